"""verl 0.9.1's hot-path functions, with verl's names, signatures and results, on rlhf-kernels' fused ops.

Enable them for an unmodified verl config, in every process that computes losses (the driver and each
Ray worker; see docs/compat-verl.md)::

    import rlhf_kernels.compat.verl
    rlhf_kernels.compat.verl.install()      # checks verl == 0.9.1; unpatch() undoes it

``install()`` registers the fused functions in verl's own registries under verl's names
(``get_policy_loss_fn(name)`` for every name of ``POLICY_LOSSES``: "vanilla", "gspo", "sapo", "gpg",
"clip_cov", "kl_cov", "geo_mean", "dro", "cispo", "dppo_tv", "dppo_kl"; ``get_adv_estimator_fn(name)`` for
every estimator of verl 0.9.1, ``ADVANTAGE_ESTIMATORS``: "gae", "grpo", "grpo_vectorized", "grpo_passk",
"rloo", "rloo_vectorized", "opo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "gpg",
"gdpo", "optimal_token_baseline", "tir_optimal_token_baseline"), replaces verl's module attributes of those
functions (``compute_policy_loss_gspo``, ``compute_grpo_outcome_advantage``, ...) and the functions verl's
workers import by name: ``agg_loss``, ``kl_penalty``, ``kl_penalty_forward``, ``compute_value_loss``,
``compute_entropy_loss``, ``compute_policy_loss`` (deprecated) in ``verl.trainer.ppo.core_algos``, and
``logprobs_from_logits``, ``entropy_from_logits``, ``entropy_from_logits_with_chunking`` in
``verl.utils.torch_functional``.  verl's "bypass_mode" policy loss stays verl's own (it then aggregates
with the fused ``agg_loss``).  Each function can also be called directly, without ``install()``.

What differs from verl, on purpose (docs/compat-verl.md lists each with its measured size):

* Losses, advantages and log-probabilities are fp32 (fp64 for fp64 loss inputs), computed in fp32, where
  verl returns its inputs' dtype: identical for fp32 inputs, more accurate for bf16 ones.
* The policy losses' metrics are 0-dim tensors (verl calls ``.item()`` on each: a host sync each);
  verl's ``Metric`` reads either.
* "clip_cov" detaches the first eligible tokens in row-major order where verl draws them at random;
  "kl_cov" takes its top-k on the device where verl copies the valid tokens to the host.
* The advantage estimators define results where verl raises or divides by zero: GAE's whitened
  advantages are 0 outside the mask (verl leaves (x − μ)/σ there, a value no verl loss reads); whitening
  ("gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gdpo") over fewer than two valid tokens
  gives zeros (verl: ``ValueError``); "grpo_passk" gives a group of one 0 (verl: ``ValueError``); "opo"
  gives a group of empty responses 0 (verl: NaN); "remax" is 0 at masked positions (verl: G before the
  last valid token); "optimal_token_baseline" with a zero divisor has baseline 0 (verl: NaN).
* Float masks whose sums lie strictly between 0 and 1 divide by 1 where verl divides by the sum.

No function here synchronises the device, except the label range check of ``logprobs_from_logits`` on
CUDA (``RLHF_KERNELS_CHECK_INDICES=0`` turns it off) and ``compute_gae_advantage_return`` when ``gamma``
or ``lam`` is passed as a tensor (read once on the host).  The group estimators turn ``index`` (a host
numpy array of prompt uids) into dense group ids on the host (``np.unique``, work verl's own grouping does
too) and copy those B ids to the device once; every group statistic is then a segment reduction on the
device, with no loop over groups and no read of device data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import rlhf_kernels as rk

from ._patching import Patcher, import_modules
from ._shared import common_dtype, no_double, weighted_aggregation

__all__ = [
    "SUPPORTED_VERSIONS",
    "agg_loss",
    "compute_entropy_loss",
    "compute_gae_advantage_return",
    "compute_gdpo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_opo_outcome_advantage",
    "compute_optimal_token_baseline_advantage",
    "compute_policy_loss",
    "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_value_loss",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "install",
    "kl_penalty",
    "kl_penalty_forward",
    "linear_cross_entropy",
    "logprobs_from_logits",
    "masked_whiten",
    "unpatch",
]

SUPPORTED_VERSIONS = ("0.9.1",)

_HALF = (torch.float16, torch.bfloat16)

# verl's kl_penalty names -> the library's estimators ("full" is not implemented in verl either).
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _as_float(name: str, value: float | torch.Tensor) -> float:
    """verl annotates gamma / lam as tensors; a one-element tensor is read once on the host."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor; got shape {tuple(value.shape)}"
            )
        return float(value.item())  # host read of a hyperparameter (documented)
    return value


