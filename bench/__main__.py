"""``python -m bench``: run the benchmarks, print medians next to their same-run baselines."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import Row, server

Benchmark = Callable[..., list[Row]]


def _registry() -> dict[str, Benchmark]:
    from . import (
        bench_console,
        bench_drain,
        bench_idle,
        bench_latency,
        bench_peers,
        bench_producers,
        bench_scale,
        bench_soak,
        bench_suspects,
        bench_webhook,
        bench_wl,
    )

    return {
        "drain": bench_drain.run,
        "latency": bench_latency.run,
        "producers": bench_producers.run,
        "scale": bench_scale.run,
        "peers": bench_peers.run,
        "idle": bench_idle.run,
        "webhook": bench_webhook.run,
        "wl": bench_wl.run,
        "console": bench_console.run,
        "suspects": bench_suspects.run,
        "soak": bench_soak.run,
    }


# Run only when named (--only soak): five minutes of faults on a server of its own.
ON_REQUEST = {"soak"}


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"


def print_table(rows: list[Row]) -> None:
    header = ["benchmark", "measure", "ours (median)", "baseline (median)", "baseline", "ratio", "target", "runs"]
    lines = [header]
    for row in rows:
        ratio = row.ratio
        lines.append(
            [
                row.benchmark,
                row.measure,
                f"{_fmt(row.ours_median)} {row.unit}",
                f"{_fmt(row.baseline_median)} {row.unit}" if row.baseline else "-",
                row.baseline_name or "-",
                f"{ratio:.2f}x" if ratio is not None else "-",
                row.target or "-",
                str(len(row.ours)),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))


def _run_isolated(benchmark: Benchmark, **options: object) -> list[Row]:
    """Run a benchmark on a server of its own (without DATABASE_URL): the idle count must not share a server
    with the load of the others, under which PostgreSQL flushes per-database counters late."""
    with server() as pg:
        return benchmark(pg, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each: checks that the suite runs")
    parser.add_argument("--repeat", type=int, default=3, help="runs per benchmark; the table shows medians (default 3)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--duration", type=float, default=None, help="soak: seconds of load and faults (default 300; 20 with --quick)")
    args = parser.parse_args(argv)
    registry = _registry()
    names = [n for n in args.only.split(",") if n] or [n for n in registry if n not in ON_REQUEST]
    unknown = set(names) - set(registry)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))} (known: {', '.join(registry)})")
    rows: list[Row] = []
    started = time.monotonic()
    with server() as pg, ThreadPoolExecutor(max_workers=1) as background:
        # The idle benchmark counts transactions and mostly waits: it runs beside the others (whose speed its
        # sleeping worker does not affect), on a server of its own, instead of adding minutes to the suite.
        idle = background.submit(_run_isolated, registry["idle"], quick=args.quick, repeat=args.repeat) if "idle" in names else None
        for name in names:
            if name == "idle":
                continue
            print(f"# {name} ...", file=sys.stderr, flush=True)
            options = {"duration": args.duration} if name == "soak" else {}
            rows.extend(registry[name](pg, quick=args.quick, repeat=args.repeat, **options))
        if idle is not None:
            print("# idle ...", file=sys.stderr, flush=True)
            rows.extend(idle.result())
    print(f"\nmachine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; {time.monotonic() - started:.0f}s\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
