"""Float64 oracles of the PPO and reward-model losses, straight from the formulas (see docs/losses.md).

Same signatures as the public functions; everything is materialised in float64, nothing is fused.
Masked positions are excluded with ``torch.where`` (so NaN padding there cannot leak in).
"""

from __future__ import annotations

import torch

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", normalizer=None):
    L = per_token.to(torch.float64)
    m = mask.to(torch.float64)
    Lm = torch.where(m != 0, L * m, torch.zeros_like(L))
    B, T = L.shape
    if normalizer is not None:
        normalizer = torch.as_tensor(normalizer, dtype=torch.float64)
    if mode == "token-mean":
        return Lm.sum() / (torch.clamp(m.sum(), min=1.0) if normalizer is None else normalizer)
    if mode == "seq-mean-token-sum":
        return Lm.sum(-1).sum() / (B if normalizer is None else normalizer)
    if mode == "seq-mean-token-mean":
        per_seq = Lm.sum(-1) / torch.clamp(m.sum(-1), min=1.0)
        return per_seq.sum() / (B if normalizer is None else normalizer)
    if mode == "seq-mean-token-sum-norm":
        return Lm.sum() / (T if normalizer is None else normalizer)
    raise ValueError(f"loss_agg must be one of {MODES}; got {mode!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float64)
    x = x.to(torch.float64)
    return torch.where(m != 0, x * m, torch.zeros_like(x)).sum() / torch.clamp(m.sum(), min=1.0)


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
    loss_agg="token-mean", normalizer=None,
):
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


def kl_estimate(logprobs, ref_logprobs, estimator="k3"):
    """k1 = δ, abs = |δ|, k2 = ½δ², k3 = clamp(e^d − d − 1, −10, 10) with d = clamp(ref − lp, −20, 20)."""
    delta = logprobs.to(torch.float64) - ref_logprobs.to(torch.float64)
    if estimator == "k1":
        return delta
    if estimator == "abs":
        return delta.abs()
    if estimator == "k2":
        return 0.5 * delta**2
    if estimator in ("k3", "low_var_kl"):
        d = torch.clamp(-delta, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
    raise ValueError(estimator)


def kl_loss(logprobs, ref_logprobs, mask, *, estimator="k3", loss_agg="token-mean", normalizer=None):
    return agg_loss(kl_estimate(logprobs, ref_logprobs, estimator), mask, loss_agg, normalizer)


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid(x)  # −log σ(x), stable in float64 for any |x|


def pairwise_reward_loss(chosen, rejected, *, margin=None, center_coef=None):
    c = chosen.to(torch.float64)
    r = rejected.to(torch.float64)
    z = c - r
    if margin is not None:
        z = z - (margin.to(torch.float64) if isinstance(margin, torch.Tensor) else margin)
    loss = _neg_log_sigmoid(z).mean()
    if center_coef is not None:
        loss = loss + center_coef * ((c + r) ** 2).mean()
    with torch.no_grad():
        metrics = {"accuracy": (c > r).double().mean(), "margin_mean": (c - r).mean()}
    return loss, metrics


def _pairs(scores, mask):
    s = scores.to(torch.float64)
    if s.dim() == 1:
        s = s.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    B, K = s.shape
    valid = torch.ones(B, K, dtype=torch.bool, device=s.device) if mask is None else (mask.to(s.device) != 0)
    i, j = torch.triu_indices(K, K, offset=1, device=s.device)
    pair_valid = valid[:, i] & valid[:, j]  # [B, P]
    return s, s[:, i], s[:, j], pair_valid


def ranking_reward_loss(scores, *, mask=None):
    s, s_i, s_j, pair_valid = _pairs(scores, mask)
    per_pair = _neg_log_sigmoid(s_i - s_j)
    n_pairs = pair_valid.sum(-1)
    per_prompt = torch.where(pair_valid, per_pair, torch.zeros_like(per_pair)).sum(-1) / n_pairs.clamp(min=1)
    has_pairs = n_pairs > 0
    per_prompt = torch.where(has_pairs, per_prompt, torch.zeros_like(per_prompt))
    loss = per_prompt.sum() / has_pairs.sum().clamp(min=1)
    with torch.no_grad():
        correct = (pair_valid & (s_i > s_j)).sum()
        metrics = {"accuracy": correct.double() / n_pairs.sum().clamp(min=1)}
    return loss, metrics


def ranking_hinge_loss(seq_scores, *, mask=None):
    s, s_i, s_j, pair_valid = _pairs(seq_scores, mask)
    per_pair = torch.relu(s_j - s_i)
    return torch.where(pair_valid, per_pair, torch.zeros_like(per_pair)).sum(-1).mean()


def pointwise_reward_loss(pred, target):
    return ((pred.to(torch.float64) - target.to(torch.float64)) ** 2).mean()
