"""PNG chart of speedup and peak memory of ours against each case's baseline.

    python -m bench.chart bench/results/<tag>.csv     # redraw a chart from a results CSV
"""

from __future__ import annotations

import csv
import sys
from dataclasses import fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import Row  # noqa: E402


def write_chart(rows: list[Row], path: Path) -> Path:
    ours = [r for r in rows if r.impl == "rlhf_kernels" and r.speedup is not None]
    labels = [f"{r.family}: {r.case} [{r.mode}]" for r in ours]
    baseline_mem: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if r.impl != "rlhf_kernels" and r.peak_mem_mb:
            key = (r.family, r.case, r.mode)
            baseline_mem[key] = max(baseline_mem.get(key, 0.0), r.peak_mem_mb)
    mem_ratio = [
        (r.peak_mem_mb or 0.0) / baseline_mem[(r.family, r.case, r.mode)]
        if r.peak_mem_mb is not None and baseline_mem.get((r.family, r.case, r.mode)) else float("nan")
        for r in ours
    ]
    height = max(4.0, 0.28 * len(ours) + 1.5)
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(15, height), sharey=True)
    y = range(len(ours))
    ax_speed.barh(y, [r.speedup for r in ours], color="#3465a4")
    ax_speed.set_xscale("log")
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_xlabel("speedup vs the case's baseline (x, log scale)")
    ax_speed.set_yticks(list(y), labels, fontsize=7)
    ax_speed.invert_yaxis()
    ax_mem.barh(y, mem_ratio, color="#73d216")
    ax_mem.axvline(1.0, color="black", linewidth=0.8)
    ax_mem.set_xlabel("peak memory / largest baseline's (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_from_csv(path: Path) -> list[Row]:
    kinds = {f.name: f.type for f in fields(Row)}
    rows = []
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            values = {}
            for name, text in record.items():
                if name in ("family", "case", "impl", "mode", "note"):
                    values[name] = text
                else:
                    values[name] = float(text) if text not in ("", "None") else None
            rows.append(Row(**values))
    assert set(kinds) >= set(values)
    return rows


if __name__ == "__main__":
    csv_path = Path(sys.argv[1])
    print(write_chart(rows_from_csv(csv_path), csv_path.with_suffix(".png")))
