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
from .ops.kl import KL_ESTIMATORS, kl_penalty
from .ops.logprobs import entropy_from_logits, logprobs_from_logits

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "backend_for",
    "broadcast_to_tokens",
    "compute_gae",
    "entropy_from_logits",
    "get_backend",
    "group_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_whiten",
    "set_backend",
    "set_index_checks",
    "token_level_rewards",
    "use_backend",
]
