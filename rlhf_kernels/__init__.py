"""rlhf-kernels: fused kernels for the RLHF hot path.

Every op runs on CUDA tensors through Triton (or the csrc CUDA extension) and on CPU tensors through a
memory-efficient PyTorch (or C++) path; ``rlhf_kernels._dispatch`` decides which, and
``RLHF_KERNELS_BACKEND=triton|torch|cpp|cuda`` forces one.
"""

from ._dispatch import backend_for, get_backend, set_backend, set_index_checks, use_backend
from .ops.logprobs import entropy_from_logits, logprobs_from_logits

__version__ = "0.1.0"

__all__ = [
    "backend_for",
    "entropy_from_logits",
    "get_backend",
    "logprobs_from_logits",
    "set_backend",
    "set_index_checks",
    "use_backend",
]
