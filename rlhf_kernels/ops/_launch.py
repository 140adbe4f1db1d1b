"""Launch helpers shared by every family's launchers (one copy each).

Sizes: :func:`cdiv`, :func:`pow2_between` (comparisons only, so that a symbolic size under
``torch.compile(dynamic=True)`` costs a few guards rather than a recompile per size), :func:`sm_count`.
Dtypes: :func:`acc_dtype` (the Triton arithmetic dtype of an op, from ``_validation.compute_dtype``),
:func:`loadable_mask`.
Scalars: the one rule for float hyperparameters (clip ranges, temperature, γ, λ, β, ...), see
:func:`scalar_parts`.
Row layout: :func:`row_layout` addresses ``x[..., V]`` as rows through at most two strided row
dimensions, so that slices such as ``logits[:, :-1]`` need no copy.
Row tiles: :func:`row_tiles`, the tiling of the [rows, T] scans and reductions (GAE, token rewards,
whitening): a few rows per program, T walked in chunks.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass

import torch

from .._validation import compute_dtype

# Every ops module takes triton, tl and wrap_triton from here: one place that copes with a platform
# without Triton (then they are None and only the PyTorch paths run).
try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = tl = wrap_triton = None


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def pow2_between(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n, clamped to [low, high] (comparisons only, see the module doc)."""
    p = low
    while p < high and p < n:
        p *= 2
    return p


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def acc_dtype(*tensors: torch.Tensor | None):
    """The Triton arithmetic dtype of an op: tl.float64 if any input is fp64, else tl.float32."""
    return tl.float64 if compute_dtype(*tensors) == torch.float64 else tl.float32


def without_autocast(fn):
    """Runs ``fn`` with autocast off on every device where it is on: an op's precision is its own
    (inputs in their dtype, fp32 accumulation), never lowered by an enclosing ``torch.autocast``
    region (which would turn its fp32 matrix products into bf16 ones)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask reinterpreted as uint8 (same bytes, no copy): what Triton loads most portably."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ---------------------------------------------------------------------------------------------------
# Scalars.  Triton passes a Python float to a kernel as fp32 (the interpreter too), so an fp64 kernel
# given the float itself computes with a 24-bit copy of it (a relative error of ~1e-8 where fp64 inputs
# promise fp64 math).  The one rule: every float hyperparameter reaches a kernel as three fp32 runtime
# arguments (hi, mid, lo) = scalar_parts(value, dtype), read in the kernel with scalar_arg(hi, mid, lo,
# ACC).  In fp32 they are (value, 0, 0) and the two zero terms fold away; a runtime argument (never a
# constexpr) means no recompile when a schedule changes the value every step, and the same dtype eager
# and compiled.
# ---------------------------------------------------------------------------------------------------
_FP32_MAX = 3.4028234663852886e38


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]


def scalar_parts(value: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """Three Python floats, each exact in fp32, whose sum in ``dtype`` is ``value`` rounded to ``dtype``.

    hi = fp32(value), mid = fp32(value − hi), lo = value − hi − mid: 24 + 24 + 24 ≥ 53 bits, each
    subtraction exact, so the three add up to ``value`` exactly in fp64.  For fp32 kernels the parts
    are ``(value, 0, 0)``: no arithmetic on the host, so a symbolic float under torch.compile stays
    symbolic; the fp64 split reads the float (a guard on its value under torch.compile).
    """
    if dtype != torch.float64:
        return value, 0.0, 0.0
    value = float(value)
    if not abs(value) < _FP32_MAX:  # beyond fp32's range no fp32 parts exist
        return value, 0.0, 0.0
    hi = _fp32(value)
    mid = _fp32(value - hi)
    return hi, mid, _fp32(value - hi - mid)


scalar_arg = None
if triton is not None:

    @triton.jit
    def scalar_arg(hi, mid, lo, ACC: tl.constexpr):
        """A float passed as :func:`scalar_parts`, in the kernel's arithmetic dtype ``ACC``."""
        return tl.cast(hi, ACC) + tl.cast(mid, ACC) + tl.cast(lo, ACC)


# ---------------------------------------------------------------------------------------------------
# Row layout.
# ---------------------------------------------------------------------------------------------------
def merged_row_dims(x: torch.Tensor) -> list[list[int]]:
    """[size, stride] of the leading dimensions of ``x`` after merging those whose strides chain."""
    merged: list[list[int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    return merged


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """``(tensor, rows0, rows1, stride0, stride1, stride_v)`` addressing the rows of ``x [..., V]``.

    Leading dimensions are merged where their strides chain; a tensor needing more than two row
    dimensions (rare: a slice of a slice of a 4-D tensor) is copied once with ``reshape``.
    """
    merged = merged_row_dims(x)
    if len(merged) > 2:
        x = x.reshape(-1, x.shape[-1])
        merged = [[x.shape[0], x.stride(0)]]
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (rows0, stride0), (rows1, stride1) = merged
    return x, rows0, rows1, stride0, stride1, x.stride(-1)


# ---------------------------------------------------------------------------------------------------
# Row tiles (GAE, token rewards, whitening): a program takes BLOCK_B rows and walks them BLOCK_T
# positions at a time.
# ---------------------------------------------------------------------------------------------------
ROW_TILE_ELEMENTS = 2048  # elements per program and chunk: 16 fp32 values per thread per live tensor


@dataclass(frozen=True)
class RowTiles:
    block_b: int
    block_t: int
    num_warps: int
    programs: int  # programs over the rows


def row_tiles(rows: int, cols: int, max_block_t: int = 1024) -> RowTiles:
    """Tiles of about ROW_TILE_ELEMENTS: one row per program once ``cols`` ≥ 2048 (long rows stream
    through in chunks of ``max_block_t``), several short rows per program otherwise so that short rows
    still fill the warps (4 warps from 1024 elements, else 2)."""
    block_t = pow2_between(cols, 16, max_block_t)
    block_b = pow2_between(rows, 1, max(1, ROW_TILE_ELEMENTS // block_t))
    num_warps = 4 if block_b * block_t >= 1024 else 2
    return RowTiles(block_b=block_b, block_t=block_t, num_warps=num_warps, programs=cdiv(rows, block_b))