def _aggregation(
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> tuple[str, float | torch.Tensor]:
    """verl 0.9.1's agg_loss as (library mode, normalizer): every mode divides a masked sum by one number.

    token-mean                Σ L·m / N · dp,  N = batch_num_tokens or Σm (0/0 = NaN for an empty mask)
    token-sum                 Σ L·m · dp
    seq-mean-token-sum        Σ_b Σ_t L·m / G · dp,  G = global_batch_size or the number of non-empty rows
    seq-mean-token-mean       Σ_b [Σ_t L·m / n_b] / G · dp  (empty rows contribute 0)
    seq-mean-token-sum-norm   seq-mean-token-sum / S,  S = loss_scale_factor or T
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return "token-mean", loss_mask.sum()
        return "token-mean", batch_num_tokens / dp_size
    if loss_agg_mode == "token-sum":
        return "seq-mean-token-sum", 1.0 / dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = (loss_mask.sum(dim=-1) > 0).sum()  # a 0-dim tensor, never read on the host
        normalizer = global_batch_size / dp_size
        if loss_agg_mode == "seq-mean-token-mean":
            return "seq-mean-token-mean", normalizer
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
            normalizer = normalizer * scale
        return "seq-mean-token-sum", normalizer
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


# ---------------------------------------------------------------------------------------------------
# verl.utils.torch_functional
# ---------------------------------------------------------------------------------------------------
def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits)``, [...] fp32 (fp64 for fp64 logits).

    As verl's flash-attn path (the one verl takes on GPUs): fp32 output whatever the logits' dtype,
    label −100 gives 0, and ``inplace_backward=True`` writes the logits gradient over ``logits`` (so
    nothing else may read them after the backward; verl turns it off when it also needs the entropy).
    The in-place backward is used for contiguous logits; flash-attn's reshape copies other layouts, so
    for those the gradient goes to a new buffer, with the same result.
    """
    inplace = bool(inplace_backward) and logits.is_contiguous()
    return rk.logprobs_from_logits(
        logits, labels, temperature=1.0, ignore_index=-100, inplace_backward=inplace
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(x) − Σ softmax(x)·x over the last dimension, in the logits' dtype (as verl),
    computed in fp32 with the fused kernel (one read of the logits)."""
    entropy = rk.entropy_from_logits(logits, temperature=1.0)
    return entropy.to(logits.dtype) if logits.dtype in _HALF else entropy


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's chunked entropy of [N, V] logits: fp32 [N] whatever the logits' dtype.  ``chunk_size`` is
    accepted and unused: the fused kernel never holds more than one block of a row."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    return rk.entropy_from_logits(logits, temperature=1.0).float()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − μ)·rsqrt(var + 1e-8) with μ and the unbiased var over ``mask``, fp32.

    Differs from verl where nothing reads the result: positions outside ``mask`` hold 0 (μ when
    ``shift_mean=False``) instead of (x − μ)/σ, and fewer than two valid elements give zeros instead of
    verl's ``ValueError`` (which costs a device sync per call).  Not installed into verl (verl's other
    estimators call its own); used by :func:`compute_gae_advantage_return`.
    """
    return rk.masked_whiten(no_double(values), mask, shift_mean=shift_mean, unbiased=True, eps=1e-8)


# ---------------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos: advantage estimators
#
# Each has verl 0.9.1's registered signature and defaults and runs rlhf_kernels.ADVANTAGE_ESTIMATORS[name]
# (segment reductions over the uid groups: no loop over groups or samples, no host sync).  verl's
# ``index`` is a host numpy array of uids: it becomes dense int64 group ids once per call
# (:func:`_grouped`, host work verl does as well); config values are passed explicitly.
# ---------------------------------------------------------------------------------------------------
def _grouped(
    name: str,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rlhf_kernels.ADVANTAGE_ESTIMATORS[name]`` with verl's ``index`` (uids: strings, ints, any hashable)
    as int64 group ids [B] on the rewards' device: :func:`rlhf_kernels.uid_index` (``np.unique`` on the
    host, as verl's own grouping, then one copy of B ids to the device).  An integer tensor ``index`` is
    taken as group ids as it is."""
    if index is None:
        raise ValueError("index (verl's uid of each sample, non_tensor_batch['uid']) is required; got None")
    device = token_level_rewards.device
    ids = index.to(device) if isinstance(index, torch.Tensor) else rk.uid_index(index, device)
    return rk.compute_advantages(name, token_level_rewards, response_mask, ids, *args, **kwargs)


def _algo_config(config: Any, function: str) -> Any:
    """verl's AlgoConfig (or a dict), which grpo_passk and reinforce_plus_plus require (verl asserts)."""
    if config is None:
        raise ValueError(f"{function} needs config (verl's AlgoConfig); got None")
    return config


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"gae"``: GAE with verl's carried next value and last advantage across masked positions, the
    advantages whitened over ``response_mask``; returns are computed before whitening.

    One fused pass instead of verl's reverse Python loop (T launches).  Both outputs fp32 [B, T]; no
    gradient; fp64 inputs are computed in fp32.  Whitened advantages at masked positions are 0, and
    fewer than two valid tokens give zeros (verl: ``ValueError``); returns match verl everywhere.
    """
    return rk.compute_advantages(
        "gae",
        no_double(token_level_rewards),
        no_double(values),
        response_mask,
        _as_float("gamma", gamma),
        _as_float("lam", lam),
    )


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"grpo"``: each response's score (Σ_t rewards) minus its group's mean, divided by the group's
    unbiased std + ``epsilon`` (not divided with ``norm_adv_by_std_in_grpo=False``: Dr. GRPO), on every
    valid token.  Groups are the equal entries of ``index`` (any order, any sizes); a group of one has
    mean 0 and std 1, as verl.  ``config`` is unused (as verl).  (advantages, advantages) [B, T]."""
    return _grouped("grpo", token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo)


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"grpo_vectorized"``: the same advantages as :func:`compute_grpo_outcome_advantage` (the flag is
    the argument, as verl: ``config.norm_adv_by_std_in_grpo`` is not read)."""
    return compute_grpo_outcome_advantage(
        token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config
    )


def compute_grpo_passk_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"grpo_passk"``: the best response of each group gets s_max − s_second (over σ_g + ε when
    ``config.norm_adv_by_std_in_grpo``, default True: verl reads the flag from ``config``, not the
    argument), the others 0.  ``config`` is required (verl asserts).  A group of one gets 0 where verl
    raises ``ValueError``."""
    norm = _algo_config(config, "compute_grpo_passk_outcome_advantage").get("norm_adv_by_std_in_grpo", True)
    return _grouped("grpo_passk", token_level_rewards, response_mask, index, epsilon, norm)


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"rloo"``: each response's score minus the mean score of the other responses of its group, on
    every valid token; a response alone in its group keeps its score (verl's loop)."""
    return _grouped("rloo", token_level_rewards, response_mask, index)


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"rloo_vectorized"``: as :func:`compute_rloo_outcome_advantage`, except that a response alone in
    its group gets 0 (verl's vectorised form multiplies by count > 1)."""
    return _grouped("rloo_vectorized", token_level_rewards, response_mask, index)


def compute_opo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"opo"``: s − Σ_g ℓ·s / Σ_g ℓ with ℓ the response lengths; a group of one, or of empty responses
    only (verl: 0/0 = NaN on those rows), has baseline 0."""
    return _grouped("opo", token_level_rewards, response_mask, index)


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"reinforce_plus_plus_baseline"``: s − μ_g on every valid token, whitened over the response
    tokens (fewer than two: zeros, where verl raises ``ValueError``)."""
    return _grouped("reinforce_plus_plus_baseline", token_level_rewards, response_mask, index)


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Any = None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"reinforce_plus_plus"``: G_t = r_t + γ·G over the valid tokens (masked positions carry G and hold
    0), γ = ``config.gamma`` (required, as verl), whitened over the response tokens (fewer than two:
    zeros, where verl raises).  Returns (advantages, G)."""
    gamma = _algo_config(config, "compute_reinforce_plus_plus_outcome_advantage").gamma
    return rk.compute_advantages(
        "reinforce_plus_plus", token_level_rewards, response_mask, gamma=_as_float("gamma", gamma)
    )


def compute_remax_outcome_advantage(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"remax"``: G = reverse cumsum of r·m, A = G − b (``reward_baselines`` [B], the greedy response's
    score) on valid tokens, 0 at masked positions (verl leaves G at masked positions before a valid
    one).  Returns (A, G) as verl."""
    return rk.compute_advantages("remax", token_level_rewards, reward_baselines, response_mask)


def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"gpg"``: α·(s − μ_g)/``f_norm`` with α = B / max(1, #{s ≠ 0}) computed from the batch (the
    ``alpha`` argument is unused, as in verl); a group of one has μ = 0."""
    return _grouped("gpg", token_level_rewards, response_mask, index, f_norm=f_norm)


def compute_gdpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    non_tensor_batch: dict | None = None,
    batch: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"gdpo"``: each reward component GRPO-normalised within the groups, Σ_k w_k·A_k, whitened over
    the response tokens.  With ``config``, ``non_tensor_batch`` and ``batch`` (verl's trainer passes all
    three) the components are ``non_tensor_batch[key]`` for ``config.gdpo_reward_keys`` (required then),
    as ``reward_scores`` [B, K] (fp32, one host-to-device copy, as verl's), weighted by
    ``config.gdpo_reward_weights`` (equal when None); otherwise the one component is Σ_t rewards."""
    reward_scores = reward_weights = None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = config.get("gdpo_reward_keys", None)
        if not keys:
            raise ValueError(
                "compute_gdpo_outcome_advantage needs config.gdpo_reward_keys (the reward component keys "
                f"compute_score returns) when non_tensor_batch and batch are given; got {keys!r}"
            )
        missing = [key for key in keys if key not in non_tensor_batch]
        if missing:
            raise ValueError(
                f"gdpo_reward_keys {missing} are not in non_tensor_batch (keys {list(non_tensor_batch)})"
            )
        components = np.stack([np.asarray(non_tensor_batch[key], dtype=np.float32) for key in keys], -1)
        reward_scores = torch.from_numpy(components).to(token_level_rewards.device)
        reward_weights = config.get("gdpo_reward_weights", None)
    return _grouped(
        "gdpo",
        token_level_rewards,
        response_mask,
        index,
        epsilon,
        norm_adv_by_std_in_grpo,
        reward_scores=reward_scores,
        reward_weights=reward_weights,
    )


def compute_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"optimal_token_baseline"``: A_t = G_t − B_t, B_t = Σ_g G_t·W_t·m_t / (Σ_g W_t·m_t + ε) per
    position of the group, W the cumulative path-variance proxy of ``old_log_probs``, ``sum_pi_squared``
    and ``rollout_is_weights``.  Returns (A, G).  A zero divisor (ε = 0) gives B = 0 where verl has NaN."""
    args = (old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail, epsilon)
    return _grouped("optimal_token_baseline", token_level_rewards, response_mask, index, *args)


def compute_multi_turn_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"tir_optimal_token_baseline"``: as :func:`compute_optimal_token_baseline_advantage` over the k-th
    valid token of each response (tool outputs between turns skipped); empty responses leave their
    group.  verl reads every row's length on the host; this reads nothing."""
    args = (old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail, epsilon)
    return _grouped("tir_optimal_token_baseline", token_level_rewards, response_mask, index, *args)


# ---------------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos: losses
# ---------------------------------------------------------------------------------------------------
def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """verl 0.9.1's aggregation of a [B, T] loss (token-mean, token-sum, seq-mean-token-sum,
    seq-mean-token-mean, seq-mean-token-sum-norm, with verl's global-batch arguments), 0-dim fp32.

    Fully masked rows are left out of the sequence means, as verl does; an all-masked token-mean is NaN
    (0/0), as in verl.  Differentiable with respect to ``loss_mat``; masked positions get zero gradient.
    """
    mode, normalizer = _aggregation(
        loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    return rk.agg_loss(loss_mat, loss_mask, mode, normalizer)


# verl's metric keys of the library's policy-loss metrics, and the three most of verl's losses report.
_VERL_METRICS = {
    "clipfrac": "actor/pg_clipfrac",
    "approx_kl": "actor/ppo_kl",
    "clipfrac_lower": "actor/pg_clipfrac_lower",
}
_PG_METRICS = ("clipfrac", "approx_kl", "clipfrac_lower")


def _verl_metrics(metrics: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {_VERL_METRICS[name]: metrics[name] for name in names}


def _clip_ratios(config: Any, function: str) -> tuple[float, float]:
    """(ε_low, ε_high) of an ActorConfig: ``clip_ratio_low`` / ``clip_ratio_high``, else ``clip_ratio``."""
    if config is None:
        raise ValueError(f"{function} needs config (verl's ActorConfig); got None")
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def _policy_loss_config(config: Any, function: str) -> Any:
    """``config.policy_loss`` (verl's PolicyLossConfig), which clip_cov / kl_cov / dro read."""
    if config is None or config.get("policy_loss") is None:
        raise ValueError(
            f"{function} needs config with a policy_loss section (verl's ActorConfig); got {config!r}"
        )
    return config.policy_loss


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clips: tuple[float, float, float],
    loss_agg_mode: str,
    rollout_is_weights: torch.Tensor | None,
    global_batch_info: dict,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    low, high, clip_ratio_c = clips
    if not clip_ratio_c > 1.0:
        raise ValueError(
            "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, "
            f"but get the value: {clip_ratio_c}."
        )
    log_prob, old_log_prob, advantages = common_dtype(log_prob, old_log_prob, advantages)
    clip = {"clip_low": low, "clip_high": high, "dual_clip": clip_ratio_c}
    if rollout_is_weights is None:
        mode, normalizer = _aggregation(response_mask, loss_agg_mode, **global_batch_info)
        return rk.ppo_policy_loss(
            log_prob, old_log_prob, advantages, response_mask, loss_agg=mode, normalizer=normalizer, **clip
        )
    # The weights multiply the per-token loss: one fused pass with the weighted mask gives the loss, and
    # one with the plain mask (no gradient) gives verl's unweighted metrics.
    mode, normalizer = _aggregation(response_mask, loss_agg_mode, **global_batch_info)
    mode, token_weights, normalizer = weighted_aggregation(
        mode, normalizer, response_mask, rollout_is_weights
    )
    loss, _ = rk.ppo_policy_loss(
        log_prob, old_log_prob, advantages, token_weights, loss_agg=mode, normalizer=normalizer, **clip
    )
    _, metrics = rk.ppo_policy_loss(
        log_prob.detach(), old_log_prob, advantages, response_mask, loss_agg="token-mean", **clip
    )
    return loss, metrics


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's registered ``"vanilla"`` policy loss: (pg_loss, {actor/pg_clipfrac, actor/ppo_kl,
    actor/pg_clipfrac_lower}).

    ℓ = clamp(lp − old, −20, 20), r = e^ℓ, C = max(−A·r, −A·clamp(r, 1 − ε_low, 1 + ε_high)); where
    A < 0 the dual clip min(C, −A·c) applies (c = ``config.clip_ratio_c``, 3 by default).  The per-token
    loss is multiplied by ``rollout_is_weights`` when given, then aggregated with ``loss_agg_mode`` and
    ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor``).  ε from ``config.clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``.
    One fused forward and backward; the metrics are 0-dim tensors (no host sync).
    """
    low, high = _clip_ratios(config, "compute_policy_loss_vanilla")
    clips = (low, high, config.get("clip_ratio_c", 3.0))
    loss, metrics = _policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        clips,
        loss_agg_mode,
        rollout_is_weights,
        dict(config.global_batch_info),
    )
    return loss, _verl_metrics(metrics, _PG_METRICS)


def _fused_policy_loss(
    name: str,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    loss_agg_mode: str | None,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
    metrics: tuple[str, ...],
    **hyperparameters: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``rk.POLICY_LOSSES[name]`` with verl's arguments: verl's denominators for ``loss_agg_mode`` and
    ``config.global_batch_info`` (none for ``loss_agg_mode=None``: geo_mean's mean over rows), the rollout
    weights multiplying each token's loss, and the ``metrics`` under verl's keys."""
    old_log_prob, log_prob, advantages, response_mask = inputs
    log_prob, old_log_prob, advantages = common_dtype(log_prob, old_log_prob, advantages)
    aggregation = {}
    if loss_agg_mode is not None:
        mode, normalizer = _aggregation(response_mask, loss_agg_mode, **dict(config.global_batch_info))
        aggregation = {"loss_agg": mode, "normalizer": normalizer}
    loss, ours = rk.POLICY_LOSSES[name](
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        is_weights=rollout_is_weights,
        **aggregation,
        **hyperparameters,
    )
    return loss, _verl_metrics(ours, metrics)


# verl 0.9.1's other registered policy losses.  Each has verl's signature and defaults; the per-token
# math, metrics and decisions are in docs/policy_losses.md, what each reads from ``config`` in its docstring.
def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"gspo"``: :func:`rlhf_kernels.gspo_policy_loss` with ε from ``config.clip_ratio`` /
    ``clip_ratio_low`` / ``clip_ratio_high``; metrics pg_clipfrac, ppo_kl, pg_clipfrac_lower (0)."""
    low, high = _clip_ratios(config, "compute_policy_loss_gspo")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss(
        "gspo", inputs, loss_agg_mode, config, rollout_is_weights, _PG_METRICS, clip_low=low, clip_high=high
    )


def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"sapo"``: :func:`rlhf_kernels.sapo_policy_loss` with ``config.tau_pos`` / ``tau_neg``,
    always aggregated with "seq-mean-token-mean" (``loss_agg_mode`` is ignored, as in verl); metrics
    pg_clipfrac (0), ppo_kl, pg_clipfrac_lower (0)."""
    if config is None:
        raise ValueError("compute_policy_loss_sapo needs config (verl's ActorConfig); got None")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss(
        "sapo",
        inputs,
        "seq-mean-token-mean",
        config,
        rollout_is_weights,
        _PG_METRICS,
        tau_pos=config.tau_pos,
        tau_neg=config.tau_neg,
    )


def compute_policy_loss_gpg(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"gpg"``: :func:`rlhf_kernels.gpg_policy_loss` (L = −A·lp); no metrics, as verl."""
    if config is None:
        raise ValueError("compute_policy_loss_gpg needs config (verl's ActorConfig); got None")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss("gpg", inputs, loss_agg_mode, config, rollout_is_weights, ())


def compute_policy_loss_clip_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"clip_cov"``: :func:`rlhf_kernels.clip_cov_policy_loss` with ε from the clip ratios and
    ``config.policy_loss.clip_cov_ratio`` / ``clip_cov_lb`` / ``clip_cov_ub`` (verl's 0.0002 / 1 / 5 when
    None).  The detached tokens are the first eligible ones in row-major order where verl draws them at
    random (docs/compat-verl.md).  Metrics pg_clipfrac (fraction detached) and ppo_kl, as verl."""
    low, high = _clip_ratios(config, "compute_policy_loss_clip_cov")
    section = _policy_loss_config(config, "compute_policy_loss_clip_cov")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss(
        "clip_cov",
        inputs,
        loss_agg_mode,
        config,
        rollout_is_weights,
        ("clipfrac", "approx_kl"),
        clip_low=low,
        clip_high=high,
        clip_cov_ratio=_or(section.clip_cov_ratio, 0.0002),
        clip_cov_lb=_or(section.clip_cov_lb, 1.0),
        clip_cov_ub=_or(section.clip_cov_ub, 5.0),
    )


def compute_policy_loss_kl_cov(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"kl_cov"``: :func:`rlhf_kernels.kl_cov_policy_loss` with ``config.policy_loss.kl_cov_ratio``
    and ``ppo_kl_coef`` (verl's 0.0002 and 1.0 when None; PolicyLossConfig's default coefficient is 0.1).
    The top-k runs on the device (verl copies the valid tokens to the host).  Metric ppo_kl (mean |ℓ|)."""
    section = _policy_loss_config(config, "compute_policy_loss_kl_cov")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss(
        "kl_cov",
        inputs,
        loss_agg_mode,
        config,
        rollout_is_weights,
        ("approx_kl",),
        kl_cov_ratio=_or(section.kl_cov_ratio, 0.0002),
        ppo_kl_coef=_or(section.ppo_kl_coef, 1.0),
    )


def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"geo_mean"`` (GMPO): :func:`rlhf_kernels.geo_mean_policy_loss`, the mean over the rows of
    the micro-batch; ``loss_agg_mode`` and ``config.global_batch_info`` are ignored, as in verl.  ε from
    the clip ratios; metrics pg_clipfrac, ppo_kl, pg_clipfrac_lower."""
    low, high = _clip_ratios(config, "compute_policy_loss_geo_mean")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss(
        "geo_mean", inputs, None, config, rollout_is_weights, _PG_METRICS, clip_low=low, clip_high=high
    )


def compute_policy_loss_dro(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"dro"``: :func:`rlhf_kernels.dro_policy_loss` with β = ``config.policy_loss.dro_beta``
    (required, > 0: verl's ValueError otherwise); metric ppo_kl."""
    beta = _policy_loss_config(config, "compute_policy_loss_dro").dro_beta
    if beta is None or not beta > 0:
        raise ValueError(f"policy_loss.dro_beta must be a positive value when using DRO; got {beta!r}")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss(
        "dro", inputs, loss_agg_mode, config, rollout_is_weights, ("approx_kl",), beta=beta
    )


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"cispo"``: :func:`rlhf_kernels.cispo_policy_loss` with ε from the clip ratios; metrics
    pg_clipfrac, ppo_kl, pg_clipfrac_lower (0)."""
    low, high = _clip_ratios(config, "compute_policy_loss_cispo")
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _fused_policy_loss(
        "cispo", inputs, loss_agg_mode, config, rollout_is_weights, _PG_METRICS, clip_low=low, clip_high=high
    )


def _dppo_policy_loss(name: str, inputs: tuple, loss_agg_mode: str, config: Any, rollout_is_weights):
    """DPPO: ε_low / ε_high are the divergence thresholds (verl reads them from the clip ratios) and the
    truncation is ``config.clip_ratio_c`` (20 where the config has none; ActorConfig's default is 3)."""
    low, high = _clip_ratios(config, f"compute_policy_loss_{name}")
    truncation = config.get("clip_ratio_c", 20.0)
    return _fused_policy_loss(
        name,
        inputs,
        loss_agg_mode,
        config,
        rollout_is_weights,
        _PG_METRICS,
        clip_low=low,
        clip_high=high,
        truncation=truncation,
    )


def compute_policy_loss_dppo_tv(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"dppo_tv"``: :func:`rlhf_kernels.dppo_tv_policy_loss` (see :func:`_dppo_policy_loss` for the
    config fields); metrics pg_clipfrac, ppo_kl, pg_clipfrac_lower."""
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _dppo_policy_loss("dppo_tv", inputs, loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_dppo_kl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``"dppo_kl"``: :func:`rlhf_kernels.dppo_kl_policy_loss` (see :func:`_dppo_policy_loss` for the
    config fields); metrics pg_clipfrac, ppo_kl, pg_clipfrac_lower."""
    inputs = (old_log_prob, log_prob, advantages, response_mask)
    return _dppo_policy_loss("dppo_kl", inputs, loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's deprecated functional policy loss: (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), the
    same math as :func:`compute_policy_loss_vanilla` without weights or global-batch arguments."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise TypeError("compute_policy_loss needs cliprange (or both cliprange_low and cliprange_high)")
    loss, metrics = _policy_loss(
        old_log_prob, log_prob, advantages, response_mask, (low, high, clip_ratio_c), loss_agg_mode, None, {}
    )
    return loss, metrics["clipfrac"], metrics["approx_kl"], metrics["clipfrac_lower"]


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's clipped value loss ½·agg(max((v − R)², (clip(v, v_old ± ε) − R)²)) and its clipfrac.

    Note verl's argument order: predictions, returns, then the old values.  ``cliprange_value=None``
    (not accepted by verl) gives the unclipped loss.
    """
    mode, normalizer = _aggregation(
        response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    vpreds, values, returns = common_dtype(vpreds, values, returns)
    loss, metrics = rk.ppo_value_loss(
        vpreds, values, returns, response_mask, clip=cliprange_value, loss_agg=mode, normalizer=normalizer
    )
    return loss, metrics["clipfrac"]


def compute_entropy_loss(
    logits: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str = "token-mean"
) -> torch.Tensor:
    """agg(entropy(logits)) over ``response_mask``: the fused entropy (one read of the logits) then
    :func:`agg_loss`.  0-dim fp32."""
    return agg_loss(rk.entropy_from_logits(logits, temperature=1.0), response_mask, loss_agg_mode)


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token KL estimate "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (k3 clamped to ±10 of a
    log-ratio clamped to ±20, as verl); "full" and unknown names raise ``NotImplementedError``, as verl."""
    estimator = _KL_NAMES.get(kl_penalty) if isinstance(kl_penalty, str) else None
    if estimator is None:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not implemented")
    return rk.kl_penalty(logprob, ref_logprob, estimator)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """:func:`kl_penalty_forward`; a "+" suffix (e.g. "k3+") keeps the estimator's value and takes the
    gradient of k2 (verl's straight-through trick, for an unbiased KL gradient).  fp32 output."""
    straight_through = isinstance(kl_penalty, str) and kl_penalty.endswith("+")
    base = kl_penalty[:-1] if straight_through else kl_penalty
    forward = kl_penalty_forward(logprob, ref_logprob, base)
    if not straight_through or _KL_NAMES[base] == "k2":
        return forward
    backward = rk.kl_penalty(logprob, ref_logprob, "k2")
    return backward - backward.detach() + forward.detach()


# ---------------------------------------------------------------------------------------------------
# verl.utils.kernel.linear_cross_entropy (for direct use; verl's own is a CUDA kernel, not replaced)
# ---------------------------------------------------------------------------------------------------
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | None = 1.0,
    reduction: str | None = "none",
    dist_process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy) of ``labels`` under softmax(hidden @ weightᵀ / τ), without the logits.

    As verl's fused kernel: ``hidden`` [..., H] is flattened to [N, H] and ``labels`` to [N]; entropy is
    [N] fp32; logprobs is [N] fp32 for ``reduction="none"``, their sum or mean (over all N) for "sum" /
    "mean".  ``dist_process_group`` shards ``weight`` by vocabulary rows across ranks.  Label −100 gives
    0 with no gradient (an extension: verl's kernel has no ignore index).
    """
    temperature = 1.0 if temperature is None else float(temperature)
    reduction = "none" if reduction is None else reduction
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be one of ('none', 'sum', 'mean'); got {reduction!r}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() != 2 else hidden
    labels1d = labels.reshape(-1) if labels.dim() != 1 else labels
    logprobs, entropy = rk.linear_logprobs(
        hidden2d,
        weight,
        labels1d,
        temperature=temperature,
        return_entropy=True,
        process_group=dist_process_group,
    )
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


# ---------------------------------------------------------------------------------------------------
# install() / unpatch()
# ---------------------------------------------------------------------------------------------------
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "geo_mean": compute_policy_loss_geo_mean,
    "dro": compute_policy_loss_dro,
    "cispo": compute_policy_loss_cispo,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
}
ADVANTAGE_ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}
_CORE_ALGOS = (
    *POLICY_LOSSES.values(),
    *ADVANTAGE_ESTIMATORS.values(),
    agg_loss,
    compute_policy_loss,
    compute_value_loss,
    compute_entropy_loss,
    kl_penalty,
    kl_penalty_forward,
)
_TORCH_FUNCTIONAL = (logprobs_from_logits, entropy_from_logits, entropy_from_logits_with_chunking)


def _plan():
    core_algos, torch_functional = import_modules(
        "verl.trainer.ppo.core_algos", "verl.utils.torch_functional"
    )
    plan = [(core_algos.POLICY_LOSS_REGISTRY, name, fn) for name, fn in POLICY_LOSSES.items()]
    plan += [(core_algos.ADV_ESTIMATOR_REGISTRY, name, fn) for name, fn in ADVANTAGE_ESTIMATORS.items()]
    plan += [(core_algos, fn.__name__, fn) for fn in _CORE_ALGOS]
    plan += [(torch_functional, fn.__name__, fn) for fn in _TORCH_FUNCTIONAL]
    return plan


_PATCHER = Patcher("verl", "verl", SUPPORTED_VERSIONS, "verl", _plan)


def install() -> list[str]:
    """Registers and installs the fused functions into verl 0.9.1 (see the module docstring); returns
    what it replaced.  Raises ``UnsupportedVersionError`` for another verl version, before changing
    anything; a second call does nothing."""
    return _PATCHER.patch()


def unpatch() -> None:
    """Puts verl's own functions back."""
    _PATCHER.unpatch()
