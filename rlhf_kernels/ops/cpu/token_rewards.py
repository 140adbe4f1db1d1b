"""The PyTorch path of token-level rewards (any device): ``token_rewards_torch``.

The math is documented in ``rlhf_kernels/ops/token_rewards.py``; the KL estimators are
``ops/cpu/kl.py``'s.
"""

from __future__ import annotations

import torch

from ..._registration import torch_op
from .kl import kl_value_torch


def _token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    score_clip: float,
    has_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T] fp32, per-row masked-mean KL [B] fp32); ``estimator`` canonical."""
    if logprobs.shape[-1] == 0:
        return logprobs.new_empty(logprobs.shape, dtype=torch.float32), logprobs.new_zeros(
            logprobs.shape[:1], dtype=torch.float32
        )
    kl = kl_value_torch(logprobs, ref_logprobs, estimator).to(torch.float32)
    if mask.dtype == torch.bool:  # no conversion at all: weights are 1
        valid = mask
        kl_masked = torch.where(valid, kl, 0.0)
        count = valid.sum(-1, dtype=torch.float32)
    else:
        weights = mask.to(torch.float32)
        valid = weights != 0
        kl_masked = torch.where(valid, kl * weights, 0.0)
        count = torch.where(valid, weights, 0.0).sum(-1)
    row_kl = torch.where(count > 0, kl_masked.sum(-1) / torch.where(count > 0, count, 1.0), 0.0)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(valid, positions, -1).amax(-1)
    score = scores.to(torch.float32)
    if has_clip:
        score = score.clamp(-score_clip, score_clip)
    rewards = -kl_coef * kl_masked
    rewards = rewards + torch.where(positions == last.unsqueeze(-1), score.unsqueeze(-1), 0.0)
    return rewards.contiguous(), row_kl


def _token_rewards_fake(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, score_clip, has_clip):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float32), logprobs.new_empty(
        logprobs.shape[:1], dtype=torch.float32
    )


token_rewards_torch = torch_op("token_rewards_torch", _token_rewards, fake=_token_rewards_fake)
