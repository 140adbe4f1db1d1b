"""Several runs of one benchmark, summarised: per case, the median over the runs of each implementation's
median time and of the speedup (each run's own baseline / ours ratio), with the speedup's range.

    python -m bench.runs_summary bench/results/<folder>/1thread-run*.csv [--baseline verl] [--ours NAME]

On a shared 2-core machine one run's medians move single rows by 10-30 % between runs; the median of the
per-run ratios and their range say how far a single figure can be trusted.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from .harness import read_rows

Summary = tuple[str, float, float, float, float, float]


def summarize(paths: list[Path], baseline: str, ours: str) -> list[Summary]:
    """(case, baseline ms, ours ms, median speedup, lowest, highest) per case present in every run."""
    runs = [{(row.case, row.impl): row.median_ms for row in read_rows(path)} for path in paths]
    cases = [case for case, impl in runs[0] if impl == ours and all((case, baseline) in r for r in runs)]
    out = []
    for case in cases:
        base = [run[(case, baseline)] for run in runs]
        mine = [run[(case, ours)] for run in runs]
        ratios = [b / o for b, o in zip(base, mine)]
        out.append((case, statistics.median(base), statistics.median(mine), statistics.median(ratios),
                    min(ratios), max(ratios)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", type=Path, help="the runs' CSV files (bench/harness.py RowWriter)")
    parser.add_argument("--baseline", default="verl")
    parser.add_argument("--ours", default="rlhf_kernels")
    args = parser.parse_args()
    print(f"{len(args.csv)} runs; medians over the runs\n")
    print(f"| case | {args.baseline} ms | ours ms | speedup | range |")
    print("|---|---:|---:|---:|---|")
    for case, base, mine, ratio, low, high in summarize(args.csv, args.baseline, args.ours):
        print(f"| {case} | {base:.1f} | {mine:.2f} | {ratio:.1f}x | {low:.1f}-{high:.1f}x |")


if __name__ == "__main__":
    main()
