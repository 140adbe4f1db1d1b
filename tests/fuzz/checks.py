"""What every drawn case must end in (issue 19): a ``ValueError``/``TypeError`` naming the argument, or
outputs and gradients equal to the float64 oracle (``rlhf_kernels/reference``) within the dtype's
tolerance, NaN exactly where the oracle is NaN, ±inf exactly where it is ±inf, and inputs unchanged.
"""

from __future__ import annotations

import contextlib
import re

import torch

# Per-dtype tolerance of an output or gradient, relative to 1 + |oracle| (outputs) or to the gradient's
# scale (gradients): the dtype's rounding, a few ulps of fp32 arithmetic over tiny reductions.
TOL = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def flat_outputs(result) -> list[torch.Tensor]:
    """Tensors of a result (tensor, tuple, or (loss, metrics dict)) in a fixed order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    out = []
    for item in result:
        out.extend(flat_outputs(item))
    return out


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, *, grad: bool = False,
                   tol: float | None = None, atol: float | torch.Tensor = 0.0,
                   may_be_nan: torch.Tensor | None = None) -> None:
    """NaN where the oracle is NaN (and only there), the same ±inf, finite values within tolerance.

    ``atol``: added to the bound; a tensor broadcast to the oracle's shape gives one per element.

    ``may_be_nan``: positions where a NaN is accepted although the oracle is finite — the gradient at a
    non-finite input whose derivative happens to be finite (∂(lp − ref)/∂lp = 1 at lp = NaN): the library
    keeps "NaN in, NaN out" for gradients too, which hides nothing."""
    assert isinstance(actual, torch.Tensor), f"{what}: not a tensor ({type(actual).__name__})"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    tol = TOL[actual.dtype] if tol is None else tol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    e_nan, a_nan = e.isnan(), a.isnan()
    if may_be_nan is not None:
        excused = may_be_nan.expand(e.shape) & a_nan & ~e_nan
        e = torch.where(excused, torch.nan, e)
        e_nan = e.isnan()
    assert bool((a_nan == e_nan).all()), (
        f"{what}: NaN pattern differs: {int((a_nan & ~e_nan).sum())} NaN where the oracle is not "
        f"(e.g. oracle {e[a_nan & ~e_nan][:3].tolist()}), {int((e_nan & ~a_nan).sum())} values where the "
        f"oracle is NaN (e.g. {a[e_nan & ~a_nan][:3].tolist()}: a hidden NaN)"
    )
    finite = e.isfinite()
    max_out = torch.finfo(actual.dtype).max
    # Infinite oracle values, and finite ones beyond the output dtype's range, must be the same ±inf.
    overflow = ~e_nan & (~finite | (e.abs() > max_out))
    assert bool((a[overflow] == torch.sign(e[overflow]) * torch.inf).all()), (
        f"{what}: infinite (or out-of-range) oracle values {e[overflow][:3].tolist()} "
        f"got {a[overflow][:3].tolist()}"
    )
    check = finite & ~overflow
    if not bool(check.any()):
        return
    err = (a[check] - e[check]).abs()
    if grad:
        bound = tol * (e[check].abs() + e[check].abs().max())
    else:
        bound = tol * (1 + e[check].abs())
    if isinstance(atol, torch.Tensor):
        atol = atol.detach().double().cpu().expand(e.shape)[check]
    bound = bound + atol
    assert bool((err <= bound).all()), (
        f"{what}: max error {err.max().item():.3g} "
        f"at oracle value {e[check][(err - bound).argmax()].item():.6g} "
        f"(tol {tol:g}{', relative to the gradient scale' if grad else ''}); got non-finite "
        f"{a[check][~a[check].isfinite()][:3].tolist()}"
    )


def snapshot(tensors: dict) -> dict:
    return {k: v.detach().clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def assert_unchanged(before: dict, tensors: dict, skip=()) -> None:
    """Inputs are never modified (bit for bit, NaN included)."""
    for name, old in before.items():
        if name in skip:
            continue
        new = tensors[name].detach()
        same = torch.equal(new.isnan(), old.isnan()) if new.dtype.is_floating_point else True
        same = same and torch.equal(
            torch.nan_to_num(new.double(), nan=0.0), torch.nan_to_num(old.double(), nan=0.0)
        )
        assert same, f"input {name} was modified"


def assert_names_argument(exc: Exception, names) -> None:
    """A ValueError/TypeError whose message names one of ``names`` (the offending argument)."""
    assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
    names = [names] if isinstance(names, str) else list(names)
    assert any(re.search(rf"\b{re.escape(n)}\b", str(exc)) for n in names), (
        f"{type(exc).__name__} does not name any of {names}: {exc}"
    )


def call(fn, *args, **kwargs):
    """(result, None) or (None, the ValueError/TypeError raised); any other exception propagates."""
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError) as exc:
        return None, exc


def grads_of(outputs, inputs, upstream):
    """∂(Σ outputs·upstream)/∂inputs with explicit upstream gradients (no NaN·0 mixing between outputs)."""
    pairs = [(o, u) for o, u in zip(outputs, upstream) if o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    outs, ups = zip(*pairs)
    return torch.autograd.grad(outs, inputs, [u.to(o.dtype) for o, u in zip(outs, ups)], allow_unused=True)


def upstream_for(outputs, seed: int):
    g = torch.Generator().manual_seed(seed + 3)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]


def leaf(x: torch.Tensor) -> torch.Tensor:
    """``x`` (any layout) as a leaf that requires grad, keeping its strides."""
    return x.detach().requires_grad_(True)


def oracle_leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().requires_grad_(True)


@contextlib.contextmanager
def index_checks(enabled: bool):
    from rlhf_kernels import _dispatch

    before = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(enabled)
    try:
        yield
    finally:
        _dispatch.set_index_checks(before)


def lse_absorbs_tied_maxima(logits: torch.Tensor, temperature: float) -> bool:
    """Some row (of logits / temperature) has >= 2 entries at its maximum m, with
    fp32(m + log 2) == m (|m| >= ~2^24·log 2)."""
    x = logits.detach().to(torch.float32).reshape(-1, logits.shape[-1]) / temperature
    if x.numel() == 0:
        return False
    m = x.amax(-1, keepdim=True)
    ties = (x == m).sum(-1) >= 2
    absorbed = (m.squeeze(-1) + 0.6931472) == m.squeeze(-1)
    return bool((ties & absorbed & m.squeeze(-1).isfinite()).any())
