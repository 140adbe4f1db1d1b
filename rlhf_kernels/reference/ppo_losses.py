"""Float64 oracles of the PPO policy and value losses, straight from the formulas (see docs/ppo_losses.md).

Same signatures as the public functions; everything is materialised in float64, nothing is fused.
Masked positions are excluded with ``torch.where`` (so NaN padding there cannot leak in); the
aggregation is :func:`rlhf_kernels.reference.aggregation.agg_loss`.
"""

from __future__ import annotations

import torch

from .aggregation import agg_loss


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·m / max(Σm, 1): the metrics' masked mean (0 without a valid token)."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64)
    return torch.where(m != 0, x * m, torch.zeros_like(x)).sum() / torch.clamp(m.sum(), min=1.0)


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
    loss_agg="token-mean", normalizer=None,
):
    """ℓ = clamp(lp − old, −20, 20), r = e^ℓ, L1 = −A·r, L2 = −A·clamp(r, 1 − ε_low, 1 + ε_high),
    C = max(L1, L2), L = min(C, −A·c) where A < 0 with dual clip c, else C; loss = agg(L)."""
    lp = logprobs.to(torch.float64)
    old = old_logprobs.detach().to(torch.float64)
    A = advantages.detach().to(torch.float64)
    if clip_high is None:
        clip_high = clip_low
    log_ratio = torch.clamp(lp - old, -20.0, 20.0)
    r = torch.exp(log_ratio)
    L1 = -A * r
    L2 = -A * torch.clamp(r, 1 - clip_low, 1 + clip_high)
    C = torch.maximum(L1, L2)
    if dual_clip is not None:
        L = torch.where(A < 0, torch.minimum(C, -A * dual_clip), C)
        lower = (C > -A * dual_clip) & (A < 0)
    else:
        L = C
        lower = torch.zeros_like(C, dtype=torch.bool)
    loss = agg_loss(L, mask, loss_agg, normalizer)
    valid = mask.to(torch.float64) != 0
    with torch.no_grad():
        ratio_valid = torch.where(valid, r, torch.zeros_like(r))
        metrics = {
            "clipfrac": _masked_mean((L2 > L1).double(), mask),
            "clipfrac_lower": _masked_mean(lower.double(), mask),
            "approx_kl": _masked_mean(-log_ratio, mask),
            "ratio_mean": _masked_mean(r, mask),
            "ratio_max": ratio_valid.max() if valid.any() else torch.zeros((), dtype=torch.float64),
        }
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.5, loss_agg="token-mean", normalizer=None):
    """½·agg(max((v − R)², (clamp(v, v_old − ε, v_old + ε) − R)²)); ½·agg((v − R)²) without clip."""
    v = values.to(torch.float64)
    v_old = old_values.detach().to(torch.float64)
    R = returns.detach().to(torch.float64)
    unclipped = (v - R) ** 2
    if clip is None:
        per_token = unclipped
        clipped = torch.zeros_like(v, dtype=torch.bool)
    else:
        v_clipped = torch.clamp(v, v_old - clip, v_old + clip)
        clipped_loss = (v_clipped - R) ** 2
        per_token = torch.maximum(unclipped, clipped_loss)
        clipped = clipped_loss > unclipped
    loss = 0.5 * agg_loss(per_token, mask, loss_agg, normalizer)
    return loss, {"clipfrac": _masked_mean(clipped.double(), mask).detach()}
