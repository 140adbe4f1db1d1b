"""Masked whitening: μ = Σxm/Σm, var = Σ(x − μ)²m/Σm (·n/(n−1) unbiased), out = (x − μ)·rsqrt(var + eps).

Statistics per row (``dim=-1``) or over the whole tensor (``dim=None``), in three passes over x:

1. ``_whiten_pivot_kernel``: per row, n = Σm, a power-of-two scale P (max|x| within [P, 2P)) and Σ(x/P)·m,
   chunk by chunk (a chunk with a larger max rescales the running sum: exact, powers of two);
2. ``_whiten_moments_kernel``: per row, about the pivot μ₀ of its selection, Σd·m and Σd²·m
   with d = x/P − μ₀ (the corrected two-pass algorithm);
3. ``_whiten_apply_kernel``: out = (x/P − μ₀ − c) / spread (+ μ when ``shift_mean=False``).

Between the passes a few [rows] PyTorch ops (``ops/cpu/whiten.py``: ``combine_pivots``,
``finish_stats``) combine the rows of a selection and finish μ₀, c and the spread; that module states
the math and why it is exact to fp32 rounding for any offset (issue 12) and any finite x (issue 19).

Backends (``_dispatch`` family ``"whiten"``): Triton here, PyTorch in ``ops/cpu/whiten.py``.

Layout: Triton kernels → launch config → launchers → registration → public function.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_at_least,
    check_float_tensor,
    check_int,
    check_mask_tensor,
    check_same_device,
    check_shape,
)
from ._launch import RowTiles, cdiv, loadable_mask, row_tiles, tl, triton, wrap_triton
from .cpu import whiten as cpu
from .cpu.whiten import (
    EXPONENT_BIAS,
    EXPONENT_FIELD,
    EXPONENT_MAX,
    EXPONENT_MIN,
    EXPONENT_SHIFT,
    WhitenStats,
)

FAMILY = "whiten"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Rows [R, C] are tiled BLOCK_B at a time and walked BLOCK_T columns at a time; the
# statistics of a row's selection are at ``rows`` (PER_ROW) or at 0 (all rows together).  Arithmetic
# in fp32 (the family takes fp32, bf16 and fp16).
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    _SHIFT = tl.constexpr(EXPONENT_SHIFT)
    _FIELD = tl.constexpr(EXPONENT_FIELD)
    _BIAS = tl.constexpr(EXPONENT_BIAS)
    _EXP_MIN = tl.constexpr(EXPONENT_MIN)
    _EXP_MAX = tl.constexpr(EXPONENT_MAX)

    @triton.jit
    def _power_of_two(field):
        """2^(field − 127) as fp32, exact, for an int32 field in [1, 254]; 0 for a field ≤ 0."""
        return (tl.maximum(field, 0) << _SHIFT).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_tile(x_ptr, mask_ptr, rows, cols, ok, stride_xb, stride_xt, stride_mb, stride_mt):
        """(x, m) of a [rows, cols] tile in fp32, x zeroed where m = 0 (garbage there is never used)."""
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xt, mask=ok, other=0.0)
        w = tl.load(mask_ptr + rows[:, None] * stride_mb + cols[None, :] * stride_mt, mask=ok, other=0)
        w = w.to(tl.float32)
        return tl.where(w != 0.0, x.to(tl.float32), 0.0), w

    @triton.jit
    def _whiten_pivot_kernel(
        x_ptr, mask_ptr, count_ptr, exponent_ptr, total_ptr,
        stride_xb, stride_xt, stride_mb, stride_mt,
        R, C,
        BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Per row: n = Σm, the exponent field e of P = 2^(e − 127) ≤ max|x| (clamped) and Σ(x/P)·m.
        Reads x and the mask once, writes 12 bytes per row."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < R
        j = tl.arange(0, BLOCK_T)
        n = tl.zeros([BLOCK_B], tl.float32)
        exponent = tl.full([BLOCK_B], _EXP_MIN, tl.int32)
        total = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, C, BLOCK_T):
            cols = (start + j).to(tl.int64)
            ok = row_ok[:, None] & (cols < C)[None, :]
            x, w = _load_tile(x_ptr, mask_ptr, rows, cols, ok, stride_xb, stride_xt, stride_mb, stride_mt)
            amax = tl.max(tl.abs(x), axis=1)
            chunk = (amax.to(tl.int32, bitcast=True) >> _SHIFT) & _FIELD
            chunk = tl.minimum(tl.maximum(chunk, _EXP_MIN), _EXP_MAX)
            grown = tl.maximum(exponent, chunk)
            inv_scale = _power_of_two(2 * _BIAS - grown)
            total = total * _power_of_two(_BIAS + exponent - grown)  # exact: a power of two ≤ 1
            total += tl.sum(x * inv_scale[:, None] * w, axis=1)
            exponent = grown
            n += tl.sum(w, axis=1)
        tl.store(count_ptr + rows, n, mask=row_ok)
        tl.store(exponent_ptr + rows, exponent, mask=row_ok)
        tl.store(total_ptr + rows, total, mask=row_ok)

    @triton.jit
    def _whiten_moments_kernel(
        x_ptr, mask_ptr, inv_scale_ptr, pivot_ptr, centred_ptr, square_ptr,
        stride_xb, stride_xt, stride_mb, stride_mt,
        R, C,
        PER_ROW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Per row: Σd·m and Σd²·m with d = x/P − μ₀ of the row's selection.  Reads x and the mask once,
        writes 8 bytes per row."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < R
        j = tl.arange(0, BLOCK_T)
        stat = rows if PER_ROW else rows * 0
        inv_scale = tl.load(inv_scale_ptr + stat, mask=row_ok, other=1.0)
        pivot = tl.load(pivot_ptr + stat, mask=row_ok, other=0.0)
        centred = tl.zeros([BLOCK_B], tl.float32)
        square = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, C, BLOCK_T):
            cols = (start + j).to(tl.int64)
            ok = row_ok[:, None] & (cols < C)[None, :]
            x, w = _load_tile(x_ptr, mask_ptr, rows, cols, ok, stride_xb, stride_xt, stride_mb, stride_mt)
            d = tl.where(w != 0.0, x * inv_scale[:, None] - pivot[:, None], 0.0)
            centred += tl.sum(d * w, axis=1)
            square += tl.sum(d * d * w, axis=1)
        tl.store(centred_ptr + rows, centred, mask=row_ok)
        tl.store(square_ptr + rows, square, mask=row_ok)

    @triton.jit
    def _whiten_apply_kernel(
        x_ptr, mask_ptr, inv_scale_ptr, pivot_ptr, correction_ptr, spread_ptr, mean_ptr, out_ptr,
        stride_xb, stride_xt, stride_mb, stride_mt,
        R, C,
        PER_ROW: tl.constexpr, SHIFT_MEAN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """out = (x/P − μ₀ − c) / spread where m ≠ 0, else 0; plus μ unless SHIFT_MEAN.  Reads x and the
        mask once, writes 4 bytes per element.  IEEE division: the spread may be subnormal (a selection
        without spread, |x| ≳ 1e34), and 0 / spread must stay 0."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < R
        ok = row_ok[:, None] & (cols < C)[None, :]
        stat = rows if PER_ROW else rows * 0
        inv_scale = tl.load(inv_scale_ptr + stat, mask=row_ok, other=1.0)
        shift = tl.load(pivot_ptr + stat, mask=row_ok, other=0.0)
        correction = tl.load(correction_ptr + stat, mask=row_ok, other=0.0)
        spread = tl.load(spread_ptr + stat, mask=row_ok, other=1.0)
        x, w = _load_tile(x_ptr, mask_ptr, rows, cols, ok, stride_xb, stride_xt, stride_mb, stride_mt)
        d = x * inv_scale[:, None] - shift[:, None]
        out = tl.where(w != 0.0, tl.math.div_rn(d - correction[:, None], spread[:, None]), 0.0)
        if not SHIFT_MEAN:
            out += tl.load(mean_ptr + stat, mask=row_ok, other=0.0)[:, None]
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], out, mask=ok)


