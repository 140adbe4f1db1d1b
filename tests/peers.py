"""Eager re-implementations of the verl, TRL and OpenRLHF functions that ``rlhf_kernels.compat`` replaces.

Each function here is written from the framework's published semantics (names, signatures, defaults,
dtype behaviour and edge cases), as of the versions named below, so that the compat tests compare the
shims with what a user of the framework gets today.  Where ``bench/baselines`` already holds a faithful
re-implementation of the same version it is re-exported instead of rewritten.

Versions followed
-----------------
verl      verl-project/verl main, 2026: ``verl/utils/torch_functional.py`` (``masked_sum`` zeroes masked
          positions with ``torch.where``; ``masked_mean`` divides by Σm + 1e-8; ``masked_whiten`` raises on
          fewer than two valid elements) and ``verl/trainer/ppo/core_algos.py`` (``agg_loss`` with
          ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` / ``loss_scale_factor``; the
          sequence modes exclude fully masked rows; ``kl_penalty`` with the "+" straight-through
          suffix).  ``logprobs_from_logits`` is the flash-attn path (fp32 output) that verl takes on
          GPUs; the gather/logsumexp fallback computes the same numbers in the logits' dtype.
TRL       huggingface/trl main: ``selective_log_softmax`` with an index of shape (...) or (..., K),
          ``entropy_from_logits(logits, chunk_size=128)``, ``RewardTrainer.compute_loss``'s loss.
OpenRLHF  OpenRLHF/OpenRLHF main (July 2026): ``models/loss.py`` (``aggregate_loss``, ``PolicyLoss`` with
          the ±20 log-ratio clamp and dual clip, ``ValueLoss``, ``PairWiseLoss``, ``LogExpLoss``),
          ``models/utils.py`` (``compute_approx_kl`` clamped to ±10, ``log_probs_from_logits`` dividing
          the logits in place, ``masked_mean`` without epsilon, ``compute_entropy``) and
          ``trainer/ppo_utils/experience_maker.py`` (``get_advantages_and_returns``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = str(Path(__file__).resolve().parents[1])  # the repository root, for bench/
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.baselines.losses import OpenRLHFLogExpLoss, OpenRLHFPairWiseLoss, trl_reward_loss  # noqa: E402

__all__ = [
    "OpenRLHFLogExpLoss",
    "OpenRLHFPairWiseLoss",
    "OpenRLHFPolicyLoss",
    "OpenRLHFValueLoss",
    "openrlhf_compute_approx_kl",
    "openrlhf_compute_entropy",
    "openrlhf_get_advantages_and_returns",
    "openrlhf_log_probs_from_logits",
    "trl_entropy_from_logits",
    "trl_reward_loss",
    "trl_selective_log_softmax",
    "verl_agg_loss",
    "verl_compute_gae_advantage_return",
    "verl_compute_policy_loss",
    "verl_compute_value_loss",
    "verl_entropy_from_logits",
    "verl_kl_penalty",
    "verl_linear_cross_entropy",
    "verl_logprobs_from_logits",
    "verl_masked_whiten",
]


# ===================================================================================================
# verl
# ===================================================================================================
def verl_masked_sum(values, mask, axis=None):
    return torch.where(mask.bool(), values, 0.0).sum(axis)


def verl_masked_mean(values, mask, axis=None):
    return verl_masked_sum(values, mask, axis) / (mask.sum(axis) + 1e-8)


def verl_masked_var(values, mask, unbiased=True):
    mean = verl_masked_mean(values, mask)
    variance = verl_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if count == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        variance = variance * (count / (count - 1))
    return variance


def verl_masked_whiten(values, mask, shift_mean=True):
    """(x − μ)·rsqrt(var + 1e-8) at every position, masked ones included (+ μ without shift_mean)."""
    mean, variance = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(variance + 1e-8)
    return out + mean if not shift_mean else out


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
        rows = ((loss_mask.sum(-1)) > 0).float()
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


def verl_gae_loop(token_level_rewards, values, response_mask, gamma, lam):
    """The reverse loop with carried next value and last advantage (skipped over masked positions)."""
    with torch.no_grad():
        next_values = 0
        last = 0
        out = []
        for t in reversed(range(token_level_rewards.shape[-1])):
            m = response_mask[:, t]
            delta = token_level_rewards[:, t] + gamma * next_values - values[:, t]
            candidate = delta + gamma * lam * last
            next_values = values[:, t] * m + (1 - m) * next_values
            last = candidate * m + (1 - m) * last
            out.append(last)
        advantages = torch.stack(out[::-1], dim=1)
        return advantages, advantages + values


def verl_compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    advantages, returns = verl_gae_loop(token_level_rewards, values, response_mask, gamma, lam)
    return verl_masked_whiten(advantages, response_mask), returns


def verl_compute_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
    cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean",
):
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
    clipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    losses1 = (vpreds - returns) ** 2
    losses2 = (clipped - returns) ** 2
    loss = 0.5 * verl_agg_loss(
        torch.max(losses1, losses2), response_mask, loss_agg_mode, dp_size, batch_num_tokens,
        global_batch_size, loss_scale_factor,
    )
    return loss, verl_masked_mean(torch.gt(losses2, losses1).float(), response_mask)


def _verl_kl_forward(logprob, ref_logprob, name):
    if name in ("kl", "k1"):
        return logprob - ref_logprob
    if name == "abs":
        return (logprob - ref_logprob).abs()
    if name in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if name in ("low_var_kl", "k3"):
        d = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    raise NotImplementedError


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    forward = _verl_kl_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


def verl_logprobs_from_logits(logits, labels):
    """flash-attn cross-entropy semantics: fp32 log-probs (computed in fp32), label −100 gives 0."""
    x = logits.float() if logits.dtype != torch.float64 else logits
    ignored = labels == -100
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    out = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return torch.where(ignored, torch.zeros_like(out), out)


def verl_entropy_from_logits(logits):
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def verl_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none"):
    """What verl's fused kernel computes: per-token (logprobs, entropy) of (hidden @ Wᵀ) / τ in fp32."""
    logits = (hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().T) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


