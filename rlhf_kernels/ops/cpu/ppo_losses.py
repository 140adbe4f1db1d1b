"""The PyTorch path of the PPO policy and value losses (any device), registered as
``ppo_policy_loss_fwd_torch`` / ``_bwd_torch`` and ``ppo_value_loss_fwd_torch`` / ``_bwd_torch``.

The math is documented in ``rlhf_kernels/ops/ppo_losses.py``; this is the same math in row chunks
(bounded temporaries), with one partial sum per row (the Triton kernels write one per (row, chunk of
columns)).  Inputs at masked positions are replaced by 0 once (ℓ = 0, r = 1, A = 0 there: every term is
0 and finite), so that the sums are plain row dot products with the mask, without a where per
statistic; the gradient is selected with a where, so that a masked position gets exactly 0 even when the
upstream gradient is not finite (a normalizer of 0 for a fully masked batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype

LOG_RATIO_CLAMP = 20.0  # verl's clamp of lp − old before the exponential (the kernels read it too)

# Rows of the policy loss's statistics tensor (each a per-row partial sum, except the max).
P_MASK, P_CLIP, P_CLIP_LOWER, P_NEG_LOG_RATIO, P_RATIO, P_RATIO_MAX = range(6)
POLICY_STATS = 6
# Rows of the value loss's statistics tensor.
V_MASK, V_CLIP = range(2)
VALUE_STATS = 2

_CHUNK_ELEMENTS = 1 << 20  # tokens per row chunk: bounds every fp32 temporary to 4 MiB


def _row_slices(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _masked_chunk(mask: torch.Tensor, rs: slice, dtype: torch.dtype, inputs: tuple[torch.Tensor, ...]):
    """(valid, weights m, inputs in ``dtype`` with 0 at masked positions) for rows ``rs``."""
    valid = mask[rs] != 0
    weights = mask[rs].to(dtype)
    return valid, weights, [torch.where(valid, t[rs].to(dtype), 0.0) for t in inputs]


def _row_dot(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t x·m per row."""
    return (x * weights).sum(-1)


