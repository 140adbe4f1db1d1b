"""Float64 oracles of the reward-model losses, straight from the formulas (see docs/reward_losses.md).

Same signatures as the public functions; everything is materialised in float64, nothing is fused.
Masked responses of the ranking losses are excluded with ``torch.where`` (so NaN padding there cannot
leak in); scalars (margin, center_coef) enter the float64 arithmetic unrounded.
"""

from __future__ import annotations

import torch


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid(x)  # −log σ(x), stable in float64 for any |x|


def pairwise_reward_loss(chosen, rejected, *, margin=None, center_coef=None):
    c = chosen.to(torch.float64)
    r = rejected.to(torch.float64)
    z = c - r
    if margin is not None:
        z = z - (margin.to(torch.float64) if isinstance(margin, torch.Tensor) else margin)
    n = max(z.numel(), 1)  # the empty-input rule (docs/robustness.md): means over nothing are 0
    loss = _neg_log_sigmoid(z).sum() / n
    if center_coef is not None:
        loss = loss + center_coef * ((c + r) ** 2).sum() / n
    with torch.no_grad():
        metrics = {"accuracy": (c > r).double().sum() / n, "margin_mean": (c - r).sum() / n}
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
    # select the difference before the loss, so that a NaN in an unpaired score gets no gradient either
    per_pair = _neg_log_sigmoid(torch.where(pair_valid, s_i - s_j, torch.zeros_like(s_i)))
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
    per_pair = torch.relu(torch.where(pair_valid, s_j - s_i, torch.zeros_like(s_i)))
    return per_pair.sum() / max(s.shape[0], 1)


def pointwise_reward_loss(pred, target):
    return ((pred.to(torch.float64) - target.to(torch.float64)) ** 2).sum() / max(pred.numel(), 1)