# ---------------------------------------------------------------------------------------------------
# Launch configuration: row tiles (``_launch.row_tiles``); the output pass also tiles the columns.
# ---------------------------------------------------------------------------------------------------
# Register budget 128/thread (bench/static/budgets.py, checked by tests/test_static.py): >= 16 resident
# warps per SM keep ~25 KiB of 16-byte loads in flight.
def _launch_config(R: int, C: int) -> RowTiles:
    return row_tiles(R, C)


# ---------------------------------------------------------------------------------------------------
# Launchers on x, mask [R, C] (any strides).  ``*_out`` write into outputs the caller allocated.
# ---------------------------------------------------------------------------------------------------
def _check_row_outputs(R: int, *outputs: torch.Tensor) -> None:
    for out in outputs:
        assert out.shape == (R,) and out.is_contiguous()


def _launch_pivot_out(
    count: torch.Tensor, exponent: torch.Tensor, total: torch.Tensor, x: torch.Tensor, mask: torch.Tensor
) -> None:
    """count, total: fp32 [R], exponent: int32 [R] ← step 1 of each row (see ``ops/cpu/whiten.py``)."""
    R, C = x.shape
    _check_row_outputs(R, count, exponent, total)
    if R == 0:
        return
    mask = loadable_mask(mask)
    cfg = _launch_config(R, C)
    wrap_triton(_whiten_pivot_kernel)[(cfg.programs,)](
        x, mask, count, exponent, total,
        x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        R, C,
        BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, num_warps=cfg.num_warps,
    )


