"""Float64 oracle of token-level rewards (KL reward shaping), row by row; the KL estimators are
``reference/kl.py``'s."""

from __future__ import annotations

import torch

from .kl import kl_penalty


def token_level_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards = −kl_coef·KL·m, plus the (clamped) score at each row's last valid position; and the mean
    over rows of each row's masked-mean KL (0 for a row without valid positions)."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    m = mask.double()
    rewards = -kl_coef * kl * m
    score = scores.double()
    if score_clip is not None:
        score = score.clamp(-score_clip, score_clip)
    row_kl = torch.zeros(m.shape[0], dtype=torch.float64)
    for b in range(m.shape[0]):
        valid = (m[b] != 0).nonzero().flatten()
        if len(valid):
            rewards[b, valid[-1]] += score[b]
            row_kl[b] = (kl[b] * m[b]).sum() / m[b].sum()
    return rewards, row_kl.sum() / max(row_kl.numel(), 1)  # no rows: 0 (the empty-input rule)
