"""PPO policy loss and value loss over [B, T] tokens, fused.

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
padding included), and receive exactly zero gradient, on every backend and in every aggregation mode
(also when the upstream gradient is not finite, e.g. a fully masked batch with a normalizer of 0).
NaN at a valid position gives a NaN loss.

Layout: Triton kernels → launch config → launchers → registration/autograd → public functions; the
PyTorch path is ``ops/cpu/ppo_losses.py``.  ``kl_loss`` lives in ``ops/kl.py`` (re-exported here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import check_greater, compute_dtype
from ._launch import (
    acc_dtype,
    cdiv,
    loadable_mask,
    pow2_between,
    scalar_arg,
    scalar_parts,
    tl,
    triton,
    wrap_triton,
)
from .aggregation import (
    TOKEN_MEAN,
    Normalizer,
    agg_row_sums,
    check_loss_agg,
    check_normalizer,
    check_token_inputs,
    chunk_totals,
)
from .cpu import ppo_losses as cpu
from .cpu.ppo_losses import LOG_RATIO_CLAMP, P_MASK, P_RATIO_MAX, POLICY_STATS, V_CLIP, V_MASK, VALUE_STATS
from .kl import kl_loss  # noqa: F401  (re-export: kl_loss lives in ops/kl.py)

FAMILY = "ppo_losses"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("cpp", "torch"))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Grid (B, chunks): program (b, c) covers columns [c·TILES·BLOCK_T, (c+1)·TILES·BLOCK_T)
# of row b, so that short batches of long rows still fill the GPU.  Every input is [B, T] with its own
# strides (an expand of [B, 1] advantages is read without a copy); the mask is bool (as uint8), integer
# or floating.  Clamps are written with comparisons (not minimum/maximum) so that NaN passes through.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    _LOG_RATIO_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)

    @triton.jit
    def _load_tile(
        x_ptr, y_ptr, z_ptr, mask_ptr, row, tile, T,
        stride_x0, stride_x1, stride_y0, stride_y1, stride_z0, stride_z1, stride_m0, stride_m1,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, LOAD_Y: tl.constexpr,
    ):
        """(columns, in-row flags, x, y, z, m) of tile ``tile`` of ``row``, in ``ACC``; without ``LOAD_Y``,
        y is x (not read)."""
        cols = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        in_row = cols < T
        m = tl.load(mask_ptr + row * stride_m0 + cols * stride_m1, mask=in_row, other=0).to(ACC)
        x = tl.load(x_ptr + row * stride_x0 + cols * stride_x1, mask=in_row, other=0.0).to(ACC)
        if LOAD_Y:
            y = tl.load(y_ptr + row * stride_y0 + cols * stride_y1, mask=in_row, other=0.0).to(ACC)
        else:
            y = x
        z = tl.load(z_ptr + row * stride_z0 + cols * stride_z1, mask=in_row, other=0.0).to(ACC)
        return cols, in_row, x, y, z, m

    @triton.jit
    def _policy_token_terms(lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL_CLIP: tl.constexpr):
        """(L, ∂L/∂lp, log-ratio ℓ, ratio r, clipped, dual-clipped) of one tile of tokens."""
        raw = lp - old
        out_of_clamp = (raw < -_LOG_RATIO_CLAMP) | (raw > _LOG_RATIO_CLAMP)
        log_ratio = tl.where(raw < -_LOG_RATIO_CLAMP, -_LOG_RATIO_CLAMP,
                             tl.where(raw > _LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP, raw))
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
            lower = clipped & (adv < adv)  # all False (NaN too), shaped like the tile
        d_lp = tl.where(out_of_clamp, 0.0, d_ratio * ratio)
        return loss, d_lp, log_ratio, ratio, clipped, lower

    # Reads lp, old, A and m once (13 bytes per token in fp32 with a bool mask); writes 7 floats per
    # program.
    @triton.jit
    def _ppo_policy_loss_fwd_kernel(
        logprobs_ptr, old_ptr, adv_ptr, mask_ptr, loss_partials_ptr, stats_ptr,
        stride_lp0, stride_lp1, stride_old0, stride_old1, stride_adv0, stride_adv1, stride_m0, stride_m1,
        stride_p0, stride_p1, stride_s0, stride_s1, stride_s2,
        T, tiles_per_program,
        clip_low_hi, clip_low_mid, clip_low_lo, clip_high_hi, clip_high_mid, clip_high_lo,
        dual_clip_hi, dual_clip_mid, dual_clip_lo,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        clip_low = scalar_arg(clip_low_hi, clip_low_mid, clip_low_lo, ACC)
        clip_high = scalar_arg(clip_high_hi, clip_high_mid, clip_high_lo, ACC)
        dual_clip = scalar_arg(dual_clip_hi, dual_clip_mid, dual_clip_lo, ACC)
        acc_loss = tl.zeros((BLOCK_T,), ACC)
        acc_mask = tl.zeros((BLOCK_T,), ACC)
        acc_clip = tl.zeros((BLOCK_T,), ACC)
        acc_lower = tl.zeros((BLOCK_T,), ACC)
        acc_neg_log_ratio = tl.zeros((BLOCK_T,), ACC)
        acc_ratio = tl.zeros((BLOCK_T,), ACC)
        ratio_max = tl.zeros((BLOCK_T,), ACC)  # ratios are > 0: 0 is "no valid token"
        for k in range(0, tiles_per_program):
            _, _, lp, old, adv, m = _load_tile(
                logprobs_ptr, old_ptr, adv_ptr, mask_ptr, row, chunk * tiles_per_program + k, T,
                stride_lp0, stride_lp1, stride_old0, stride_old1, stride_adv0, stride_adv1,
                stride_m0, stride_m1,
                BLOCK_T, ACC, True,
            )
            loss, _, log_ratio, ratio, clipped, lower = _policy_token_terms(
                lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL_CLIP
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
        tl.store(loss_partials_ptr + row * stride_p0 + chunk * stride_p1, tl.sum(acc_loss, axis=0))
        stats = stats_ptr + row * stride_s1 + chunk * stride_s2
        tl.store(stats + 0 * stride_s0, tl.sum(acc_mask, axis=0))
        tl.store(stats + 1 * stride_s0, tl.sum(acc_clip, axis=0))
        tl.store(stats + 2 * stride_s0, tl.sum(acc_lower, axis=0))
        tl.store(stats + 3 * stride_s0, tl.sum(acc_neg_log_ratio, axis=0))
        tl.store(stats + 4 * stride_s0, tl.sum(acc_ratio, axis=0))
        tl.store(stats + 5 * stride_s0, tl.max(ratio_max, axis=0))

    # Reads lp, old, A, m again and writes ∂/∂lp (17 bytes per token in fp32 with a bool mask).
    @triton.jit
    def _ppo_policy_loss_bwd_kernel(
        grad_logprobs_ptr, grad_partials_ptr, logprobs_ptr, old_ptr, adv_ptr, mask_ptr,
        stride_lp0, stride_lp1, stride_old0, stride_old1, stride_adv0, stride_adv1, stride_m0, stride_m1,
        stride_glp0, stride_glp1, stride_g0, stride_g1,
        T, tiles_per_program,
        clip_low_hi, clip_low_mid, clip_low_lo, clip_high_hi, clip_high_mid, clip_high_lo,
        dual_clip_hi, dual_clip_mid, dual_clip_lo,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        clip_low = scalar_arg(clip_low_hi, clip_low_mid, clip_low_lo, ACC)
        clip_high = scalar_arg(clip_high_hi, clip_high_mid, clip_high_lo, ACC)
        dual_clip = scalar_arg(dual_clip_hi, dual_clip_mid, dual_clip_lo, ACC)
        g = tl.load(grad_partials_ptr + row * stride_g0 + chunk * stride_g1).to(ACC)
        for k in range(0, tiles_per_program):
            cols, in_row, lp, old, adv, m = _load_tile(
                logprobs_ptr, old_ptr, adv_ptr, mask_ptr, row, chunk * tiles_per_program + k, T,
                stride_lp0, stride_lp1, stride_old0, stride_old1, stride_adv0, stride_adv1,
                stride_m0, stride_m1,
                BLOCK_T, ACC, True,
            )
            _, d_lp, _, _, _, _ = _policy_token_terms(
                lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL_CLIP
            )
            grad = tl.where(m != 0, g * m * d_lp, 0.0)
            tl.store(grad_logprobs_ptr + row * stride_glp0 + cols * stride_glp1,
                     grad.to(grad_logprobs_ptr.dtype.element_ty), mask=in_row)

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
            clipped = err < err  # all False (NaN too), shaped like the tile
            d_v = err
        return loss, d_v, clipped

    # Reads v, v_old (only with a clip), R and m once; writes 3 floats per program.
    @triton.jit
    def _ppo_value_loss_fwd_kernel(
        values_ptr, old_ptr, returns_ptr, mask_ptr, loss_partials_ptr, stats_ptr,
        stride_v0, stride_v1, stride_old0, stride_old1, stride_r0, stride_r1, stride_m0, stride_m1,
        stride_p0, stride_p1, stride_s0, stride_s1, stride_s2,
        T, tiles_per_program, clip_hi, clip_mid, clip_lo,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, HAS_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        clip = scalar_arg(clip_hi, clip_mid, clip_lo, ACC)
        acc_loss = tl.zeros((BLOCK_T,), ACC)
        acc_mask = tl.zeros((BLOCK_T,), ACC)
        acc_clip = tl.zeros((BLOCK_T,), ACC)
        for k in range(0, tiles_per_program):
            _, _, v, v_old, ret, m = _load_tile(
                values_ptr, old_ptr, returns_ptr, mask_ptr, row, chunk * tiles_per_program + k, T,
                stride_v0, stride_v1, stride_old0, stride_old1, stride_r0, stride_r1, stride_m0, stride_m1,
                BLOCK_T, ACC, HAS_CLIP,
            )
            loss, _, clipped = _value_token_terms(v, v_old, ret, clip, HAS_CLIP)
            valid = m != 0
            acc_loss += tl.where(valid, loss * m, 0.0)
            acc_mask += m
            acc_clip += tl.where(valid & clipped, m, 0.0)
        tl.store(loss_partials_ptr + row * stride_p0 + chunk * stride_p1, tl.sum(acc_loss, axis=0))
        stats = stats_ptr + row * stride_s1 + chunk * stride_s2
        tl.store(stats + 0 * stride_s0, tl.sum(acc_mask, axis=0))
        tl.store(stats + 1 * stride_s0, tl.sum(acc_clip, axis=0))

    # Reads v, v_old (only with a clip), R, m again and writes ∂/∂v.
    @triton.jit
    def _ppo_value_loss_bwd_kernel(
        grad_values_ptr, grad_partials_ptr, values_ptr, old_ptr, returns_ptr, mask_ptr,
        stride_v0, stride_v1, stride_old0, stride_old1, stride_r0, stride_r1, stride_m0, stride_m1,
        stride_gv0, stride_gv1, stride_g0, stride_g1,
        T, tiles_per_program, clip_hi, clip_mid, clip_lo,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, HAS_CLIP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        clip = scalar_arg(clip_hi, clip_mid, clip_lo, ACC)
        g = tl.load(grad_partials_ptr + row * stride_g0 + chunk * stride_g1).to(ACC)
        for k in range(0, tiles_per_program):
            cols, in_row, v, v_old, ret, m = _load_tile(
                values_ptr, old_ptr, returns_ptr, mask_ptr, row, chunk * tiles_per_program + k, T,
                stride_v0, stride_v1, stride_old0, stride_old1, stride_r0, stride_r1, stride_m0, stride_m1,
                BLOCK_T, ACC, HAS_CLIP,
            )
            _, d_v, _ = _value_token_terms(v, v_old, ret, clip, HAS_CLIP)
            grad = tl.where(m != 0, g * m * d_v, 0.0)
            tl.store(grad_values_ptr + row * stride_gv0 + cols * stride_gv1,
                     grad.to(grad_values_ptr.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _RowTiling:
    block_t: int  # columns per tile
    tiles_per_program: int
    chunks: int  # programs per row
    num_warps: int


# Rows are split only below ~2 programs per SM of an H100 (132 SMs): a split costs one more reduction
# launch in the finishing step, which at these sizes weighs as much as the kernel itself.
_TARGET_PROGRAMS = 256


# Register budget 128/thread (bench/static/budgets.py, checked by tests/test_static.py): >= 16 resident
# warps per SM keep ~25 KiB of 16-byte loads in flight.
def _row_tiling(rows: int, cols: int) -> _RowTiling:
    """Tiles of up to 1024 columns (4 warps: 8 fp32 per thread per input, two 16-byte vectors); a row is
    split into several programs only when there are too few rows to reach ~_TARGET_PROGRAMS programs."""
    block_t = pow2_between(cols, 16, 1024)
    tiles = max(1, cdiv(cols, block_t))  # T = 0 still gets one (empty) tile per row
    chunks = min(tiles, max(1, cdiv(_TARGET_PROGRAMS, max(rows, 1))))
    tiles_per_program = cdiv(tiles, chunks)
    chunks = cdiv(tiles, tiles_per_program)
    num_warps = 4 if block_t >= 512 else (2 if block_t >= 128 else 1)
    return _RowTiling(block_t, tiles_per_program, chunks, num_warps)


# ---------------------------------------------------------------------------------------------------
# Launchers: one shape per kernel kind.  A forward writes loss partial sums [B, chunks] and statistics
# [S, B, chunks]; a backward writes the gradient [B, T] of its first input.  Both take the loss's three
# [B, T] inputs, the mask and its scalars, the last of which is optional (None: its constexpr flag is
# off).  ``*_out`` write into outputs the caller allocated (any strides); the others allocate.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    # loss -> (forward kernel, backward kernel, statistics rows, flag of the optional last scalar)
    _KERNELS = {
        "policy": (_ppo_policy_loss_fwd_kernel, _ppo_policy_loss_bwd_kernel, POLICY_STATS, "HAS_DUAL_CLIP"),
        "value": (_ppo_value_loss_fwd_kernel, _ppo_value_loss_bwd_kernel, VALUE_STATS, "HAS_CLIP"),
    }


def _launch_args(
    inputs: tuple[torch.Tensor, ...], mask: torch.Tensor, scalars: tuple[float | None, ...]
) -> tuple[list[torch.Tensor], list[int], list[float], bool]:
    """(inputs and mask, their strides, every scalar as scalar_parts, whether the optional one is set)."""
    tensors = [*inputs, loadable_mask(mask)]
    *required, optional = scalars
    dtype = compute_dtype(*inputs)
    parts = [p for v in (*required, 0.0 if optional is None else optional) for p in scalar_parts(v, dtype)]
    return tensors, [st for t in tensors for st in t.stride()], parts, optional is not None


def _launch_fwd_out(
    loss: str, loss_partials: torch.Tensor, stats: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    z: torch.Tensor, mask: torch.Tensor, *scalars: float | None,
) -> None:
    kernel, _, n_stats, option = _KERNELS[loss]
    rows, cols = x.shape
    cfg = _row_tiling(rows, cols)
    assert tuple(loss_partials.shape) == (rows, cfg.chunks)
    assert tuple(stats.shape) == (n_stats, rows, cfg.chunks)
    assert loss_partials.dtype == stats.dtype == compute_dtype(x, y, z)
    tensors, strides, parts, has_option = _launch_args((x, y, z), mask, scalars)
    wrap_triton(kernel)[(rows, cfg.chunks)](
        *tensors, loss_partials, stats,
        *strides, *loss_partials.stride(), *stats.stride(),
        cols, cfg.tiles_per_program, *parts,
        BLOCK_T=cfg.block_t, ACC=acc_dtype(x, y, z), num_warps=cfg.num_warps, **{option: has_option},
    )


def _launch_bwd_out(
    loss: str, grad: torch.Tensor, grad_partials: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    z: torch.Tensor, mask: torch.Tensor, *scalars: float | None,
) -> None:
    _, kernel, _, option = _KERNELS[loss]
    rows, cols = x.shape
    cfg = _row_tiling(rows, cols)
    assert tuple(grad_partials.shape) == (rows, cfg.chunks), "gradient of the forward's partial sums"
    assert tuple(grad.shape) == (rows, cols)
    tensors, strides, parts, has_option = _launch_args((x, y, z), mask, scalars)
    wrap_triton(kernel)[(rows, cfg.chunks)](
        grad, grad_partials, *tensors,
        *strides, *grad.stride(), *grad_partials.stride(),
        cols, cfg.tiles_per_program, *parts,
        BLOCK_T=cfg.block_t, ACC=acc_dtype(x, y, z), num_warps=cfg.num_warps, **{option: has_option},
    )


def _launch_fwd(
    loss: str, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, *scalars: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    chunks = _row_tiling(rows, cols).chunks
    dtype = compute_dtype(x, y, z)
    loss_partials = torch.empty(rows, chunks, dtype=dtype, device=x.device)
    stats = torch.empty(_KERNELS[loss][2], rows, chunks, dtype=dtype, device=x.device)
    _launch_fwd_out(loss, loss_partials, stats, x, y, z, mask, *scalars)
    return loss_partials, stats


def _launch_bwd(
    loss: str, grad_partials: torch.Tensor, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
    mask: torch.Tensor, *scalars: float | None,
) -> torch.Tensor:
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_bwd_out(loss, grad, grad_partials, x, y, z, mask, *scalars)
    return grad


# The routing ops' Triton implementations: (logprobs, old_logprobs, advantages, mask, clip_low,
# clip_high, dual_clip) and (values, old_values, returns, mask, clip), gradients first in the backward.
_launch_policy_fwd = functools.partial(_launch_fwd, "policy")
_launch_policy_bwd = functools.partial(_launch_bwd, "policy")
_launch_value_fwd = functools.partial(_launch_fwd, "value")
_launch_value_bwd = functools.partial(_launch_bwd, "value")


# ---------------------------------------------------------------------------------------------------
# Registration.  The forward ops return (loss partial sums [B, chunks], statistics [S, B, chunks]);
# only the loss partial sums are differentiable.  The number of chunks depends on the backend (1 on the
# PyTorch path), which is why the public functions always reduce over the last dimension.
# ---------------------------------------------------------------------------------------------------
@kernel_op("ppo_policy_loss_fwd")
def ppo_policy_loss_fwd(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_low: float, clip_high: float, dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ L·m partial sums [B, chunks], statistics [6, B, chunks]: Σm, Σ clipped·m, Σ dual-clipped·m,
    Σ −ℓ·m, Σ r·m, max r), in fp32 (fp64 for fp64 inputs)."""
    return _dispatch.route(
        FAMILY, logprobs.device, triton=_launch_policy_fwd, cpp=cpu.ppo_policy_loss_fwd_cpp,
        torch=cpu.ppo_policy_loss_fwd_torch,
    )(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip)


