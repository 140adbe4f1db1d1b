"""Eager advantage idioms of verl and OpenRLHF (written from their published semantics).

Both compute GAE with a reverse Python loop over the response length (T small kernels per call);
verl whitens the advantages over the response mask with Bessel's correction, OpenRLHF normalises them
over all valid tokens of the batch with the biased variance.
"""

from __future__ import annotations

import torch


def verl_gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's compute_gae_advantage_return without its final whitening: (advantages, returns).

    The carried next value and last advantage skip masked positions (m·new + (1 − m)·old)."""
    with torch.no_grad():
        next_values = 0
        last_gae = 0
        reversed_advantages = []
        mask = response_mask.to(values.dtype)
        for t in reversed(range(token_level_rewards.shape[-1])):
            delta = token_level_rewards[:, t] + gamma * next_values - values[:, t]
            candidate = delta + gamma * lam * last_gae
            next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
            last_gae = candidate * mask[:, t] + (1 - mask[:, t]) * last_gae
            reversed_advantages.append(last_gae)
        advantages = torch.stack(reversed_advantages[::-1], dim=1)
        return advantages, advantages + values


def verl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """verl's masked_whiten: masked mean, unbiased masked variance, rsqrt(var + 1e-8).  Masked positions
    keep (x − μ)·rstd (verl does not zero them); raises on an empty mask (a host sync)."""
    mask = mask.to(values.dtype)
    mean = (values * mask).sum() / mask.sum()
    centered = values - mean
    variance = (centered**2 * mask).sum() / mask.sum()
    count = mask.sum()
    if count == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    variance = variance * count / (count - 1)
    whitened = centered * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def verl_gae_whitened(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's full compute_gae_advantage_return: the loop, then whitening over the response mask."""
    advantages, returns = verl_gae(token_level_rewards, values, response_mask, gamma, lam)
    return verl_masked_whiten(advantages, response_mask), returns


def openrlhf_gae(
    values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float, lambd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's get_advantages_and_returns: zero the masked values and rewards, then the plain loop
    with V_T = 0.  Note the (values, rewards) argument order."""
    with torch.no_grad():
        mask = action_mask.to(values.dtype)
        values = mask * values
        rewards = mask * rewards
        last_gae = 0
        reversed_advantages = []
        length = rewards.shape[1]
        for t in reversed(range(length)):
            next_values = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + gamma * next_values - values[:, t]
            last_gae = delta + gamma * lambd * last_gae
            reversed_advantages.append(last_gae)
        advantages = torch.stack(reversed_advantages[::-1], dim=1)
        return advantages, advantages + values


def openrlhf_normalize(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's batch advantage normalisation: mean and biased variance over all valid tokens,
    (A − μ)·rsqrt(max(var, 1e-8))."""
    mask = action_mask.to(advantages.dtype)
    count = mask.sum()
    mean = (advantages * mask).sum() / count
    variance = ((advantages - mean).pow(2) * mask).sum() / count
    return (advantages - mean) * variance.clamp(min=1e-8).rsqrt()


def verl_token_level_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's apply_kl_penalty with the k1 estimator: the score placed at the last valid token, minus
    β·KL on every valid token; and the batch KL metric (mean over rows of the masked row mean)."""
    mask = response_mask.to(torch.float32)
    last = (torch.arange(mask.shape[1], device=mask.device) * (mask > 0)).amax(-1)
    token_scores = torch.zeros_like(logprobs, dtype=torch.float32)
    token_scores[torch.arange(mask.shape[0], device=mask.device), last] = scores.float()
    kld = (logprobs.float() - ref_logprobs.float()) * mask
    rewards = token_scores - kl_coef * kld
    row_kl = (kld * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    return rewards, row_kl.mean()
