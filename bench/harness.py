"""Timing, memory and ceiling measurement shared by every benchmark file.

On CUDA: times each call between CUDA events (median and 20/80 quantiles over ~100 ms of calls), peak
memory from ``torch.cuda.max_memory_allocated``, and the device's ceilings measured in the same run (a
large device-to-device copy, a large bf16 matrix product).  With ``cold_l2`` a buffer twice L2's size is
overwritten before every timed call, so inputs come from device memory.

On CPU: wall-clock medians over repeats, and peak memory as the rise of the process's peak resident set
(Linux ``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``).

Rows are written to CSV and markdown the moment they are measured (:class:`RowWriter`), so a run killed
at its time limit keeps everything it measured.
"""

from __future__ import annotations

import csv
import gc
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch


@dataclass
class Row:
    family: str
    case: str
    impl: str
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    frac_of_ceiling: float | None = None
    speedup: float | None = None  # against the case's baseline impl, same mode
    note: str = ""


# ---------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measurements may read low after reuse
        pass


def exact_rss_env(root: str | Path | None = None) -> dict[str, str]:
    """Environment for a child process whose resident-set rise should be its live memory's peak.

    A fixed mmap threshold makes glibc map every allocation of 64 KiB or more on its own and unmap it on
    free: no dynamic threshold that moves large blocks into the heap, where freed pages stay resident
    and fragmentation grows it (one CI run read 0.51x of the logits for a forward whose live peak is
    0.15x).  Two arenas keep worker threads from holding heaps of their own.  ``root`` goes first on
    ``PYTHONPATH`` so that the child imports this checkout.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))
    return env


def cpu_peak_rss_rise(fn: Callable[[], object]) -> int:
    """Bytes by which ``fn`` raises the process's peak resident set above the resident set before it.

    Results of ``fn`` are dropped before returning, but counted while alive.  Linux only.
    """
    gc.collect()
    _malloc_trim()  # return freed heap pages, else reused pages hide the function's allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = _status_bytes("VmRSS")
    out = fn()
    peak = _status_bytes("VmHWM")
    del out
    return max(0, peak - before)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Extra memory ``fn`` needs at its peak, on ``device`` (CUDA allocator or CPU resident set)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return peak - before
    return cpu_peak_rss_rise(fn)


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
def time_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    rep_ms: float = 100,
    min_reps: int = 5,
    cold_l2: bool = False,
) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) milliseconds of ``fn``.

    CUDA: CUDA events around each call; with ``cold_l2`` a buffer twice the L2's size is overwritten
    before every call (outside the timed region), so each call finds its inputs in device memory, not in
    L2.  CPU: wall clock.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_time_ms(fn, device, rep_ms, min_reps, cold_l2)
    fn()  # warm-up (and first-call costs)
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _quantiles(samples)


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


def _cuda_time_ms(
    fn: Callable[[], object], device: torch.device, rep_ms: float, min_reps: int, cold_l2: bool
) -> tuple[float, float, float]:
    flush = None
    if cold_l2:
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        flush = torch.empty(2 * l2_bytes, dtype=torch.int8, device=device)
    fn()  # warm-up: compilation, autotuning, allocator growth
    torch.cuda.synchronize(device)
    probe_start = torch.cuda.Event(enable_timing=True)
    probe_end = torch.cuda.Event(enable_timing=True)
    probe_start.record()
    for _ in range(3):
        fn()
    probe_end.record()
    torch.cuda.synchronize(device)
    estimate = max(probe_start.elapsed_time(probe_end) / 3, 1e-3)
    reps = max(min_reps, min(10_000, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ---------------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------------
@dataclass
class Ceilings:
    copy_gbps: float  # bytes read + bytes written per second, large device-to-device copy
    matmul_tflops: float | None  # large bf16 matrix product (CUDA only)


def measure_ceilings(device: torch.device | str) -> Ceilings:
    device = torch.device(device)
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    copy_gbps = 2 * n_bytes / (ms * 1e-3) / 1e9
    src = dst = None  # frees 2 buffers before the matrix product  # noqa: F841
    matmul_tflops = None
    if device.type == "cuda":
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms, _, _ = time_ms(lambda: a @ b, device)
        matmul_tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    return Ceilings(copy_gbps=copy_gbps, matmul_tflops=matmul_tflops)


# ---------------------------------------------------------------------------------------------------
# The run: collects rows, fills derived columns, writes CSV / markdown.
# ---------------------------------------------------------------------------------------------------
CSV_FIELDS = [f.name for f in fields(Row)]
MD_HEADER = (
    "| family | case | impl | mode | median ms | p20 | p80 | peak MiB | GB/s | TFLOP/s | of ceiling "
    "| speedup | note |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
)


def md_row(r: Row) -> str:
    return (
        f"| {r.family} | {r.case} | {r.impl} | {r.mode} | {r.median_ms:.3f} | {r.p20_ms:.3f} | "
        f"{r.p80_ms:.3f} | {_fmt(r.peak_mem_mb, '.1f')} | {_fmt(r.gbps, '.0f')} | "
        f"{_fmt(r.tflops, '.0f')} | {_fmt(r.frac_of_ceiling, '.0%')} | "
        f"{_fmt(r.speedup, '.2f', 'x')} | {r.note} |\n"
    )


def md_preamble(tag: str, device: torch.device, ceilings: Ceilings, cold_l2: bool) -> str:
    text = f"# Benchmark results: {tag}\n\nDevice: {device_name(device)}; torch {torch.__version__}"
    try:
        import triton

        text += f", triton {triton.__version__}"
    except ImportError:
        pass
    text += f"; cold L2: {cold_l2}.\n\nMeasured ceilings: copy {ceilings.copy_gbps:.0f} GB/s (read + write)"
    if ceilings.matmul_tflops:
        text += f", bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s"
    return text + ".\n\n"


class RowWriter:
    """Appends each row to ``<tag>.csv`` and ``<tag>.md`` the moment it is measured (files opened, written
    and closed per row), so a run stopped at any point keeps every row it measured.  With ``append`` an
    existing pair of files is continued (several processes, e.g. one per family, filling one table)."""

    def __init__(self, out_dir: Path, tag: str, preamble: str, append: bool = False) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.md_path = out_dir / f"{tag}.csv", out_dir / f"{tag}.md"
        if not (append and self.csv_path.exists() and self.csv_path.stat().st_size > 0):
            with open(self.csv_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writeheader()
        if not (append and self.md_path.exists() and self.md_path.stat().st_size > 0):
            self.md_path.write_text(preamble + MD_HEADER)

    def write(self, row: Row) -> None:
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(asdict(row))
        with open(self.md_path, "a") as f:
            f.write(md_row(row))


def read_rows(csv_path: Path) -> list[Row]:
    """The rows of a results CSV (e.g. written by several processes), for the chart."""
    rows = []
    with open(csv_path, newline="") as f:
        for record in csv.DictReader(f):
            values = {}
            for spec in fields(Row):
                text = record.get(spec.name, "")
                if spec.name in ("family", "case", "impl", "mode", "note"):
                    values[spec.name] = text
                else:
                    values[spec.name] = float(text) if text not in ("", "None") else None
            rows.append(Row(**values))
    return rows


@dataclass
class Bench:
    device: torch.device
    ceilings: Ceilings
    cold_l2: bool = False
    quick: bool = False
    rows: list[Row] = field(default_factory=list)
    writer: RowWriter | None = None  # each row is written as soon as it is measured
    compile_baselines: bool = True  # False: with_compiled adds no torch.compile peers

    def measure(
        self,
        family: str,
        case: str,
        impl: str,
        mode: str,
        fn: Callable[[], object],
        *,
        bytes_moved: int | None = None,
        flops: int | None = None,
        memory: bool = True,
        baseline: str | None = None,
        note: str = "",
    ) -> Row:
        """Times ``fn`` (and its peak memory); ``bytes_moved``/``flops`` are the minimal traffic/work,
        giving GB/s or TFLOP/s and the fraction of the measured ceiling.  ``baseline`` names the impl
        whose same-mode row this one's speedup is relative to."""
        rep = 40 if self.quick else 100
        med, p20, p80 = time_ms(fn, self.device, rep_ms=rep, cold_l2=self.cold_l2)
        row = Row(family, case, impl, mode, med, p20, p80, note=note)
        if memory:
            row.peak_mem_mb = peak_memory_bytes(fn, self.device) / 2**20
        if bytes_moved is not None:
            row.gbps = bytes_moved / (med * 1e-3) / 1e9
            row.frac_of_ceiling = row.gbps / self.ceilings.copy_gbps
        if flops is not None:
            row.tflops = flops / (med * 1e-3) / 1e12
            if self.ceilings.matmul_tflops:
                row.frac_of_ceiling = row.tflops / self.ceilings.matmul_tflops
        if baseline is not None:
            for other in self.rows:
                if (other.family, other.case, other.impl, other.mode) == (family, case, baseline, mode):
                    row.speedup = other.median_ms / med
        self.rows.append(row)
        if self.writer is not None:
            self.writer.write(row)
        print(_format_row(row), flush=True)
        return row

    def write(self, out_dir: Path, tag: str) -> tuple[Path, Path]:
        """Writes every row at once (runs without a :class:`RowWriter`)."""
        writer = RowWriter(out_dir, tag, md_preamble(tag, self.device, self.ceilings, self.cold_l2))
        for row in self.rows:
            writer.write(row)
        return writer.csv_path, writer.md_path


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def _format_row(r: Row) -> str:
    parts = [f"{r.family:>10} {r.case:<34} {r.impl:<26} {r.mode:<7} {r.median_ms:9.3f} ms"]
    if r.peak_mem_mb is not None:
        parts.append(f"{r.peak_mem_mb:9.1f} MiB")
    if r.gbps is not None:
        parts.append(f"{r.gbps:7.0f} GB/s")
    if r.tflops is not None:
        parts.append(f"{r.tflops:6.0f} TFLOP/s")
    if r.frac_of_ceiling is not None:
        parts.append(f"{r.frac_of_ceiling:5.0%} of ceiling")
    if r.speedup is not None:
        parts.append(f"{r.speedup:6.2f}x")
    return "  ".join(parts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_tag(device: torch.device) -> str:
    """File-name tag: e.g. ``nvidia-h100-80gb-hbm3-2026-11-20`` or ``cpu-2core-2026-11-20``."""
    import os

    if device.type == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    else:
        name = f"cpu-{os.cpu_count()}core"
    return f"{name}-{time.strftime('%Y-%m-%d')}"


# Shared by the loss families' benchmarks.
def measure_loss_modes(bench: Bench, family: str, case: str, impl: str, fn, x: torch.Tensor,
                       bytes_per_token: tuple[int, int], baseline: str | None) -> None:
    """Times ``fn(x)`` (a 0-dim loss) forward only and forward+backward."""
    x = x.detach().requires_grad_()
    fwd_bytes, bwd_bytes = (b * x.numel() for b in bytes_per_token)

    def forward():
        with torch.no_grad():
            return fn(x)

    def fwd_bwd():
        x.grad = None
        fn(x).backward()

    bench.measure(family, case, impl, "fwd", forward, bytes_moved=fwd_bytes, baseline=baseline)
    bench.measure(family, case, impl, "fwd+bwd", fwd_bwd, bytes_moved=fwd_bytes + bwd_bytes,
                  baseline=baseline)
    x.grad = None


def measure_head_loss_modes(bench: Bench, family: str, case: str, impl: str, fn, inputs: tuple,
                            flops_fwd: int, flops_fwd_bwd: int, baseline: str | None,
                            fwd: bool = True) -> Row:
    """Times ``fn(hidden, weight, *rest)`` (a 0-dim loss from an lm_head's inputs) forward only (unless
    ``fwd`` is False) and forward+backward with gradients to hidden and weight; returns the fwd+bwd row."""
    hidden, weight, *rest = inputs
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(h, w, *rest)

    def fwd_bwd():
        h.grad = w.grad = None
        fn(h, w, *rest).backward()

    if fwd:
        bench.measure(family, case, impl, "fwd", forward, flops=flops_fwd, baseline=baseline)
    row = bench.measure(family, case, impl, "fwd+bwd", fwd_bwd, flops=flops_fwd_bwd, baseline=baseline)
    h.grad = w.grad = None
    return row


def with_compiled(bench: Bench, impls: dict) -> dict:
    """Adds torch.compile of each eager peer (skipped with --quick on CPU, where compiling dominates, and
    with ``--compile-baselines none``)."""
    if (bench.device.type == "cpu" and bench.quick) or not bench.compile_baselines:
        return impls
    out = dict(impls)
    for name, fn in impls.items():
        out[f"torch.compile({name})"] = torch.compile(fn)
    return out
