"""Advantages: group-relative advantages of consecutive equal-size groups (``group_advantages``, the fast
path), their broadcast to tokens, and the advantage estimators of verl 0.9.1's registry (same names and
semantics, plus TRL's batch-std GRPO and OpenRLHF's FlashREINFORCE) over groups given by an arbitrary
index tensor: ``ADVANTAGE_ESTIMATORS`` / ``compute_advantages``.

The group statistics are PyTorch on [B]: segment reductions (``index_add_`` / ``scatter_reduce_``) into
buffers of B slots, so no size depends on the data and nothing synchronises the host; no Python loop over
groups or samples.  The [B, T] passes (the broadcast onto the tokens, the whitened broadcast, the remax
and reinforce_plus_plus scans, the optimal-token baselines) run, on CPU tensors, as the C++ kernels of
``csrc/advantages.cpp`` (``_dispatch`` family "advantages": cpu ``cpp`` then ``torch``; CUDA and the
fallback ``RLHF_KERNELS_EXT=0`` run the PyTorch path of ``ops/cpu/advantages.py``).  docs/advantages.md
states every estimator's math, its singleton rule, the results defined where verl raises or divides by
zero, and the CPU speed.

This module also re-exports the token-level families it used to hold, so that
``from rlhf_kernels.ops.advantages import compute_gae`` keeps working: GAE is ``ops/gae.py``, masked
whitening ``ops/whiten.py``, KL reward shaping ``ops/token_rewards.py``.  They are imported on first
use (PEP 562), so ``rlhf_kernels.group_advantages`` does not import the Triton kernels.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import _dispatch
from .._validation import (
    FLOAT_DTYPES,
    check_at_least,
    check_choice,
    check_float_tensor,
    check_in_range,
    check_index_tensor,
    check_int,
    check_mask_tensor,
    check_ndim,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)
from .cpu import advantages as cpu

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports them on first use
    from .gae import compute_gae
    from .token_rewards import token_level_rewards
    from .whiten import masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "broadcast_to_tokens",
    "compute_advantages",
    "compute_gae",
    "group_advantages",
    "masked_whiten",
    "token_level_rewards",
    "uid_index",
]

# Names that moved to their family's module: name -> module (relative to rlhf_kernels.ops).
_MOVED = {"compute_gae": ".gae", "masked_whiten": ".whiten", "token_level_rewards": ".token_rewards"}

GROUP_NORMS = ("std", "none")

FAMILY = "advantages"
_dispatch.register_family(FAMILY, cuda=("torch",), cpu=("cpp", "torch"))

WHITEN_EPS = 1e-8  # masked_whiten's default, as verl's


def _route(device: torch.device, cpp: Callable, torch_fn: Callable) -> Callable:
    """The C++ kernel where ``_dispatch`` picks "cpp" for this family on ``device``, else ``torch_fn``.
    A forced backend that this family does not have (triton, cuda) runs the PyTorch path, as before the
    family had a C++ kernel (the estimators are plain PyTorch there)."""
    if _dispatch.get_backend() in ("triton", "cuda"):
        return torch_fn
    return _dispatch.route(FAMILY, device, cpp=cpp, torch=torch_fn)


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    norm: str = "std",
    eps: float = 1e-6,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """Group-relative advantages (GRPO, RLOO, Dr. GRPO) of sequence scores.

    ``scores`` [B] holds consecutive groups of ``group_size`` samples of one prompt.  With the group's
    mean μ_g and unbiased standard deviation σ_g:

        baseline_i = μ_g, or with ``leave_one_out`` the mean of the other members (G·μ_g − s_i)/(G − 1)
        A_i = (s_i − baseline_i) / (σ_g + eps)  (norm="std"),   A_i = s_i − baseline_i  (norm="none")

    GRPO is the default; RLOO is ``leave_one_out=True, norm="none"``; Dr. GRPO is ``norm="none"``.

    Example: scores (0, 1, 2), group_size 3 → σ = 1, A = (−1, 0, 1)/(1 + 1e-6).

    Returns float32 [B]; differentiable (plain PyTorch).  ``group_size`` must divide B, and must be at
    least 2 when σ_g or a leave-one-out baseline is needed (both are undefined for one sample).  An
    empty ``scores`` gives an empty result (and no warning).
    """
    check_float_tensor("scores", scores)
    check_ndim("scores", scores, 1, "[B]")
    group_size = check_int("group_size", group_size)
    norm = check_choice("norm", norm, GROUP_NORMS)
    eps = check_at_least("eps", eps, 0.0)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of scores (scores.shape[0] = {scores.shape[0]}); "
            f"got {group_size}"
        )
    if group_size < 2 and (norm == "std" or leave_one_out):
        raise ValueError(
            "group_size must be >= 2 with norm='std' or leave_one_out=True (a group of one sample has no "
            f"standard deviation and no other members); got {group_size}"
        )
    groups = scores.to(torch.float32).view(-1, group_size)
    if leave_one_out:
        # Σ_{j≠i} s_j as (sum left of i) + (sum right of i): no subtraction, so an infinite member
        # gives the others an infinite baseline and itself a finite one (Σ − s_i would be inf − inf).
        zero = groups.new_zeros(groups.shape[0], 1)
        left = torch.cat([zero, groups[:, :-1].cumsum(-1)], dim=-1)
        right = torch.cat([groups[:, 1:].flip(-1).cumsum(-1).flip(-1), zero], dim=-1)
        baseline = (left + right) / (group_size - 1)
    else:
        baseline = groups.mean(-1, keepdim=True)
    advantages = groups - baseline
    # No groups, nothing to divide (torch.std of a [0, G] tensor warns about its degrees of freedom).
    if norm == "std" and groups.shape[0] > 0:
        advantages = advantages / (groups.std(-1, keepdim=True) + eps)
    return advantages.view(-1)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence values [B] onto tokens: out[b, t] = advantages[b]·m[b, t] where m ≠ 0, else 0.

    ``mask`` [B, T] bool, integer or floating.  Returns float32 [B, T]; differentiable; masked positions
    are exactly 0 even when the sequence value is NaN.
    """
    check_float_tensor("advantages", advantages)
    check_ndim("advantages", advantages, 1, "[B]")
    check_mask_tensor("mask", mask)
    check_ndim("mask", mask, 2, "[B, T]")
    check_shape("advantages", advantages, mask.shape[:1], "mask.shape[:1]")
    check_same_device(advantages=advantages, mask=mask)
    m = mask.to(torch.float32)
    return torch.where(m != 0, advantages.to(torch.float32).unsqueeze(-1) * m, 0.0)


