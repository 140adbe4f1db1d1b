"""Reward-model losses: pairwise (Bradley-Terry), K-way ranking (InstructGPT), pointwise (MSE) and RRHF's
ranking hinge.

With sp(x) = −log σ(x) = log(1 + e^{−x}), evaluated as max(−x, 0) + log1p(e^{−|x|}) so that it is exact
for |x| up to the fp32 range (e^{−|x|} underflows to 0 instead of e^{|x|} overflowing):

    pairwise   mean_n sp(c_n − r_n − margin_n)  (+ center_coef · mean_n (c_n + r_n)²)
    ranking    mean over prompts b with a valid pair of  mean_{i<j valid} sp(s_bi − s_bj)
    hinge      mean over prompts b of  Σ_{i<j valid} max(0, s_bj − s_bi)
    pointwise  mean_n (p_n − t_n)²

Gradients: ∂sp(x)/∂x = −σ(−x), with σ(−x) = e/(1 + e) for x ≥ 0 and 1/(1 + e) for x < 0, e = e^{−|x|};
the hinge's derivative is 1[x > 0] (0 at a tie, as ``torch.relu``).

Kernels write per-block (pairwise, pointwise) or per-prompt (ranking, hinge) partial sums; the means
are taken in plain torch.  Inputs are read in their dtype, all arithmetic is fp32 (fp64 for fp64).
NaN in gives NaN out.  The PyTorch path is ``ops/cpu/reward_losses.py``; the float64 oracle
``reference/reward_losses.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_float_tensor,
    check_mask_tensor,
    check_ndim,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)
from . import _launch
from .cpu import reward_losses as cpu

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    from ._launch import scalar_arg
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = None

FAMILY = "reward_losses"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))

_REWARD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Outputs first; the flat kernels (pairwise, pointwise) take contiguous 1-D inputs and
# write one partial sum per program, the ranking kernels one program per prompt of scores [B, K] (any
# strides).
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _neg_log_sigmoid(x):
        """−log σ(x) = max(−x, 0) + log1p(e^{−|x|}); log1p by Goldberg's log(u)·e/(u − 1), u = 1 + e,
        accurate to a few ulps without a libdevice call."""
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
        return tl.where(x < 0, -x, 0.0) + log1p_e

    @triton.jit
    def _sigmoid_of_neg(x):
        """σ(−x), without overflow."""
        e = tl.exp(-tl.abs(x))
        return tl.where(x >= 0, e / (1.0 + e), 1.0 / (1.0 + e))

    @triton.jit
    def _relu_derivative(x):
        """1[x > 0], NaN for NaN."""
        return tl.where(x > 0, 1.0, tl.where(x <= 0, 0.0, x))

    @triton.jit
    def _block_offsets(N, BLOCK: tl.constexpr):
        """(program id, its BLOCK int64 offsets, which of them are < N)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return pid, offs, offs < N

    @triton.jit
    def _load_pair(
        chosen_ptr, rejected_ptr, margin_ptr, offs, in_range, margin_hi, margin_mid, margin_lo,
        HAS_MARGIN_TENSOR: tl.constexpr, ACC: tl.constexpr,
    ):
        """(c, r, margin) at ``offs`` in ACC; 0 out of range.  The margin is the tensor's elements with
        HAS_MARGIN_TENSOR, else the scalar passed as ``scalar_parts``."""
        c = tl.load(chosen_ptr + offs, mask=in_range, other=0.0).to(ACC)
        r = tl.load(rejected_ptr + offs, mask=in_range, other=0.0).to(ACC)
        if HAS_MARGIN_TENSOR:
            margin = tl.load(margin_ptr + offs, mask=in_range, other=0.0).to(ACC)
        else:
            margin = scalar_arg(margin_hi, margin_mid, margin_lo, ACC)
        return c, r, margin

    @triton.jit
    def _load_error(pred_ptr, target_ptr, offs, in_range, ACC: tl.constexpr):
        """p − t at ``offs`` in ACC; 0 out of range."""
        p = tl.load(pred_ptr + offs, mask=in_range, other=0.0).to(ACC)
        return p - tl.load(target_ptr + offs, mask=in_range, other=0.0).to(ACC)

    @triton.jit
    def _load_scores(
        row_scores, row_mask, idx, stride_s1, stride_m1, K, HAS_MASK: tl.constexpr, ACC: tl.constexpr
    ):
        """(scores at ``idx`` of one prompt in ACC, validity: idx < K and, with HAS_MASK, mask != 0)."""
        valid = idx < K
        s = tl.load(row_scores + idx * stride_s1, mask=valid, other=0.0).to(ACC)
        if HAS_MASK:
            valid &= tl.load(row_mask + idx * stride_m1, mask=valid, other=0) != 0
        return s, valid

    # Reads c, r (and a margin tensor) once; writes 4 values per program.
    @triton.jit
    def _pairwise_reward_fwd_kernel(
        partials_ptr, stats_ptr, chosen_ptr, rejected_ptr, margin_ptr,
        N, margin_hi, margin_mid, margin_lo,
        BLOCK: tl.constexpr, HAS_MARGIN_TENSOR: tl.constexpr, ACC: tl.constexpr,
    ):
        pid, offs, in_range = _block_offsets(N, BLOCK)
        n_blocks = tl.num_programs(0)
        c, r, margin = _load_pair(
            chosen_ptr, rejected_ptr, margin_ptr, offs, in_range, margin_hi, margin_mid, margin_lo,
            HAS_MARGIN_TENSOR, ACC,
        )
        diff = c - r
        center = (c + r) * (c + r)
        tl.store(partials_ptr + pid, tl.sum(tl.where(in_range, _neg_log_sigmoid(diff - margin), 0.0), axis=0))
        tl.store(partials_ptr + n_blocks + pid, tl.sum(tl.where(in_range, center, 0.0), axis=0))
        tl.store(stats_ptr + pid, tl.sum(tl.where(in_range & (c > r), 1.0, 0.0), axis=0))
        tl.store(stats_ptr + n_blocks + pid, tl.sum(tl.where(in_range, diff, 0.0), axis=0))

    # Reads c, r (and a margin tensor) and 2 values per program; writes ∂/∂c, ∂/∂r once.
    @triton.jit
    def _pairwise_reward_bwd_kernel(
        grad_chosen_ptr, grad_rejected_ptr, grad_partials_ptr, chosen_ptr, rejected_ptr, margin_ptr,
        N, margin_hi, margin_mid, margin_lo,
        BLOCK: tl.constexpr, HAS_MARGIN_TENSOR: tl.constexpr, ACC: tl.constexpr,
    ):
        pid, offs, in_range = _block_offsets(N, BLOCK)
        g_loss = tl.load(grad_partials_ptr + pid).to(ACC)
        g_center = tl.load(grad_partials_ptr + tl.num_programs(0) + pid).to(ACC)
        c, r, margin = _load_pair(
            chosen_ptr, rejected_ptr, margin_ptr, offs, in_range, margin_hi, margin_mid, margin_lo,
            HAS_MARGIN_TENSOR, ACC,
        )
        d_loss = g_loss * _sigmoid_of_neg(c - r - margin)  # = −∂/∂c = ∂/∂r of sp(c − r − margin)
        d_center = g_center * 2.0 * (c + r)
        grad_chosen = (d_center - d_loss).to(grad_chosen_ptr.dtype.element_ty)
        grad_rejected = (d_center + d_loss).to(grad_rejected_ptr.dtype.element_ty)
        tl.store(grad_chosen_ptr + offs, grad_chosen, mask=in_range)
        tl.store(grad_rejected_ptr + offs, grad_rejected, mask=in_range)

    # Reads a prompt's K scores (and mask) once per tile row (K/BLOCK_K times, from L1/L2); writes 3
    # values per prompt.  Only the tiles on or above the diagonal (the pairs i < j) are visited.
    @triton.jit
    def _ranking_fwd_kernel(
        loss_partials_ptr, stats_ptr, scores_ptr, mask_ptr,
        stride_s0, stride_s1, stride_m0, stride_m1,
        B, K,
        BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, HINGE: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_scores = scores_ptr + row * stride_s0
        row_mask = mask_ptr + row * stride_m0
        acc_loss = tl.zeros((), ACC)
        acc_pairs = tl.zeros((), ACC)
        acc_correct = tl.zeros((), ACC)
        for i0 in range(0, K, BLOCK_K):
            ii = i0 + tl.arange(0, BLOCK_K)
            s_i, valid_i = _load_scores(row_scores, row_mask, ii, stride_s1, stride_m1, K, HAS_MASK, ACC)
            for j0 in range(i0, K, BLOCK_K):
                jj = j0 + tl.arange(0, BLOCK_K)
                s_j, valid_j = _load_scores(row_scores, row_mask, jj, stride_s1, stride_m1, K, HAS_MASK, ACC)
                pair = (ii[:, None] < jj[None, :]) & valid_i[:, None] & valid_j[None, :]
                d = s_i[:, None] - s_j[None, :]
                if HINGE:
                    term = tl.where(d > 0, 0.0, -d)  # max(0, s_j − s_i), NaN kept
                else:
                    term = _neg_log_sigmoid(d)
                acc_loss += tl.sum(tl.sum(tl.where(pair, term, 0.0), axis=1), axis=0)
                acc_pairs += tl.sum(tl.sum(tl.where(pair, 1.0, 0.0), axis=1), axis=0)
                acc_correct += tl.sum(tl.sum(tl.where(pair & (d > 0), 1.0, 0.0), axis=1), axis=0)
        tl.store(loss_partials_ptr + row, acc_loss)
        tl.store(stats_ptr + row, acc_pairs)
        tl.store(stats_ptr + B + row, acc_correct)

    # Reads a prompt's K scores (and mask) K/BLOCK_K + 1 times (from L1/L2) and 1 value; writes its K
    # gradients once.
    @triton.jit
    def _ranking_bwd_kernel(
        grad_scores_ptr, grad_partials_ptr, scores_ptr, mask_ptr,
        stride_s0, stride_s1, stride_m0, stride_m1,
        K,
        BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, HINGE: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_scores = scores_ptr + row * stride_s0
        row_mask = mask_ptr + row * stride_m0
        g = tl.load(grad_partials_ptr + row).to(ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            s_k, valid_k = _load_scores(row_scores, row_mask, kk, stride_s1, stride_m1, K, HAS_MASK, ACC)
            acc = tl.zeros((BLOCK_K,), ACC)
            for j0 in range(0, K, BLOCK_K):
                jj = j0 + tl.arange(0, BLOCK_K)
                s_j, valid_j = _load_scores(row_scores, row_mask, jj, stride_s1, stride_m1, K, HAS_MASK, ACC)
                # The pair's term is f(x), x = s_above − s_below: x = s_k − s_j when k ranks above j
                # (∂/∂s_k = f'(x)), x = s_j − s_k when below (∂/∂s_k = −f'(x)); −f'(x) = σ(−x) for sp,
                # 1[−x > 0] for the hinge.  One exponential per pair.
                above = kk[:, None] < jj[None, :]
                x = tl.where(above, s_k[:, None] - s_j[None, :], s_j[None, :] - s_k[:, None])
                if HINGE:
                    neg_df = _relu_derivative(-x)
                else:
                    neg_df = _sigmoid_of_neg(x)
                w = tl.where(above, -neg_df, tl.where(kk[:, None] > jj[None, :], neg_df, 0.0))
                acc += tl.sum(tl.where(valid_k[:, None] & valid_j[None, :], w, 0.0), axis=1)
            grad = (g * acc).to(grad_scores_ptr.dtype.element_ty)
            tl.store(grad_scores_ptr + row * K + kk, grad, mask=kk < K)

    # Reads p, t once; writes 1 value per program.
    @triton.jit
    def _pointwise_reward_fwd_kernel(
        partials_ptr, pred_ptr, target_ptr, N, BLOCK: tl.constexpr, ACC: tl.constexpr
    ):
        pid, offs, in_range = _block_offsets(N, BLOCK)
        err = _load_error(pred_ptr, target_ptr, offs, in_range, ACC)
        tl.store(partials_ptr + pid, tl.sum(err * err, axis=0))

    # Reads p, t once and 1 value per program; writes ∂/∂p once.
    @triton.jit
    def _pointwise_reward_bwd_kernel(
        grad_pred_ptr, grad_partials_ptr, pred_ptr, target_ptr, N, BLOCK: tl.constexpr, ACC: tl.constexpr
    ):
        pid, offs, in_range = _block_offsets(N, BLOCK)
        g = tl.load(grad_partials_ptr + pid).to(ACC)
        err = _load_error(pred_ptr, target_ptr, offs, in_range, ACC)
        tl.store(grad_pred_ptr + offs, (2.0 * g * err).to(grad_pred_ptr.dtype.element_ty), mask=in_range)


# ---------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------
FLAT_BLOCK = 1024  # elements per program of the pairwise and pointwise kernels
# Register budget 128/thread for the ranking kernels, 128 for the flat ones (bench/static/budgets.py,
# checked by tests/test_static.py): 8 warps at K = 64, 2 CTAs per SM.
PAIR_TILE = 64  # the ranking kernels' pair tiles are at most PAIR_TILE × PAIR_TILE
# Issue 13 measured the ranking forward kernel at 255 registers per thread on sm_90 (the architectural
# maximum: it may spill, and it caps occupancy) with 64 × 64 tiles over 4 warps, i.e. 32 pairs per
# thread, each with d, sp(d) and three masks live.  Warps are now chosen so that a thread holds at most
# PAIRS_PER_THREAD pairs: 8 warps for 64 × 64 tiles (16 × 16 and 32 × 32 keep their 2 warps).  Not yet
# re-measured on a GPU.
PAIRS_PER_THREAD = 16


@dataclass(frozen=True)
class _LaunchConfig:
    """``programs`` programs of ``num_warps`` warps, each over ``block`` elements (flat kernels) or a
    prompt in ``block`` × ``block`` pair tiles (ranking kernels)."""

    programs: int
    block: int
    num_warps: int

    @classmethod
    def flat(cls, n: int) -> _LaunchConfig:
        """FLAT_BLOCK elements per program (4 warps); tiny inputs one block sized to them (1 warp)."""
        block = _launch.pow2_between(n, 16, FLAT_BLOCK)
        return cls(_launch.cdiv(n, block), block, 4 if block >= 512 else 1)

    @classmethod
    def ranking(cls, prompts: int, k: int) -> _LaunchConfig:
        """One prompt per program; tiles sized to K up to PAIR_TILE, ≤ PAIRS_PER_THREAD pairs a thread."""
        block = _launch.pow2_between(k, 16, PAIR_TILE)
        return cls(prompts, block, max(2, block * block // (32 * PAIRS_PER_THREAD)))


# ---------------------------------------------------------------------------------------------------
# Launchers: ``_<op>_out(outputs..., inputs...)`` writes into outputs the caller allocated (contiguous, of
# the shapes and dtypes the allocating ``_launch_<op>`` gives them) and returns them; flat contiguous
# 1-D inputs, or scores [B, K] with any strides.
# ---------------------------------------------------------------------------------------------------
def _check_out(out: Tensor, shape: tuple, dtype: torch.dtype) -> None:
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous(), (
        f"output of shape {tuple(shape)} and dtype {dtype} expected; got {tuple(out.shape)} {out.dtype}"
    )


def _pairwise_args(chosen: Tensor, rejected: Tensor, margin: Tensor | None, margin_value: float) -> tuple:
    """chosen, rejected, margin (``chosen`` as an unread placeholder when None), N, the scalar's parts."""
    margin_arg = chosen if margin is None else margin
    parts = _launch.scalar_parts(margin_value, compute_dtype(chosen, rejected))
    return chosen, rejected, margin_arg, chosen.numel(), *parts


def _pairwise_fwd_out(
    partials: Tensor, stats: Tensor,
    chosen: Tensor, rejected: Tensor, margin: Tensor | None, margin_value: float,
) -> tuple[Tensor, Tensor]:
    cfg = _LaunchConfig.flat(chosen.numel())
    for out in (partials, stats):
        _check_out(out, (2, cfg.programs), compute_dtype(chosen, rejected))
    wrap_triton(_pairwise_reward_fwd_kernel)[(cfg.programs,)](
        partials, stats, *_pairwise_args(chosen, rejected, margin, margin_value),
        BLOCK=cfg.block, HAS_MARGIN_TENSOR=margin is not None, ACC=_launch.acc_dtype(chosen, rejected),
        num_warps=cfg.num_warps,
    )
    return partials, stats


def _launch_pairwise_fwd(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None, margin_value: float
) -> tuple[Tensor, Tensor]:
    shape, dtype = (2, _LaunchConfig.flat(chosen.numel()).programs), compute_dtype(chosen, rejected)
    outputs = chosen.new_empty(shape, dtype=dtype), chosen.new_empty(shape, dtype=dtype)
    return _pairwise_fwd_out(*outputs, chosen, rejected, margin, margin_value)


def _pairwise_bwd_out(
    grad_chosen: Tensor, grad_rejected: Tensor, grad_partials: Tensor,
    chosen: Tensor, rejected: Tensor, margin: Tensor | None, margin_value: float,
) -> tuple[Tensor, Tensor]:
    cfg = _LaunchConfig.flat(chosen.numel())
    assert grad_partials.shape == (2, cfg.programs), "gradient of the forward's partial sums"
    _check_out(grad_chosen, chosen.shape, chosen.dtype)
    _check_out(grad_rejected, rejected.shape, rejected.dtype)
    wrap_triton(_pairwise_reward_bwd_kernel)[(cfg.programs,)](
        grad_chosen, grad_rejected, grad_partials, *_pairwise_args(chosen, rejected, margin, margin_value),
        BLOCK=cfg.block, HAS_MARGIN_TENSOR=margin is not None, ACC=_launch.acc_dtype(chosen, rejected),
        num_warps=cfg.num_warps,
    )
    return grad_chosen, grad_rejected


def _launch_pairwise_bwd(
    grad_partials: Tensor, chosen: Tensor, rejected: Tensor, margin: Tensor | None, margin_value: float
) -> tuple[Tensor, Tensor]:
    outputs = torch.empty_like(chosen), torch.empty_like(rejected)
    return _pairwise_bwd_out(*outputs, grad_partials, chosen, rejected, margin, margin_value)


def _ranking_args(scores: Tensor, mask: Tensor | None) -> tuple:
    """scores, mask (``scores`` as an unread placeholder when None) and their strides."""
    mask_arg = scores if mask is None else _launch.loadable_mask(mask)
    return scores, mask_arg, scores.stride(0), scores.stride(1), mask_arg.stride(0), mask_arg.stride(1)


def _ranking_fwd_out(
    loss_partials: Tensor, stats: Tensor, scores: Tensor, mask: Tensor | None, hinge: bool
) -> tuple[Tensor, Tensor]:
    prompts, k = scores.shape
    cfg = _LaunchConfig.ranking(prompts, k)
    _check_out(loss_partials, (prompts,), compute_dtype(scores))
    _check_out(stats, (2, prompts), compute_dtype(scores))
    wrap_triton(_ranking_fwd_kernel)[(cfg.programs,)](
        loss_partials, stats, *_ranking_args(scores, mask), prompts, k,
        BLOCK_K=cfg.block, HAS_MASK=mask is not None, HINGE=hinge, ACC=_launch.acc_dtype(scores),
        num_warps=cfg.num_warps,
    )
    return loss_partials, stats


def _launch_ranking_fwd(scores: Tensor, mask: Tensor | None, hinge: bool) -> tuple[Tensor, Tensor]:
    return _ranking_fwd_out(*cpu.ranking_fwd_outputs(scores), scores, mask, hinge)


def _ranking_bwd_out(
    grad_scores: Tensor, grad_partials: Tensor, scores: Tensor, mask: Tensor | None, hinge: bool
) -> Tensor:
    prompts, k = scores.shape
    cfg = _LaunchConfig.ranking(prompts, k)
    assert grad_partials.shape == (prompts,), "gradient of the forward's per-prompt sums"
    _check_out(grad_scores, scores.shape, scores.dtype)
    wrap_triton(_ranking_bwd_kernel)[(cfg.programs,)](
        grad_scores, grad_partials, *_ranking_args(scores, mask), k,
        BLOCK_K=cfg.block, HAS_MASK=mask is not None, HINGE=hinge, ACC=_launch.acc_dtype(scores),
        num_warps=cfg.num_warps,
    )
    return grad_scores


def _launch_ranking_bwd(grad_partials: Tensor, scores: Tensor, mask: Tensor | None, hinge: bool) -> Tensor:
    return _ranking_bwd_out(scores.new_empty(scores.shape), grad_partials, scores, mask, hinge)


def _pointwise_fwd_out(partials: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    cfg = _LaunchConfig.flat(pred.numel())
    _check_out(partials, (cfg.programs,), compute_dtype(pred, target))
    wrap_triton(_pointwise_reward_fwd_kernel)[(cfg.programs,)](
        partials, pred, target, pred.numel(),
        BLOCK=cfg.block, ACC=_launch.acc_dtype(pred, target), num_warps=cfg.num_warps,
    )
    return partials


def _launch_pointwise_fwd(pred: Tensor, target: Tensor) -> Tensor:
    programs = _LaunchConfig.flat(pred.numel()).programs
    return _pointwise_fwd_out(pred.new_empty(programs, dtype=compute_dtype(pred, target)), pred, target)


def _pointwise_bwd_out(grad_pred: Tensor, grad_partials: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    cfg = _LaunchConfig.flat(pred.numel())
    assert grad_partials.shape == (cfg.programs,), "gradient of the forward's partial sums"
    _check_out(grad_pred, pred.shape, pred.dtype)
    wrap_triton(_pointwise_reward_bwd_kernel)[(cfg.programs,)](
        grad_pred, grad_partials, pred, target, pred.numel(),
        BLOCK=cfg.block, ACC=_launch.acc_dtype(pred, target), num_warps=cfg.num_warps,
    )
    return grad_pred


def _launch_pointwise_bwd(grad_partials: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    return _pointwise_bwd_out(torch.empty_like(pred), grad_partials, pred, target)


# ---------------------------------------------------------------------------------------------------
# Registration.  Forward ops return partial sums (differentiable) and statistics (not); the public
# functions finish the means in plain torch.
# ---------------------------------------------------------------------------------------------------
@kernel_op("pairwise_reward_loss_fwd")
def pairwise_reward_loss_fwd(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None, margin_value: float
) -> tuple[Tensor, Tensor]:
    """(partials [2, blocks]: Σ sp(c − r − margin), Σ (c + r)²; stats [2, blocks]: Σ 1[c > r], Σ (c − r))
    for flat contiguous inputs; ``margin`` a tensor like ``chosen`` or None (then ``margin_value``)."""
    impl = _dispatch.route(FAMILY, chosen.device, triton=_launch_pairwise_fwd, torch=cpu.pairwise_fwd)
    return impl(chosen, rejected, margin, margin_value)


@kernel_op("pairwise_reward_loss_bwd")
def pairwise_reward_loss_bwd(
    grad_partials: Tensor, chosen: Tensor, rejected: Tensor, margin: Tensor | None, margin_value: float
) -> tuple[Tensor, Tensor]:
    """(∂/∂chosen, ∂/∂rejected) given the gradient of the forward's partial sums."""
    impl = _dispatch.route(FAMILY, chosen.device, triton=_launch_pairwise_bwd, torch=cpu.pairwise_bwd)
    return impl(grad_partials, chosen, rejected, margin, margin_value)


@kernel_op("ranking_loss_fwd")
def ranking_loss_fwd(scores: Tensor, mask: Tensor | None, hinge: bool) -> tuple[Tensor, Tensor]:
    """(per-prompt Σ over valid pairs i < j of sp(s_i − s_j), or of max(0, s_j − s_i) with ``hinge``, [B];
    stats [2, B]: valid pairs, pairs with s_i > s_j) for scores [B, K]."""
    impl = _dispatch.route(FAMILY, scores.device, triton=_launch_ranking_fwd, torch=cpu.ranking_fwd)
    return impl(scores, mask, hinge)


@kernel_op("ranking_loss_bwd")
def ranking_loss_bwd(grad_partials: Tensor, scores: Tensor, mask: Tensor | None, hinge: bool) -> Tensor:
    """∂/∂scores [B, K] (scores' dtype, contiguous) given the gradient of each prompt's partial sum."""
    impl = _dispatch.route(FAMILY, scores.device, triton=_launch_ranking_bwd, torch=cpu.ranking_bwd)
    return impl(grad_partials, scores, mask, hinge)


@kernel_op("pointwise_reward_loss_fwd")
def pointwise_reward_loss_fwd(pred: Tensor, target: Tensor) -> Tensor:
    """Partial sums of (p − t)² [blocks] for flat contiguous inputs."""
    impl = _dispatch.route(FAMILY, pred.device, triton=_launch_pointwise_fwd, torch=cpu.pointwise_fwd)
    return impl(pred, target)


@kernel_op("pointwise_reward_loss_bwd")
def pointwise_reward_loss_bwd(grad_partials: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    """∂/∂pred (pred's dtype) given the gradient of the forward's partial sums (∂/∂target = −∂/∂pred)."""
    impl = _dispatch.route(FAMILY, pred.device, triton=_launch_pointwise_bwd, torch=cpu.pointwise_bwd)
    return impl(grad_partials, pred, target)


def _save_inputs(ctx, inputs: tuple, output) -> None:
    """setup_context of every forward op: tensor inputs (None included) saved for backward, the others
    (scalars, flags) kept as they are."""
    ctx.is_tensor = [x is None or isinstance(x, torch.Tensor) for x in inputs]
    ctx.save_for_backward(*(x for x, is_tensor in zip(inputs, ctx.is_tensor) if is_tensor))
    ctx.others = [x for x, is_tensor in zip(inputs, ctx.is_tensor) if not is_tensor]


def _saved_inputs(ctx) -> list:
    """The forward op's inputs, in order, as :func:`_save_inputs` kept them."""
    tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
    return [next(tensors) if is_tensor else next(others) for is_tensor in ctx.is_tensor]


def _pairwise_backward(ctx, grad_partials, grad_stats):
    grad_chosen, grad_rejected = pairwise_reward_loss_bwd(grad_partials.contiguous(), *_saved_inputs(ctx))
    return grad_chosen, grad_rejected, None, None


def _ranking_backward(ctx, grad_partials, grad_stats):
    return ranking_loss_bwd(grad_partials.contiguous(), *_saved_inputs(ctx)), None, None


def _pointwise_backward(ctx, grad_partials):
    grad_pred = pointwise_reward_loss_bwd(grad_partials.contiguous(), *_saved_inputs(ctx))
    return grad_pred, (-grad_pred if ctx.needs_input_grad[1] else None)


pairwise_reward_loss_fwd.register_autograd(_pairwise_backward, setup_context=_save_inputs)
ranking_loss_fwd.register_autograd(_ranking_backward, setup_context=_save_inputs)
pointwise_reward_loss_fwd.register_autograd(_pointwise_backward, setup_context=_save_inputs)


# ---------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------
def _check_pair(first_name: str, first: object, second_name: str, second: object) -> None:
    check_float_tensor(first_name, first, _REWARD_DTYPES)
    check_float_tensor(second_name, second, _REWARD_DTYPES)
    check_shape(second_name, second, first.shape, f"{first_name}.shape")
    if second.dtype != first.dtype:
        raise TypeError(
            f"{second_name} must have the dtype of {first_name} ({first.dtype}); got {second.dtype}"
        )
    check_same_device(**{first_name: first, second_name: second})


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1)


def pairwise_reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise reward-model loss, as TRL's reward trainer and OpenRLHF's PairWiseLoss.

    Args:
        chosen: rewards of the preferred responses, any shape ([N] or [N, 1] typically); float32,
            bfloat16, float16 (or float64).
        rejected: rewards of the rejected responses; same shape and dtype.
        margin: None, a number, or a tensor of ``chosen``'s shape (any floating dtype; receives no
            gradient): the required reward gap.
        center_coef: None or a number; adds center_coef·mean((c + r)²) (keeps rewards centred at 0).

    Returns:
        ``(loss, metrics)``: loss = mean(−log σ(c − r − margin)) (+ center term), 0-dim fp32 (fp64
        for fp64 inputs), differentiable with respect to ``chosen`` and ``rejected``; metrics
        ``accuracy`` = mean(c > r) (strict: ties count as wrong) and ``margin_mean`` = mean(c − r),
        0-dim fp32; no pair at all (N = 0) gives 0 for all three (docs/robustness.md).  There is no
        mask: every pair counts, and a NaN anywhere makes the loss, ``margin_mean`` and that pair's
        gradient NaN.  Exact for |c − r| up to the fp32 range; no
        device sync.

    Example: c = [1, 2], r = [0, 2], margin 0: loss = (sp(1) + sp(0)) / 2 = (0.3133 + 0.6931) / 2,
    accuracy 0.5 (the tie is wrong), margin_mean 0.5.
    """
    _check_pair("chosen", chosen, "rejected", rejected)
    margin_tensor, margin_value = None, 0.0
    if isinstance(margin, torch.Tensor):
        check_float_tensor("margin", margin, _REWARD_DTYPES)
        check_shape("margin", margin, chosen.shape, "chosen.shape")
        check_same_device(chosen=chosen, margin=margin)
        margin_tensor = _flat(margin.detach())
    elif margin is not None:
        margin_value = check_real("margin", margin)
    if center_coef is not None:
        center_coef = check_real("center_coef", center_coef)

    n = max(chosen.numel(), 1)  # the empty rule (docs/robustness.md): a mean over no pair is 0
    partials, stats = pairwise_reward_loss_fwd(_flat(chosen), _flat(rejected), margin_tensor, margin_value)
    sums = partials.sum(dim=-1)
    loss = sums[0] / n
    if center_coef is not None:
        loss = loss + center_coef * (sums[1] / n)
    stat_sums = stats.detach().sum(dim=-1)
    metrics = {
        "accuracy": (stat_sums[0] / n).to(torch.float32),
        "margin_mean": (stat_sums[1] / n).to(torch.float32),
    }
    return loss, metrics


def _ranking_inputs(name: str, scores: object, mask: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_float_tensor(name, scores, _REWARD_DTYPES)
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
        if isinstance(mask, torch.Tensor):
            mask = mask.unsqueeze(0)
    check_ndim(name, scores, 2, "[B, K] (or [K] for one prompt), ordered best to worst")
    if mask is not None:
        check_mask_tensor("mask", mask)
        check_shape("mask", mask, scores.shape, f"{name}.shape")
        check_same_device(**{name: scores}, mask=mask)
    return scores, mask


def ranking_reward_loss(
    scores: torch.Tensor, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InstructGPT's K-way ranking loss.

    Args:
        scores: [B, K] rewards of K responses per prompt, ordered best to worst ([K] is one prompt);
            float32, bfloat16, float16 (or float64), any strides.  Any B, K >= 0
            (no prompt or no pair: loss 0, docs/robustness.md).
        mask: [B, K] 0/1 mask of the valid responses (when K varies by prompt), or None (all valid).
            Valid responses need not be contiguous; their order is the order in ``scores``.

    Returns:
        ``(loss, metrics)``: loss = mean over prompts of the mean over pairs i < j, both valid, of
        −log σ(s_i − s_j); prompts with no valid pair are left out of the mean (loss 0 if none has
        one).  0-dim fp32 (fp64 for fp64), differentiable with respect to ``scores``.
        ``metrics["accuracy"]`` = fraction of all valid pairs with s_i > s_j (0 if none), 0-dim fp32.
        Masked responses add nothing and get exactly zero gradient, whatever they hold (NaN included);
        a NaN score in a valid pair makes the loss NaN.

    Example: scores [[2, 1, 0]], mask [[1, 0, 1]]: one pair (2, 0), loss sp(2) = 0.1269, accuracy 1.
    """
    scores, mask = _ranking_inputs("scores", scores, mask)
    pair_sums, stats = ranking_loss_fwd(scores, mask, False)
    pairs, correct = stats.detach()
    has_pairs = pairs > 0
    per_prompt = torch.where(has_pairs, pair_sums / pairs.clamp(min=1.0), 0.0)
    loss = per_prompt.sum() / has_pairs.sum().clamp(min=1)
    accuracy = correct.sum() / pairs.sum().clamp(min=1.0)
    return loss, {"accuracy": accuracy.to(torch.float32)}


def ranking_hinge_loss(seq_scores: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RRHF's ranking term: mean over prompts of Σ_{i<j, both valid} max(0, s_j − s_i).

    Args:
        seq_scores: [B, K] (length-normalised) sequence log-probabilities of K responses per prompt,
            ordered best to worst by reward ([K] is one prompt); any floating dtype as above.
        mask: [B, K] 0/1 mask of valid responses, or None.

    Returns:
        0-dim fp32 loss (fp64 for fp64), differentiable with respect to ``seq_scores`` (derivative
        1[s_j > s_i] per pair: 0 at ties).  A prompt with no valid pair contributes 0 to the mean
        (which is over all B prompts; 0 when B = 0).  Masked responses add nothing and get exactly zero
        gradient, whatever they hold; a NaN score in a valid pair makes the loss NaN.
    """
    seq_scores, mask = _ranking_inputs("seq_scores", seq_scores, mask)
    pair_sums, _ = ranking_loss_fwd(seq_scores, mask, True)
    return pair_sums.sum() / max(seq_scores.shape[0], 1)


def pointwise_reward_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error mean((p − t)²) for score labels (the "scoring" reward-model form).

    Args:
        pred: predicted scores, any shape; float32, bfloat16, float16 (or float64).
        target: label scores, same shape and dtype.

    Returns:
        0-dim fp32 loss (fp64 for fp64), differentiable with respect to ``pred`` (and ``target``
        if it requires grad).  Empty inputs give 0.  No mask: a NaN anywhere makes the loss NaN.
    """
    _check_pair("pred", pred, "target", target)
    return pointwise_reward_loss_fwd(_flat(pred), _flat(target)).sum() / max(pred.numel(), 1)