# ===================================================================================================
# TRL
# ===================================================================================================
def trl_selective_log_softmax(logits, index):
    squeeze = index.ndim == logits.ndim - 1
    if squeeze:
        index = index.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        out = selected - lse.unsqueeze(-1)
    else:
        out = torch.stack(
            [F.log_softmax(row, dim=-1).gather(dim=-1, index=idx) for row, idx in zip(logits, index)]
        )
    return out.squeeze(-1) if squeeze else out


def trl_entropy_from_logits(logits, chunk_size=128):
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = F.log_softmax(chunk, dim=-1)
        parts.append(-(torch.exp(logp) * logp).sum(-1))
    return torch.cat(parts, dim=0).reshape(logits.shape[:-1])


# ===================================================================================================
# OpenRLHF
# ===================================================================================================
def openrlhf_masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def openrlhf_aggregate_loss(
    loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None
):
    if token_level_loss:
        if batch_num_tokens is None:
            return openrlhf_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    counts = loss_mask.sum(dim=-1)
    row_means = (loss * loss_mask).sum(dim=-1) / (counts + 1e-8)
    rows = (counts > 0).float()
    if global_batch_size is None:
        return openrlhf_masked_mean(row_means, rows, dim=None)
    return (row_means * rows).sum() / global_batch_size * dp_size


class OpenRLHFPolicyLoss(torch.nn.Module):
    """PPO policy loss ("ppo" type, no vLLM importance-sampling correction).

    Returns (loss, clip_ratio, ppo_kl, None)."""

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


def openrlhf_log_probs_from_logits(logits, labels, temperature=1.0):
    """Divides ``logits`` in place by the temperature (as OpenRLHF does), then gather − logsumexp for
    fp32/fp64 and a per-row log_softmax for half precision; the result has the logits' dtype."""
    if temperature != 1.0:
        logits.div_(temperature)
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return selected - torch.logsumexp(logits, dim=-1)
    rows = [F.log_softmax(row, dim=-1).gather(-1, lab.unsqueeze(-1)) for row, lab in zip(logits, labels)]
    return torch.stack(rows).squeeze(-1)


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio.clamp(min=-10, max=10)


def openrlhf_compute_entropy(logits):
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def openrlhf_get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
    with torch.no_grad():
        if action_mask is not None:
            values = action_mask * values
            rewards = action_mask * rewards
        last = 0
        out = []
        length = rewards.size(1)
        for t in reversed(range(length)):
            next_values = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + gamma * next_values - values[:, t]
            last = delta + gamma * lambd * last
            out.append(last)
        advantages = torch.stack(out[::-1], dim=1)
        return advantages.detach(), advantages + values