# --------------------------------------------------------------------------------------------------
# Advantage estimators with verl 0.9.1's names and semantics, over groups given by an index tensor.
# --------------------------------------------------------------------------------------------------
ESTIMATOR_DTYPES = FLOAT_DTYPES + (torch.float64,)


def uid_index(uids: Sequence[object] | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """verl's ``index`` (a host array of prompt uids: strings, ints, any hashable) as the int64 [B]
    group-id tensor the estimators take: equal uids get equal ids (``np.unique``'s inverse).  Host-side
    (the uids live on the host); call it once per batch, before the tensors reach the device."""
    uids = np.asarray(uids, dtype=object if not isinstance(uids, np.ndarray) else None).reshape(-1)
    if uids.size == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    try:
        _, inverse = np.unique(uids, return_inverse=True)
    except TypeError:  # mixed, unorderable uids: group by their text
        _, inverse = np.unique(np.array([str(u) for u in uids]), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64).reshape(-1)).to(device)


def _check_estimator_inputs(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor | None = None,
    **others: torch.Tensor | None,
) -> torch.dtype:
    """Validates the common arguments (and ``others``: [B, T] floating tensors or None); returns the
    compute dtype."""
    check_float_tensor("token_level_rewards", token_level_rewards, ESTIMATOR_DTYPES)
    check_ndim("token_level_rewards", token_level_rewards, 2, "[B, T]")
    check_mask_tensor("response_mask", response_mask)
    check_shape("response_mask", response_mask, token_level_rewards.shape, "token_level_rewards.shape")
    if index is not None:
        check_index_tensor("index", index)
        check_shape("index", index, token_level_rewards.shape[:1], "token_level_rewards.shape[:1]")
    for name, tensor in others.items():
        if tensor is not None:
            check_float_tensor(name, tensor, ESTIMATOR_DTYPES)
            check_shape(name, tensor, token_level_rewards.shape, "token_level_rewards.shape")
    check_same_device(token_level_rewards=token_level_rewards, response_mask=response_mask, index=index,
                      **others)
    return compute_dtype(token_level_rewards, *others.values())