def _launch_moments_out(
    centred: torch.Tensor,
    square: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    inv_scale: torch.Tensor,
    pivot: torch.Tensor,
    per_row: bool,
) -> None:
    """centred, square: fp32 [R] ← Σd·m, Σd²·m per row, d = x·inv_scale − pivot (per row, or [1])."""
    R, C = x.shape
    _check_row_outputs(R, centred, square)
    if R == 0:
        return
    mask = loadable_mask(mask)
    cfg = _launch_config(R, C)
    wrap_triton(_whiten_moments_kernel)[(cfg.programs,)](
        x, mask, inv_scale, pivot, centred, square,
        x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        R, C,
        PER_ROW=per_row, BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, num_warps=cfg.num_warps,
    )


def _launch_apply_out(
    out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, stats: WhitenStats, shift_mean: bool,
    per_row: bool,
) -> None:
    """out: contiguous fp32 [R, C] ← the whitened x (``stats`` per row, or [1])."""
    R, C = x.shape
    assert out.shape == (R, C) and out.dtype == torch.float32 and out.is_contiguous()
    if R == 0 or C == 0:
        return
    mask = loadable_mask(mask)
    cfg = _launch_config(R, C)
    wrap_triton(_whiten_apply_kernel)[(cfg.programs, cdiv(C, cfg.block_t))](
        x, mask, *stats, out,
        x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        R, C,
        PER_ROW=per_row, SHIFT_MEAN=shift_mean, BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
    )


def _launch_moments(x: torch.Tensor, mask: torch.Tensor, per_row: bool):
    """Passes 1-2 on a non-empty [R, C]: (pivot, Σd·m [R], Σd²·m [R]), see ``ops/cpu/whiten.py``."""
    R = x.shape[0]
    count, total = (torch.empty(R, dtype=torch.float32, device=x.device) for _ in range(2))
    exponent = torch.empty(R, dtype=torch.int32, device=x.device)
    _launch_pivot_out(count, exponent, total, x, mask)
    pivot = cpu.combine_pivots(count, exponent, total, per_row)
    centred, square = torch.empty_like(count), torch.empty_like(count)
    _launch_moments_out(centred, square, x, mask, pivot.inv_scale, pivot.pivot, per_row)
    return pivot, centred, square


