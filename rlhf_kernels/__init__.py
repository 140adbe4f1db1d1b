"""rlhf-kernels: fused kernels for the RLHF hot path.

Every op runs on CUDA tensors through Triton (or the csrc CUDA extension) and on CPU tensors through a
memory-efficient PyTorch (or C++) path; ``rlhf_kernels._dispatch`` decides which, and
``RLHF_KERNELS_BACKEND=triton|torch|cpp|cuda`` forces one.

Importing the package is cheap: each op family's module (its Triton kernels and registrations) is
imported the first time one of its names is used (``rk.compute_gae`` or ``from rlhf_kernels import
compute_gae``).  ``bench/bench_import.py`` measures it.
"""

# ruff: noqa: F401  (every import here is a re-export listed in __all__, which is built from _LAZY)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._dispatch import backend_for, get_backend, set_backend, set_index_checks, use_backend

__version__ = "0.1.0"

# Public name -> the module (relative to this package) that defines it: one family per ops/ module.
_LAZY = {
    "logprobs_from_logits": ".ops.logprobs",
    "entropy_from_logits": ".ops.logprobs",
    "token_stats_from_logits": ".ops.token_stats",
    "TokenStats": ".ops.token_stats",
    "linear_logprobs": ".ops.linear_logprobs",
    "linear_token_stats": ".ops.linear_logprobs",
    "sampling_logprobs": ".ops.sampling_logprobs",
    "LinearLogprobs": ".modules",
    "linear_policy_loss": ".ops.linear_policy_loss",
    "LINEAR_POLICY_LOSSES": ".ops.linear_policy_loss",
    "linear_preference_loss": ".ops.linear_preference_loss",
    "linear_distill_loss": ".ops.linear_distill_loss",
    "compute_gae": ".ops.gae",
    "masked_whiten": ".ops.whiten",
    "token_level_rewards": ".ops.token_rewards",
    "ADVANTAGE_ESTIMATORS": ".ops.advantages",
    "compute_advantages": ".ops.advantages",
    "uid_index": ".ops.advantages",
    "group_advantages": ".ops.advantages",
    "broadcast_to_tokens": ".ops.advantages",
    "KL_ESTIMATORS": ".ops.kl",
    "kl_penalty": ".ops.kl",
    "kl_loss": ".ops.kl",
    "KL_CORRECTIONS": ".ops.kl",
    "LOSS_AGG_MODES": ".ops.aggregation",
    "agg_loss": ".ops.aggregation",
    "ppo_policy_loss": ".ops.ppo_losses",
    "ppo_value_loss": ".ops.ppo_losses",
    "POLICY_LOSSES": ".ops.policy_losses",
    "get_policy_loss": ".ops.policy_losses",
    "vanilla_policy_loss": ".ops.policy_losses",
    "gspo_policy_loss": ".ops.policy_losses",
    "sapo_policy_loss": ".ops.policy_losses",
    "gpg_policy_loss": ".ops.policy_losses",
    "clip_cov_policy_loss": ".ops.policy_losses",
    "kl_cov_policy_loss": ".ops.policy_losses",
    "geo_mean_policy_loss": ".ops.policy_losses",
    "dro_policy_loss": ".ops.policy_losses",
    "cispo_policy_loss": ".ops.policy_losses",
    "dppo_tv_policy_loss": ".ops.policy_losses",
    "dppo_kl_policy_loss": ".ops.policy_losses",
    "dpo_loss": ".ops.preference_losses",
    "simpo_loss": ".ops.preference_losses",
    "cpo_loss": ".ops.preference_losses",
    "orpo_loss": ".ops.preference_losses",
    "kto_loss": ".ops.preference_losses",
    "DPO_LOSS_TYPES": ".ops.preference_losses",
    "bypass_mode_policy_loss": ".ops.policy_losses",
    "rollout_correction": ".ops.rollout_correction",
    "REJECTION_OPTIONS": ".ops.rollout_correction",
    "is_correction": ".ops.rollout_correction",
    "off_policy_mask": ".ops.rollout_correction",
    "elo_ratings": ".ops.ratings",
    "bradley_terry": ".ops.ratings",
    "pairwise_reward_loss": ".ops.reward_losses",
    "pointwise_reward_loss": ".ops.reward_losses",
    "ranking_hinge_loss": ".ops.reward_losses",
    "ranking_reward_loss": ".ops.reward_losses",
    "AdaptiveKLController": ".kl_control",
    "FixedKLController": ".kl_control",
}

__all__ = sorted(
    [*_LAZY, "backend_for", "get_backend", "set_backend", "set_index_checks", "use_backend"]
)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static analysers and IDEs see the real definitions
    from .kl_control import AdaptiveKLController, FixedKLController
    from .modules import LinearLogprobs
    from .ops.advantages import (
        ADVANTAGE_ESTIMATORS,
        broadcast_to_tokens,
        compute_advantages,
        group_advantages,
        uid_index,
    )
    from .ops.aggregation import LOSS_AGG_MODES, agg_loss
    from .ops.gae import compute_gae
    from .ops.kl import KL_CORRECTIONS, KL_ESTIMATORS, kl_loss, kl_penalty
    from .ops.linear_distill_loss import linear_distill_loss
    from .ops.linear_logprobs import linear_logprobs, linear_token_stats
    from .ops.linear_policy_loss import LINEAR_POLICY_LOSSES, linear_policy_loss
    from .ops.linear_preference_loss import linear_preference_loss
    from .ops.logprobs import entropy_from_logits, logprobs_from_logits
    from .ops.policy_losses import (
        POLICY_LOSSES,
        bypass_mode_policy_loss,
        cispo_policy_loss,
        clip_cov_policy_loss,
        dppo_kl_policy_loss,
        dppo_tv_policy_loss,
        dro_policy_loss,
        geo_mean_policy_loss,
        get_policy_loss,
        gpg_policy_loss,
        gspo_policy_loss,
        kl_cov_policy_loss,
        sapo_policy_loss,
        vanilla_policy_loss,
    )
    from .ops.ppo_losses import ppo_policy_loss, ppo_value_loss
    from .ops.preference_losses import DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
    from .ops.ratings import bradley_terry, elo_ratings
    from .ops.reward_losses import (
        pairwise_reward_loss,
        pointwise_reward_loss,
        ranking_hinge_loss,
        ranking_reward_loss,
    )
    from .ops.rollout_correction import REJECTION_OPTIONS, is_correction, off_policy_mask, rollout_correction
    from .ops.sampling_logprobs import sampling_logprobs
    from .ops.token_rewards import token_level_rewards
    from .ops.token_stats import TokenStats, token_stats_from_logits
    from .ops.whiten import masked_whiten
