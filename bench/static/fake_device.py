"""A CUDA device that is not there: fake CUDA tensors and an H100/H200-sized device description.

The launchers choose their configurations from the tensors they get (shapes, dtypes, strides, the device
type) and from the device (its SM count).  Under :func:`fake_h200` every public op can be called with
*fake* CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes and strides, no memory), so the real
launch configurations of the real shapes (N = 16384 rows of V = 151936 logits) are recorded on a CPU
machine; ``torch.cuda.get_device_properties`` answers with 132 SMs, as an H100 SXM or H200 has.

Limits of the fake device, and what is done about them:
- a CPU build of torch cannot run autograd on CUDA tensors (its engine needs a CUDA device guard), so a
  workload calls the backward ops by their registered names (``torch.ops.rlhf_kernels.*_bwd``);
- a few Python-level tensor methods on fake CUDA tensors ask for a CUDA device guard too: while
  active, basic indexing (ints, slices, None, Ellipsis), ``__setitem__``, ``copy_``, ``contiguous``
  and ``~`` go through the equivalent ``aten`` ops;
- a registered op's body runs as its fake implementation, where ``wrap_triton`` would trace instead of
  launching: wrap_triton is told it is not tracing, so the body launches (and the recorder catches it);
- label range checks read tensor values: they are switched off (``set_index_checks(False)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

import torch

H200 = SimpleNamespace(
    name="NVIDIA H200 (static model)",
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=141 * 2**30,
    L2_cache_size=50 * 2**20,
    max_threads_per_multi_processor=2048,
    regs_per_multiprocessor=65536,
    shared_memory_per_multiprocessor=228 * 1024,
    shared_memory_per_block_optin=227 * 1024,
    warp_size=32,
)


_MISSING = object()


def _aten_getitem(x: torch.Tensor, index):
    if not isinstance(index, tuple):
        index = (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        raise NotImplementedError(f"the fake CUDA device supports basic indexing only; got {index!r}")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = x.dim() - sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:at] + (slice(None),) * fill + index[at + 1 :]
    dim = 0
    for i in index:
        if i is None:
            x = torch.ops.aten.unsqueeze.default(x, dim)
            dim += 1
        elif isinstance(i, int):
            x = torch.ops.aten.select.int(x, dim, i)
        else:
            start, stop, step = i.indices(x.shape[dim])
            x = torch.ops.aten.slice.Tensor(x, dim, start, max(start, stop), step)
            dim += 1
    return x


def _aten_setitem(x: torch.Tensor, index, value) -> None:
    target = _aten_getitem(x, index)
    if isinstance(value, torch.Tensor):
        torch.ops.aten.copy_.default(target, value.expand_as(target))
    else:
        torch.ops.aten.fill_.Scalar(target, value)


def _aten_contiguous(x: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    if x.is_contiguous(memory_format=memory_format):
        return x
    return torch.ops.aten.clone.default(x, memory_format=memory_format)


@contextlib.contextmanager
def fake_h200() -> Iterator[torch._subclasses.FakeTensorMode]:
    """Fake CUDA tensors on a 132-SM sm_90 device; yields the FakeTensorMode (create tensors inside)."""
    import torch._library.triton as library_triton
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rlhf_kernels import _dispatch

    patches = [
        (torch.cuda, "get_device_properties", lambda *a, **k: H200),
        (torch.cuda, "get_device_capability", lambda *a, **k: (H200.major, H200.minor)),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "device_count", lambda: 1),
        (library_triton, "is_wrap_triton_enabled", lambda: False),
        (torch.Tensor, "__getitem__", _aten_getitem),
        (torch.Tensor, "__setitem__", _aten_setitem),
        (
            torch.Tensor,
            "copy_",
            lambda self, src, non_blocking=False: torch.ops.aten.copy_.default(self, src),
        ),
        (torch.Tensor, "contiguous", _aten_contiguous),
        (torch.Tensor, "__invert__", lambda self: torch.ops.aten.bitwise_not.default(self)),
    ]
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in patches]
    checks = _dispatch.index_checks_enabled()
    for owner, name, value in patches:
        setattr(owner, name, value)
    _dispatch.set_index_checks(False)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, _dispatch.use_backend("triton"):
            yield mode
    finally:
        _dispatch.set_index_checks(checks)
        for owner, name, value in saved:
            if value is _MISSING:
                delattr(owner, name)  # inherited before: inherit again
            else:
                setattr(owner, name, value)
