"""Masked whitening off the Triton path: ``masked_whiten_torch`` (any device), and the small [rows]
steps between the Triton passes (:func:`combine_pivots`, :func:`finish_stats`), shared by both paths.

The statistics, per selection (a row with ``dim=-1``, all of x with ``dim=None``), n = Σm:

1. Scale and pivot.  P = 2^k, the power of two with P ≤ max|x| < 2P (clamped to [2^-126, 2^126]), so
   that x/P is exact and |x/P| < 4 for every finite x; μ₀ = Σ(x/P)·m / n.  Per row, then rows combined
   by rescaling their sums to the largest P (exact: powers of two).
2. Centred moments about the pivot: d = x/P − μ₀ (|d| < 8), c = Σd·m / n, M2 = Σd²·m − n·c².
   This is the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): the global mean first, then
   the second moment about it, with c correcting the rounding of μ₀, so a large offset (x ≈ 1000 ± 1)
   costs nothing (issue 12), and no square can overflow, however large x is (issue 19).
3. var/P² = M2 / n, times n/(n−1) when unbiased (0 for an empty selection or unbiased n = 1);
   out = (x/P − μ₀ − c) / hypot(√(var/P²), √eps/P) = (x − μ)·rsqrt(var + eps), μ = P·(μ₀ + c).  hypot
   neither overflows nor underflows where eps/P² would (x tiny or huge beside √eps), and dividing (not
   multiplying by a reciprocal that may overflow) keeps 0/d = 0 for a selection without spread.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._registration import torch_op

# The fp32 exponent field (bits 23-30) of P = 2^(e − 127): e in [EXPONENT_MIN, EXPONENT_MAX], i.e.
# P in [2^-126, 2^126], so that P and 1/P are normal numbers and |x/P| < 4 for every finite fp32 x.
EXPONENT_SHIFT = 23
EXPONENT_FIELD = 0xFF
EXPONENT_BIAS = 127
EXPONENT_MIN = 1
EXPONENT_MAX = 253
FP32_MIN_NORMAL = 2.0**-126


class Pivot(NamedTuple):
    """Step 1 per selection ([rows] with ``dim=-1``, [1] with ``dim=None``)."""

    count: torch.Tensor  # n = Σm
    inv_scale: torch.Tensor  # 1/P
    pivot: torch.Tensor  # μ₀ = Σ(x/P)·m / n (0 when n = 0)


class WhitenStats(NamedTuple):
    """What the output needs per selection: out = (x·inv_scale − pivot − correction) / spread (+ mean)."""

    inv_scale: torch.Tensor
    pivot: torch.Tensor
    correction: torch.Tensor  # c = Σ(x/P − μ₀)·m / n
    spread: torch.Tensor  # √(var + eps) / P
    mean: torch.Tensor  # μ = P·(μ₀ + c)


def exponent_of(amax: torch.Tensor) -> torch.Tensor:
    """int32 exponent field e of P = 2^(e − 127) ≤ amax (amax ≥ 0, fp32), clamped (NaN/inf: the top)."""
    field = (amax.view(torch.int32) >> EXPONENT_SHIFT) & EXPONENT_FIELD
    return field.clamp(EXPONENT_MIN, EXPONENT_MAX)


def _power_of_two(field: torch.Tensor) -> torch.Tensor:
    """2^(field − 127) as fp32, exact, for an int32 field in [1, 254]; 0 for a field ≤ 0."""
    return (field.clamp_min(0) << EXPONENT_SHIFT).view(torch.float32)


def combine_pivots(
    count: torch.Tensor, exponent: torch.Tensor, total: torch.Tensor, per_row: bool
) -> Pivot:
    """Step 1 from per-row ``count`` n_b, ``exponent`` e_b and ``total`` Σ(x/P_b)·m [rows]; all rows
    together (rescaled to the largest P, exactly) unless ``per_row``."""
    if not per_row:
        top = exponent.amax(0, keepdim=True)
        total = (total * _power_of_two(EXPONENT_BIAS + exponent - top)).sum(0, keepdim=True)
        count, exponent = count.sum(0, keepdim=True), top
    pivot = total / torch.where(count > 0, count, 1.0)
    return Pivot(count, _power_of_two(2 * EXPONENT_BIAS - exponent), pivot)


def finish_stats(
    pivot: Pivot, centred: torch.Tensor, square: torch.Tensor, unbiased: bool, eps: float, per_row: bool
) -> WhitenStats:
    """Steps 2-3 from per-row ``centred`` Σd·m and ``square`` Σd²·m [rows] (d = x/P − μ₀)."""
    if not per_row:
        centred, square = centred.sum(0, keepdim=True), square.sum(0, keepdim=True)
    count = pivot.count
    correction = centred / torch.where(count > 0, count, 1.0)
    m2 = (square - centred * correction).clamp_min(0.0)
    denom = count - 1.0 if unbiased else count
    var = torch.where(denom > 0, m2 / torch.where(denom > 0, denom, 1.0), 0.0)
    spread = torch.hypot(var.sqrt(), eps**0.5 * pivot.inv_scale)  # √(var/P² + eps/P²), see step 3
    # A floor where eps > 0, so that no divisor is 0 or subnormal: a selection without spread keeps
    # 0 / spread = 0 when √eps/P is below fp32's range (eps = 1e-8, |x| ≳ 1e34), and eps = 0 keeps the
    # formula's 0/0 = NaN.  A positive var/P² is far above the floor (the deviations are multiples of
    # fp32 steps of x/P); only var forced to 0 (unbiased, n ≤ 1) with spread there is affected, where
    # (x − μ)/√eps exceeds fp32's range anyway.
    spread = spread.clamp_min(FP32_MIN_NORMAL if eps > 0 else 0.0)
    mean = (pivot.pivot + correction) / pivot.inv_scale
    return WhitenStats(pivot.inv_scale, pivot.pivot, correction, spread, mean)


def _weighted_row_sum(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.sum(-1) if weights is None else torch.linalg.vecdot(values, weights)


def _masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    """The three steps on [R, C] in plain PyTorch, per row and then combined, as the Triton kernels do;
    in place on one fp32 copy of x (zeroed where m = 0, so garbage there is never read)."""
    if mask.dtype == torch.bool:
        valid, weights = mask, None  # weights 1: no conversion at all
        count = valid.sum(-1, dtype=torch.float32)
    else:
        weights = mask.to(torch.float32)
        valid = weights != 0
        weights = torch.where(valid, weights, 0.0)
        count = weights.sum(-1)
    scaled = torch.where(valid, x.to(torch.float32), 0.0)
    exponent = exponent_of(torch.maximum(scaled.amax(-1), -scaled.amin(-1)))
    row_inv_scale = _power_of_two(2 * EXPONENT_BIAS - exponent)
    scaled.mul_(row_inv_scale.unsqueeze(-1))  # x/P per row: exact
    pivot = combine_pivots(count, exponent, _weighted_row_sum(scaled, weights), per_row)
    if not per_row:
        scaled.mul_((pivot.inv_scale / row_inv_scale).unsqueeze(-1))  # to the common P: exact
    dev = scaled.sub_(pivot.pivot.unsqueeze(-1)).mul_(valid)  # x/P − μ₀ where m ≠ 0, else 0
    centred = _weighted_row_sum(dev, weights)
    square = torch.linalg.vecdot(dev, dev if weights is None else dev * weights)
    stats = finish_stats(pivot, centred, square, unbiased, eps, per_row)
    dev.sub_(stats.correction.unsqueeze(-1)).div_(stats.spread.unsqueeze(-1))
    out = torch.where(valid, dev, 0.0)
    if not shift_mean:
        out.add_(stats.mean.unsqueeze(-1))
    return out


def _masked_whiten_fake(x, mask, shift_mean, unbiased, eps, per_row):
    return x.new_empty(x.shape, dtype=torch.float32)


masked_whiten_torch = torch_op("masked_whiten_torch", _masked_whiten, fake=_masked_whiten_fake)
