"""Eager PPO / reward-model loss idioms of verl, OpenRLHF and TRL, written from their published semantics.

verl (``trainer/ppo/core_algos.py``): ``compute_policy_loss`` always applies the dual clip with
``clip_ratio_c`` (default 3), reduces with ``agg_loss``; ``masked_mean`` divides by Σm + 1e-8, and
"seq-mean-token-mean" divides each row by its own token count (0/0 = NaN for an empty row).
OpenRLHF (``models/loss.py``): ``PolicyLoss`` / ``ValueLoss`` average per token over the batch
(``token_level_loss=True``) or per row then over rows; its ``masked_mean`` has no epsilon.
TRL (``RewardTrainer.compute_loss``): −log σ(c − r − margin) averaged, plus
``center_rewards_coefficient``·mean((c + r)²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------------
def verl_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    if loss_agg_mode == "token-mean":
        return verl_masked_mean(loss_mat, loss_mask)
    row_sums = (loss_mat * loss_mask).sum(dim=-1)
    if loss_agg_mode == "seq-mean-token-sum":
        return row_sums.mean()
    if loss_agg_mode == "seq-mean-token-mean":
        return (row_sums / loss_mask.sum(dim=-1)).mean()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return row_sums.sum() / loss_mask.shape[-1]
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def verl_compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
):
    """Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), as verl's vanilla policy loss."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = verl_masked_mean(-neg_kl, response_mask)
    surrogate = -advantages * ratio
    surrogate_clipped = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clipped_max = torch.maximum(surrogate, surrogate_clipped)
    pg_clipfrac = verl_masked_mean(torch.gt(surrogate_clipped, surrogate).float(), response_mask)
    dual_bound = -advantages * clip_ratio_c
    dual_clipped = torch.min(dual_bound, clipped_max)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clipped_max, dual_bound) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, dual_clipped, clipped_max)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
):
    """Returns (vf_loss, vf_clipfrac), as verl's compute_value_loss."""
    vpred_clipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    unclipped = (vpreds - returns) ** 2
    clipped = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * verl_agg_loss(torch.max(unclipped, clipped), response_mask, loss_agg_mode)
    vf_clipfrac = verl_masked_mean(torch.gt(clipped, unclipped).float(), response_mask)
    return vf_loss, vf_clipfrac


# ---------------------------------------------------------------------------------------------------
# OpenRLHF
# ---------------------------------------------------------------------------------------------------
def openrlhf_masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None):
    if mask is None:
        return tensor.mean(dim=dim)
    if dim is None:
        return (tensor * mask).sum() / mask.sum()
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


class OpenRLHFPolicyLoss(torch.nn.Module):
    """PPO clipped surrogate; returns (loss, clip_ratio)."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, token_level_loss: bool = True):
        super().__init__()
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.token_level_loss = token_level_loss

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None):
        ratio = (log_probs - old_log_probs).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        loss = -torch.min(surr1, surr2)
        if self.token_level_loss:
            loss = openrlhf_masked_mean(loss, action_mask, dim=None)
        else:
            loss = openrlhf_masked_mean(loss, action_mask, dim=-1).mean()
        clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
        return loss, clip_ratio


class OpenRLHFValueLoss(torch.nn.Module):
    """½ · masked mean of max((v_clip − R)², (v − R)²), v_clip = v_old + clamp(v − v_old, ±ε)."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True):
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values, old_values, returns, action_mask=None):
        if self.clip_eps is not None:
            values_clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
            loss = torch.max((values_clipped - returns) ** 2, (values - returns) ** 2)
        else:
            loss = (values - returns) ** 2
        if self.token_level_loss:
            loss = openrlhf_masked_mean(loss, action_mask, dim=None)
        else:
            loss = openrlhf_masked_mean(loss, action_mask, dim=-1).mean()
        return 0.5 * loss


class OpenRLHFPairWiseLoss(torch.nn.Module):
    def forward(self, chosen_reward, reject_reward, margin=None):
        if margin is not None:
            return -F.logsigmoid(chosen_reward - reject_reward - margin).mean()
        return -F.logsigmoid(chosen_reward - reject_reward).mean()


class OpenRLHFLogExpLoss(torch.nn.Module):
    """log(1 + e^{r − c}), written literally (it overflows for r − c beyond ~88 in fp32)."""

    def forward(self, chosen_reward, reject_reward, margin=None):
        return torch.log(1 + torch.exp(reject_reward - chosen_reward)).mean()


# ---------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------
def trl_reward_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    if margin is not None:
        loss = -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    else:
        loss = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


def instructgpt_ranking_loss(scores: torch.Tensor) -> torch.Tensor:
    """The straightforward eager K-way ranking loss: every pair i < j materialised, then averaged."""
    k = scores.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=scores.device)
    return -F.logsigmoid(scores[:, i] - scores[:, j]).mean()
