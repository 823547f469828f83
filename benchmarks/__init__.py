"""Benchmark suites (pytest-benchmark) and the runner `python -m benchmarks`."""
