"""The static sm_90 check (issue 13): every Triton kernel compiled for H100/H200 without a GPU.

``python -m bench.static --ci --check`` records the launches of the CI subset of cases (public ops on fake
CUDA tensors of real shapes, see bench/static/workloads.py), compiles each distinct specialisation for
sm_90 with triton.compile and fails when one spills, exceeds its register budget
(bench/static/budgets.py), fails to compile, or when a kernel in rlhf_kernels.ops is launched by no case.
It runs in a subprocess without TRITON_INTERPRET (this process interprets) and caches nothing.  The CI
subset (``Case.ci``, 43 specialisations, 1-2 minutes on 2 cores): each kernel in its main dtype (fp32
or bf16), every fused-head variant, the ranking kernels at K = 64, the policy-loss variants with the
most registers, token statistics with and without top-k; ``python -m bench.static`` compiles all 95.

The other tests check the arithmetic the report rests on and the GPU smoke selection's patterns.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.static import sm90
from bench.static.sweep import balanced_splits

ROOT = Path(__file__).resolve().parents[1]


def test_ci_subset_compiles_for_sm90_without_spills_within_budgets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.static", "--ci", "--check", "--jobs", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert "static check passed" in result.stdout


@pytest.mark.parametrize(
    "regs, warps, shared, ctas, limiter",
    [
        (255, 8, 96 * 1024, 1, "registers"),  # the fused head: 8 warps × 255 → 8 warps per SM
        (128, 8, 96 * 1024, 2, "registers = shared memory"),  # 16 warps by registers; (96 + 1) KiB × 2
        (64, 8, 0, 4, "registers"),  # 32 warps per SM
        (63, 8, 32, 4, "registers"),  # 63 × 32 = 2016 rounds up to 2048 per warp
        (65, 8, 0, 3, "registers"),  # 2304 per warp: 28 warps → 3 CTAs
        (32, 4, 0, 16, "registers = threads"),  # 64 warps by either
        (32, 1, 0, 32, "CTA slots"),
        (32, 4, 100 * 1024, 2, "shared memory"),  # (100 + 1) KiB per CTA of 228 KiB
        (32, 4, 228 * 1024, 0, "does not fit"),  # over the 227 KiB a CTA may have
    ],
)
def test_occupancy_model(regs, warps, shared, ctas, limiter):
    got = sm90.occupancy(regs, warps, shared)
    assert (got.ctas_per_sm, got.warps_per_sm, got.limiter) == (ctas, ctas * warps, limiter)


def test_waves():
    assert sm90.waves(528, 4) == (1.0, 1.0)
    waves, last = sm90.waves(1024, 1)  # the fused head at N = 16384: 1024 programs, 1 CTA per SM
    assert waves == pytest.approx(1024 / 132) and last == pytest.approx((1024 - 7 * 132) / 132)


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
        "ptxas info    : Function properties for _k\n"
        "    208 bytes stack frame, 196 bytes spill stores, 204 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 98304 bytes smem\n"
    )
    assert sm90.parse_ptxas_log(log) == (255, 196, 204, 208)
    assert sm90.parse_ptxas_log("ptxas info    : Used 40 registers, used 0 barriers") == (40, 0, 0, 0)
    with pytest.raises(ValueError, match="no register count"):
        sm90.parse_ptxas_log("")


def test_balanced_splits_fill_the_waves():
    # V = 151936 in 128-wide tiles is 1187 tiles; 128 row blocks on 132 slots: 33 splits of 36 tiles give
    # 4224 programs = 32 full waves.
    assert balanced_splits(128, 1187, 132) == (33, 36)
    for row_blocks in (4, 16, 32, 64, 128, 256):
        splits, per = balanced_splits(row_blocks, 1187, 132)
        assert 8 <= splits <= 64 and splits * per >= 1187 and (splits - 1) * per < 1187


def test_row_writer_keeps_every_row_as_it_is_measured(tmp_path):
    import torch

    from bench.harness import Bench, Ceilings, RowWriter, md_preamble

    device = torch.device("cpu")
    ceilings = Ceilings(copy_gbps=10.0, matmul_tflops=None)
    writer = RowWriter(tmp_path, "t", md_preamble("t", device, ceilings, False))
    bench = Bench(device=device, ceilings=ceilings, quick=True, writer=writer)
    bench.measure("fam", "case", "impl", "fwd", lambda: None, memory=False)
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 2  # header + the row, already on disk
    assert (tmp_path / "t.md").read_text().count("| fam | case | impl | fwd |") == 1
    second = Bench(
        device=device, ceilings=ceilings, quick=True, writer=RowWriter(tmp_path, "t", "ignored", append=True)
    )
    second.measure("fam2", "case", "impl", "fwd", lambda: None, memory=False)
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 3
    assert "ignored" not in (tmp_path / "t.md").read_text()


def test_runs_summary_takes_medians_over_runs_of_per_run_ratios(tmp_path):
    """bench.runs_summary on three runs written by the harness's RowWriter: the median of each side's
    times, the median and range of the per-run ratios (not the ratio of the medians), and only cases
    that every run has on both sides."""
    from bench.harness import Row, RowWriter
    from bench.runs_summary import summarize

    times = {"a": [(10.0, 2.0), (30.0, 3.0), (12.0, 4.0)], "b": [(8.0, 1.0), (8.0, 2.0), (8.0, 4.0)]}
    paths = []
    for run in range(3):
        writer = RowWriter(tmp_path, f"run{run}", "")
        for case, pairs in times.items():
            base, ours = pairs[run]
            writer.write(Row("fam", case, "verl", "fwd", base, base, base))
            writer.write(Row("fam", case, "rlhf_kernels", "fwd", ours, ours, ours))
        if run == 0:
            writer.write(Row("fam", "only-in-run-0", "rlhf_kernels", "fwd", 1.0, 1.0, 1.0))
        paths.append(tmp_path / f"run{run}.csv")
    summary = {case: rest for case, *rest in summarize(paths, "verl", "rlhf_kernels")}
    assert set(summary) == {"a", "b"}
    # a: ratios 5, 10, 3 -> median 5 (the ratio of the medians, 12 / 3 = 4, would differ)
    assert summary["a"] == [12.0, 3.0, 5.0, 3.0, 10.0]
    assert summary["b"] == [8.0, 2.0, 4.0, 2.0, 8.0]


def test_family_time_limit_interrupts_and_clears():
    from bench.__main__ import FamilyTimeout, time_limit

    start = time.monotonic()
    with pytest.raises(FamilyTimeout):
        with time_limit(0.2):
            while True:
                time.sleep(0.01)
    assert time.monotonic() - start < 5
    with time_limit(0.2):
        pass
    time.sleep(0.3)  # the timer was cleared: nothing fires here


def test_gpu_smoke_patterns_name_existing_tests():
    """Each pattern's file exists and defines its test function (a rename must update the selection)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import gpu_smoke
    finally:
        sys.path.pop(0)
    for pattern in gpu_smoke.SMOKE:
        path, name = pattern.split("::")
        source = (ROOT / path).read_text()
        function = name.split("[")[0]
        assert re.search(rf"^def {function}\(", source, re.M), f"{pattern}: no {function} in {path}"
    assert gpu_smoke.matches("tests/t.py::f[a-37]", "tests/t.py::f[*-37]")
    assert not gpu_smoke.matches("tests/t.py::f[a-370]", "tests/t.py::f[*-37]")
    assert not gpu_smoke.matches("tests/t.py::f[3]", "tests/t.py::f[*-37]")
