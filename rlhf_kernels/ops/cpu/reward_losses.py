"""The reward-model losses' PyTorch path (any device): the same partial sums as the Triton kernels of
``ops/reward_losses.py``, one partial per op (or per prompt for the ranking losses), each registered with
``_registration.torch_op`` as ``rlhf_kernels::<op>_torch``.

torch's own stable log-sigmoid and sigmoid give the kernels' values: sp(x) = −log σ(x) = −logsigmoid(x),
∂sp/∂x = −σ(−x).  Arithmetic is fp32 (fp64 when an input is fp64); Python-float hyperparameters enter
the arithmetic unrounded, so fp64 inputs get fp64 math throughout.
"""

from __future__ import annotations

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype

# The [rows, K(K−1)/2] pair temporaries of the ranking losses are built for this many pairs at a time.
PAIRS_PER_CHUNK = 1 << 22


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid(x)


def _relu_derivative(x: torch.Tensor) -> torch.Tensor:
    """1[x > 0], NaN for NaN (as the kernels)."""
    return torch.where(x > 0, 1.0, torch.where(x <= 0, 0.0, x))


# ---------------------------------------------------------------------------------------------------
# Pairwise: partials [2, 1] = (Σ sp(c − r − margin), Σ (c + r)²), stats [2, 1] = (Σ 1[c > r], Σ (c − r)).
# ---------------------------------------------------------------------------------------------------
def _pairwise_inputs(chosen, rejected, margin, margin_value):
    dtype = compute_dtype(chosen, rejected)
    c, r = chosen.to(dtype), rejected.to(dtype)
    return c, r, (margin.to(dtype) if margin is not None else margin_value)


def _pairwise_fwd(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, margin_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    c, r, m = _pairwise_inputs(chosen, rejected, margin, margin_value)
    diff = c - r
    total = c + r
    partials = torch.stack([_neg_log_sigmoid(diff - m).sum(), total.dot(total)]).unsqueeze(-1)
    stats = torch.stack([(c > r).sum().to(c.dtype), diff.sum()]).unsqueeze(-1)
    return partials, stats


def _pairwise_fwd_fake(chosen, rejected, margin, margin_value):
    dtype = compute_dtype(chosen, rejected)
    return chosen.new_empty(2, 1, dtype=dtype), chosen.new_empty(2, 1, dtype=dtype)


def _pairwise_bwd(
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


def _pairwise_bwd_fake(grad_partials, chosen, rejected, margin, margin_value):
    return torch.empty_like(chosen), torch.empty_like(rejected)


pairwise_fwd = torch_op("pairwise_reward_loss_fwd_torch", _pairwise_fwd, fake=_pairwise_fwd_fake)
pairwise_bwd = torch_op("pairwise_reward_loss_bwd_torch", _pairwise_bwd, fake=_pairwise_bwd_fake)


# ---------------------------------------------------------------------------------------------------
# Ranking and hinge: per-prompt sums over the pairs i < j (both valid), in row chunks.
# ---------------------------------------------------------------------------------------------------
def _pair_chunks(scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype):
    """Yields (rows, d = s_i − s_j [rows, P], pair validity [rows, P] or None) over row chunks, with
    the pair index vectors (i, j) of the K(K−1)/2 pairs i < j."""
    n_rows, k = scores.shape
    index_i, index_j = torch.triu_indices(k, k, offset=1, device=scores.device)
    step = max(1, PAIRS_PER_CHUNK // max(index_i.numel(), 1))
    for start in range(0, n_rows, step):
        rows = slice(start, min(n_rows, start + step))
        s = scores[rows].to(dtype)
        d = s[:, index_i] - s[:, index_j]
        if mask is None:
            yield rows, d, None, index_i, index_j
        else:
            valid = mask[rows] != 0
            yield rows, d, valid[:, index_i] & valid[:, index_j], index_i, index_j


def ranking_fwd_outputs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (per-prompt loss sums [B], stats [2, B]) of the ranking forward, every backend."""
    dtype = compute_dtype(scores)
    return scores.new_empty(scores.shape[0], dtype=dtype), scores.new_empty(2, scores.shape[0], dtype=dtype)


def _ranking_fwd(
    scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(scores)
    loss_partials, stats = ranking_fwd_outputs(scores)
    for rows, d, pair, index_i, _ in _pair_chunks(scores, mask, dtype):
        term = torch.relu(-d) if hinge else _neg_log_sigmoid(d)  # max(0, s_j − s_i) or −log σ(d)
        correct = d > 0
        if pair is None:
            loss_partials[rows] = term.sum(-1)
            stats[0, rows] = float(index_i.numel())
        else:
            loss_partials[rows] = torch.where(pair, term, 0.0).sum(-1)
            stats[0, rows] = pair.sum(-1).to(dtype)
            correct &= pair
        stats[1, rows] = correct.sum(-1).to(dtype)
    return loss_partials, stats


def _ranking_fwd_fake(scores, mask, hinge):
    return ranking_fwd_outputs(scores)


def _ranking_bwd(
    grad_partials: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None, hinge: bool
) -> torch.Tensor:
    dtype = compute_dtype(scores)
    grad_scores = scores.new_empty(scores.shape)
    for rows, d, pair, index_i, index_j in _pair_chunks(scores, mask, dtype):
        # w = ∂term/∂d, with d = s_i − s_j: the pair adds w to ∂/∂s_i and −w to ∂/∂s_j.
        w = -_relu_derivative(-d) if hinge else -torch.sigmoid(-d)
        if pair is not None:
            w = torch.where(pair, w, 0.0)
        w = w * grad_partials[rows].to(dtype)[:, None]
        grad = torch.zeros(w.shape[0], scores.shape[1], dtype=dtype, device=scores.device)
        grad.index_add_(1, index_i, w)
        grad.index_add_(1, index_j, -w)
        grad_scores[rows] = grad
    return grad_scores


def _ranking_bwd_fake(grad_partials, scores, mask, hinge):
    return scores.new_empty(scores.shape)


ranking_fwd = torch_op("ranking_loss_fwd_torch", _ranking_fwd, fake=_ranking_fwd_fake)
ranking_bwd = torch_op("ranking_loss_bwd_torch", _ranking_bwd, fake=_ranking_bwd_fake)


# ---------------------------------------------------------------------------------------------------
# Pointwise: partials [1] = Σ (p − t)².
# ---------------------------------------------------------------------------------------------------
def _pointwise_fwd(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(pred, target)
    return ((pred.to(dtype) - target.to(dtype)) ** 2).sum().reshape(1)


def _pointwise_fwd_fake(pred, target):
    return pred.new_empty(1, dtype=compute_dtype(pred, target))


def _pointwise_bwd(grad_partials: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(pred, target)
    g = grad_partials.sum().to(dtype)
    return (2.0 * g * (pred.to(dtype) - target.to(dtype))).to(pred.dtype)


def _pointwise_bwd_fake(grad_partials, pred, target):
    return torch.empty_like(pred)


pointwise_fwd = torch_op("pointwise_reward_loss_fwd_torch", _pointwise_fwd, fake=_pointwise_fwd_fake)
pointwise_bwd = torch_op("pointwise_reward_loss_bwd_torch", _pointwise_bwd, fake=_pointwise_bwd_fake)
