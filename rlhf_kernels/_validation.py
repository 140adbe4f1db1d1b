"""Argument checks shared by the public functions.

Each raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or value),
naming the argument, what was expected and what was received.  None of them touches tensor data, so
none synchronises a device, except ``check_label_range`` (documented, and switchable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The arithmetic (and accumulation) dtype of an op: fp64 if any input is fp64, else fp32."""
    has_fp64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if has_fp64 else torch.float32


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def check_float_tensor(
    name: str, value: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
) -> torch.Tensor:
    """A floating tensor of one of ``dtypes``."""
    tensor = check_tensor(name, value)
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be a floating tensor ({_dtype_names(dtypes)}); got {tensor.dtype}")
    return tensor


def check_index_tensor(name: str, value: object) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor ({_dtype_names(INDEX_DTYPES)}); got {tensor.dtype}"
        )
    return tensor


def check_mask_tensor(name: str, value: object) -> torch.Tensor:
    """A 0/1 mask: bool, integer or floating."""
    tensor = check_tensor(name, value)
    if tensor.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating 0/1 mask; got {tensor.dtype}")
    return tensor


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int], described_as: str) -> None:
    """``tensor.shape == expected``; ``described_as`` says where the expectation comes from."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {described_as} = {tuple(expected)}; got {tuple(tensor.shape)}"
        )


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}; got shape {tuple(tensor.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listed}")


def check_real(name: str, value: object) -> float:
    """A finite Python number (tensors are refused: reading one would need a host sync).

    Under ``torch.compile(dynamic=True)`` a float may arrive symbolic (``torch.SymFloat``): it is
    checked by comparison (which guards) and returned as is, so it stays a graph input.
    """
    symbolic = isinstance(value, (torch.SymFloat, torch.SymInt))
    if isinstance(value, bool) or not (symbolic or isinstance(value, (int, float))):
        raise TypeError(f"{name} must be a Python float; got {type(value).__name__}")
    if not (value == value and -math.inf < value < math.inf):  # NaN fails the first comparison
        raise ValueError(f"{name} must be finite; got {value}")
    return value if symbolic else float(value)


def check_positive(name: str, value: object) -> float:
    return check_greater(name, value, 0.0)


def check_greater(name: str, value: object, bound: float) -> float:
    value = check_real(name, value)
    if not value > bound:
        raise ValueError(f"{name} must be > {bound:g}; got {value}")
    return value


def check_at_least(name: str, value: object, bound: float) -> float:
    value = check_real(name, value)
    if not value >= bound:
        raise ValueError(f"{name} must be >= {bound:g}; got {value}")
    return value


def check_in_range(name: str, value: object, low: float, high: float) -> float:
    value = check_real(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]; got {value}")
    return value


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int; got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int, vocab_from: str) -> None:
    """Raises when a label is outside [0, V) and not ``ignore_index`` (``vocab_from`` names where V
    comes from).  The one check in this module that reads tensor data: it synchronises a CUDA device,
    so it is off with ``RLHF_KERNELS_CHECK_INDICES=0`` / ``set_index_checks(False)`` (on every device)
    and under torch.compile; unchecked bad labels give NaN, never an out-of-bounds access."""
    from . import _dispatch

    if torch.compiler.is_compiling() or labels.numel() == 0 or not _dispatch.index_checks_enabled():
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):  # host sync: the documented, switchable label check
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) (the vocabulary size, {vocab_from}) or equal "
            f"ignore_index={ignore_index}; got label {first}"
        )