@kernel_op("ppo_policy_loss_bwd")
def ppo_policy_loss_bwd(
    grad_partials: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
    advantages: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
) -> torch.Tensor:
    """∂/∂logprobs [B, T] (logprobs' dtype) given the gradient of the forward's loss partial sums."""
    return _dispatch.route(
        FAMILY, logprobs.device, triton=_launch_policy_bwd, cpp=cpu.ppo_policy_loss_bwd_cpp,
        torch=cpu.ppo_policy_loss_bwd_torch,
    )(grad_partials, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip)


@kernel_op("ppo_value_loss_fwd")
def ppo_value_loss_fwd(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ L·m partial sums [B, chunks], statistics [2, B, chunks]: Σm, Σ clipped·m)."""
    return _dispatch.route(
        FAMILY, values.device, triton=_launch_value_fwd, cpp=cpu.ppo_value_loss_fwd_cpp,
        torch=cpu.ppo_value_loss_fwd_torch,
    )(values, old_values, returns, mask, clip)


@kernel_op("ppo_value_loss_bwd")
def ppo_value_loss_bwd(
    grad_partials: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
    mask: torch.Tensor, clip: float | None,
) -> torch.Tensor:
    """∂/∂values [B, T] (values' dtype) given the gradient of the forward's loss partial sums."""
    return _dispatch.route(
        FAMILY, values.device, triton=_launch_value_bwd, cpp=cpu.ppo_value_loss_bwd_cpp,
        torch=cpu.ppo_value_loss_bwd_torch,
    )(grad_partials, values, old_values, returns, mask, clip)


def _register_autograd(forward, backward_op) -> None:
    """Both forwards take (x, y, z, mask, *scalars) and differentiate the loss partial sums in x only."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:4])
        ctx.scalars = inputs[4:]

    def backward(ctx, grad_partials, grad_stats):
        grad = backward_op(grad_partials, *ctx.saved_tensors, *ctx.scalars)
        return (grad,) + (None,) * (3 + len(ctx.scalars))

    forward.register_autograd(backward, setup_context=setup_context)


_register_autograd(ppo_policy_loss_fwd, ppo_policy_loss_bwd)
_register_autograd(ppo_value_loss_fwd, ppo_value_loss_bwd)


# ---------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------
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
    is_weights: torch.Tensor | None = None,
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
        loss_agg: one of :data:`rlhf_kernels.ops.aggregation.LOSS_AGG_MODES` (verl 0.9.1's meanings).
        normalizer: replaces the aggregation's whole denominator, for micro-batches (docs/aggregation.md).
        is_weights: optional [B, T] rollout importance weights w (no gradient; e.g. from
            :func:`rlhf_kernels.rollout_correction`): the per-token loss becomes L·w (verl's
            ``rollout_is_weights``); the metrics stay unweighted.  Runs the token-level core of
            ``ops/policy_losses.py`` (variant "vanilla"), which reads w in the same single pass.

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

    Masked positions contribute exactly 0 and receive exactly zero gradient, whatever they hold; a
    fully masked batch gives a zero gradient in every mode.
    """
    check_token_inputs(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    clip_low = check_greater("clip_low", clip_low, 0.0)
    clip_high = clip_low if clip_high is None else check_greater("clip_high", clip_high, 0.0)
    if dual_clip is not None:
        dual_clip = check_greater("dual_clip", dual_clip, 1.0)
    check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)

    from .policy_losses import saves_derivative, weighted_vanilla_fwd  # that module imports this one

    if is_weights is None and not saves_derivative(logprobs):
        loss_partials, stats = ppo_policy_loss_fwd(
            logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip
        )
    else:  # rollout weights, or the C++ path keeping D for its backward: the token-level core's "vanilla"
        loss_partials, stats = weighted_vanilla_fwd(
            logprobs, old_logprobs, advantages, mask, is_weights, clip_low, clip_high, dual_clip
        )
    stats = stats.detach()  # metrics carry no gradient
    loss = agg_row_sums(
        chunk_totals(loss_partials), chunk_totals(stats[P_MASK]), loss_agg, logprobs.shape[1], normalizer
    )
    # Few, small launches: on the GPU they cost about as much as the fused kernel itself.
    totals = stats[:P_RATIO_MAX].sum(dim=(1, 2))  # Σm, Σ clipped·m, Σ dual-clipped·m, Σ −ℓ·m, Σ r·m
    means = (totals[1:] / totals[:1].clamp(min=1.0)).to(torch.float32)
    clipfrac, clipfrac_lower, approx_kl, ratio_mean = means.unbind()
    # A NaN ratio at a valid token makes the ratio mean NaN; the max (which skipped it) follows.
    ratio_max_parts = stats[P_RATIO_MAX]
    peak = ratio_max_parts.amax() if ratio_max_parts.numel() else stats.new_zeros(())  # B = 0: no tokens
    ratio_max = torch.where(ratio_mean.isnan(), ratio_mean, peak.to(torch.float32))
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
        (0 without clipping).  No device sync.  Masked positions contribute 0 and get zero gradient; a
        fully masked batch gives a zero gradient in every mode.
    """
    check_token_inputs(mask, values=values, old_values=old_values, returns=returns)
    if clip is not None:
        clip = check_greater("clip", clip, 0.0)
    check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)

    loss_partials, stats = ppo_value_loss_fwd(values, old_values, returns, mask, clip)
    stats = stats.detach()
    loss = agg_row_sums(
        chunk_totals(loss_partials), chunk_totals(stats[V_MASK]), loss_agg, values.shape[1], normalizer
    )
    totals = stats.sum(dim=(1, 2))  # Σm, Σ clipped·m
    clipfrac = (totals[V_CLIP] / totals[V_MASK].clamp(min=1.0)).to(torch.float32)
    return loss, {"clipfrac": clipfrac}


__all__ = ["kl_loss", "ppo_policy_loss", "ppo_value_loss"]
