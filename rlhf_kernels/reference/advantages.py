"""Float64 oracles of group advantages and their broadcast to tokens, group by group.

The token-level families' oracles live in ``reference/gae.py``, ``reference/whiten.py`` and
``reference/token_rewards.py`` (re-exported here for the old import path); the KL estimators only in
``reference/kl.py``.
"""

from __future__ import annotations

import torch

from .gae import compute_gae
from .token_rewards import token_level_rewards
from .whiten import masked_whiten

__all__ = ["broadcast_to_tokens", "compute_gae", "group_advantages", "masked_whiten", "token_level_rewards"]


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    norm: str = "std",
    eps: float = 1e-6,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """A_i = (s_i − baseline_i)/(std_g + eps) (or without the division), group by group."""
    s = scores.double()
    out = torch.empty_like(s)
    for start in range(0, s.shape[0], group_size):
        group = s[start : start + group_size]
        std = group.std(unbiased=True)
        for i in range(group_size):
            if leave_one_out:
                others = torch.cat([group[:i], group[i + 1 :]])
                baseline = others.mean()
            else:
                baseline = group.mean()
            a = group[i] - baseline
            out[start + i] = a / (std + eps) if norm == "std" else a
    return out


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """advantages[b]·m[b, t], 0 where m = 0."""
    m = mask.double()
    return torch.where(m != 0, advantages.double()[:, None] * m, torch.zeros_like(m))
