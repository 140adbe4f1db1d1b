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
NaN in gives NaN out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.library import triton_op, wrap_triton

from .. import _dispatch
from .._validation import (
    check_float_tensor,
    check_mask_tensor,
    check_ndim,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = None

FAMILY = "reward_losses"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))

_REWARD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------------
# Triton kernels.
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
    def _pairwise_reward_fwd_kernel(
        chosen_ptr, rejected_ptr, margin_ptr, partials_ptr, stats_ptr,
        N, margin_value,
        BLOCK: tl.constexpr, HAS_MARGIN_TENSOR: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_blocks = tl.num_programs(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < N
        compute_ty = partials_ptr.dtype.element_ty
        c = tl.load(chosen_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        r = tl.load(rejected_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        if HAS_MARGIN_TENSOR:
            margin = tl.load(margin_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        else:
            margin = tl.cast(margin_value, compute_ty)  # fp32 eagerly, possibly fp64 under Inductor
        diff = c - r
        center = (c + r) * (c + r)
        tl.store(partials_ptr + pid, tl.sum(tl.where(in_range, _neg_log_sigmoid(diff - margin), 0.0), axis=0))
        tl.store(partials_ptr + n_blocks + pid, tl.sum(tl.where(in_range, center, 0.0), axis=0))
        tl.store(stats_ptr + pid, tl.sum(tl.where(in_range & (c > r), 1.0, 0.0), axis=0))
        tl.store(stats_ptr + n_blocks + pid, tl.sum(tl.where(in_range, diff, 0.0), axis=0))

    @triton.jit
    def _pairwise_reward_bwd_kernel(
        grad_chosen_ptr, grad_rejected_ptr, grad_partials_ptr, chosen_ptr, rejected_ptr, margin_ptr,
        N, margin_value,
        BLOCK: tl.constexpr, HAS_MARGIN_TENSOR: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < N
        compute_ty = grad_partials_ptr.dtype.element_ty
        g_loss = tl.load(grad_partials_ptr + pid)
        g_center = tl.load(grad_partials_ptr + tl.num_programs(0) + pid)
        c = tl.load(chosen_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        r = tl.load(rejected_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        if HAS_MARGIN_TENSOR:
            margin = tl.load(margin_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        else:
            margin = tl.cast(margin_value, compute_ty)  # fp32 eagerly, possibly fp64 under Inductor
        d_loss = g_loss * _sigmoid_of_neg(c - r - margin)  # = −∂/∂c = ∂/∂r of sp(c − r − margin)
        d_center = g_center * 2.0 * (c + r)
        grad_chosen = (d_center - d_loss).to(grad_chosen_ptr.dtype.element_ty)
        grad_rejected = (d_center + d_loss).to(grad_rejected_ptr.dtype.element_ty)
        tl.store(grad_chosen_ptr + offs, grad_chosen, mask=in_range)
        tl.store(grad_rejected_ptr + offs, grad_rejected, mask=in_range)

    @triton.jit
    def _ranking_fwd_kernel(
        scores_ptr, mask_ptr, loss_partials_ptr, stats_ptr,
        stride_s0, stride_s1, stride_m0, stride_m1,
        B, K,
        BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, HINGE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_scores = scores_ptr + row * stride_s0
        row_mask = mask_ptr + row * stride_m0
        compute_ty = loss_partials_ptr.dtype.element_ty
        acc_loss = tl.zeros((), compute_ty)
        acc_pairs = tl.zeros((), compute_ty)
        acc_correct = tl.zeros((), compute_ty)
        for i0 in range(0, K, BLOCK_K):
            ii = i0 + tl.arange(0, BLOCK_K)
            valid_i = ii < K
            s_i = tl.load(row_scores + ii * stride_s1, mask=valid_i, other=0.0).to(compute_ty)
            if HAS_MASK:
                valid_i &= tl.load(row_mask + ii * stride_m1, mask=valid_i, other=0) != 0
            for j0 in range(i0, K, BLOCK_K):
                jj = j0 + tl.arange(0, BLOCK_K)
                valid_j = jj < K
                s_j = tl.load(row_scores + jj * stride_s1, mask=valid_j, other=0.0).to(compute_ty)
                if HAS_MASK:
                    valid_j &= tl.load(row_mask + jj * stride_m1, mask=valid_j, other=0) != 0
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

    @triton.jit
    def _ranking_bwd_kernel(
        grad_scores_ptr, grad_partials_ptr, scores_ptr, mask_ptr,
        stride_s0, stride_s1, stride_m0, stride_m1,
        K,
        BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, HINGE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_scores = scores_ptr + row * stride_s0
        row_mask = mask_ptr + row * stride_m0
        compute_ty = grad_partials_ptr.dtype.element_ty
        g = tl.load(grad_partials_ptr + row)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            in_row = kk < K
            valid_k = in_row
            s_k = tl.load(row_scores + kk * stride_s1, mask=in_row, other=0.0).to(compute_ty)
            if HAS_MASK:
                valid_k &= tl.load(row_mask + kk * stride_m1, mask=in_row, other=0) != 0
            acc = tl.zeros((BLOCK_K,), compute_ty)
            for j0 in range(0, K, BLOCK_K):
                jj = j0 + tl.arange(0, BLOCK_K)
                valid_j = jj < K
                s_j = tl.load(row_scores + jj * stride_s1, mask=valid_j, other=0.0).to(compute_ty)
                if HAS_MASK:
                    valid_j &= tl.load(row_mask + jj * stride_m1, mask=valid_j, other=0) != 0
                d = s_k[:, None] - s_j[None, :]
                # k ranked above j: term f(s_k − s_j); k ranked below j: term f(s_j − s_k).
                if HINGE:
                    above = -_relu_derivative(-d)
                    below = _relu_derivative(d)
                else:
                    above = -_sigmoid_of_neg(d)
                    below = _sigmoid_of_neg(-d)
                k_col, j_row = kk[:, None], jj[None, :]
                w = tl.where(k_col < j_row, above, tl.where(k_col > j_row, below, 0.0))
                both = valid_k[:, None] & valid_j[None, :]
                acc += tl.sum(tl.where(both, w, 0.0), axis=1)
            out = grad_scores_ptr + row * K + kk
            tl.store(out, (g * acc).to(grad_scores_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _pointwise_reward_fwd_kernel(
        pred_ptr, target_ptr, partials_ptr,
        N,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < N
        compute_ty = partials_ptr.dtype.element_ty
        err = (
            tl.load(pred_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
            - tl.load(target_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        )
        tl.store(partials_ptr + pid, tl.sum(err * err, axis=0))

    @triton.jit
    def _pointwise_reward_bwd_kernel(
        grad_pred_ptr, grad_partials_ptr, pred_ptr, target_ptr,
        N,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < N
        compute_ty = grad_partials_ptr.dtype.element_ty
        g = tl.load(grad_partials_ptr + pid)
        err = (
            tl.load(pred_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
            - tl.load(target_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        )
        tl.store(grad_pred_ptr + offs, (2.0 * g * err).to(grad_pred_ptr.dtype.element_ty), mask=in_range)


@dataclass(frozen=True)
class _LaunchConfig:
    block: int
    num_warps: int


def _pow2_between(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n, clamped to [low, high].  Comparisons only: a symbolic size under
    torch.compile(dynamic=True) then costs a few guards instead of a specialisation."""
    p = low
    while p < high and p < n:
        p *= 2
    return p


def _flat_config(n: int) -> _LaunchConfig:
    """Elementwise reductions: 1024 elements per program (4 warps); tiny inputs one block sized to them."""
    block = _pow2_between(n, 16, 1024)
    return _LaunchConfig(block=block, num_warps=4 if block >= 512 else 1)


def _ranking_config(k: int) -> _LaunchConfig:
    """One prompt per program; pairs in tiles of at most 64 x 64 (4096 fp32 values over 4 warps)."""
    block = _pow2_between(k, 16, 64)
    return _LaunchConfig(block=block, num_warps=4 if block == 64 else 2)


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask reinterpreted as uint8 (same bytes, no copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ---------------------------------------------------------------------------------------------------
# PyTorch path: torch's own stable log-sigmoid and sigmoid (same values as the kernels' formulas).
# ---------------------------------------------------------------------------------------------------
def _neg_log_sigmoid_torch(x: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid(x)


def _relu_derivative_torch(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0, torch.where(x <= 0, 0.0, x))


def _pairwise_inputs(chosen, rejected, margin, margin_value):
    dtype = compute_dtype(chosen, rejected)
    c, r = chosen.to(dtype), rejected.to(dtype)
    m = margin.to(dtype) if margin is not None else margin_value
    return c, r, m


@torch.library.custom_op("rlhf_kernels::pairwise_reward_loss_fwd_torch", mutates_args=())
def _pairwise_reward_fwd_torch(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, margin_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    c, r, m = _pairwise_inputs(chosen, rejected, margin, margin_value)
    diff = c - r
    total = c + r
    partials = torch.stack([_neg_log_sigmoid_torch(diff - m).sum(), total.dot(total)]).unsqueeze(-1)
    stats = torch.stack([(c > r).sum().to(c.dtype), diff.sum()]).unsqueeze(-1)
    return partials, stats


@_pairwise_reward_fwd_torch.register_fake
def _(chosen, rejected, margin, margin_value):
    dtype = compute_dtype(chosen, rejected)
    return chosen.new_empty(2, 1, dtype=dtype), chosen.new_empty(2, 1, dtype=dtype)


@torch.library.custom_op("rlhf_kernels::pairwise_reward_loss_bwd_torch", mutates_args=())
def _pairwise_reward_bwd_torch(
    grad_partials: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None,
    margin_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    c, r, m = _pairwise_inputs(chosen, rejected, margin, margin_value)
    g = grad_partials.sum(-1).to(c.dtype)
    d_loss = g[0] * torch.sigmoid(m - (c - r))  # σ(−z), z = c − r − margin
    d_center = g[1] * 2.0 * (c + r)
    return (d_center - d_loss).to(chosen.dtype), (d_center + d_loss).to(rejected.dtype)


@_pairwise_reward_bwd_torch.register_fake
def _(grad_partials, chosen, rejected, margin, margin_value):
    return torch.empty_like(chosen), torch.empty_like(rejected)


def _pair_rows(rows: int, pairs: int):
    """Row slices keeping the [rows, K(K−1)/2] pair temporaries near 4 Mi elements."""
    step = max(1, (1 << 22) // max(pairs, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _pair_terms(scores: torch.Tensor, mask: torch.Tensor | None, rs: slice, index_i, index_j, dtype):
    """(d = s_i − s_j over pairs i < j [rows, P], pair validity [rows, P] or None)."""
    s = scores[rs].to(dtype)
    d = s[:, index_i] - s[:, index_j]
    if mask is None:
        return d, None
    valid = mask[rs] != 0
    return d, valid[:, index_i] & valid[:, index_j]


@torch.library.custom_op("rlhf_kernels::ranking_loss_fwd_torch", mutates_args=())
def _ranking_fwd_torch(
    scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, k = scores.shape
    dtype = compute_dtype(scores)
    loss_partials = torch.empty(rows, dtype=dtype, device=scores.device)
    stats = torch.empty(2, rows, dtype=dtype, device=scores.device)
    index_i, index_j = torch.triu_indices(k, k, offset=1, device=scores.device)
    for rs in _pair_rows(rows, index_i.numel()):
        d, pair = _pair_terms(scores, mask, rs, index_i, index_j, dtype)
        term = torch.relu(-d) if hinge else _neg_log_sigmoid_torch(d)  # max(0, s_j − s_i) or −log σ(d)
        correct = d > 0
        if pair is None:
            loss_partials[rs] = term.sum(-1)
            stats[0, rs] = float(index_i.numel())
        else:
            loss_partials[rs] = torch.where(pair, term, 0.0).sum(-1)
            stats[0, rs] = pair.sum(-1).to(dtype)
            correct &= pair
        stats[1, rs] = correct.sum(-1).to(dtype)
    return loss_partials, stats


@_ranking_fwd_torch.register_fake
def _(scores, mask, hinge):
    dtype = compute_dtype(scores)
    return scores.new_empty(scores.shape[0], dtype=dtype), scores.new_empty(2, scores.shape[0], dtype=dtype)


@torch.library.custom_op("rlhf_kernels::ranking_loss_bwd_torch", mutates_args=())
def _ranking_bwd_torch(
    grad_partials: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> torch.Tensor:
    rows, k = scores.shape
    dtype = compute_dtype(scores)
    grad_scores = torch.empty(rows, k, dtype=scores.dtype, device=scores.device)
    index_i, index_j = torch.triu_indices(k, k, offset=1, device=scores.device)
    for rs in _pair_rows(rows, index_i.numel()):
        d, pair = _pair_terms(scores, mask, rs, index_i, index_j, dtype)
        # w = ∂term/∂d, with d = s_i − s_j: the pair adds w to ∂/∂s_i and −w to ∂/∂s_j.
        w = -_relu_derivative_torch(-d) if hinge else -torch.sigmoid(-d)
        if pair is not None:
            w = torch.where(pair, w, 0.0)
        w = w * grad_partials[rs].to(dtype)[:, None]
        grad = torch.zeros(w.shape[0], k, dtype=dtype, device=scores.device)
        grad.index_add_(1, index_i, w)
        grad.index_add_(1, index_j, -w)
        grad_scores[rs] = grad
    return grad_scores


@_ranking_bwd_torch.register_fake
def _(grad_partials, scores, mask, hinge):
    return scores.new_empty(scores.shape)


@torch.library.custom_op("rlhf_kernels::pointwise_reward_loss_fwd_torch", mutates_args=())
def _pointwise_reward_fwd_torch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(pred, target)
    return ((pred.to(dtype) - target.to(dtype)) ** 2).sum().reshape(1)


@_pointwise_reward_fwd_torch.register_fake
def _(pred, target):
    return pred.new_empty(1, dtype=compute_dtype(pred, target))


@torch.library.custom_op("rlhf_kernels::pointwise_reward_loss_bwd_torch", mutates_args=())
def _pointwise_reward_bwd_torch(
    grad_partials: torch.Tensor, pred: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    dtype = compute_dtype(pred, target)
    g = grad_partials.sum().to(dtype)
    return (2.0 * g * (pred.to(dtype) - target.to(dtype))).to(pred.dtype)


@_pointwise_reward_bwd_torch.register_fake
def _(grad_partials, pred, target):
    return torch.empty_like(pred)


# ---------------------------------------------------------------------------------------------------
# Triton launchers (flat contiguous 1-D inputs, or [B, K] with any strides for the ranking losses).
# ---------------------------------------------------------------------------------------------------
def _exact_margin(
    chosen: torch.Tensor, margin: torch.Tensor | None, margin_value: float, dtype: torch.dtype
) -> torch.Tensor | None:
    """Triton passes a Python float as fp32: an fp64 computation gets a scalar margin as an fp64 tensor
    instead (fp64 inputs are a debugging and gradcheck path, where the extra N values do not matter)."""
    if margin is None and dtype == torch.float64:
        return torch.full(chosen.shape, margin_value, dtype=dtype, device=chosen.device)
    return margin


def _launch_pairwise_fwd(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, margin_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = chosen.numel()
    cfg = _flat_config(n)
    n_blocks = (n + cfg.block - 1) // cfg.block
    dtype = compute_dtype(chosen, rejected)
    partials = torch.empty(2, n_blocks, dtype=dtype, device=chosen.device)
    stats = torch.empty(2, n_blocks, dtype=dtype, device=chosen.device)
    margin = _exact_margin(chosen, margin, margin_value, dtype)
    wrap_triton(_pairwise_reward_fwd_kernel)[(n_blocks,)](
        chosen, rejected, chosen if margin is None else margin, partials, stats,
        n, margin_value,
        BLOCK=cfg.block, HAS_MARGIN_TENSOR=margin is not None, num_warps=cfg.num_warps,
    )
    return partials, stats


def _launch_pairwise_bwd(
    grad_partials: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None,
    margin_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = chosen.numel()
    cfg = _flat_config(n)
    n_blocks = (n + cfg.block - 1) // cfg.block
    assert tuple(grad_partials.shape) == (2, n_blocks), "gradient of the forward's partial sums"
    grad_chosen = torch.empty_like(chosen)
    grad_rejected = torch.empty_like(rejected)
    margin = _exact_margin(chosen, margin, margin_value, compute_dtype(chosen, rejected))
    wrap_triton(_pairwise_reward_bwd_kernel)[(n_blocks,)](
        grad_chosen, grad_rejected, grad_partials, chosen, rejected, chosen if margin is None else margin,
        n, margin_value,
        BLOCK=cfg.block, HAS_MARGIN_TENSOR=margin is not None, num_warps=cfg.num_warps,
    )
    return grad_chosen, grad_rejected


def _launch_ranking_fwd(
    scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, k = scores.shape
    cfg = _ranking_config(k)
    dtype = compute_dtype(scores)
    loss_partials = torch.empty(rows, dtype=dtype, device=scores.device)
    stats = torch.empty(2, rows, dtype=dtype, device=scores.device)
    mask_arg = scores if mask is None else _kernel_mask(mask)
    wrap_triton(_ranking_fwd_kernel)[(rows,)](
        scores, mask_arg, loss_partials, stats,
        scores.stride(0), scores.stride(1), mask_arg.stride(0), mask_arg.stride(1),
        rows, k,
        BLOCK_K=cfg.block, HAS_MASK=mask is not None, HINGE=hinge, num_warps=cfg.num_warps,
    )
    return loss_partials, stats


def _launch_ranking_bwd(
    grad_partials: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> torch.Tensor:
    rows, k = scores.shape
    cfg = _ranking_config(k)
    grad_scores = torch.empty(rows, k, dtype=scores.dtype, device=scores.device)
    mask_arg = scores if mask is None else _kernel_mask(mask)
    wrap_triton(_ranking_bwd_kernel)[(rows,)](
        grad_scores, grad_partials, scores, mask_arg,
        scores.stride(0), scores.stride(1), mask_arg.stride(0), mask_arg.stride(1),
        k,
        BLOCK_K=cfg.block, HAS_MASK=mask is not None, HINGE=hinge, num_warps=cfg.num_warps,
    )
    return grad_scores


def _launch_pointwise_fwd(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    n = pred.numel()
    cfg = _flat_config(n)
    n_blocks = (n + cfg.block - 1) // cfg.block
    partials = torch.empty(n_blocks, dtype=compute_dtype(pred, target), device=pred.device)
    wrap_triton(_pointwise_reward_fwd_kernel)[(n_blocks,)](
        pred, target, partials, n, BLOCK=cfg.block, num_warps=cfg.num_warps
    )
    return partials


def _launch_pointwise_bwd(
    grad_partials: torch.Tensor, pred: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    n = pred.numel()
    cfg = _flat_config(n)
    n_blocks = (n + cfg.block - 1) // cfg.block
    assert tuple(grad_partials.shape) == (n_blocks,), "gradient of the forward's partial sums"
    grad_pred = torch.empty_like(pred)
    wrap_triton(_pointwise_reward_bwd_kernel)[(n_blocks,)](
        grad_pred, grad_partials, pred, target, n, BLOCK=cfg.block, num_warps=cfg.num_warps
    )
    return grad_pred


# ---------------------------------------------------------------------------------------------------
# Registration.  Forward ops return partial sums (differentiable) and statistics (not); the public
# functions finish the means in plain torch.
# ---------------------------------------------------------------------------------------------------
@triton_op("rlhf_kernels::pairwise_reward_loss_fwd", mutates_args=())
def pairwise_reward_loss_fwd(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, margin_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials [2, blocks]: Σ sp(c − r − margin), Σ (c + r)²; stats [2, blocks]: Σ 1[c > r], Σ (c − r))
    for flat contiguous inputs; ``margin`` a tensor like ``chosen`` or None (then ``margin_value``)."""
    if _dispatch.backend_for(FAMILY, chosen.device) == "triton":
        return _launch_pairwise_fwd(chosen, rejected, margin, margin_value)
    return _dispatch.torch_path(_pairwise_reward_fwd_torch)(chosen, rejected, margin, margin_value)


@triton_op("rlhf_kernels::pairwise_reward_loss_bwd", mutates_args=())
def pairwise_reward_loss_bwd(
    grad_partials: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None,
    margin_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂chosen, ∂/∂rejected) given the gradient of the forward's partial sums."""
    if _dispatch.backend_for(FAMILY, chosen.device) == "triton":
        return _launch_pairwise_bwd(grad_partials, chosen, rejected, margin, margin_value)
    body = _dispatch.torch_path(_pairwise_reward_bwd_torch)
    return body(grad_partials, chosen, rejected, margin, margin_value)


def _pairwise_setup_context(ctx, inputs, output) -> None:
    chosen, rejected, margin, margin_value = inputs
    ctx.save_for_backward(chosen, rejected, margin)
    ctx.margin_value = margin_value


def _pairwise_backward(ctx, grad_partials, grad_stats):
    chosen, rejected, margin = ctx.saved_tensors
    grad_chosen, grad_rejected = pairwise_reward_loss_bwd(
        grad_partials.contiguous(), chosen, rejected, margin, ctx.margin_value
    )
    return grad_chosen, grad_rejected, None, None


pairwise_reward_loss_fwd.register_autograd(_pairwise_backward, setup_context=_pairwise_setup_context)


@triton_op("rlhf_kernels::ranking_loss_fwd", mutates_args=())
def ranking_loss_fwd(
    scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-prompt Σ over valid pairs i < j of sp(s_i − s_j), or of max(0, s_j − s_i) with ``hinge``, [B];
    stats [2, B]: valid pairs, pairs with s_i > s_j) for scores [B, K]."""
    if _dispatch.backend_for(FAMILY, scores.device) == "triton":
        return _launch_ranking_fwd(scores, mask, hinge)
    return _dispatch.torch_path(_ranking_fwd_torch)(scores, mask, hinge)


@triton_op("rlhf_kernels::ranking_loss_bwd", mutates_args=())
def ranking_loss_bwd(
    grad_partials: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> torch.Tensor:
    """∂/∂scores [B, K] (scores' dtype) given the gradient of each prompt's partial sum."""
    if _dispatch.backend_for(FAMILY, scores.device) == "triton":
        return _launch_ranking_bwd(grad_partials, scores, mask, hinge)
    return _dispatch.torch_path(_ranking_bwd_torch)(grad_partials, scores, mask, hinge)


def _ranking_setup_context(ctx, inputs, output) -> None:
    scores, mask, hinge = inputs
    ctx.save_for_backward(scores, mask)
    ctx.hinge = hinge


def _ranking_backward(ctx, grad_partials, grad_stats):
    scores, mask = ctx.saved_tensors
    return ranking_loss_bwd(grad_partials.contiguous(), scores, mask, ctx.hinge), None, None


ranking_loss_fwd.register_autograd(_ranking_backward, setup_context=_ranking_setup_context)


@triton_op("rlhf_kernels::pointwise_reward_loss_fwd", mutates_args=())
def pointwise_reward_loss_fwd(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Partial sums of (p − t)² [blocks] for flat contiguous inputs."""
    if _dispatch.backend_for(FAMILY, pred.device) == "triton":
        return _launch_pointwise_fwd(pred, target)
    return _dispatch.torch_path(_pointwise_reward_fwd_torch)(pred, target)


@triton_op("rlhf_kernels::pointwise_reward_loss_bwd", mutates_args=())
def pointwise_reward_loss_bwd(
    grad_partials: torch.Tensor, pred: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """∂/∂pred (pred's dtype) given the gradient of the forward's partial sums; ∂/∂target is its negation."""
    if _dispatch.backend_for(FAMILY, pred.device) == "triton":
        return _launch_pointwise_bwd(grad_partials, pred, target)
    return _dispatch.torch_path(_pointwise_reward_bwd_torch)(grad_partials, pred, target)


def _pointwise_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _pointwise_backward(ctx, grad_partials):
    pred, target = ctx.saved_tensors
    grad_pred = pointwise_reward_loss_bwd(grad_partials.contiguous(), pred, target)
    return grad_pred, (-grad_pred if ctx.needs_input_grad[1] else None)


pointwise_reward_loss_fwd.register_autograd(_pointwise_backward, setup_context=_pointwise_setup_context)


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
    if first.numel() == 0:
        raise ValueError(f"{first_name} must have at least one element; got shape {tuple(first.shape)}")
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
        0-dim fp32.  Exact for |c − r| up to the fp32 range; no device sync.
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

    n = chosen.numel()
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
    if scores.numel() == 0:
        raise ValueError(f"{name} must be non-empty [B, K]; got shape {tuple(scores.shape)}")
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
            float32, bfloat16, float16 (or float64), any strides.  Any K >= 1.
        mask: [B, K] 0/1 mask of the valid responses (when K varies by prompt), or None (all valid).
            Valid responses need not be contiguous; their order is the order in ``scores``.

    Returns:
        ``(loss, metrics)``: loss = mean over prompts of the mean over pairs i < j, both valid, of
        −log σ(s_i − s_j); prompts with no valid pair are left out of the mean (loss 0 if none has
        one).  0-dim fp32 (fp64 for fp64), differentiable with respect to ``scores``.
        ``metrics["accuracy"]`` = fraction of all valid pairs with s_i > s_j (0 if none), 0-dim fp32.
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
        1[s_j > s_i] per pair: 0 at ties).  A prompt with no valid pair contributes 0 to the mean.
    """
    seq_scores, mask = _ranking_inputs("seq_scores", seq_scores, mask)
    pair_sums, _ = ranking_loss_fwd(seq_scores, mask, True)
    return pair_sums.sum() / seq_scores.shape[0]


def pointwise_reward_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error mean((p − t)²) for score labels (the "scoring" reward-model form).

    Args:
        pred: predicted scores, any shape; float32, bfloat16, float16 (or float64).
        target: label scores, same shape and dtype.

    Returns:
        0-dim fp32 loss (fp64 for fp64), differentiable with respect to ``pred`` (and ``target``
        if it requires grad).
    """
    _check_pair("pred", pred, "target", target)
    return pointwise_reward_loss_fwd(_flat(pred), _flat(target)).sum() / pred.numel()
