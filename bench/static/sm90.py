"""Compiles recorded launches for sm_90 (H100/H200) without a GPU and models their occupancy.

``compile_launch`` runs ``triton.compile`` on exactly the specialisation a native launch would build
(:func:`record.specialise`), for ``GPUTarget("cuda", 90, 32)`` (Triton emits sm_90a), in a process
without ``TRITON_INTERPRET``.  Triton's ptxas log (``TRITON_DUMP_PTXAS_LOG=1``) gives the registers
per thread and the spill stores/loads; the compiled metadata gives the shared memory per CTA.  The
cache directory is a fresh temporary one, so every run really compiles (a cache hit skips ptxas).

Occupancy model for sm_90 (CUDA's occupancy calculator, simplified): 65536 registers per SM allocated
per warp in units of 256 (registers per thread × 32, rounded up), at most 2048 threads, 32 CTAs and
228 KiB of shared memory per SM (227 KiB per CTA, plus 1 KiB the driver reserves per CTA).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

SMS = 132  # H100 SXM and H200
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA = 227 * 1024
SMEM_RESERVED_PER_CTA = 1024


@dataclass(frozen=True)
class Occupancy:
    ctas_per_sm: int
    warps_per_sm: int
    limiter: str  # "registers", "threads", "shared memory", "CTA slots" (" = "-joined ties), "does not fit"


def occupancy(regs: int, num_warps: int, shared: int) -> Occupancy:
    """Resident CTAs and warps per SM of a kernel using ``regs`` registers per thread."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (REGS_PER_SM // regs_per_warp) // num_warps,
        "threads": MAX_THREADS_PER_SM // (num_warps * 32),
        "shared memory": SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA) if shared <= SMEM_PER_CTA else 0,
        "CTA slots": MAX_CTAS_PER_SM,
    }
    ctas = min(limits.values())
    limiter = " = ".join(k for k, v in limits.items() if v == ctas)  # every limit that binds
    return Occupancy(ctas, ctas * num_warps, limiter if ctas else "does not fit")


def waves(programs: int, ctas_per_sm: int, sms: int = SMS) -> tuple[float, float]:
    """(waves, fill of the last wave): programs over the CTA slots of ``sms`` SMs."""
    slots = max(ctas_per_sm, 1) * sms
    full, rest = divmod(programs, slots)
    return programs / slots, (rest / slots if rest else 1.0)


@dataclass
class Compiled:
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    num_warps: int
    num_stages: int
    seconds: float
    ptxas: str  # the log's lines about this kernel


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from ``ptxas -v``."""
    used = _USED.search(log)
    if used is None:
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    spill = _SPILL.search(log)
    stack = _STACK.search(log)
    return (
        int(used.group(1)),
        int(spill.group(1)) if spill else 0,
        int(spill.group(2)) if spill else 0,
        int(stack.group(1)) if stack else 0,
    )


def prepare_environment() -> None:
    """Process settings for compiling: no interpreter, ptxas log on, always compile (a cache hit would skip
    ptxas and its log) into a temporary cache removed at exit, FP fusion as Triton's default."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compiling for sm_90 needs a process without TRITON_INTERPRET")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cache = tempfile.mkdtemp(prefix="rlhf-static-triton-")
    os.environ["TRITON_CACHE_DIR"] = cache
    atexit.register(shutil.rmtree, cache, ignore_errors=True)


def compile_launch(launch) -> Compiled:
    """Compiles ``launch`` (a :class:`record.Launch`) for sm_90; see the module docstring."""
    import triton
    from triton.compiler import ASTSource

    from .record import SM90, kernel_function, specialise

    signature, constexprs, attrs, options = specialise(launch)
    src = ASTSource(kernel_function(launch.module, launch.kernel), signature, constexprs, attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=SM90, options=options.__dict__)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs, stores, loads, stack = parse_ptxas_log(text)
    lines = [ln for ln in text.splitlines() if "ptxas info" in ln and ("Used" in ln or "spill" in ln)]
    return Compiled(
        regs,
        stores,
        loads,
        stack,
        kernel.metadata.shared,
        options.num_warps,
        options.num_stages,
        seconds,
        "\n".join(lines),
    )


def ptxas_path() -> str:
    """The ptxas Triton compiles with (bundled with the triton wheel; TRITON_PTXAS_PATH overrides)."""
    from triton import knobs

    return knobs.nvidia.ptxas.path


def ptxas_version() -> str:
    out = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return match.group(2) if match else out.strip().splitlines()[-1]
