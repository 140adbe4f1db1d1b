"""Bytes the PyTorch glue around the kernels moves (allocations excluded, views free).

While a workload runs, the public function and every implementation that ``rlhf_kernels._dispatch.route``
returns (the body of a registered op, which the outer mode sees as one opaque op) run under a dispatch
mode that adds up, for each ``aten`` op executed (a merge of partial results, a ``torch.mm`` in a
backward, a ``.contiguous()`` copy an input needed, a loss aggregation), the bytes of its distinct tensor
inputs and outputs.  With the kernels' own arguments (``report.launch_bytes``) this gives the traffic
estimate that the report sets against each op's minimum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves

from .record import tensor_arg

# Ops that move no data (allocation, views, metadata).
_FREE = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "_unsafe_view",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
}


class _Traffic(TorchDispatchMode):
    def __init__(self, sink: list[tuple[str, int]]) -> None:
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and not func.is_view and name not in _FREE:
            seen = {}
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor):
                    arg = tensor_arg(t)
                    seen[(arg.storage, arg.offset_bytes, arg.shape, arg.stride)] = arg.nbytes
            self.sink.append((name, sum(seen.values())))
        return out


@contextlib.contextmanager
def count_glue(sink: list[tuple[str, int]]) -> Iterator[None]:
    """Appends (aten op, bytes) to ``sink`` for every op the routed implementations run while active."""
    from rlhf_kernels import _dispatch

    original = _dispatch.route

    def route(family, device, **implementations):
        impl = original(family, device, **implementations)

        def counted(*args):
            if any(isinstance(m, _Traffic) for m in _get_current_dispatch_mode_stack()):
                return impl(*args)
            with _Traffic(sink):
                return impl(*args)

        return counted

    _dispatch.route = route
    try:
        with _Traffic(sink):
            yield
    finally:
        _dispatch.route = original
