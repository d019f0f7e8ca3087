"""``python -m bench.ab REF [REF ...]``: the drain probe, A/B between versions of pg-worker, each in its own venv.

Each REF (a git commit, branch or tag; or ``WORKTREE`` for the uncommitted working tree) is exported with
``git archive``, installed (not editable) into a virtualenv of its own under ``.cache/bench-ab/`` with the pinned
``requirements/constraints.txt``, and run as ``<venv>/bin/pg-worker run`` from a directory that holds only the
probe's app. Nothing of the repository is on the worker's ``sys.path`` (no ``PYTHONPATH``, no repository
working directory): the round-2 A/B passed ``PYTHONPATH`` to the suite, whose ``start_workers`` then replaced it
with the repository root, so "old" and "new" both ran the new code. To prove what ran, every worker process
writes ``pg_worker.__file__`` and a digest of the package's ``.py`` files; the harness compares them with the
venv and with the digest of the exported source, and refuses the run if they differ.

The probe (issue 18, item 8): ``COUNT`` no-op jobs are queued, then ``pg-worker run`` starts (default settings,
a no-op ``async def`` handler); the clock runs from the process spawn until the queue table is empty
("including start-up"), and from the first handler call until empty ("excluding start-up"). Before each worker
run the raw loop (``pgmq.read`` 100 + ``pgmq.delete`` of those ids, one connection, psycopg) drains the same
number of jobs on the same server: each run's ratio is against the raw run just before it. Rounds alternate the
order of the versions; the report gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from .bench_drain import empty, fill, raw_loop
from .common import Server, server

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench-ab"
WORKTREE = "WORKTREE"

# The probe's app, written next to nothing else. It reports which pg_worker it imported (file and a digest of
# the package's sources) and when the first job reached the handler.
APP_SOURCE = '''\
import hashlib, json, os, time
from pathlib import Path

import pg_worker
from pg_worker import App


def _digest(package_dir):
    h = hashlib.sha256()
    for path in sorted(Path(package_dir).rglob("*.py")):
        h.update(path.relative_to(package_dir).as_posix().encode() + b"\\0" + path.read_bytes() + b"\\0")
    return h.hexdigest()


_OUT = Path(os.environ["AB_OUT"])
(_OUT / f"{os.getpid()}.json").write_text(json.dumps({
    "pid": os.getpid(),
    "pg_worker_file": pg_worker.__file__,
    "digest": _digest(Path(pg_worker.__file__).parent),
}))

app = App()
_first = []


@app.handler("jobs")
async def noop(job):
    if not _first:
        _first.append(time.time())
        (_OUT / f"{os.getpid()}.first").write_text(f"{_first[0]!r} {time.process_time()!r}")
'''


def package_digest(package_dir: Path) -> str:
    """The same digest the probe's app computes in the worker process."""
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        h.update(path.relative_to(package_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class Variant:
    ref: str
    label: str
    key: str  # commit hash, or "worktree"
    venv: Path
    digest: str  # of the pg_worker sources installed
    incl: list[float] = field(default_factory=list)  # jobs/s including start-up
    excl: list[float] = field(default_factory=list)  # jobs/s excluding start-up
    raw: list[float] = field(default_factory=list)  # the raw loop run just before each of ours
    startup: list[float] = field(default_factory=list)  # seconds from spawn to the first handler call
    cpu_us: list[float] = field(default_factory=list)  # the worker process's CPU time per job (start-up included)
    cpu_drain_us: list[float] = field(default_factory=list)  # the same from the first job on (start-up excluded)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def pg_worker(self) -> Path:
        return self.venv / "bin" / "pg-worker"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _export(ref: str, dest: Path) -> None:
    """pg-worker/ of ``ref`` (or of the working tree) into ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    if ref == WORKTREE:
        shutil.copytree(ROOT / "pg-worker", dest / "pg-worker", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests"))
        shutil.copytree(ROOT / "requirements", dest / "requirements")
        return
    dest.mkdir(parents=True)
    data = subprocess.run(["git", "archive", "--format=tar", ref, "pg-worker", "requirements"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def _quiet(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise RuntimeError(f"failed ({done.returncode}): {' '.join(command)}")


def prepare(ref: str) -> Variant:
    """Export ``ref`` and install it into its own venv (reused while the sources are the same)."""
    key = "worktree" if ref == WORKTREE else _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    label = "worktree" if ref == WORKTREE else key[:9] if key.startswith(ref) else f"{ref} ({key[:9]})"
    home = CACHE / key
    src = home / "src"
    _export(ref, src)
    digest = package_digest(src / "pg-worker" / "src" / "pg_worker")
    venv = home / "venv"
    stamp = home / "installed.digest"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if not stamp.exists() or stamp.read_text() != digest:
        print(f"# installing {label} into {venv}", file=sys.stderr, flush=True)
        constraints = src / "requirements" / "constraints.txt"
        env = {**os.environ, "PIP_CONSTRAINT": str(constraints)}
        env.pop("PYTHONPATH", None)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
        # pg-worker itself always afresh; its dependencies separately (and only once): --force-reinstall must
        # not rebuild every pinned wheel.
        _quiet([*pip, "--force-reinstall", "--no-cache-dir", "--no-deps", str(src / "pg-worker")], env)
        _quiet([*pip, str(src / "pg-worker")], env)
        stamp.write_text(digest)
    return Variant(ref, label, key, venv, digest)


def _worker_env(url: str, out: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_WORKER_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({"DATABASE_URL": url, "PG_WORKER_METRICS_PORT": "0", "AB_OUT": str(out)})
    return env


def _check_ran(variant: Variant, out: Path, pid: int) -> None:
    marker = out / f"{pid}.json"
    if not marker.exists():
        raise RuntimeError(f"{variant.label}: the worker process wrote no marker ({marker}); see {out / 'worker.log'}")
    seen = json.loads(marker.read_text())
    site = variant.venv.resolve()
    if not Path(seen["pg_worker_file"]).resolve().is_relative_to(site):
        raise RuntimeError(f"{variant.label}: the worker imported {seen['pg_worker_file']}, not the venv {site}")
    if seen["digest"] != variant.digest:
        raise RuntimeError(f"{variant.label}: the worker ran pg_worker sources with digest {seen['digest'][:12]}, expected {variant.digest[:12]}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux): less disturbed by a busy machine than wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_run(variant: Variant, pg: Server, count: int, workdir: Path) -> tuple[float, float, float, float, float]:
    """Jobs/s including start-up and excluding it, start-up seconds, and the worker's CPU us per job including
    and excluding start-up, for one ``pg-worker run``."""
    with pg.database(["jobs"], install=False) as url:
        out = Path(tempfile.mkdtemp(prefix="ab-", dir=workdir))
        (out / "ab_probe_app.py").write_text(APP_SOURCE)
        env = _worker_env(url, out)
        subprocess.run([str(variant.pg_worker), "install", "--queue", "jobs"], cwd=out, env=env, check=True, capture_output=True)
        fill(url, count)
        with open(out / "worker.log", "wb") as log, psycopg.connect(url, autocommit=True) as conn:
            started = time.time()
            proc = subprocess.Popen([str(variant.pg_worker), "run", "ab_probe_app:app"], cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 300
                while not empty(conn):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{variant.label}: the worker exited with {proc.returncode}; see {out / 'worker.log'}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{variant.label}: the queue was not drained in 300 s")
                    time.sleep(0.01)
                ended = time.time()
                cpu = _cpu_seconds(proc.pid)
            finally:
                proc.terminate()
                proc.wait(60)
        _check_ran(variant, out, proc.pid)
        first, cpu_first = (float(x) for x in (out / f"{proc.pid}.first").read_text().split())
        shutil.rmtree(out)
    return count / (ended - started), count / (ended - first), first - started, cpu / count * 1e6, (cpu - cpu_first) / count * 1e6


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(variants: list[Variant], count: int) -> str:
    lines = [
        f"drain probe: {count:,} queued no-op jobs, `pg-worker run` (default settings) vs raw pgmq.read 100 + delete; "
        f"medians of {len(variants[0].incl)} alternating rounds",
        "",
        "| version | incl. start-up | ratio to raw | excl. start-up | ratio to raw | start-up | worker CPU per job incl. / excl. start-up | raw loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        ratio_incl = _median([a / r for a, r in zip(v.incl, v.raw, strict=True)])
        ratio_excl = _median([a / r for a, r in zip(v.excl, v.raw, strict=True)])
        lines.append(
            f"| {v.label} | {_median(v.incl):,.0f} jobs/s | {ratio_incl:.2f}x | {_median(v.excl):,.0f} jobs/s | {ratio_excl:.2f}x "
            f"| {_median(v.startup):.2f} s | {_median(v.cpu_us):.1f} / {_median(v.cpu_drain_us):.1f} us | {_median(v.raw):,.0f} jobs/s |"
        )
    lines.append("")
    for v in variants:
        runs = ", ".join(f"{a / r:.2f}/{b / r:.2f}" for a, b, r in zip(v.incl, v.excl, v.raw, strict=True))
        lines.append(f"{v.label}: per-round ratios incl/excl: {runs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("refs", nargs="+", metavar="REF", help=f"git commits/branches to compare, or {WORKTREE} for the working tree")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    parser.add_argument("--count", type=int, default=50_000, help="jobs per run (default 50,000)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = parser.parse_args(argv)
    variants = [prepare(ref) for ref in args.refs]
    with server() as pg, tempfile.TemporaryDirectory(prefix="pgw-ab-") as tmp:
        for round_ in range(args.rounds):
            # Rotate the order each round, so no version always runs first (or right after another).
            order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for v in order:
                with pg.database(["jobs"]) as url:
                    raw = raw_loop(url, args.count)
                incl, excl, startup, cpu_us, cpu_drain_us = worker_run(v, pg, args.count, Path(tmp))
                v.raw.append(raw)
                v.incl.append(incl)
                v.excl.append(excl)
                v.startup.append(startup)
                v.cpu_us.append(cpu_us)
                v.cpu_drain_us.append(cpu_drain_us)
                print(
                    f"# round {round_ + 1} {v.label}: raw {raw:,.0f}/s; worker {incl:,.0f}/s incl ({incl / raw:.2f}x), "
                    f"{excl:,.0f}/s excl ({excl / raw:.2f}x), start-up {startup:.2f} s, CPU {cpu_us:.1f} us/job ({cpu_drain_us:.1f} excl. start-up)",
                    file=sys.stderr,
                    flush=True,
                )
    print(report(variants, args.count))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in vars(v).items() if k != "venv"} for v in variants], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
