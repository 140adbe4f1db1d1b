"""PPO policy loss, value loss and KL loss over [B, T] tokens.

Policy loss (clipped surrogate, with optional dual clip), per token:

    ℓ  = clamp(lp − old, −20, 20),   r = e^ℓ
    L1 = −A·r,   L2 = −A·clamp(r, 1 − ε_low, 1 + ε_high),   C = max(L1, L2)
    L  = min(C, −A·c)  where A < 0 (dual clip c > 1),   else C

    ∂L/∂lp = −A·r   where L1 ≥ L2 (not clipped), |lp − old| ≤ 20 and, with dual clip, not (A < 0, C > −A·c);
             0      elsewhere.

Value loss, per token (the ½ of the issue's ½·agg(...) is folded into every token's term):

    v_c = clamp(v, v_old − ε, v_old + ε),   L = ½·max((v − R)², (v_c − R)²)
    ∂L/∂v = v − R  where (v_c − R)² ≤ (v − R)²,  0 elsewhere (a strictly larger clipped term means v lies
    outside [v_old − ε, v_old + ε], where v_c does not depend on v).

Both are reduced by ``ops/aggregation.py`` from per-row partial sums: the forward kernel reads every
input once and writes, per (row, chunk of columns), Σ L·m and every metric's partial sum; nothing of
size [B, T] is written.  The backward kernel reads the inputs once more and writes ∂loss/∂lp (or ∂/∂v),
given the gradient of each row's partial sum.  Ties take the unclipped branch, so that the gradient
flows exactly where the clip metrics count a token as unclipped.

Masked positions (m = 0) contribute exactly 0 to the loss and every metric, whatever they hold (NaN
padding included), and receive exactly zero gradient.  NaN at a valid position gives a NaN loss.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
from torch.library import triton_op, wrap_triton

from .. import _dispatch
from .._validation import (
    check_float_tensor,
    check_greater,
    check_mask_tensor,
    check_ndim,
    check_same_device,
    check_shape,
    compute_dtype,
)
from .aggregation import TOKEN_MEAN, Normalizer, agg_loss, agg_row_sums, check_loss_agg, check_normalizer
from .kl import check_estimator, kl_penalty

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = None

FAMILY = "ppo_losses"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))

LOG_RATIO_CLAMP = 20.0  # verl's clamp of lp − old before the exponential

# float64 is accepted too (gradcheck, oracles); it is then the compute precision, else fp32.
_LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Rows of the policy loss's statistics tensor (each a per-(row, chunk) partial sum, except the max).
_P_MASK, _P_CLIP, _P_CLIP_LOWER, _P_NEG_LOG_RATIO, _P_RATIO, _P_RATIO_MAX = range(6)
_POLICY_STATS = 6
# Rows of the value loss's statistics tensor.
_V_MASK, _V_CLIP = range(2)
_VALUE_STATS = 2


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Grid (B, chunks): program (b, c) covers columns [c·TILES·BLOCK_T, (c+1)·TILES·BLOCK_T)
# of row b, so that short batches of long rows still fill the GPU.  Clamps are written with
# comparisons (not minimum/maximum) so that NaN passes through.
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _scalar_arg(hi, mid, lo, dtype: tl.constexpr):
        """A Python float passed as three fp32-exact parts (see ``_scalar_parts``), summed in ``dtype``."""
        return tl.cast(hi, dtype) + tl.cast(mid, dtype) + tl.cast(lo, dtype)

    @triton.jit
    def _policy_token_terms(lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL_CLIP: tl.constexpr):
        """(L, ∂L/∂lp, log-ratio ℓ, ratio r, clipped, dual-clipped) of one tile of tokens."""
        raw = lp - old
        out_of_clamp = (raw < -20.0) | (raw > 20.0)
        log_ratio = tl.where(raw < -20.0, -20.0, tl.where(raw > 20.0, 20.0, raw))
        ratio = tl.exp(log_ratio)
        low = 1.0 - clip_low
        high = 1.0 + clip_high
        loss1 = -adv * ratio
        loss2 = -adv * tl.where(ratio < low, low, tl.where(ratio > high, high, ratio))
        clipped = loss2 > loss1
        loss = tl.where(clipped, loss2, loss1)
        d_ratio = tl.where(clipped, 0.0, -adv)
        if HAS_DUAL_CLIP:
            bound = -adv * dual_clip
            lower = (adv < 0) & (loss > bound)
            loss = tl.where(lower, bound, loss)
            d_ratio = tl.where(lower, 0.0, d_ratio)
        else:
            lower = clipped & (adv != adv)  # all False, shaped like the tile
        d_lp = tl.where(out_of_clamp, 0.0, d_ratio * ratio)
        return loss, d_lp, log_ratio, ratio, clipped, lower

    @triton.jit
    def _ppo_policy_loss_fwd_kernel(
        logprobs_ptr, old_ptr, adv_ptr, mask_ptr, loss_partials_ptr, stats_ptr,
        stride_lp0, stride_lp1, stride_old0, stride_old1, stride_adv0, stride_adv1, stride_m0, stride_m1,
        stride_stat,
        T, tiles_per_program,
        clip_low_hi, clip_low_mid, clip_low_lo, clip_high_hi, clip_high_mid, clip_high_lo,
        dual_clip_hi, dual_clip_mid, dual_clip_lo,
        BLOCK_T: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        compute_ty = stats_ptr.dtype.element_ty
        clip_low = _scalar_arg(clip_low_hi, clip_low_mid, clip_low_lo, compute_ty)
        clip_high = _scalar_arg(clip_high_hi, clip_high_mid, clip_high_lo, compute_ty)
        dual_clip = _scalar_arg(dual_clip_hi, dual_clip_mid, dual_clip_lo, compute_ty)
        acc_loss = tl.zeros((BLOCK_T,), compute_ty)
        acc_mask = tl.zeros((BLOCK_T,), compute_ty)
        acc_clip = tl.zeros((BLOCK_T,), compute_ty)
        acc_lower = tl.zeros((BLOCK_T,), compute_ty)
        acc_neg_log_ratio = tl.zeros((BLOCK_T,), compute_ty)
        acc_ratio = tl.zeros((BLOCK_T,), compute_ty)
        ratio_max = tl.zeros((BLOCK_T,), compute_ty)  # ratios are > 0: 0 is "no valid token"
        for k in range(0, tiles_per_program):
            cols = ((chunk * tiles_per_program + k) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            in_row = cols < T
            m = tl.load(mask_ptr + row * stride_m0 + cols * stride_m1, mask=in_row, other=0).to(compute_ty)
            lp = tl.load(logprobs_ptr + row * stride_lp0 + cols * stride_lp1, mask=in_row, other=0.0)
            old = tl.load(old_ptr + row * stride_old0 + cols * stride_old1, mask=in_row, other=0.0)
            adv = tl.load(adv_ptr + row * stride_adv0 + cols * stride_adv1, mask=in_row, other=0.0)
            loss, _, log_ratio, ratio, clipped, lower = _policy_token_terms(
                lp.to(compute_ty), old.to(compute_ty), adv.to(compute_ty),
                clip_low, clip_high, dual_clip, HAS_DUAL_CLIP,
            )
            valid = m != 0
            acc_loss += tl.where(valid, loss * m, 0.0)
            acc_mask += m
            acc_clip += tl.where(valid & clipped, m, 0.0)
            acc_lower += tl.where(valid & lower, m, 0.0)
            acc_neg_log_ratio += tl.where(valid, -log_ratio * m, 0.0)
            acc_ratio += tl.where(valid, ratio * m, 0.0)
            # NaN ratios are ignored here; the finishing step turns a NaN ratio sum into a NaN max.
            ratio_max = tl.where(valid & (ratio > ratio_max), ratio, ratio_max)
        n_chunks = tl.num_programs(1)
        out = row * n_chunks + chunk
        tl.store(loss_partials_ptr + out, tl.sum(acc_loss, axis=0))
        tl.store(stats_ptr + 0 * stride_stat + out, tl.sum(acc_mask, axis=0))
        tl.store(stats_ptr + 1 * stride_stat + out, tl.sum(acc_clip, axis=0))
        tl.store(stats_ptr + 2 * stride_stat + out, tl.sum(acc_lower, axis=0))
        tl.store(stats_ptr + 3 * stride_stat + out, tl.sum(acc_neg_log_ratio, axis=0))
        tl.store(stats_ptr + 4 * stride_stat + out, tl.sum(acc_ratio, axis=0))
        tl.store(stats_ptr + 5 * stride_stat + out, tl.max(ratio_max, axis=0))

    @triton.jit
    def _ppo_policy_loss_bwd_kernel(
        grad_logprobs_ptr, grad_partials_ptr, logprobs_ptr, old_ptr, adv_ptr, mask_ptr,
        stride_lp0, stride_lp1, stride_old0, stride_old1, stride_adv0, stride_adv1, stride_m0, stride_m1,
        stride_g0, stride_g1,
        T, tiles_per_program,
        clip_low_hi, clip_low_mid, clip_low_lo, clip_high_hi, clip_high_mid, clip_high_lo,
        dual_clip_hi, dual_clip_mid, dual_clip_lo,
        BLOCK_T: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        compute_ty = grad_partials_ptr.dtype.element_ty
        clip_low = _scalar_arg(clip_low_hi, clip_low_mid, clip_low_lo, compute_ty)
        clip_high = _scalar_arg(clip_high_hi, clip_high_mid, clip_high_lo, compute_ty)
        dual_clip = _scalar_arg(dual_clip_hi, dual_clip_mid, dual_clip_lo, compute_ty)
        g = tl.load(grad_partials_ptr + row * stride_g0 + chunk * stride_g1)
        for k in range(0, tiles_per_program):
            cols = ((chunk * tiles_per_program + k) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            in_row = cols < T
            m = tl.load(mask_ptr + row * stride_m0 + cols * stride_m1, mask=in_row, other=0).to(compute_ty)
            lp = tl.load(logprobs_ptr + row * stride_lp0 + cols * stride_lp1, mask=in_row, other=0.0)
            old = tl.load(old_ptr + row * stride_old0 + cols * stride_old1, mask=in_row, other=0.0)
            adv = tl.load(adv_ptr + row * stride_adv0 + cols * stride_adv1, mask=in_row, other=0.0)
            _, d_lp, _, _, _, _ = _policy_token_terms(
                lp.to(compute_ty), old.to(compute_ty), adv.to(compute_ty),
                clip_low, clip_high, dual_clip, HAS_DUAL_CLIP,
            )
            grad = tl.where(m != 0, g * m * d_lp, 0.0)
            tl.store(
                grad_logprobs_ptr + row * T + cols, grad.to(grad_logprobs_ptr.dtype.element_ty), mask=in_row
            )

    @triton.jit
    def _value_token_terms(v, v_old, ret, clip, HAS_CLIP: tl.constexpr):
        """(L, ∂L/∂v, clipped) of one tile of tokens."""
        err = v - ret
        loss = 0.5 * err * err
        if HAS_CLIP:
            low = v_old - clip
            high = v_old + clip
            err_clipped = tl.where(v < low, low, tl.where(v > high, high, v)) - ret
            loss_clipped = 0.5 * err_clipped * err_clipped
            clipped = loss_clipped > loss
            loss = tl.where(clipped, loss_clipped, loss)
            d_v = tl.where(clipped, 0.0, err)
        else:
            clipped = err != err  # all False (NaN aside), shaped like the tile
            d_v = err
        return loss, d_v, clipped

    @triton.jit
    def _ppo_value_loss_fwd_kernel(
        values_ptr, old_ptr, returns_ptr, mask_ptr, loss_partials_ptr, stats_ptr,
        stride_v0, stride_v1, stride_old0, stride_old1, stride_r0, stride_r1, stride_m0, stride_m1,
        stride_stat,
        T, tiles_per_program, clip_hi, clip_mid, clip_lo,
        BLOCK_T: tl.constexpr, HAS_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        compute_ty = stats_ptr.dtype.element_ty
        clip = _scalar_arg(clip_hi, clip_mid, clip_lo, compute_ty)
        acc_loss = tl.zeros((BLOCK_T,), compute_ty)
        acc_mask = tl.zeros((BLOCK_T,), compute_ty)
        acc_clip = tl.zeros((BLOCK_T,), compute_ty)
        for k in range(0, tiles_per_program):
            cols = ((chunk * tiles_per_program + k) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            in_row = cols < T
            m = tl.load(mask_ptr + row * stride_m0 + cols * stride_m1, mask=in_row, other=0).to(compute_ty)
            v = tl.load(values_ptr + row * stride_v0 + cols * stride_v1, mask=in_row, other=0.0)
            ret = tl.load(returns_ptr + row * stride_r0 + cols * stride_r1, mask=in_row, other=0.0)
            if HAS_CLIP:
                v_old = tl.load(old_ptr + row * stride_old0 + cols * stride_old1, mask=in_row, other=0.0)
            else:
                v_old = v
            loss, _, clipped = _value_token_terms(
                v.to(compute_ty), v_old.to(compute_ty), ret.to(compute_ty), clip, HAS_CLIP
            )
            valid = m != 0
            acc_loss += tl.where(valid, loss * m, 0.0)
            acc_mask += m
            acc_clip += tl.where(valid & clipped, m, 0.0)
        out = row * tl.num_programs(1) + chunk
        tl.store(loss_partials_ptr + out, tl.sum(acc_loss, axis=0))
        tl.store(stats_ptr + 0 * stride_stat + out, tl.sum(acc_mask, axis=0))
        tl.store(stats_ptr + 1 * stride_stat + out, tl.sum(acc_clip, axis=0))

    @triton.jit
    def _ppo_value_loss_bwd_kernel(
        grad_values_ptr, grad_partials_ptr, values_ptr, old_ptr, returns_ptr, mask_ptr,
        stride_v0, stride_v1, stride_old0, stride_old1, stride_r0, stride_r1, stride_m0, stride_m1,
        stride_g0, stride_g1,
        T, tiles_per_program, clip_hi, clip_mid, clip_lo,
        BLOCK_T: tl.constexpr, HAS_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        compute_ty = grad_partials_ptr.dtype.element_ty
        clip = _scalar_arg(clip_hi, clip_mid, clip_lo, compute_ty)
        g = tl.load(grad_partials_ptr + row * stride_g0 + chunk * stride_g1)
        for k in range(0, tiles_per_program):
            cols = ((chunk * tiles_per_program + k) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            in_row = cols < T
            m = tl.load(mask_ptr + row * stride_m0 + cols * stride_m1, mask=in_row, other=0).to(compute_ty)
            v = tl.load(values_ptr + row * stride_v0 + cols * stride_v1, mask=in_row, other=0.0)
            ret = tl.load(returns_ptr + row * stride_r0 + cols * stride_r1, mask=in_row, other=0.0)
            if HAS_CLIP:
                v_old = tl.load(old_ptr + row * stride_old0 + cols * stride_old1, mask=in_row, other=0.0)
            else:
                v_old = v
            _, d_v, _ = _value_token_terms(
                v.to(compute_ty), v_old.to(compute_ty), ret.to(compute_ty), clip, HAS_CLIP
            )
            grad = tl.where(m != 0, g * m * d_v, 0.0)
            tl.store(grad_values_ptr + row * T + cols, grad.to(grad_values_ptr.dtype.element_ty), mask=in_row)


@dataclass(frozen=True)
class _RowTiling:
    block_t: int  # columns per tile
    tiles_per_program: int
    chunks: int  # programs per row
    num_warps: int


# Rows are split only below ~2 programs per SM of an H100 (132 SMs): a split costs one more reduction
# launch in the finishing step, which at these sizes weighs as much as the kernel itself.
_TARGET_PROGRAMS = 256


def _pow2_between(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n, clamped to [low, high].  Comparisons only: a symbolic size under
    torch.compile(dynamic=True) then costs a few guards instead of a specialisation."""
    p = low
    while p < high and p < n:
        p *= 2
    return p


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _row_tiling(rows: int, cols: int) -> _RowTiling:
    """Tiles of up to 1024 columns (4 warps: 8 fp32 per thread per input, two 16-byte vectors); a row is
    split into several programs only when there are too few rows to reach ~_TARGET_PROGRAMS programs."""
    block_t = _pow2_between(cols, 16, 1024)
    tiles = _cdiv(cols, block_t)
    chunks = min(tiles, max(1, _cdiv(_TARGET_PROGRAMS, rows)))
    tiles_per_program = _cdiv(tiles, chunks)
    chunks = _cdiv(tiles, tiles_per_program)
    num_warps = 4 if block_t >= 512 else (2 if block_t >= 128 else 1)
    return _RowTiling(block_t, tiles_per_program, chunks, num_warps)