# ---------------------------------------------------------------------------------------------------
# The two shapes every op here takes: forward partial sums, backward gradient.
# ---------------------------------------------------------------------------------------------------
def _forward(
    inputs: tuple[torch.Tensor, ...], mask: torch.Tensor, n_stats: int, chunk_terms: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t L·m [B, 1], statistics [n_stats, B, 1]); ``chunk_terms(valid, m, *inputs)`` gives a chunk's
    per-token loss and {statistic row: per-row value}; row 0 is Σ_t m."""
    rows, cols = inputs[0].shape
    dtype = compute_dtype(*inputs)
    loss_partials = torch.empty(rows, 1, dtype=dtype, device=inputs[0].device)
    stats = torch.zeros(n_stats, rows, 1, dtype=dtype, device=inputs[0].device)
    for rs in _row_slices(rows, cols):
        valid, m, chunk = _masked_chunk(mask, rs, dtype, inputs)
        loss, row_stats = chunk_terms(valid, m, *chunk)
        loss_partials[rs, 0] = _row_dot(loss, m)
        stats[0, rs, 0] = m.sum(-1)
        for index, value in row_stats.items():
            stats[index, rs, 0] = value
    return loss_partials, stats


def _backward(
    grad_partials: torch.Tensor, inputs: tuple[torch.Tensor, ...], mask: torch.Tensor, derivative: Callable
) -> torch.Tensor:
    """∂/∂inputs[0] [B, T] in its dtype: g_b·m·derivative(*inputs) at valid positions, exactly 0 elsewhere."""
    x = inputs[0]
    rows, cols = x.shape
    dtype = compute_dtype(*inputs)
    grad = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    # One partial per row on this path (a forward and its backward always share a backend).
    g = grad_partials.sum(-1, keepdim=True).to(dtype)
    for rs in _row_slices(rows, cols):
        valid, m, chunk = _masked_chunk(mask, rs, dtype, inputs)
        grad[rs] = torch.where(valid, g[rs] * m * derivative(*chunk), 0.0)
    return grad


def _partials_fake(n_stats: int) -> Callable:
    def fake(x, *args):
        dtype = compute_dtype(x, *args[:2])
        return x.new_empty(x.shape[0], 1, dtype=dtype), x.new_empty(n_stats, x.shape[0], 1, dtype=dtype)

    return fake


def _grad_fake(grad_partials, x, *args):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------------
# Policy loss.
# ---------------------------------------------------------------------------------------------------
def policy_terms(lp, old, adv, clip_low, clip_high, dual_clip):
    """(L, log-ratio ℓ, ratio r, clipped, dual-clipped or None, raw lp − old) per token."""
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


def _policy_fwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    def chunk_terms(valid, m, lp, old, adv):
        loss, log_ratio, ratio, clipped, lower, _ = policy_terms(lp, old, adv, clip_low, clip_high, dual_clip)
        row_stats = {
            P_CLIP: _row_dot(clipped, m),
            P_NEG_LOG_RATIO: -_row_dot(log_ratio, m),
            P_RATIO: _row_dot(ratio, m),
            # NaN ratios are skipped here as in the kernel; the finishing step restores the NaN.
            P_RATIO_MAX: (
                torch.where(valid & (ratio > 0), ratio, 0.0).amax(-1) if ratio.shape[-1] else ratio.new_zeros(ratio.shape[:-1])
            ),
        }
        if lower is not None:
            row_stats[P_CLIP_LOWER] = _row_dot(lower, m)
        return loss, row_stats

    return _forward((logprobs, old_logprobs, advantages), mask, POLICY_STATS, chunk_terms)


def _policy_bwd(
    grad_partials: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    def derivative(lp, old, adv):
        _, _, ratio, clipped, lower, raw = policy_terms(lp, old, adv, clip_low, clip_high, dual_clip)
        unclipped = ~clipped if lower is None else ~(clipped | lower)
        in_clamp = (raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP)
        # ∂L/∂lp = −A·r on unclipped tokens inside the log-ratio clamp; NaN stays NaN (comparisons
        # with NaN are False, so a NaN token is "unclipped" and its NaN product survives).
        return torch.where(unclipped & (in_clamp | raw.isnan()), -adv * ratio, 0.0)

    return _backward(grad_partials, (logprobs, old_logprobs, advantages), mask, derivative)


# ---------------------------------------------------------------------------------------------------
# Value loss.
# ---------------------------------------------------------------------------------------------------
def value_terms(v, v_old, ret, clip):
    """(L, ∂L/∂v, clipped or None) per token."""
    err = v - ret
    loss = 0.5 * err * err
    if clip is None:
        return loss, err, None
    v_clipped = torch.where(v < v_old - clip, v_old - clip, torch.where(v > v_old + clip, v_old + clip, v))
    err_clipped = v_clipped - ret
    loss_clipped = 0.5 * err_clipped * err_clipped
    clipped = loss_clipped > loss
    return torch.where(clipped, loss_clipped, loss), torch.where(clipped, 0.0, err), clipped


def _value_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    def chunk_terms(valid, m, v, v_old, ret):
        loss, _, clipped = value_terms(v, v_old, ret, clip)
        return loss, ({} if clipped is None else {V_CLIP: _row_dot(clipped, m)})

    return _forward((values, old_values, returns), mask, VALUE_STATS, chunk_terms)


def _value_bwd(
    grad_partials: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    def derivative(v, v_old, ret):
        return value_terms(v, v_old, ret, clip)[1]

    return _backward(grad_partials, (values, old_values, returns), mask, derivative)


ppo_policy_loss_fwd_torch = torch_op(
    "ppo_policy_loss_fwd_torch", _policy_fwd, fake=_partials_fake(POLICY_STATS)
)
ppo_policy_loss_bwd_torch = torch_op("ppo_policy_loss_bwd_torch", _policy_bwd, fake=_grad_fake)
ppo_value_loss_fwd_torch = torch_op("ppo_value_loss_fwd_torch", _value_fwd, fake=_partials_fake(VALUE_STATS))
ppo_value_loss_bwd_torch = torch_op("ppo_value_loss_bwd_torch", _value_bwd, fake=_grad_fake)
