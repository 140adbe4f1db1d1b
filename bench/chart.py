"""PNG chart of speedup and peak memory against each case's baseline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import Row  # noqa: E402


def write_chart(rows: list[Row], path: Path) -> Path:
    ours = [r for r in rows if r.impl == "rlhf_kernels" and r.speedup is not None]
    labels = [f"{r.family}\n{r.case}\n{r.mode}" for r in ours]
    baseline_mem = {}
    for r in rows:
        if r.impl != "rlhf_kernels" and r.peak_mem_mb:
            key = (r.family, r.case, r.mode)
            baseline_mem[key] = max(baseline_mem.get(key, 0.0), r.peak_mem_mb)
    fig, (ax_speed, ax_mem) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(ours)), 9))
    ax_speed.bar(range(len(ours)), [r.speedup for r in ours], color="#3465a4")
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_ylabel("speedup vs baseline (x)")
    ax_speed.set_xticks(range(len(ours)), labels, fontsize=7)
    ratios = [
        (r.peak_mem_mb or 0.0) / baseline_mem[(r.family, r.case, r.mode)]
        if baseline_mem.get((r.family, r.case, r.mode)) else 0.0
        for r in ours
    ]
    ax_mem.bar(range(len(ours)), ratios, color="#73d216")
    ax_mem.axhline(1.0, color="black", linewidth=0.8)
    ax_mem.set_ylabel("peak memory / largest baseline's")
    ax_mem.set_xticks(range(len(ours)), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
