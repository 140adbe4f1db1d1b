"""The one place that decides which implementation runs for which tensor.

Backends
--------
``triton``  Triton kernels.  Native on CUDA tensors; on CPU tensors only inside Triton's interpreter
            (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how CI checks them.
``cuda``    The C++/CUDA extension built from ``csrc/`` (families that have one, e.g. GAE).
``cpp``     The C++ CPU extension built from ``csrc/`` (families that have one).
``torch``   Plain PyTorch, memory-efficient (chunked); runs on any device.

Choice
------
``auto`` (the default) picks, per family, the first entry of :data:`_AUTO` for the tensor's device
that is usable.  The environment variable ``RLHF_KERNELS_BACKEND`` (read once at import) or
:func:`set_backend` / :func:`use_backend` force one backend for every family; a forced backend that
cannot run on the tensor's device raises a ``RuntimeError`` saying why, rather than silently running
something else.

The decision depends only on Python-level state (device type, the forced backend), so it is made at
trace time under ``torch.compile`` and costs nothing at run time.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")
_VALID_CHOICES = ("auto",) + BACKENDS

# Per family and device type, the preference order used by "auto"; a family's implemented backends are
# the union of its orders.  Families missing here get _DEFAULT_ORDER.
_AUTO: dict[str, dict[str, tuple[str, ...]]] = {}

_DEFAULT_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch"), "cpu": ("torch",)}

_state = types.SimpleNamespace()  # process-wide settings changed by set_backend / set_index_checks


def _env_choice() -> str:
    value = os.environ.get("RLHF_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID_CHOICES:
        raise ValueError(
            f"RLHF_KERNELS_BACKEND must be one of {_VALID_CHOICES}; got {value!r}"
        )
    return value


_DEFAULT_CHOICE = _env_choice()

# Whether public functions check index arguments (labels) against their range before launching.
# On CUDA tensors the check reads device memory, i.e. synchronises the host with the device once per
# call; RLHF_KERNELS_CHECK_INDICES=0 or set_index_checks(False) turns it off.  Kernels never read out of
# bounds either way: an out-of-range index yields NaN.  Under torch.compile the check is skipped.
_CHECK_INDICES = os.environ.get("RLHF_KERNELS_CHECK_INDICES", "1").strip() not in ("0", "false", "no", "off")


def triton_available() -> bool:
    """True when ``import triton`` works."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def tracing() -> bool:
    """True while torch.compile, export or make_fx traces (then only registered ops may run).

    In plain eager mode the registered ops' bodies call their PyTorch/C++ implementations directly
    instead of through a second registered op: each torch.library layer costs 30-100 µs per call on
    CPU, as much as a small kernel.
    """
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def route(family: str, device: torch.device | str, **implementations: Callable) -> Callable:
    """The implementation of ``family`` that runs for tensors on ``device``, among ``implementations``
    (keyword per backend: ``triton=``, ``cuda=``, ``cpp=``, ``torch=``).  Every routing op's body is
    ``route(FAMILY, device, triton=..., torch=...)(*args)``: the choice is Python-level state only, so
    it is made once at trace time under ``torch.compile``."""
    backend = backend_for(family, device)
    try:
        return implementations[backend]
    except KeyError:
        raise RuntimeError(
            f"rlhf_kernels: {family!r} routed to backend {backend!r}, which this op does not implement "
            f"(it has {sorted(implementations)})"
        ) from None


def index_checks_enabled() -> bool:
    """Whether index arguments are range-checked (see ``RLHF_KERNELS_CHECK_INDICES``)."""
    return getattr(_state, "check_indices", _CHECK_INDICES)


def set_index_checks(enabled: bool) -> None:
    """Turn the (device-synchronising on CUDA) range check of index arguments on or off."""
    _state.check_indices = bool(enabled)


def register_family(family: str, *, cuda: tuple[str, ...], cpu: tuple[str, ...]) -> None:
    """Declare the "auto" preference order of a kernel family (called by the ops modules)."""
    for order in (cuda, cpu):
        for name in order:
            if name not in BACKENDS:
                raise ValueError(f"unknown backend {name!r} for family {family!r}")
    _AUTO[family] = {"cuda": cuda, "cpu": cpu}


def get_backend() -> str:
    """The forced backend, or ``"auto"``."""
    return getattr(_state, "choice", _DEFAULT_CHOICE)


def set_backend(choice: str) -> None:
    """Force a backend for every family (``"auto"`` restores per-device selection)."""
    if choice not in _VALID_CHOICES:
        raise ValueError(f"backend must be one of {_VALID_CHOICES}; got {choice!r}")
    _state.choice = choice


@contextlib.contextmanager
def use_backend(choice: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = get_backend()
    set_backend(choice)
    try:
        yield
    finally:
        _state.choice = previous


def _unusable_reason(backend: str, device: torch.device, family: str) -> str | None:
    """Why ``backend`` cannot run ``family`` on ``device``; None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (
            f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got a {device.type} tensor"
        )
    if backend in ("cuda", "cpp"):
        from . import _ext

        want = "cuda" if backend == "cuda" else "cpu"
        if device.type != want:
            return f"the {backend} extension runs on {want} tensors; got a {device.type} tensor"
        return _ext.unavailable_reason(family, backend)
    return f"unknown backend {backend!r}"


def backend_for(family: str, device: torch.device | str) -> str:
    """The backend that runs ``family`` for tensors on ``device``."""
    device = torch.device(device)
    choice = get_backend()
    if choice != "auto":
        implemented = set(_AUTO.get(family, _DEFAULT_ORDER)["cuda"]) | set(
            _AUTO.get(family, _DEFAULT_ORDER)["cpu"]
        )
        reason = (
            None
            if choice in implemented or choice == "torch"
            else f"{family!r} has no {choice!r} implementation (it has {sorted(implemented)})"
        )
        reason = reason or _unusable_reason(choice, device, family)
        if reason is not None:
            raise RuntimeError(
                f"rlhf_kernels: backend {choice!r} was forced (RLHF_KERNELS_BACKEND or set_backend) "
                f"but cannot run {family!r}: {reason}"
            )
        return choice
    orders = _AUTO.get(family, _DEFAULT_ORDER)
    order = orders.get(device.type, ("torch",))
    for backend in order:
        if _unusable_reason(backend, device, family) is None:
            return backend
    return "torch"
