"""Advantage estimators off the public module: the groups (segment reductions over an index tensor), the
PyTorch path of the [B, T] passes, and the same passes as the C++ CPU kernels of ``csrc/advantages.cpp``
(registered ops, ``_dispatch`` family "advantages"):

``advantages_on_tokens_cpp(values, mask)``            values[b]·m[b, t] (``_on_tokens`` of ops/advantages.py)
``advantages_whitened_on_tokens_cpp(values, mask, eps)``  masked_whiten(values·m, m)·m (gdpo,
                                                       reinforce_plus_plus_baseline)
``remax_cpp(rewards, baselines, mask)``                (advantages, returns) of ``"remax"``
``reinforce_plus_plus_cpp(rewards, mask, gamma, eps, double_out)``  (advantages, returns) of
                                                       ``"reinforce_plus_plus"``
``optimal_token_baseline_cpp(rewards, mask, group_ids, old_log_probs, sum_pi_squared, rollout_is_weights,
                             handle_zero_tail, eps, multi_turn, double_out)``  (advantages, returns) of
                                                       ``"optimal_token_baseline"`` (``"tir_..."``:
                                                       ``multi_turn``); ``group_ids`` dense in [0, B)

Each returns what the PyTorch path of ``rlhf_kernels/ops/advantages.py`` returns (its docstrings state the
math; the whitening statistics here are fp64).  Inputs: any dtypes the public functions accept, any
strides; outputs contiguous, fp32 (fp64 where the compute dtype is fp64).  The extension is built on first
use by ``rlhf_kernels/_ext.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ... import _ext
from ..._registration import torch_op


# --------------------------------------------------------------------------------------------------
# The PyTorch path: groups as segment reductions, and the [B, T] passes the C++ kernels replace.
# --------------------------------------------------------------------------------------------------
class Groups(NamedTuple):
    """Dense group ids of the samples and per-sample group sizes, all [B] (at most B groups, so every
    per-group buffer has B slots: no size depends on the data, no host sync)."""

    ids: torch.Tensor  # int64 [B] in [0, B)
    size: torch.Tensor  # n_g of each sample's group, in the compute dtype

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """Σ over each group of ``values`` [B, ...], per group slot [B, ...]."""
        return values.new_zeros(values.shape).index_add_(0, self.ids, values)

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group ``values`` [B, ...] (one per slot) back to the samples."""
        return values.index_select(0, self.ids)

    def amax(self, values: torch.Tensor) -> torch.Tensor:
        """max over each group of ``values`` [B] (NaN if any is NaN), back to the samples."""
        top = values.new_full(values.shape, -math.inf).scatter_reduce_(0, self.ids, values, "amax")
        return self.spread(top)

    def mean_std(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample group mean and unbiased std (two passes, as torch.std); a group of one sample has
        mean 0 and std 1 (verl).  ``scores`` [B] or [B, K]."""
        size = self.size.view(-1, *([1] * (scores.dim() - 1)))
        mean = self.spread(self.total(scores)) / size
        centred = scores - mean
        std = (self.spread(self.total(centred * centred)) / (size - 1).clamp_min(1)).sqrt()
        alone = size == 1
        return torch.where(alone, 0.0, mean), torch.where(alone, 1.0, std)


def find_groups(index: torch.Tensor, dtype: torch.dtype) -> Groups:
    """Samples with equal ``index`` values form a group (any values, any order): sort, mark where the
    sorted value changes, number the runs, and scatter the numbers back."""
    ordered, order = torch.sort(index, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.int64)
    starts[1:] = (ordered[1:] != ordered[:-1]).to(torch.int64)
    ids = torch.empty_like(starts).scatter_(0, order, starts.cumsum(0) - 1)
    size = torch.zeros(index.shape[0], dtype=dtype, device=index.device)
    size = size.index_add_(0, ids, torch.ones_like(size)).index_select(0, ids)
    return Groups(ids, size)


def on_tokens_torch(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if response_mask.dtype == torch.bool:
        return torch.where(response_mask, values, 0.0).to(values.dtype)
    return values * response_mask.to(values.dtype)


def _whiten_tokens(values: torch.Tensor, response_mask: torch.Tensor, process_group=None) -> torch.Tensor:
    """verl's ``masked_whiten(values, mask) * mask`` (statistics in fp32, see docs/whiten.md; over every
    rank of ``process_group`` when given)."""
    from ..whiten import masked_whiten

    whitened = masked_whiten(values.to(torch.float32), response_mask, process_group=process_group)
    return on_tokens_torch(whitened.to(values.dtype), response_mask)


def whitened_on_tokens_torch(values: torch.Tensor, response_mask: torch.Tensor, eps: float) -> torch.Tensor:
    return _whiten_tokens(on_tokens_torch(values, response_mask), response_mask)


def _reverse_cumsum(values: torch.Tensor) -> torch.Tensor:
    """Σ_{s ≥ t} values[..., s] (verl's flip-cumsum-flip, same order of additions); ``values`` may be
    a temporary: the cumulative sum runs in place on its flipped copy (two [B, T] buffers, not three)."""
    return values.flip(-1).cumsum_(-1).flip(-1)


def reinforce_plus_plus_torch(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float, eps: float,
    double_out: bool, process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..gae import compute_gae

    dtype = torch.float64 if double_out else torch.float32
    rewards = token_level_rewards.to(torch.float32) if double_out else token_level_rewards
    carried, _ = compute_gae(rewards, torch.zeros_like(rewards), response_mask, gamma, 1.0, mask_mode="carry")
    valid = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    returns = torch.where(valid, carried.to(dtype), 0.0)
    return _whiten_tokens(returns, response_mask, process_group), returns


def remax_torch(
    token_level_rewards: torch.Tensor, reward_baselines: torch.Tensor, response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = reward_baselines.dtype
    returns = _reverse_cumsum(on_tokens_torch(token_level_rewards.to(dtype), response_mask))
    valid = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    # G − b·m at valid tokens, 0 elsewhere, built in one buffer (−(b·m) + G rounds as G − b·m).
    advantages = torch.mul(response_mask.to(dtype), reward_baselines.unsqueeze(-1))
    return advantages.neg_().add_(returns).masked_fill_(~valid, 0.0), returns


def _path_weights(
    response_mask: torch.Tensor, old_log_probs: torch.Tensor, sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor | None, dtype: torch.dtype,
) -> torch.Tensor:
    """W_t = Σ_{j ≤ t} m_j·w_j, w_j = (1 − 2π_j + Σπ²_j)·ρ_j² (the cumulative path-variance proxy)."""
    w = 1 - 2 * old_log_probs.to(dtype).exp() + sum_pi_squared.to(dtype)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.to(dtype).square()
    return on_tokens_torch(w, response_mask).cumsum(-1)


def _token_baseline(groups: Groups, members: torch.Tensor, returns: torch.Tensor, weights: torch.Tensor,
                    lengths: torch.Tensor, epsilon: float, handle_zero_tail: bool) -> torch.Tensor:
    """B_t = Σ_g G_t·W_t / (Σ_g W_t + ε) per group and position, back to the samples [B, T]: 0 for a
    group of one member (``members`` counts the members of each sample's group) and where the divisor
    is 0; with ``handle_zero_tail``, 0 from the second-longest length on for a unique longest member."""
    numerator = groups.spread(groups.total(returns * weights))
    divisor = groups.spread(groups.total(weights)) + epsilon
    baseline = torch.where(divisor != 0, numerator / torch.where(divisor != 0, divisor, 1.0), 0.0)
    baseline = torch.where((members > 1).unsqueeze(-1), baseline, 0.0)
    if handle_zero_tail:
        longest = groups.amax(lengths)
        at_longest = lengths == longest
        unique = groups.spread(groups.total(at_longest.to(lengths.dtype))) == 1
        second = groups.amax(torch.where(at_longest, -math.inf, lengths)).floor()
        position = torch.arange(returns.shape[-1], device=returns.device, dtype=lengths.dtype)
        cut = (at_longest & unique & (members > 1)).unsqueeze(-1) & (position >= second.unsqueeze(-1))
        baseline = torch.where(cut, 0.0, baseline)
    return baseline


def optimal_token_baseline_torch(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor,
    old_log_probs: torch.Tensor, sum_pi_squared: torch.Tensor, rollout_is_weights: torch.Tensor | None,
    handle_zero_tail: bool, epsilon: float, multi_turn: bool, double_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.float64 if double_out else torch.float32
    returns = _reverse_cumsum(on_tokens_torch(token_level_rewards.to(dtype), response_mask))
    weights = _path_weights(response_mask, old_log_probs, sum_pi_squared, rollout_is_weights, dtype)
    groups = find_groups(group_ids, dtype)
    if not multi_turn:
        lengths = response_mask.sum(-1, dtype=dtype)
        weights = on_tokens_torch(weights, response_mask)
        baseline = _token_baseline(groups, groups.size, returns, weights, lengths, epsilon, handle_zero_tail)
        return on_tokens_torch(returns - baseline, response_mask), returns
    valid = response_mask != 0
    lengths = valid.sum(-1, dtype=dtype)
    # The k-th valid token of row b goes to column k; masked positions to a spare column T, dropped.
    T = valid.shape[-1]
    slot = torch.where(valid, valid.cumsum(-1) - 1, T)
    packed_returns, packed_weights = (
        x.new_zeros(x.shape[0], T + 1).scatter_(1, slot, torch.where(valid, x, 0.0))[:, :T]
        for x in (returns, weights)
    )
    members = groups.spread(groups.total((lengths > 0).to(dtype)))
    baseline = _token_baseline(groups, members, packed_returns, packed_weights, lengths, epsilon,
                               handle_zero_tail)
    baseline = torch.nn.functional.pad(baseline, (0, 1)).gather(1, slot)
    return on_tokens_torch(returns - baseline, response_mask), returns


# --------------------------------------------------------------------------------------------------
# The C++ kernels as registered ops.
# --------------------------------------------------------------------------------------------------


def _module():
    return _ext.load("cpp")


def _on_tokens_ext(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _module().advantages_on_tokens(values, mask)


def _whitened_on_tokens_ext(values: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    return _module().advantages_whitened_on_tokens(values, mask, eps)


def _remax(
    rewards: torch.Tensor, baselines: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_module().remax_advantages(rewards, baselines, mask))


def _reinforce_plus_plus(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float, eps: float, double_out: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_module().reinforce_plus_plus(rewards, mask, gamma, eps, double_out))


def _optimal_token_baseline(
    rewards: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor, old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor, rollout_is_weights: torch.Tensor | None, handle_zero_tail: bool, eps: float,
    multi_turn: bool, double_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_module().optimal_token_baseline(
        rewards, mask, group_ids, old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail, eps,
        multi_turn, double_out))


def _tokens_like(values, mask, *args):
    return values.new_empty(mask.shape)


def _remax_fake(rewards, baselines, mask):
    return baselines.new_empty(mask.shape), baselines.new_empty(mask.shape)


def _reinforce_plus_plus_fake(rewards, mask, gamma, eps, double_out):
    out = rewards.new_empty(rewards.shape, dtype=torch.float64 if double_out else torch.float32)
    return out, torch.empty_like(out)


def _optimal_token_baseline_fake(rewards, mask, group_ids, old_log_probs, sum_pi_squared, rollout_is_weights,
                                 handle_zero_tail, eps, multi_turn, double_out):
    return _reinforce_plus_plus_fake(rewards, mask, 1.0, eps, double_out)


advantages_on_tokens_cpp = torch_op("advantages_on_tokens_cpp", _on_tokens_ext, fake=_tokens_like)
advantages_whitened_on_tokens_cpp = torch_op(
    "advantages_whitened_on_tokens_cpp", _whitened_on_tokens_ext, fake=_tokens_like
)
remax_cpp = torch_op("remax_cpp", _remax, fake=_remax_fake)
reinforce_plus_plus_cpp = torch_op(
    "reinforce_plus_plus_cpp", _reinforce_plus_plus, fake=_reinforce_plus_plus_fake
)
optimal_token_baseline_cpp = torch_op(
    "optimal_token_baseline_cpp", _optimal_token_baseline, fake=_optimal_token_baseline_fake
)