def _launch_fwd(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    R, C = x.shape
    out = torch.empty((R, C), dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:
        return out
    pivot, centred, square = _launch_moments(x, mask, per_row)
    stats = cpu.finish_stats(pivot, centred, square, unbiased, eps, per_row)
    _launch_apply_out(out, x, mask, stats, shift_mean, per_row)
    return out


def _launch_fwd_global(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, group
) -> torch.Tensor:
    """:func:`_launch_fwd` of all of x with the statistics of every rank's x together (one all_reduce
    between passes 2 and 3: ``cpu.global_stats``)."""
    R, C = x.shape
    out = torch.empty((R, C), dtype=torch.float32, device=x.device)
    empty = R == 0 or C == 0
    moments = cpu.empty_moments(x.device) if empty else _launch_moments(x, mask, per_row=False)
    stats = cpu.global_stats(*moments, unbiased, eps, group)  # every rank joins, empty or not
    if not empty:
        _launch_apply_out(out, x, mask, stats, shift_mean, per_row=False)
    return out


# ---------------------------------------------------------------------------------------------------
# Registration.  No autograd: whitened advantages are targets (the public function detaches).
# ---------------------------------------------------------------------------------------------------
@kernel_op("masked_whiten")
def whiten_op(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    """Whitened x [R, C] fp32, statistics per row (``per_row``) or over all of x."""
    return _dispatch.route(FAMILY, x.device, triton=_launch_fwd, torch=cpu.masked_whiten_torch)(
        x, mask, shift_mean, unbiased, eps, per_row
    )


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    dim: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """Whitening over the positions where ``mask`` is nonzero.

    μ = Σxm / Σm;  var = Σ(x − μ)²m / Σm, times n/(n−1) when ``unbiased`` (n = Σm);
    out = (x − μ)·rsqrt(var + eps), plus μ again when ``shift_mean=False``.

    Args:
        x: float32, bfloat16 or float16, any shape (``dim=-1``: at least 1-D, rows are all leading
            dimensions).
        mask: same shape; bool, integer or floating (its values weight the statistics).
        shift_mean: False adds μ back (keeps the location, rescales the spread).
        unbiased: Bessel's correction n/(n−1).
        eps: ≥ 0, added to the variance.
        dim: ``None`` whitens over the whole tensor (one μ and var), ``-1`` (or ``x.dim() − 1``) per row.
        process_group: a ``torch.distributed`` group (``dim=None`` only): μ and var of every rank's x
            together, as if the ranks' x were concatenated (data parallelism: the global batch).  One
            all_reduce of 4·world float64 numbers; every rank of the group must call it (an empty x too).

    Returns:
        float32, ``x``'s shape.  Masked positions hold 0 when ``shift_mean=True`` (μ when False).

    Example: x = (1, 2, 3, 100), mask = (1, 1, 1, 0), unbiased → μ = 2, var = 1, out ≈ (−1, 0, 1, 0).

    Accurate to fp32 rounding for any finite x: the mean first, then the second moment about it, both
    on x scaled by a power of two (so x ≈ 1000 ± 1 or |x| ≈ 1e30 whiten as well as x ≈ 0 ± 1).
    Degenerate selections, decided so that nothing syncs or raises: an all-masked tensor (or row, with
    ``dim=-1``) has μ = 0 and var = 0, so its output is all zeros; a single valid element with
    ``unbiased=True`` (n/(n−1) undefined) has var = 0, so it whitens to 0.  No host synchronisation;
    no gradient (the input is detached).
    """
    check_float_tensor("x", x)
    check_mask_tensor("mask", mask)
    check_shape("mask", mask, x.shape, "x.shape")
    check_same_device(x=x, mask=mask)
    eps = check_at_least("eps", eps, 0.0)
    if dim is not None:
        dim = check_int("dim", dim)
        if x.dim() == 0 or dim not in (-1, x.dim() - 1):
            raise ValueError(
                f"dim must be None or -1 (the last dimension of x, shape {tuple(x.shape)}); got {dim}"
            )
    if process_group is not None:
        _check_process_group(process_group, dim)
    elif x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    # [rows, last dimension]; a copy only when the layout needs one.
    columns = x.shape[-1] if x.dim() else 1
    if process_group is not None:  # eager: a collective between the passes, not a registered op
        out = _dispatch.route(FAMILY, x.device, triton=_launch_fwd_global, torch=cpu.masked_whiten_global)(
            x.reshape(-1, columns).detach(), mask.reshape(-1, columns).detach(), bool(shift_mean),
            bool(unbiased), eps, process_group,
        )
        return out.view(x.shape)
    out = whiten_op(
        x.reshape(-1, columns).detach(), mask.reshape(-1, columns).detach(), bool(shift_mean),
        bool(unbiased), eps, dim is not None,
    )
    return out.view(x.shape)


def _check_process_group(process_group, dim) -> None:
    import torch.distributed as dist

    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or None; "
            f"got {type(process_group).__name__}"
        )
    if dim is not None:
        raise ValueError(f"process_group needs dim=None (per-row statistics are local); got dim={dim}")