_FP32_MAX = 3.4028234663852886e38


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _scalar_parts(value: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """A scalar for a kernel computing in ``dtype``, as three Python floats that are exact in fp32 and
    whose sum in ``dtype`` is ``value`` rounded to ``dtype``.

    Triton passes a Python float to a kernel as fp32 (the interpreter, too), so an fp64 kernel given
    ``value`` itself would compute with a 24-bit clip (a relative error of ~1e-8 in the loss, where
    fp64 inputs promise fp64 math).  hi = fp32(value), mid = fp32(value − hi), lo = value − hi − mid
    (24 + 24 + 24 ≥ 53 bits, each subtraction exact) add up to ``value`` exactly in fp64.  fp32 kernels
    get ``(value, 0, 0)``: no arithmetic on the host, so a symbolic float under torch.compile stays
    symbolic; the fp64 split reads the float (a guard on its value under torch.compile).
    """
    if dtype != torch.float64:
        return value, 0.0, 0.0
    value = float(value)
    if not abs(value) < _FP32_MAX:  # beyond fp32's range no fp32 parts exist; validated clips are small
        return value, 0.0, 0.0
    hi = _fp32(value)
    mid = _fp32(value - hi)
    return hi, mid, _fp32(value - hi - mid)


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask reinterpreted as uint8 (same bytes, no copy): what Triton loads most portably."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ---------------------------------------------------------------------------------------------------
# PyTorch path: the same math in row chunks (bounded fp32 temporaries), one partial per row.  Inputs at
# masked positions are replaced by 0 once (ℓ = 0, r = 1, A = 0 there: every term is 0 and finite), so
# that the sums are plain row dot products with the mask, without a where per statistic.
# ---------------------------------------------------------------------------------------------------
def _row_slices(rows: int, cols: int):
    step = max(1, (1 << 20) // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _masked_chunk(mask: torch.Tensor, rs: slice, dtype: torch.dtype, *tensors: torch.Tensor):
    """(valid, weights m, tensors in ``dtype`` with 0 at masked positions) for rows ``rs``."""
    valid = mask[rs] != 0
    weights = mask[rs].to(dtype)
    return valid, weights, [torch.where(valid, t[rs].to(dtype), 0.0) for t in tensors]


def _row_dot(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t x·m per row."""
    return (x * weights).sum(-1)


def _policy_terms_torch(lp, old, adv, clip_low, clip_high, dual_clip):
    """(L, log-ratio ℓ, ratio r, clipped, dual-clipped, raw lp − old) per token; same math as the kernel."""
    raw = lp - old
    log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # torch.clamp propagates NaN
    ratio = log_ratio.exp()
    neg_adv = -adv
    loss1 = neg_adv * ratio
    loss2 = neg_adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = loss2 > loss1
    loss = torch.maximum(loss1, loss2)  # = where(clipped, loss2, loss1); both are NaN or neither
    lower = None
    if dual_clip is not None:
        bound = neg_adv * dual_clip
        lower = (adv < 0) & (loss > bound)
        loss = torch.where(lower, bound, loss)
    return loss, log_ratio, ratio, clipped, lower, raw


@torch.library.custom_op("rlhf_kernels::ppo_policy_loss_fwd_torch", mutates_args=())
def _ppo_policy_loss_fwd_torch(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = logprobs.shape
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    loss_partials = torch.empty(rows, 1, dtype=dtype, device=logprobs.device)
    stats = torch.zeros(_POLICY_STATS, rows, 1, dtype=dtype, device=logprobs.device)
    for rs in _row_slices(rows, cols):
        valid, m, (lp, old, adv) = _masked_chunk(mask, rs, dtype, logprobs, old_logprobs, advantages)
        loss, log_ratio, ratio, clipped, lower, _ = _policy_terms_torch(
            lp, old, adv, clip_low, clip_high, dual_clip
        )
        loss_partials[rs, 0] = _row_dot(loss, m)
        stats[_P_MASK, rs, 0] = m.sum(-1)
        stats[_P_CLIP, rs, 0] = _row_dot(clipped, m)
        if lower is not None:
            stats[_P_CLIP_LOWER, rs, 0] = _row_dot(lower, m)
        stats[_P_NEG_LOG_RATIO, rs, 0] = -_row_dot(log_ratio, m)
        stats[_P_RATIO, rs, 0] = _row_dot(ratio, m)
        # NaN ratios are skipped here as in the kernel; the finishing step restores the NaN.
        stats[_P_RATIO_MAX, rs, 0] = torch.where(valid & (ratio > 0), ratio, 0.0).amax(-1)
    return loss_partials, stats


@_ppo_policy_loss_fwd_torch.register_fake
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip):
    rows = logprobs.shape[0]
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    return logprobs.new_empty(rows, 1, dtype=dtype), logprobs.new_empty(_POLICY_STATS, rows, 1, dtype=dtype)


@torch.library.custom_op("rlhf_kernels::ppo_policy_loss_bwd_torch", mutates_args=())
def _ppo_policy_loss_bwd_torch(
    grad_partials: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    rows, cols = logprobs.shape
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    grad_logprobs = torch.empty(rows, cols, dtype=logprobs.dtype, device=logprobs.device)
    # One partial per row on this path (a forward and its backward always share a backend).
    g = grad_partials.sum(-1, keepdim=True).to(dtype)
    for rs in _row_slices(rows, cols):
        _, m, (lp, old, adv) = _masked_chunk(mask, rs, dtype, logprobs, old_logprobs, advantages)
        _, _, ratio, clipped, lower, raw = _policy_terms_torch(lp, old, adv, clip_low, clip_high, dual_clip)
        unclipped = ~clipped if lower is None else ~(clipped | lower)
        in_clamp = (raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP)
        # ∂L/∂lp = −A·r on unclipped tokens inside the log-ratio clamp; NaN stays NaN (comparisons
        # with NaN are False, so a NaN token is "unclipped" and its NaN product survives).
        d_lp = torch.where(unclipped & (in_clamp | raw.isnan()), -adv * ratio, 0.0)
        grad_logprobs[rs] = g[rs] * m * d_lp
    return grad_logprobs


@_ppo_policy_loss_bwd_torch.register_fake
def _(grad_partials, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip):
    return logprobs.new_empty(logprobs.shape)


def _value_terms_torch(v, v_old, ret, clip):
    """(L, ∂L/∂v, clipped) per token; same math as the kernel."""
    err = v - ret
    loss = 0.5 * err * err
    if clip is None:
        return loss, err, None
    v_clipped = torch.where(v < v_old - clip, v_old - clip, torch.where(v > v_old + clip, v_old + clip, v))
    err_clipped = v_clipped - ret
    loss_clipped = 0.5 * err_clipped * err_clipped
    clipped = loss_clipped > loss
    return torch.where(clipped, loss_clipped, loss), torch.where(clipped, 0.0, err), clipped


@torch.library.custom_op("rlhf_kernels::ppo_value_loss_fwd_torch", mutates_args=())
def _ppo_value_loss_fwd_torch(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = values.shape
    dtype = compute_dtype(values, old_values, returns)
    loss_partials = torch.empty(rows, 1, dtype=dtype, device=values.device)
    stats = torch.zeros(_VALUE_STATS, rows, 1, dtype=dtype, device=values.device)
    for rs in _row_slices(rows, cols):
        _, m, (v, v_old, ret) = _masked_chunk(mask, rs, dtype, values, old_values, returns)
        loss, _, clipped = _value_terms_torch(v, v_old, ret, clip)
        loss_partials[rs, 0] = _row_dot(loss, m)
        stats[_V_MASK, rs, 0] = m.sum(-1)
        if clipped is not None:
            stats[_V_CLIP, rs, 0] = _row_dot(clipped, m)
    return loss_partials, stats


@_ppo_value_loss_fwd_torch.register_fake
def _(values, old_values, returns, mask, clip):
    rows = values.shape[0]
    dtype = compute_dtype(values, old_values, returns)
    return values.new_empty(rows, 1, dtype=dtype), values.new_empty(_VALUE_STATS, rows, 1, dtype=dtype)


@torch.library.custom_op("rlhf_kernels::ppo_value_loss_bwd_torch", mutates_args=())
def _ppo_value_loss_bwd_torch(
    grad_partials: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    rows, cols = values.shape
    dtype = compute_dtype(values, old_values, returns)
    grad_values = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    g = grad_partials.sum(-1, keepdim=True).to(dtype)
    for rs in _row_slices(rows, cols):
        _, m, (v, v_old, ret) = _masked_chunk(mask, rs, dtype, values, old_values, returns)
        _, d_v, _ = _value_terms_torch(v, v_old, ret, clip)
        grad_values[rs] = g[rs] * m * d_v
    return grad_values


@_ppo_value_loss_bwd_torch.register_fake
def _(grad_partials, values, old_values, returns, mask, clip):
    return values.new_empty(values.shape)


# ---------------------------------------------------------------------------------------------------
# Triton launchers.
# ---------------------------------------------------------------------------------------------------
def _launch_policy_fwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = logprobs.shape
    cfg = _row_tiling(rows, cols)
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    loss_partials = torch.empty(rows, cfg.chunks, dtype=dtype, device=logprobs.device)
    stats = torch.empty(_POLICY_STATS, rows, cfg.chunks, dtype=dtype, device=logprobs.device)
    mask = _kernel_mask(mask)
    wrap_triton(_ppo_policy_loss_fwd_kernel)[(rows, cfg.chunks)](
        logprobs, old_logprobs, advantages, mask, loss_partials, stats,
        logprobs.stride(0), logprobs.stride(1), old_logprobs.stride(0), old_logprobs.stride(1),
        advantages.stride(0), advantages.stride(1), mask.stride(0), mask.stride(1),
        stats.stride(0),
        cols, cfg.tiles_per_program,
        *_scalar_parts(clip_low, dtype), *_scalar_parts(clip_high, dtype),
        *_scalar_parts(0.0 if dual_clip is None else dual_clip, dtype),
        BLOCK_T=cfg.block_t, HAS_DUAL_CLIP=dual_clip is not None, num_warps=cfg.num_warps,
    )
    return loss_partials, stats


def _launch_policy_bwd(
    grad_partials: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    rows, cols = logprobs.shape
    cfg = _row_tiling(rows, cols)
    assert tuple(grad_partials.shape) == (rows, cfg.chunks), "gradient of the forward's partial sums"
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    grad_logprobs = torch.empty(rows, cols, dtype=logprobs.dtype, device=logprobs.device)
    mask = _kernel_mask(mask)
    wrap_triton(_ppo_policy_loss_bwd_kernel)[(rows, cfg.chunks)](
        grad_logprobs, grad_partials, logprobs, old_logprobs, advantages, mask,
        logprobs.stride(0), logprobs.stride(1), old_logprobs.stride(0), old_logprobs.stride(1),
        advantages.stride(0), advantages.stride(1), mask.stride(0), mask.stride(1),
        grad_partials.stride(0), grad_partials.stride(1),
        cols, cfg.tiles_per_program,
        *_scalar_parts(clip_low, dtype), *_scalar_parts(clip_high, dtype),
        *_scalar_parts(0.0 if dual_clip is None else dual_clip, dtype),
        BLOCK_T=cfg.block_t, HAS_DUAL_CLIP=dual_clip is not None, num_warps=cfg.num_warps,
    )
    return grad_logprobs


def _launch_value_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = values.shape
    cfg = _row_tiling(rows, cols)
    dtype = compute_dtype(values, old_values, returns)
    loss_partials = torch.empty(rows, cfg.chunks, dtype=dtype, device=values.device)
    stats = torch.empty(_VALUE_STATS, rows, cfg.chunks, dtype=dtype, device=values.device)
    mask = _kernel_mask(mask)
    wrap_triton(_ppo_value_loss_fwd_kernel)[(rows, cfg.chunks)](
        values, old_values, returns, mask, loss_partials, stats,
        values.stride(0), values.stride(1), old_values.stride(0), old_values.stride(1),
        returns.stride(0), returns.stride(1), mask.stride(0), mask.stride(1),
        stats.stride(0),
        cols, cfg.tiles_per_program, *_scalar_parts(0.0 if clip is None else clip, dtype),
        BLOCK_T=cfg.block_t, HAS_CLIP=clip is not None, num_warps=cfg.num_warps,
    )
    return loss_partials, stats


def _launch_value_bwd(
    grad_partials: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    rows, cols = values.shape
    cfg = _row_tiling(rows, cols)
    assert tuple(grad_partials.shape) == (rows, cfg.chunks), "gradient of the forward's partial sums"
    dtype = compute_dtype(values, old_values, returns)
    grad_values = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    mask = _kernel_mask(mask)
    wrap_triton(_ppo_value_loss_bwd_kernel)[(rows, cfg.chunks)](
        grad_values, grad_partials, values, old_values, returns, mask,
        values.stride(0), values.stride(1), old_values.stride(0), old_values.stride(1),
        returns.stride(0), returns.stride(1), mask.stride(0), mask.stride(1),
        grad_partials.stride(0), grad_partials.stride(1),
        cols, cfg.tiles_per_program, *_scalar_parts(0.0 if clip is None else clip, dtype),
        BLOCK_T=cfg.block_t, HAS_CLIP=clip is not None, num_warps=cfg.num_warps,
    )
    return grad_values


# ---------------------------------------------------------------------------------------------------
# Registration.  The forward ops return (loss partial sums [B, chunks], statistics [S, B, chunks]);
# only the loss partial sums are differentiable.  The number of chunks depends on the backend (1 on the
# PyTorch path), which is why the public functions always reduce over the last dimension.
# ---------------------------------------------------------------------------------------------------
@triton_op("rlhf_kernels::ppo_policy_loss_fwd", mutates_args=())
def ppo_policy_loss_fwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ L·m partial sums [B, chunks], statistics [6, B, chunks]: Σm, Σ clipped·m, Σ dual-clipped·m,
    Σ −ℓ·m, Σ r·m, max r), in fp32 (fp64 for fp64 inputs)."""
    args = (logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip)
    if _dispatch.backend_for(FAMILY, logprobs.device) == "triton":
        return _launch_policy_fwd(*args)
    return _dispatch.torch_path(_ppo_policy_loss_fwd_torch)(*args)


@triton_op("rlhf_kernels::ppo_policy_loss_bwd", mutates_args=())
def ppo_policy_loss_bwd(
    grad_partials: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    """∂/∂logprobs [B, T] (logprobs' dtype) given the gradient of the forward's loss partial sums."""
    args = (grad_partials, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip)
    if _dispatch.backend_for(FAMILY, logprobs.device) == "triton":
        return _launch_policy_bwd(*args)
    return _dispatch.torch_path(_ppo_policy_loss_bwd_torch)(*args)


def _policy_setup_context(ctx, inputs, output) -> None:
    logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip = inputs
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask)
    ctx.clips = (clip_low, clip_high, dual_clip)


def _policy_backward(ctx, grad_partials, grad_stats):
    logprobs, old_logprobs, advantages, mask = ctx.saved_tensors
    grad = ppo_policy_loss_bwd(
        grad_partials, logprobs, old_logprobs, advantages, mask, *ctx.clips  # any strides: an expand is fine
    )
    return grad, None, None, None, None, None, None


ppo_policy_loss_fwd.register_autograd(_policy_backward, setup_context=_policy_setup_context)


@triton_op("rlhf_kernels::ppo_value_loss_fwd", mutates_args=())
def ppo_value_loss_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ L·m partial sums [B, chunks], statistics [2, B, chunks]: Σm, Σ clipped·m)."""
    if _dispatch.backend_for(FAMILY, values.device) == "triton":
        return _launch_value_fwd(values, old_values, returns, mask, clip)
    return _dispatch.torch_path(_ppo_value_loss_fwd_torch)(values, old_values, returns, mask, clip)


@triton_op("rlhf_kernels::ppo_value_loss_bwd", mutates_args=())
def ppo_value_loss_bwd(
    grad_partials: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    """∂/∂values [B, T] (values' dtype) given the gradient of the forward's loss partial sums."""
    if _dispatch.backend_for(FAMILY, values.device) == "triton":
        return _launch_value_bwd(grad_partials, values, old_values, returns, mask, clip)
    body = _dispatch.torch_path(_ppo_value_loss_bwd_torch)
    return body(grad_partials, values, old_values, returns, mask, clip)


def _value_setup_context(ctx, inputs, output) -> None:
    values, old_values, returns, mask, clip = inputs
    ctx.save_for_backward(values, old_values, returns, mask)
    ctx.clip = clip


def _value_backward(ctx, grad_partials, grad_stats):
    values, old_values, returns, mask = ctx.saved_tensors
    grad = ppo_value_loss_bwd(grad_partials, values, old_values, returns, mask, ctx.clip)
    return grad, None, None, None, None


ppo_value_loss_fwd.register_autograd(_value_backward, setup_context=_value_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------
def _check_token_inputs(mask: object, **tensors: torch.Tensor) -> None:
    """[B, T] floating tensors of one dtype and a [B, T] mask, on one device, B, T >= 1."""
    (first_name, first), *others = tensors.items()
    for name, tensor in tensors.items():
        check_float_tensor(name, tensor, _LOSS_DTYPES)
    check_ndim(first_name, first, 2, "[B, T]")
    if first.numel() == 0:
        raise ValueError(
            f"{first_name} must be non-empty [B, T] with B, T >= 1; got shape {tuple(first.shape)}"
        )
    for name, tensor in others:
        check_shape(name, tensor, first.shape, f"{first_name}.shape")
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}); got {tensor.dtype}")
    check_mask_tensor("mask", mask)
    check_shape("mask", mask, first.shape, f"{first_name}.shape")
    check_same_device(**tensors, mask=mask)


def _row_sums(partials: torch.Tensor) -> torch.Tensor:
    """[B, chunks] partial sums -> [B]; no launch when a row is one chunk (the usual case)."""
    return partials.sum(dim=-1) if partials.shape[-1] > 1 else partials.squeeze(-1)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped PPO policy loss (optionally dual-clipped) and its metrics, fused.

    Args:
        logprobs: [B, T] log-probabilities of the sampled tokens under the current policy; float32,
            bfloat16, float16 (or float64), any strides.
        old_logprobs: [B, T], same dtype: under the policy that sampled them.
        advantages: [B, T], same dtype (an ``expand`` of [B, 1] works without a copy).
        mask: [B, T] bool, integer or floating 0/1 mask of the tokens that count.
        clip_low: ε_low > 0; the ratio is clipped below at 1 − ε_low.
        clip_high: ε_high > 0 (default ``clip_low``); the ratio is clipped above at 1 + ε_high.
        dual_clip: c > 1 enables dual clip: where A < 0 the loss is min(C, −A·c).  None disables it.
        loss_agg: one of :data:`rlhf_kernels.ops.aggregation.LOSS_AGG_MODES`.
        normalizer: replaces the aggregation's denominator (see ``agg_loss``), for micro-batches.

    Math, per token: ℓ = clamp(lp − old, −20, 20), r = e^ℓ, L1 = −A·r,
    L2 = −A·clamp(r, 1 − ε_low, 1 + ε_high), C = max(L1, L2); L = min(C, −A·c) where A < 0 with dual
    clip, else C.  The loss is ``agg(L, mask)``.

    Returns:
        ``(loss, metrics)``: loss 0-dim fp32 (fp64 for fp64 inputs), differentiable with respect to
        ``logprobs`` only (gradient in its dtype).  ``metrics`` maps ``clipfrac`` (masked mean of
        L2 > L1), ``clipfrac_lower`` (masked mean of C > −A·c and A < 0; 0 without dual clip),
        ``approx_kl`` (masked mean of −ℓ), ``ratio_mean`` (masked mean of r) and ``ratio_max`` (max of
        r over valid tokens; 0 when there are none) to 0-dim fp32 tensors.  Masked means divide by
        max(Σm, 1).  Nothing synchronises the device.

    Masked positions contribute exactly 0 and receive exactly zero gradient, whatever they hold.
    """
    _check_token_inputs(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    clip_low = check_greater("clip_low", clip_low, 0.0)
    clip_high = clip_low if clip_high is None else check_greater("clip_high", clip_high, 0.0)
    if dual_clip is not None:
        dual_clip = check_greater("dual_clip", dual_clip, 1.0)
    check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)

    loss_partials, stats = ppo_policy_loss_fwd(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip
    )
    stats = stats.detach()  # metrics carry no gradient
    loss = agg_row_sums(
        _row_sums(loss_partials), _row_sums(stats[_P_MASK]), loss_agg, logprobs.shape[1], normalizer
    )
    # Few, small launches: on the GPU they cost about as much as the fused kernel itself.
    totals = stats[:_P_RATIO_MAX].sum(dim=(1, 2))  # Σm, Σ clipped·m, Σ dual-clipped·m, Σ −ℓ·m, Σ r·m
    means = (totals[1:] / totals[:1].clamp(min=1.0)).to(torch.float32)
    clipfrac, clipfrac_lower, approx_kl, ratio_mean = means.unbind()
    # A NaN ratio at a valid token makes the ratio mean NaN; the max (which skipped it) follows.
    ratio_max = torch.where(ratio_mean.isnan(), ratio_mean, stats[_P_RATIO_MAX].amax().to(torch.float32))
    metrics = {
        "clipfrac": clipfrac,
        "clipfrac_lower": clipfrac_lower,
        "approx_kl": approx_kl,
        "ratio_mean": ratio_mean,
        "ratio_max": ratio_max,
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.5,
    loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The (clipped) PPO value loss ½·agg(max((v − R)², (clamp(v, v_old − ε, v_old + ε) − R)²)), fused.

    Args:
        values: [B, T] critic values v; float32, bfloat16, float16 (or float64), any strides.
        old_values: [B, T], same dtype: the values at rollout time (read only when clipping).
        returns: [B, T], same dtype: the targets R.
        mask: [B, T] bool, integer or floating 0/1 mask of the tokens that count.
        clip: ε > 0, or None for the unclipped ½·agg((v − R)²).
        loss_agg, normalizer: as for :func:`ppo_policy_loss`.

    Returns:
        ``(loss, metrics)``: loss 0-dim fp32 (fp64 for fp64 inputs), differentiable with respect to
        ``values`` only; ``metrics["clipfrac"]`` = masked mean of (v_clipped − R)² > (v − R)², 0-dim fp32
        (0 without clipping).  No device sync.  Masked positions contribute 0 and get zero gradient.
    """
    _check_token_inputs(mask, values=values, old_values=old_values, returns=returns)
    if clip is not None:
        clip = check_greater("clip", clip, 0.0)
    check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)

    loss_partials, stats = ppo_value_loss_fwd(values, old_values, returns, mask, clip)
    stats = stats.detach()
    loss = agg_row_sums(
        _row_sums(loss_partials), _row_sums(stats[_V_MASK]), loss_agg, values.shape[1], normalizer
    )
    totals = stats.sum(dim=(1, 2))  # Σm, Σ clipped·m
    clipfrac = (totals[_V_CLIP] / totals[_V_MASK].clamp(min=1.0)).to(torch.float32)
    return loss, {"clipfrac": clipfrac}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str = "k3",
    loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> torch.Tensor:
    """agg(k(lp, ref), mask): the KL penalty as a loss, 0-dim fp32 (fp64 for fp64 inputs).

    Args:
        logprobs: [B, T] policy log-probabilities (float32, bfloat16, float16 or float64).
        ref_logprobs: [B, T] reference log-probabilities (same dtype).
        mask: [B, T] 0/1 mask.
        estimator: ``"k1"``, ``"abs"``, ``"k2"``, ``"k3"`` / ``"low_var_kl"``, as defined by
            :func:`rlhf_kernels.ops.kl.kl_penalty` (the one definition in the library).
        loss_agg, normalizer: as for :func:`ppo_policy_loss`.

    Differentiable with respect to ``logprobs`` (and ``ref_logprobs`` if it requires grad).  Masked
    positions contribute 0 and receive zero gradient.  No device sync.
    """
    _check_token_inputs(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    estimator = check_estimator(estimator)
    check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)
    # Padding may hold NaN/inf: zero it first, so that masked positions get an exact 0 gradient (the
    # aggregation alone would multiply their zero upstream gradient by a NaN derivative).
    valid = mask != 0
    logprobs = torch.where(valid, logprobs, 0.0)
    ref_logprobs = torch.where(valid, ref_logprobs, 0.0)
    return agg_loss(kl_penalty(logprobs, ref_logprobs, estimator), mask, loss_agg, normalizer)
