"""Advantage estimators' [B, T] passes as the C++ CPU kernels of ``csrc/advantages.cpp``, registered ops.

``advantages_on_tokens_cpp(values, mask)``            values[b]·m[b, t] (``ops/advantages.py``'s ``_on_tokens``)
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

import torch

from ... import _ext
from ..._registration import torch_op


def _module():
    return _ext.load("cpp")


def _on_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _module().advantages_on_tokens(values, mask)


def _whitened_on_tokens(values: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    return _module().advantages_whitened_on_tokens(values, mask, eps)


def _remax(rewards: torch.Tensor, baselines: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


advantages_on_tokens_cpp = torch_op("advantages_on_tokens_cpp", _on_tokens, fake=_tokens_like)
advantages_whitened_on_tokens_cpp = torch_op(
    "advantages_whitened_on_tokens_cpp", _whitened_on_tokens, fake=_tokens_like
)
remax_cpp = torch_op("remax_cpp", _remax, fake=_remax_fake)
reinforce_plus_plus_cpp = torch_op("reinforce_plus_plus_cpp", _reinforce_plus_plus, fake=_reinforce_plus_plus_fake)
optimal_token_baseline_cpp = torch_op(
    "optimal_token_baseline_cpp", _optimal_token_baseline, fake=_optimal_token_baseline_fake
)
