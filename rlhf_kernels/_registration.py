"""The one way this library registers an op with ``torch.library``.

Two kinds of registered op, each written once here:

``kernel_op(name)``  a family's *routing* op (the one autograd and ``torch.compile`` see).  Its body
    asks :func:`rlhf_kernels._dispatch.route` which implementation runs and calls it.  Where Triton
    kernels can run natively in this process (a CUDA device), it is registered with
    ``torch.library.triton_op``, so that ``torch.compile`` traces into the body and sees the Triton
    launches; elsewhere with ``torch.library.custom_op`` (same name, schema, fake and autograd).
    ``triton_op`` scans the body's source for kernels at registration, which imports
    ``torch._inductor`` and ``torch._dynamo`` (~0.9 s on a 2-core machine): a CPU-only process, where no
    compiled Triton kernel can ever run, never pays for it.
``torch_op(name, fn, fake=...)``  the PyTorch (or C++/CUDA extension) implementation of a family, as an
    opaque ``custom_op``.

Both return a :class:`RegisteredOp`: calling it runs the plain Python body directly in eager mode (each
``torch.library`` layer costs 30-100 µs per call on CPU, as much as a small kernel) and the registered
op while anything traces (``torch.compile``, export, ``make_fx``), where only registered ops may run.
An op with an autograd formula runs, in eager mode and when an input requires grad, through a
``torch.autograd.Function`` with the same formula (see :meth:`RegisteredOp.register_autograd`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from . import _dispatch

NAMESPACE = "rlhf_kernels"


@functools.lru_cache(maxsize=1)
def triton_native() -> bool:
    """Whether compiled (not interpreted) Triton kernels can run in this process: CUDA and Triton."""
    return torch.cuda.is_available() and _dispatch.triton_available()


class RegisteredOp:
    """A registered op plus its plain body; see the module docstring."""

    def __init__(self, op, body: Callable) -> None:
        self.op = op  # the torch.library CustomOpDef
        self.body = body
        self.eager_autograd: type[torch.autograd.Function] | None = None
        functools.update_wrapper(self, body)

    @property
    def has_autograd(self) -> bool:
        return self.eager_autograd is not None

    def __call__(self, *args):
        if _dispatch.tracing():
            return self.op(*args)
        if self.eager_autograd is not None and torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            return self.eager_autograd.apply(*args)
        return self.body(*args)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Attaches ``backward`` to the registered op (what tracing sees) and, for eager calls, to an
        equivalent ``torch.autograd.Function`` over the plain body: the first call of any registered op
        imports ``torch._dynamo`` (torch wraps custom-op kernels in a dynamo-disable guard, ~1.3 s on a
        2-core machine), and each dispatcher layer costs tens of µs; the same formula runs either way."""
        self.op.register_autograd(backward, setup_context=setup_context)
        body = self.body

        class EagerAutograd(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                return body(*args)

            @staticmethod
            def setup_context(ctx, inputs, output):
                setup_context(ctx, inputs, output)

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        EagerAutograd.__name__ = EagerAutograd.__qualname__ = f"{body.__name__}_autograd"
        self.eager_autograd = EagerAutograd


def _qualified(name: str) -> str:
    return name if "::" in name else f"{NAMESPACE}::{name}"


def kernel_op(
    name: str, *, mutates_args: Iterable[str] = ()
) -> Callable[[Callable], RegisteredOp]:
    """Decorator: registers ``fn`` (type-annotated; make_fx-traceable) as the routing op ``name``.

    ``fn`` is its own fake implementation, as ``triton_op`` requires: on fake tensors the routing picks
    the implementation for their device, whose launcher or registered PyTorch op allocates the outputs.
    """
    mutates_args = tuple(mutates_args)

    def register(fn: Callable) -> RegisteredOp:
        if triton_native():
            op = torch.library.triton_op(_qualified(name), fn, mutates_args=mutates_args)
        else:
            op = torch.library.custom_op(_qualified(name), fn, mutates_args=mutates_args)
            op.register_fake(fn)
        return RegisteredOp(op, fn)

    return register


def torch_op(
    name: str, fn: Callable, *, fake: Callable, mutates_args: Iterable[str] = ()
) -> RegisteredOp:
    """Registers ``fn`` (type-annotated) as the opaque custom op ``name`` with the fake ``fake``."""
    op = torch.library.custom_op(_qualified(name), fn, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return RegisteredOp(op, fn)
