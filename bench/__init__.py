"""Benchmarks of pg-worker against same-run baselines. Run: ./scripts/bench [--quick]."""
