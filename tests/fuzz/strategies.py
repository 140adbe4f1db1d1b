"""Hypothesis strategies shared by the fuzz suite: shapes, layouts, dtypes, values and masks.

Values come from a drawn seed (fast, and reproducible from the reported example) plus a short, shrinkable
list of special values (±inf, NaN, ±1e30, denormals) written at drawn positions.  A layout turns a
tensor into one with the same shape (and, except for ``expanded``, the same values) but other strides:
sliced, transposed, "channels-last-like" (first dimension innermost), expanded (stride 0) or at a
storage offset.  Every tensor is built on the CPU: the Triton path runs in the interpreter.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

LAYOUTS = ("contiguous", "offset", "sliced", "transposed", "channels_last", "expanded")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALL_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)
REJECTED_FLOAT_DTYPES = (torch.int32, torch.bool, torch.complex64)
MASK_DTYPES = (torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.bfloat16)

SPECIALS = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "big": 1e30,
    "-big": -1e30,
    "denormal": 1e-40,
    "-denormal": -1e-40,
}

# A dimension: 0 and 1 (the edge cases), small odd sizes, a power of two.
dims = st.sampled_from([0, 1, 1, 2, 3, 5, 7, 8])
positive_dims = st.sampled_from([1, 1, 2, 3, 5, 7, 8])


def seeds():
    return st.integers(0, 2**31 - 1)


def specials(max_size: int = 3, kinds=tuple(SPECIALS)):
    """A short list of (position in [0, 1), special value name): shrinks towards no specials."""
    return st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(kinds)), max_size=max_size)


def values(shape, dtype, seed: int, *, scale: float = 2.0, offset: float = 0.0, special=()) -> torch.Tensor:
    """Normal(offset, scale) values of ``shape`` rounded to ``dtype``, with ``special`` written over them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    flat = x.view(-1)
    for position, name in special:
        if flat.numel():
            flat[int(position * flat.numel())] = SPECIALS[name]
    return x.to(dtype)


def labels_for(shape, vocab: int, seed: int, *, ignore_index: int = -100, edges=()) -> torch.Tensor:
    """Labels in [0, V) with some ``ignore_index`` and the range edges 0 and V − 1 written at ``edges``."""
    g = torch.Generator().manual_seed(seed + 1)
    out = torch.randint(0, max(vocab, 1), shape, generator=g)
    flat = out.view(-1)
    if flat.numel():
        ignored = torch.rand(flat.shape, generator=g) < 0.2
        flat[ignored] = ignore_index
        for position, edge in edges:
            flat[int(position * flat.numel())] = {"zero": 0, "last": vocab - 1, "ignore": ignore_index}[edge]
    return out


def mask_for(shape, kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A 0/1 mask of ``kind``: "random" (holes), "ones", "zeros", "prefix" (right padding), "rows"
    (some rows all 0, others all 1)."""
    g = torch.Generator().manual_seed(seed + 2)
    if kind == "ones":
        m = torch.ones(shape, dtype=torch.bool)
    elif kind == "zeros":
        m = torch.zeros(shape, dtype=torch.bool)
    elif kind == "prefix" and len(shape) == 2:
        lengths = torch.randint(0, shape[1] + 1, (shape[0],), generator=g)
        m = torch.arange(shape[1])[None, :] < lengths[:, None]
    elif kind == "rows" and len(shape) == 2:
        m = (torch.rand(shape[0], generator=g) < 0.5)[:, None].expand(shape).clone()
    else:
        m = torch.rand(shape, generator=g) < 0.6
    return m.to(dtype)


MASK_KINDS = ("random", "ones", "zeros", "prefix", "rows")


def masks():
    return st.tuples(st.sampled_from(MASK_KINDS), st.sampled_from(MASK_DTYPES))


def arrange(x: torch.Tensor, layout: str, *, expand_dim: int = 0) -> torch.Tensor:
    """``x`` in ``layout``.  "expanded" keeps x's first slice along ``expand_dim`` and repeats it with
    stride 0 (so its values differ from x's: use the returned tensor's values as the oracle's input)."""
    if layout == "contiguous" or x.dim() == 0:
        return x.clone()
    if layout == "offset":
        storage = torch.full((x.numel() + 3,), 7, dtype=x.dtype)
        storage[3:] = x.reshape(-1)
        return storage[3:].view(x.shape)
    if layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        wide[..., 1::2] = x
        return wide[..., 1::2]
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last" and x.dim() >= 2:
        return x.movedim(0, -1).contiguous().movedim(-1, 0)
    if layout == "expanded":
        d = expand_dim % x.dim()
        if x.shape[d] == 0:
            return x.clone()
        return x.narrow(d, 0, 1).clone().expand(x.shape)
    return x.clone()


def layouts():
    return st.sampled_from(LAYOUTS)


def with_specials_at_valid(x: torch.Tensor, mask: torch.Tensor, special) -> torch.Tensor:
    """``x`` with the special values written at drawn *valid* (mask ≠ 0) positions only: ops exclude
    masked positions, and the metamorphic tests check separately that garbage there changes nothing."""
    x = x.clone()
    valid = (mask.reshape(-1) != 0).nonzero().flatten()
    flat = x.view(-1)
    for position, name in special:
        if valid.numel():
            flat[valid[int(position * valid.numel())]] = SPECIALS[name]
    return x


def garbage_at_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN, +inf, −inf and 1e30 cycling over the masked (mask = 0) positions."""
    x = x.contiguous().clone()
    hole = (mask == 0).reshape(-1).nonzero().flatten()
    junk = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=torch.float64).to(x.dtype)
    if hole.numel():
        x.view(-1)[hole] = junk[torch.arange(hole.numel()) % 4]
    return x


@st.composite
def token_batches(draw, n_float: int, dtypes=ALL_FLOAT_DTYPES, same_dtype: bool = True):
    """(B, T, [float tensors in their layouts], mask in its layout, case dict) for [B, T] token ops."""
    B, T = draw(dims), draw(dims)
    seed = draw(seeds())
    kind, mask_dtype = draw(masks())
    mask = arrange(
        mask_for((B, T), kind, mask_dtype, seed), draw(layouts()), expand_dim=draw(st.integers(0, 1))
    )
    dtype = draw(st.sampled_from(dtypes))
    special = draw(specials())
    tensors = []
    for i in range(n_float):
        d = dtype if same_dtype else draw(st.sampled_from(dtypes))
        x = values((B, T), torch.float64, seed + 17 * i, scale=draw(st.sampled_from([0.5, 2.0])))
        x = with_specials_at_valid(x, mask, special if i == 0 else ()).to(d)
        tensors.append(arrange(x, draw(layouts()), expand_dim=draw(st.integers(0, 1))))
    return B, T, tensors, mask, dict(seed=seed, mask_kind=kind, special=special)
