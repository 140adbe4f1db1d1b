"""Eager GAE idioms of verl and OpenRLHF (versions in ``bench/baselines/__init__.py``).

Both compute GAE with a reverse Python loop over the response length (T small kernels per call); verl's
``compute_gae_advantage_return`` then whitens the advantages over the response mask.
"""

from __future__ import annotations

import torch

from .masked import verl_masked_whiten


def verl_gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop of verl's compute_gae_advantage_return, without its final whitening: (advantages,
    returns).  The carried next value and last advantage skip masked positions (m·new + (1 − m)·old).

    The mask is cast to the values' dtype first: verl's response_mask is an integer or float tensor (its
    ``1 − m`` fails on bool); for those the numbers are the same."""
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


def verl_compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's compute_gae_advantage_return: the loop, then masked_whiten of the advantages over the
    response mask (raises, a host sync, with fewer than two valid tokens); returns are not whitened."""
    advantages, returns = verl_gae(token_level_rewards, values, response_mask, gamma, lam)
    return verl_masked_whiten(advantages, response_mask), returns


def openrlhf_get_advantages_and_returns(
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor | None,
    gamma: float,
    lambd: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's get_advantages_and_returns: zero the masked values and rewards, then the plain loop
    with V_T = 0.  Note the (values, rewards) argument order."""
    with torch.no_grad():
        if action_mask is not None:
            values = action_mask * values
            rewards = action_mask * rewards
        last_gae = 0
        reversed_advantages = []
        length = rewards.shape[1]
        for t in reversed(range(length)):
            next_values = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + gamma * next_values - values[:, t]
            last_gae = delta + gamma * lambd * last_gae
            reversed_advantages.append(last_gae)
        advantages = torch.stack(reversed_advantages[::-1], dim=1)
        return advantages.detach(), advantages + values
