"""Randomised inputs and comparisons shared by the peer-parity tests."""

from __future__ import annotations

import torch

MASK_KINDS = ("random", "holes", "left", "right", "empty_rows", "all_masked")
HALF = (torch.bfloat16, torch.float16)

# |ours − peer| ≤ tol·(1 + |peer|) when both compute in the same precision (the peer on inputs upcast to
# fp32 / fp64 where ours computes in fp32 / fp64 anyway).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# Against the peer run in half precision itself: the peer rounds intermediate values to the input dtype.
HALF_TOL = {torch.bfloat16: 4e-2, torch.float16: 5e-3}


def mask(batch: int, seq: int, kind: str, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Response masks of the shapes RLHF batches have."""
    t = torch.arange(seq)
    lengths = torch.randint(1, seq + 1, (batch,))
    if kind == "right":
        m = t < lengths[:, None]
    elif kind == "left":
        m = t >= (seq - lengths)[:, None]
    elif kind == "holes":
        m = (t < lengths[:, None]) & (torch.rand(batch, seq) < 0.6)
        m[:, 0] = True
    elif kind == "empty_rows":
        m = torch.rand(batch, seq) < 0.7
        m[1] = False
        m[2] = False
        m[2, seq // 2] = True  # a one-token row next to an empty one
    elif kind == "all_masked":
        m = torch.zeros(batch, seq, dtype=torch.bool)
    else:
        m = torch.rand(batch, seq) < 0.7
    return m.to(dtype)


def logprob_pair(batch: int, seq: int, dtype: torch.dtype, spread: float = 0.5):
    """(old, new) log-probabilities; ``spread`` sets the log-ratio's scale (30 reaches the ±20 clamp)."""
    old = -torch.rand(batch, seq) * 4
    new = old + torch.randn(batch, seq) * spread
    return old.to(dtype), new.to(dtype)


def close(actual, expected, tol: float, what: str = "") -> None:
    """Elementwise |actual − expected| ≤ tol·(1 + |expected|) in float64, NaN where (and only where) the
    expected value is NaN, same shape."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def grad_close(actual, expected, tol: float, what: str = "") -> None:
    """Gradients: |actual − expected| ≤ tol·(|expected| + max|expected|), NaN where expected is NaN."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    finite = ~expected.isnan()
    scale = expected[finite].abs().max() if bool(finite.any()) else torch.tensor(0.0, dtype=torch.float64)
    err = (actual - expected)[finite].abs()
    bound = tol * (expected[finite].abs() + scale + 1e-30)
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item() if err.numel() else 0:.3g}"


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in the precision the fused kernels compute in (fp32; fp64 stays fp64)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_()
