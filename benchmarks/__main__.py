"""Run the benchmark suites and write tables: `python -m benchmarks [-k EXPR] [--quick] [--cpu-time] [--out DIR] [bench_file ...]`.

``--quick`` (make gpu-check): 3 rounds, at most 0.05 s per benchmark, no warm-up rounds beyond the
one every benchmark makes before its memory probe. For each run, under benchmarks/results/ (or ``--out``): <stamp>.json (pytest-benchmark's raw
data), <stamp>.md (one table per group: median, quartiles, speed-up over the
group's baseline, GB/s or GFLOP/s, peak memory) and <stamp>.png (speed-ups).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import subprocess
import sys
from collections import defaultdict

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _rate(extra: dict, median_s: float) -> str:
    if "flops" in extra:
        return f"{extra['flops'] / median_s / 1e9:.1f} GFLOP/s"
    if "bytes" in extra:
        return f"{extra['bytes'] / median_s / 1e9:.2f} GB/s"
    return ""


def tables(data: dict) -> tuple[str, dict[str, dict[str, float]]]:
    """Markdown tables per group and the speed-ups {group: {provider: ratio}}."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    lines, speedups = [], {}
    for group in sorted(groups):
        rows = groups[group]
        base = [r for r in rows if r["extra_info"].get("baseline")]
        base_median = base[0]["stats"]["median"] if base else None
        lines += [f"### {group}", "", "| provider | median ms | q1–q3 ms | vs baseline | rate | peak MB |",
                  "|---|---:|---:|---:|---:|---:|"]
        speedups[group] = {}
        for r in sorted(rows, key=lambda r: r["stats"]["median"], reverse=True):
            st, ex = r["stats"], r["extra_info"]
            ratio = base_median / st["median"] if base_median else float("nan")
            speedups[group][ex.get("provider", r["name"])] = ratio
            peak = ex.get("peak_mem_bytes")
            peak_s = f"{peak / 2**20:.1f}" if isinstance(peak, (int, float)) and peak >= 0 else "n/a"
            lines.append(f"| {ex.get('provider', r['name'])}{' (baseline)' if ex.get('baseline') else ''} | "
                         f"{st['median'] * 1e3:.3f} | {st['q1'] * 1e3:.3f}–{st['q3'] * 1e3:.3f} | {ratio:.2f}× | "
                         f"{_rate(ex, st['median'])} | {peak_s} |")
        lines.append("")
    return "\n".join(lines), speedups


def plot(speedups: dict[str, dict[str, float]], path: pathlib.Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels, values = [], []
    for group, by_provider in speedups.items():
        for provider, ratio in by_provider.items():
            if ratio == ratio and ratio != 1.0:
                labels.append(f"{group} · {provider}")
                values.append(ratio)
    if not values:
        return
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(values) + 1))
    ax.barh(labels, values)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over baseline (median time ratio)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("files", nargs="*", help="bench_*.py files (default: all)")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--quick", action="store_true", help="3 rounds, <= 0.05 s per benchmark")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time (time.process_time) instead of the wall clock: other "
                             "jobs on a shared machine then barely change the figures; it sums every thread (spinning "
                             "ones too), so use it with OMP_NUM_THREADS=1")
    args = parser.parse_args(argv)
    results = pathlib.Path(args.out) if args.out else RESULTS
    here = pathlib.Path(__file__).resolve().parent
    files = args.files or sorted(str(p) for p in here.glob("bench_*.py"))
    results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M") + (f"_{args.tag}" if args.tag else "")
    raw = results / f"{stamp}.json"
    timing = ["--benchmark-min-rounds=3", "--benchmark-max-time=0.05"] if args.quick else \
        ["--benchmark-min-rounds=5", "--benchmark-max-time=0.5"]
    if args.cpu_time:
        timing.append("--benchmark-timer=time.process_time")
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw}", *timing]
    if args.k:
        cmd += ["-k", args.k]
    code = subprocess.call(cmd)
    if not raw.exists():
        return code or 1
    data = json.loads(raw.read_text())
    md, speedups = tables(data)
    info = data.get("machine_info", {})
    rows = data["benchmarks"]
    run_info = rows[0]["extra_info"] if rows else {}
    header = (f"# Benchmarks {stamp}\n\nMachine: {run_info.get('cpu_model', '?')}, ISA {run_info.get('isa', '?')}, "
              f"{run_info.get('threads', '?')} threads of {info.get('cpu', {}).get('count', '?')} logical CPUs; "
              f"torch {run_info.get('torch', '?')}, triton {run_info.get('triton', '?')}, "
              f"python {info.get('python_version', '?')}; timer: "
              f"{'CPU time (process_time)' if args.cpu_time else 'wall clock'}.\n"
              f"Command: `python -m benchmarks {' '.join(argv or sys.argv[1:])}`\n\n")
    (results / f"{stamp}.md").write_text(header + md)
    plot(speedups, results / f"{stamp}.png")
    print(header + md)
    return code


if __name__ == "__main__":
    sys.exit(main())