def _on_tokens(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """values·m (verl's product: 0 at masked positions for finite values, NaN·0 = NaN stays NaN), in one
    pass; ``values`` [B] (one per sequence: the C++ kernel on CPU) or [B, T]."""
    if values.dim() == 1:
        return _route(values.device, cpu.advantages_on_tokens_cpp, cpu.on_tokens_torch)(values, response_mask)
    return cpu.on_tokens_torch(values, response_mask)


def _whitened_on_tokens(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_whiten(values·m, m)·m`` of per-sequence ``values`` [B]."""
    return _route(values.device, cpu.advantages_whitened_on_tokens_cpp, cpu.whitened_on_tokens_torch)(
        values, response_mask, WHITEN_EPS)


def _scores(token_level_rewards: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return token_level_rewards.sum(-1, dtype=dtype)


def _pair(values: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = _on_tokens(values, response_mask)
    return advantages, advantages


@torch.no_grad()
def grpo_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
    epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"grpo"``: A = (s − μ_g)/(σ_g + ε) (Dr. GRPO without the division), s = Σ_t r; a group of one
    has μ = 0, σ = 1."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    epsilon = check_at_least("epsilon", epsilon, 0.0)
    scores = _scores(token_level_rewards, dtype)
    mean, std = cpu.find_groups(index, dtype).mean_std(scores)
    advantages = scores - mean
    if norm_adv_by_std_in_grpo:
        advantages = advantages / (std + epsilon)
    return _pair(advantages, response_mask)


@torch.no_grad()
def grpo_passk_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
    epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"grpo_passk"``: only the best sample of each group (the first of equal best) gets
    s_max − s_second (over σ_g + ε); a group of one gets 0 (verl raises)."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    epsilon = check_at_least("epsilon", epsilon, 0.0)
    scores = _scores(token_level_rewards, dtype)
    groups = cpu.find_groups(index, dtype)
    best = groups.amax(scores)
    position = torch.arange(scores.shape[0], device=scores.device)
    candidate = torch.where((scores == best) | scores.isnan(), position, scores.shape[0])
    first = torch.full_like(position, scores.shape[0]).scatter_reduce_(0, groups.ids, candidate, "amin")
    winner = position == groups.spread(first)
    second = groups.amax(torch.where(winner, -math.inf, scores))
    advantages = best - second
    if norm_adv_by_std_in_grpo:
        advantages = advantages / (groups.mean_std(scores)[1] + epsilon)
    return _pair(torch.where(winner & (groups.size > 1), advantages, 0.0), response_mask)


@torch.no_grad()
def rloo_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"rloo"``: A = n/(n−1)·(s − μ_g) = s − mean of the others; a group of one keeps A = s."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    scores = _scores(token_level_rewards, dtype)
    groups = cpu.find_groups(index, dtype)
    n = groups.size
    loo = n / (n - 1).clamp_min(1) * (scores - groups.spread(groups.total(scores)) / n)
    return _pair(torch.where(n > 1, loo, scores), response_mask)


@torch.no_grad()
def rloo_vectorized_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"rloo_vectorized"``: as ``"rloo"`` except that a group of one gets A = 0."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    scores = _scores(token_level_rewards, dtype)
    groups = cpu.find_groups(index, dtype)
    n = groups.size
    loo = (n * scores - groups.spread(groups.total(scores))) / (n - 1).clamp_min(1)
    return _pair(torch.where(n > 1, loo, 0.0), response_mask)


@torch.no_grad()
def opo_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"opo"``: A = s − Σ_g ℓ·s / Σ_g ℓ with ℓ = Σ_t m (length-weighted baseline); a group of one, or
    of empty responses only (verl: 0/0), has baseline 0."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    scores = _scores(token_level_rewards, dtype)
    lengths = response_mask.sum(-1, dtype=dtype)
    groups = cpu.find_groups(index, dtype)
    weight = groups.spread(groups.total(lengths))
    baseline = groups.spread(groups.total(lengths * scores)) / torch.where(weight != 0, weight, 1.0)
    return _pair(scores - torch.where((groups.size > 1) & (weight != 0), baseline, 0.0), response_mask)


@torch.no_grad()
def gpg_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor, f_norm: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"gpg"``: A = α·(s − μ_g)/f_norm with α = B / max(1, #{s ≠ 0}); a group of one has μ = 0."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    f_norm = check_real("f_norm", f_norm)
    scores = _scores(token_level_rewards, dtype)
    mean, _ = cpu.find_groups(index, dtype).mean_std(scores)
    alpha = scores.shape[0] / torch.count_nonzero(scores).clamp_min(1).to(dtype)
    return _pair(alpha * (scores - mean) / f_norm, response_mask)


@torch.no_grad()
def reinforce_plus_plus_baseline_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"reinforce_plus_plus_baseline"``: s − μ_g on every token, whitened over the response tokens."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    scores = _scores(token_level_rewards, dtype)
    mean, _ = cpu.find_groups(index, dtype).mean_std(scores)
    advantages = _whitened_on_tokens(scores - mean, response_mask)
    return advantages, advantages


@torch.no_grad()
def gdpo_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
    epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
    reward_scores: torch.Tensor | None = None, reward_weights: Sequence[float] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"gdpo"``: each reward component k of ``reward_scores`` [B, K] normalised as GRPO within the
    groups, Σ_k w_k·A_k, then whitened over the response tokens; without ``reward_scores`` the one
    component is Σ_t r (verl's fallback)."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    epsilon = check_at_least("epsilon", epsilon, 0.0)
    if reward_scores is None:
        scores = _scores(token_level_rewards, dtype).unsqueeze(-1)
    else:
        check_float_tensor("reward_scores", reward_scores, ESTIMATOR_DTYPES)
        check_ndim("reward_scores", reward_scores, 2, "[B, K]")
        check_shape("reward_scores", reward_scores[:, 0], index.shape, "index.shape")
        check_same_device(reward_scores=reward_scores, index=index)
        dtype = compute_dtype(token_level_rewards, reward_scores)
        scores = reward_scores.to(dtype)
    weights = torch.ones(scores.shape[1], dtype=dtype, device=scores.device)
    if reward_weights is not None:
        weights = torch.as_tensor(reward_weights, device=scores.device).to(dtype)
        check_shape("reward_weights", weights, scores.shape[1:], "(K,) of reward_scores [B, K]")
    mean, std = cpu.find_groups(index, dtype).mean_std(scores)
    normalised = scores - mean
    if norm_adv_by_std_in_grpo:
        normalised = normalised / (std + epsilon)
    combined = (normalised * weights).sum(-1)
    advantages = _whitened_on_tokens(combined, response_mask)
    return advantages, advantages


@torch.no_grad()
def reinforce_plus_plus_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0, *,
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"reinforce_plus_plus"``: G_t = r_t + γ·G_{t'} over the valid tokens (masked positions carry
    G and get 0), whitened over the response tokens — of every rank of ``process_group`` when given
    (``masked_whiten``'s one all-reduce; the PyTorch path).  Returns (advantages, G)."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask)
    gamma = check_in_range("gamma", gamma, 0.0, 1.0)
    if process_group is not None:
        return cpu.reinforce_plus_plus_torch(
            token_level_rewards, response_mask, gamma, WHITEN_EPS, dtype == torch.float64, process_group)
    return _route(token_level_rewards.device, cpu.reinforce_plus_plus_cpp, cpu.reinforce_plus_plus_torch)(
        token_level_rewards, response_mask, gamma, WHITEN_EPS, dtype == torch.float64)


@torch.no_grad()
def remax_advantages(
    token_level_rewards: torch.Tensor, reward_baselines: torch.Tensor, response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"remax"``: G = reverse cumsum of r·m, A = G − b (the greedy sample's score) on valid tokens."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask)
    check_float_tensor("reward_baselines", reward_baselines, ESTIMATOR_DTYPES)
    check_shape(
        "reward_baselines", reward_baselines, token_level_rewards.shape[:1], "token_level_rewards.shape[:1]"
    )
    check_same_device(token_level_rewards=token_level_rewards, reward_baselines=reward_baselines)
    dtype = compute_dtype(token_level_rewards, reward_baselines)
    return _route(token_level_rewards.device, cpu.remax_cpp, cpu.remax_torch)(
        token_level_rewards, reward_baselines.to(dtype), response_mask)


@torch.no_grad()
def optimal_token_baseline_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
    old_log_probs: torch.Tensor, sum_pi_squared: torch.Tensor, rollout_is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True, epsilon: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"optimal_token_baseline"``: A_t = G_t − B_t with G the reward-to-go of r·m and
    B_t = Σ_g G_t·W_t·m_t / (Σ_g W_t·m_t + ε) per position t of the group.  Returns (A, G)."""
    return _token_baseline_estimator(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                     rollout_is_weights, handle_zero_tail, epsilon, multi_turn=False)


@torch.no_grad()
def tir_optimal_token_baseline_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: torch.Tensor,
    old_log_probs: torch.Tensor, sum_pi_squared: torch.Tensor, rollout_is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True, epsilon: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"tir_optimal_token_baseline"`` (multi-turn): as ``"optimal_token_baseline"``, with the
    baseline taken over the k-th *valid* token of each member (tool outputs between turns skipped)
    and empty responses left out of their group.  Returns (A, G)."""
    return _token_baseline_estimator(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                     rollout_is_weights, handle_zero_tail, epsilon, multi_turn=True)


def _token_baseline_estimator(
    token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
    handle_zero_tail, epsilon, *, multi_turn: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates, numbers the groups, and runs the C++ kernel (one pass per group) or the PyTorch path."""
    dtype = _check_estimator_inputs(
        token_level_rewards, response_mask, index, old_log_probs=old_log_probs,
        sum_pi_squared=sum_pi_squared, rollout_is_weights=rollout_is_weights)
    epsilon = check_at_least("epsilon", epsilon, 0.0)
    group_ids = cpu.find_groups(index, dtype).ids
    implementation = _route(token_level_rewards.device, cpu.optimal_token_baseline_cpp,
                            cpu.optimal_token_baseline_torch)
    return implementation(token_level_rewards, response_mask, group_ids, old_log_probs, sum_pi_squared,
                          rollout_is_weights, bool(handle_zero_tail), epsilon, multi_turn,
                          dtype == torch.float64)


@torch.no_grad()
def gae_advantages(
    token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
    gamma: float = 1.0, lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"gae"``: :func:`rlhf_kernels.compute_gae` (verl's carry rule), advantages whitened over the
    response tokens (0 at masked positions; verl leaves (x − μ)/σ there).  Returns (A, returns)."""
    from .gae import compute_gae
    from .whiten import masked_whiten

    advantages, returns = compute_gae(
        token_level_rewards, values, response_mask, gamma, lam, mask_mode="carry"
    )
    return masked_whiten(advantages, response_mask), returns


@torch.no_grad()
def grpo_batch_std_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    epsilon: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"grpo_batch_std"`` (TRL ``scale_rewards="batch"``): A = (s − mean_g)/(σ_batch + ε) with
    σ_batch the unbiased std of all scores (0 for fewer than two); a group of one gets A = 0."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask, index)
    epsilon = check_at_least("epsilon", epsilon, 0.0)
    scores = _scores(token_level_rewards, dtype)
    groups = cpu.find_groups(index, dtype)
    centred = scores - scores.mean() if scores.shape[0] else scores
    spread = (centred.square().sum() / max(scores.shape[0] - 1, 1)).sqrt()
    advantages = (scores - groups.spread(groups.total(scores)) / groups.size) / (spread + epsilon)
    return _pair(advantages, response_mask)


@torch.no_grad()
def flash_reinforce_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"flash_reinforce"`` (OpenRLHF): A = s − mean of the batch's scores, unscaled."""
    dtype = _check_estimator_inputs(token_level_rewards, response_mask)
    scores = _scores(token_level_rewards, dtype)
    return _pair(scores - scores.mean() if scores.shape[0] else scores, response_mask)


class _EstimatorTable(dict):
    """name → estimator; an unknown name raises a ValueError listing the valid ones."""

    def __missing__(self, name: object):
        raise ValueError(f"estimator must be one of {tuple(sorted(self))}; got {name!r}")


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = _EstimatorTable(
    gae=gae_advantages,
    grpo=grpo_advantages,
    grpo_vectorized=grpo_advantages,
    grpo_passk=grpo_passk_advantages,
    grpo_batch_std=grpo_batch_std_advantages,
    rloo=rloo_advantages,
    rloo_vectorized=rloo_vectorized_advantages,
    opo=opo_advantages,
    gpg=gpg_advantages,
    gdpo=gdpo_advantages,
    reinforce_plus_plus=reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline=reinforce_plus_plus_baseline_advantages,
    remax=remax_advantages,
    optimal_token_baseline=optimal_token_baseline_advantages,
    tir_optimal_token_baseline=tir_optimal_token_baseline_advantages,
    flash_reinforce=flash_reinforce_advantages,
)


def compute_advantages(estimator: str, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``ADVANTAGE_ESTIMATORS[estimator](*args, **kwargs)``: (advantages, returns), both [B, T]."""
    if not isinstance(estimator, str):
        raise TypeError(f"estimator must be a str; got {type(estimator).__name__}")
    return ADVANTAGE_ESTIMATORS[estimator](*args, **kwargs)


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
