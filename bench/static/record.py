"""Which Triton kernels an op launches, and how: launch interception.

``record_launches()`` replaces Triton's launch (``JITFunction.run``, and ``Autotuner.run`` for autotuned
kernels) by a recorder for as long as it is active: every ``kernel[grid](*args, **kwargs)`` a launcher
makes is stored as a :class:`Launch` (the kernel, its grid, every argument in parameter order with
tensors reduced to :class:`TensorArg`, and the launch options) and nothing runs.  The launch numbers
therefore come from the launchers themselves, never re-typed here.

``count_interpreted()`` does the same inside Triton's interpreter but lets every launch run: it is how
the tests' specialisations are counted (see ``tests/gpu_smoke.py``).

:func:`specialise` turns a launch into what a native launch would compile: Triton's own binder (the
code ``JITFunction.run`` uses) applied to the recorded arguments, with tensors standing in as pointers
whose address is their byte offset inside a 512-byte-aligned allocation (as CUDA's caching allocator
gives).  Works with the Triton versions this project meets (3.6 on the GPU machine, 3.9 here).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

SM90 = GPUTarget("cuda", 90, 32)
_ALLOCATION_ALIGNMENT = 512  # CUDA caching allocator: every block starts 512-byte aligned


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as a kernel sees it: a typed pointer (plus what the traffic estimate needs)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset_bytes: int  # from the start of its storage: decides 16-byte alignment
    storage: int  # identity of the storage (de-duplicates a tensor passed twice, e.g. as a dummy)

    @property
    def nbytes(self) -> int:
        """Bytes of the elements the view addresses (each counted once)."""
        if any(s == 0 for s in self.shape):
            return 0
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(self.shape, self.stride) if st)
        numel = 1
        for n, st in zip(self.shape, self.stride):
            numel *= n if st else 1
        return min(span, numel) * self.dtype.itemsize

    def data_ptr(self) -> int:  # what Triton's specialisation reads
        return _ALLOCATION_ALIGNMENT + self.offset_bytes


def tensor_arg(t: torch.Tensor) -> TensorArg:
    from torch.multiprocessing.reductions import StorageWeakRef

    try:
        storage = StorageWeakRef(t.untyped_storage()).cdata
    except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensor subclasses
        storage = id(t)
    return TensorArg(
        t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset() * t.element_size(), storage
    )


@dataclass
class Launch:
    """One recorded ``kernel[grid](...)``."""

    module: str
    kernel: str
    grid: tuple[int, int, int]
    values: tuple  # every parameter's value, in the kernel's parameter order (TensorArg for tensors)
    options: dict  # num_warps, num_stages, ... as passed (Triton's defaults otherwise)
    autotune_config: int | None = None
    tags: dict = field(default_factory=dict)  # filled by the caller (workload, case, ...)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def tensors(self) -> list[tuple[str, TensorArg]]:
        names = _jit_twin(self.module, self.kernel).arg_names
        return [(n, v) for n, v in zip(names, self.values) if isinstance(v, TensorArg)]

    def key(self) -> tuple:
        """What a native launch keys its compiled-kernel cache on: kernel, specialisation, options."""
        sig, constexprs, attrs, options = specialise(self)
        return (
            self.module,
            self.kernel,
            tuple(sig.items()),
            tuple(sorted((str(k), repr(v)) for k, v in constexprs.items())),
            tuple(sorted((str(k), repr(v)) for k, v in attrs.items() if v)),  # 3.9 lists empty ones too
            tuple(sorted(self.options.items())),
        )


def kernel_function(module: str, name: str) -> JITFunction:
    fn = getattr(importlib.import_module(module), name)
    if isinstance(fn, Autotuner):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"{module}.{name} is a {type(fn).__name__}, not a JITFunction: run without TRITON_INTERPRET"
        )
    return fn


def _python_function(fn):
    """The decorated Python function of a JITFunction, InterpretedFunction or Autotuner."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _as_value(value):
    return tensor_arg(value) if isinstance(value, torch.Tensor) else value


def _launch(fn, grid, args: tuple, kwargs: dict, autotune_config: int | None = None) -> Launch:
    """``fn[grid](*args, **kwargs)`` as a Launch: parameters in order (defaults applied), options apart."""
    python_fn = _python_function(fn)
    signature = inspect.signature(python_fn)
    names = list(signature.parameters)
    options = {k: v for k, v in kwargs.items() if k not in names and k not in ("grid", "warmup")}
    bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    values = tuple(_as_value(bound.arguments[n]) for n in names)
    if callable(grid):
        grid = grid(dict(zip(names, values)))
    grid = tuple(int(g) for g in grid)
    grid = grid + (1,) * (3 - len(grid))
    return Launch(python_fn.__module__, python_fn.__name__, grid, values, options, autotune_config)


# ---------------------------------------------------------------------------------------------------
# Interception
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Records every native Triton launch (and runs none) while active; yields the list it fills."""
    launches: list[Launch] = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(_launch(self, grid, args, kwargs))

    def tuned_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        for i, config in enumerate(self.configs):  # every config the autotuner would try
            launches.append(_launch(self.fn, grid, args, {**kwargs, **config.all_kwargs()}, i))

    JITFunction.run, Autotuner.run = run, tuned_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


@contextlib.contextmanager
def count_interpreted() -> Iterator[list[Launch]]:
    """Inside Triton's interpreter: records every launch, then runs it as usual."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(_launch(self, grid, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


# ---------------------------------------------------------------------------------------------------
# Specialisation: what JITFunction.run would hand to triton.compile
# ---------------------------------------------------------------------------------------------------
@functools.cache
def _backend():
    from triton.compiler import make_backend

    return make_backend(SM90)


@functools.cache
def _binder(module: str, name: str):
    fn = _jit_twin(module, name)
    return fn, create_function_from_signature(fn.signature, fn.params, _backend())


@functools.cache
def _jit_twin(module: str, name: str) -> JITFunction:
    """The kernel as a JITFunction, also when this process interprets (its binder is what we want)."""
    fn = getattr(importlib.import_module(module), name)
    if isinstance(fn, Autotuner):
        fn = fn.fn
    if isinstance(fn, JITFunction):
        return fn
    return JITFunction(_python_function(fn))  # interpreting: a JITFunction of the same Python function


def specialise(launch: Launch):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them for sm_90."""
    fn, binder = _binder(launch.module, launch.kernel)
    bound_args, specialization, options = binder(*launch.values, **launch.options)
    options, signature, constexprs, attrs = fn._pack_args(
        _backend(), dict(launch.options), bound_args, specialization, options
    )
    return signature, constexprs, attrs, options


def triton_version() -> str:
    return triton.__version__
