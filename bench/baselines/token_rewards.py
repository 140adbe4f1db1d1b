"""verl's eager KL reward shaping (``apply_kl_penalty``); versions in ``bench/baselines/__init__.py``."""

from __future__ import annotations

import torch

from .masked import verl_masked_mean


def verl_token_level_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's apply_kl_penalty with the k1 estimator, on token-level scores that hold each sequence's
    score at its last valid token (where verl's reward manager puts it for right-padded responses):
    rewards = scores − β·KL·m, and the batch KL metric, the mean over rows of the masked row mean (as a
    0-dim tensor: verl reads it with ``.item()``)."""
    mask = response_mask.to(torch.float32)
    last = (torch.arange(mask.shape[1], device=mask.device) * (mask > 0)).amax(-1)
    token_scores = torch.zeros_like(logprobs, dtype=torch.float32)
    token_scores[torch.arange(mask.shape[0], device=mask.device), last] = scores.float()
    kld = (logprobs.float() - ref_logprobs.float()) * mask
    rewards = token_scores - kl_coef * kld
    return rewards, verl_masked_mean(kld, mask, axis=-1).mean()
