"""rlhf-kernels: fused kernels for the RLHF hot path.

Every op runs on CUDA tensors through Triton (or the csrc CUDA extension) and on CPU tensors through a
memory-efficient PyTorch (or C++) path; ``rlhf_kernels._dispatch`` decides which, and
``RLHF_KERNELS_BACKEND=triton|torch|cpp|cuda`` forces one.
"""

from ._dispatch import backend_for, get_backend, set_backend, set_index_checks, use_backend
from .kl_control import AdaptiveKLController, FixedKLController
from .ops.advantages import (
    broadcast_to_tokens,
    compute_gae,
    group_advantages,
    masked_whiten,
    token_level_rewards,
)
from .ops.aggregation import LOSS_AGG_MODES, agg_loss
from .ops.kl import KL_ESTIMATORS, kl_penalty
from .ops.linear_logprobs import LinearLogprobs, linear_logprobs
from .ops.logprobs import entropy_from_logits, logprobs_from_logits
from .ops.ppo_losses import kl_loss, ppo_policy_loss, ppo_value_loss
from .ops.reward_losses import (
    pairwise_reward_loss,
    pointwise_reward_loss,
    ranking_hinge_loss,
    ranking_reward_loss,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "LinearLogprobs",
    "agg_loss",
    "backend_for",
    "broadcast_to_tokens",
    "compute_gae",
    "entropy_from_logits",
    "get_backend",
    "group_advantages",
    "kl_loss",
    "kl_penalty",
    "linear_logprobs",
    "logprobs_from_logits",
    "masked_whiten",
    "pairwise_reward_loss",
    "pointwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranking_hinge_loss",
    "ranking_reward_loss",
    "set_backend",
    "set_index_checks",
    "token_level_rewards",
    "use_backend",
]
