"""Eager PPO / reward-model loss idioms of verl, OpenRLHF and TRL (versions: ``bench/baselines/__init__``).

verl (``trainer/ppo/core_algos.py``, checked line by line against the verl 0.9.1 wheel):
``compute_policy_loss`` clamps lp − old to ±20, always applies the
dual clip with ``clip_ratio_c`` (default 3) and reduces with ``agg_loss``: "token-mean" divides the masked
sum by Σm (0/0 = NaN for an empty batch), "token-sum" does not divide, the sequence modes average over
the rows that have at least one token ("seq-mean-token-sum-norm" further divides by T, or
``loss_scale_factor``), each row's token mean dividing by n + 1e-8.  Metrics use ``masked_mean`` (Σm + 1e-8).
OpenRLHF (``models/loss.py``): ``PolicyLoss`` / ``ValueLoss`` reduce with ``aggregate_loss``, per token over
the batch (``token_level_loss=True``) or per row then over non-empty rows; its ``masked_mean`` has no
epsilon.
TRL (``RewardTrainer.compute_loss``): −log σ(c − r − margin) averaged, plus
``center_rewards_coefficient``·mean((c + r)²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masked import openrlhf_masked_mean, verl_masked_mean, verl_masked_sum


# ---------------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------------
def verl_agg_loss(
    loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
    loss_scale_factor=None,
):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return verl_masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        row_sums = (loss_mat * loss_mask).sum(-1)
        rows = (loss_mask.sum(-1) > 0).float()  # fully masked rows are left out
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = rows.sum()
        loss = verl_masked_sum(row_sums, rows) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        counts = loss_mask.sum(-1)
        row_means = (loss_mat * loss_mask).sum(-1) / (counts + 1e-8)
        rows = (counts > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = rows.sum()
        return verl_masked_sum(row_means, rows) / global_batch_size * dp_size
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def verl_compute_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
    cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean",
):
    """Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), as verl's compute_policy_loss (the
    positional form; compute_policy_loss_vanilla computes the same from an actor config)."""
    assert clip_ratio_c > 1.0
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = verl_masked_mean(-neg_kl, response_mask)
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clipped = torch.maximum(loss1, loss2)
    clipfrac = verl_masked_mean(torch.gt(loss2, loss1).float(), response_mask)
    loss3 = -advantages * clip_ratio_c
    dual = torch.min(loss3, clipped)
    clipfrac_lower = verl_masked_mean(torch.gt(clipped, loss3) * (advantages < 0).float(), response_mask)
    losses = torch.where(advantages < 0, dual, clipped)
    return verl_agg_loss(losses, response_mask, loss_agg_mode), clipfrac, ppo_kl, clipfrac_lower


def verl_compute_value_loss(
    vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean", dp_size=1,
    batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
):
    """Returns (vf_loss, vf_clipfrac): ½·agg(max((v − R)², (clip(v, v_old ± ε) − R)²))."""
    clipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    losses1 = (vpreds - returns) ** 2
    losses2 = (clipped - returns) ** 2
    loss = 0.5 * verl_agg_loss(
        torch.max(losses1, losses2), response_mask, loss_agg_mode, dp_size, batch_num_tokens,
        global_batch_size, loss_scale_factor,
    )
    return loss, verl_masked_mean(torch.gt(losses2, losses1).float(), response_mask)


# ---------------------------------------------------------------------------------------------------
# OpenRLHF
# ---------------------------------------------------------------------------------------------------
def openrlhf_aggregate_loss(
    loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None
):
    if token_level_loss:
        if batch_num_tokens is None:
            return openrlhf_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    counts = loss_mask.sum(dim=-1)
    row_means = (loss * loss_mask).sum(dim=-1) / (counts + 1e-8)
    rows = (counts > 0).float()  # fully masked rows are left out
    if global_batch_size is None:
        return openrlhf_masked_mean(row_means, rows, dim=None)
    return (row_means * rows).sum() / global_batch_size * dp_size


class OpenRLHFPolicyLoss(torch.nn.Module):
    """PPO policy loss ("ppo" type, no vLLM importance-sampling correction): the log-ratio clamped to
    ±20, optional dual clip.  Returns (loss, clip_ratio, ppo_kl, None); ppo_kl averages the unclamped
    −(lp − old)."""

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True):
        super().__init__()
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.dual_clip, self.token_level_loss = dual_clip, token_level_loss

    def forward(
        self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
        batch_num_tokens=None, global_batch_size=None,
    ):
        raw = log_probs - old_log_probs
        ratio = raw.clamp(min=-20.0, max=20.0).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        if self.dual_clip is None:
            loss = -torch.min(surr1, surr2)
        else:
            clip1 = torch.min(surr1, surr2)
            clip2 = torch.max(clip1, self.dual_clip * advantages)
            loss = -torch.where(advantages < 0, clip2, clip1)
        loss = openrlhf_aggregate_loss(
            loss, action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
        )
        clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
        ppo_kl = openrlhf_masked_mean(-raw.detach(), action_mask, dim=None)
        return loss, clip_ratio, ppo_kl, None


class OpenRLHFValueLoss(torch.nn.Module):
    """½ · aggregate of max((v_clip − R)², (v − R)²), v_clip = v_old + clamp(v − v_old, ±ε)."""

    def __init__(self, clip_eps=None, token_level_loss=True):
        super().__init__()
        self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

    def forward(
        self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
        global_batch_size=None,
    ):
        if self.clip_eps is not None:
            clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
            loss = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
        else:
            loss = (values - returns) ** 2
        loss = openrlhf_aggregate_loss(
            loss, action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
        )
        return 0.5 * loss


class OpenRLHFPairWiseLoss(torch.nn.Module):
    def forward(self, chosen_reward, reject_reward, margin=None):
        if margin is not None:
            return -F.logsigmoid(chosen_reward - reject_reward - margin).mean()
        return -F.logsigmoid(chosen_reward - reject_reward).mean()


class OpenRLHFLogExpLoss(torch.nn.Module):
    """log(1 + e^{r − c}), written literally (it overflows for r − c beyond ~88 in fp32); margin ignored."""

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


# ---------------------------------------------------------------------------------------------------
# The textbook K-way ranking loss (InstructGPT), no framework's exact code
# ---------------------------------------------------------------------------------------------------
def instructgpt_ranking_loss(scores: torch.Tensor) -> torch.Tensor:
    """The straightforward eager K-way ranking loss: every pair i < j materialised, then averaged."""
    k = scores.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=scores.device)
    return -F.logsigmoid(scores[:, i] - scores[:, j]).mean()
