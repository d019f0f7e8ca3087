"""A graceful stop is not a crash (issue 18 item 4): deliveries that deploys cut short (handed back, or left to
a sync thread that shutdown had to abandon) never count towards the poison limit nor as attempts."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pg_worker
from helpers import dlq_messages, wait_until
from pg_worker import Producer
from test_resilience import WorkerProcess, _wait_for_marker


async def test_three_rolling_deploys_never_dead_letter_a_healthy_long_sync_job(db_url: str, tmp_path: Path, producer: Producer) -> None:
    await pg_worker.install(db_url, ["slow"])
    msg_id = producer.enqueue("slow", {"seconds": 4})
    processes: list[WorkerProcess] = []
    outputs: list[str] = []
    try:
        for deploy in range(1, 4):
            # each deploy: a new worker takes the job over (after the old one's lease ended), then gets SIGTERM
            # while the job's thread runs; the grace period is shorter than the job, so the thread is abandoned
            worker = WorkerProcess(db_url, tmp_path, PGW_TEST_VT="2", PG_WORKER_SHUTDOWN_GRACE="0.2")
            processes.append(worker)
            await _wait_for_marker(worker, "started", deploy, limit=30)
            worker.proc.send_signal(signal.SIGTERM)
            code, output = await asyncio.to_thread(worker.wait)
            assert code == 0, output
            assert '"event": "sync_jobs_abandoned"' in output
            outputs.append(output)
        last = WorkerProcess(db_url, tmp_path, PGW_TEST_VT="2")
        processes.append(last)

        async def settled() -> bool:
            return bool(last.markers("done")) or last.proc.poll() is not None or bool(await dlq_messages(db_url, "slow"))

        await wait_until(settled, timeout=40, interval=0.1, what="the job's fourth run to finish (or its dead letter)")
        last.proc.send_signal(signal.SIGTERM)
        code, output = await asyncio.to_thread(last.wait)
        assert code == 0, output
        outputs.append(output)
    finally:
        for process in processes:
            process.kill()
    assert await dlq_messages(db_url, "slow") == [], "not dead-lettered as killed_worker"
    assert not any('"event": "suspect_running"' in output for output in outputs), "not even a poison suspect"
    # started-<msg_id>-<attempt>-<pid>: four runs, each still attempt 1 (a deploy's cut is not an attempt)
    assert [m.split("-")[1:3] for m in last.markers("started")] == [[str(msg_id), "1"]] * 4
    assert len(last.markers("done")) == 1
    assert all('"event": "jobs_abandoned"' in output for output in outputs[:3]), "each deploy recorded its cut"
