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

Across processes (``process_group``, ``dim=None``): every rank finds its own n, mean and M2 as above and
sends them, in float64, in one ``all_reduce`` (each rank fills its row of a [world, 4] zero tensor: the
sum is a gather).  Every rank then merges the rows in the same order (Chan, Golub & LeVeque's parallel
formula M2 = Σ M2ᵢ + Σ nᵢ(μᵢ − μ)², in float64, exact beside fp32 rounding) and whitens its x with the
global statistics, expressed about the largest P of all ranks (:func:`global_stats`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

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
    var = _bessel_var(m2, count, unbiased)
    spread = _spread(var, eps, pivot.inv_scale)  # √(var/P² + eps/P²), see step 3
    mean = (pivot.pivot + correction) / pivot.inv_scale
    return WhitenStats(pivot.inv_scale, pivot.pivot, correction, spread, mean)


def _spread(var: torch.Tensor, eps: float, inv_scale: torch.Tensor) -> torch.Tensor:
    """√(var/P² + eps/P²) from var/P², floored where eps > 0 (see the comment in :func:`finish_stats`)."""
    spread = torch.hypot(var.sqrt(), eps**0.5 * inv_scale)
    # A floor where eps > 0, so that no divisor is 0 or subnormal: a selection without spread keeps
    # 0 / spread = 0 when √eps/P is below fp32's range (eps = 1e-8, |x| ≳ 1e34), and eps = 0 keeps the
    # formula's 0/0 = NaN.  A positive var/P² is far above the floor (the deviations are multiples of
    # fp32 steps of x/P); only var forced to 0 (unbiased, n ≤ 1) with spread there is affected, where
    # (x − μ)/√eps exceeds fp32's range anyway.
    return spread.clamp_min(FP32_MIN_NORMAL if eps > 0 else 0.0)


def _bessel_var(m2: torch.Tensor, count: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """M2 / n, or M2 / (n − 1) when unbiased; 0 for an empty selection (or unbiased n ≤ 1)."""
    denom = count - 1.0 if unbiased else count
    return torch.where(denom > 0, m2 / torch.where(denom > 0, denom, 1.0), 0.0)


def empty_moments(device: torch.device) -> tuple[Pivot, torch.Tensor, torch.Tensor]:
    """(pivot, Σd·m, Σd²·m) of an empty selection: n = 0, P = 2^-126 (the smallest)."""
    zero = torch.zeros(1, dtype=torch.float32, device=device)
    inv_scale = _power_of_two(torch.full((1,), 2 * EXPONENT_BIAS - EXPONENT_MIN, dtype=torch.int32,
                                         device=device))
    return Pivot(zero, inv_scale, zero), zero, zero


def global_stats(
    pivot: Pivot,
    centred: torch.Tensor,
    square: torch.Tensor,
    unbiased: bool,
    eps: float,
    group: dist.ProcessGroup,
) -> WhitenStats:
    """The statistics of the union of every rank's selection ([1] each, like ``per_row=False``), from
    this rank's ``pivot`` (all of its x) and its ``centred`` Σd·m, ``square`` Σd²·m [rows].

    One all_reduce of a [world, 4] float64 tensor (this rank's row: n, P, mean, M2), then the same
    float64 merge on every rank.  The result is expressed about the largest P of all ranks, so that no
    rank's scaled mean or spread leaves fp32's range (a rank of zeros has P = 2^-126)."""
    f64 = torch.float64
    count = pivot.count.to(f64)
    scale = 1.0 / pivot.inv_scale.to(f64)  # P, exact
    centred, square = centred.to(f64).sum(0, keepdim=True), square.to(f64).sum(0, keepdim=True)
    correction = centred / torch.where(count > 0, count, 1.0)
    m2 = (square - centred * correction).clamp_min(0.0)
    mean = (pivot.pivot.to(f64) + correction) * scale
    rows = torch.zeros(dist.get_world_size(group), 4, dtype=f64, device=count.device)
    rows[dist.get_rank(group)] = torch.cat([count, scale, mean, m2 * scale * scale])
    dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
    n_i, p_i, mean_i, m2_i = rows.unbind(1)
    n = n_i.sum(0, keepdim=True)
    mu = (n_i * mean_i).sum(0, keepdim=True) / torch.where(n > 0, n, 1.0)
    m2 = m2_i.sum(0, keepdim=True) + (n_i * (mean_i - mu).square()).sum(0, keepdim=True)
    inv_scale = 1.0 / p_i.amax(0, keepdim=True)  # 1/P of the largest P, exact
    var = _bessel_var(m2 * inv_scale * inv_scale, n, unbiased)  # var/P²
    scaled_mean = mu * inv_scale
    pivot32 = scaled_mean.float()
    f32 = torch.float32
    return WhitenStats(
        inv_scale.to(f32),
        pivot32,
        (scaled_mean - pivot32.to(f64)).to(f32),
        _spread(var, eps, inv_scale).to(f32),
        mu.to(f32),
    )


def _weighted_row_sum(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.sum(-1) if weights is None else torch.linalg.vecdot(values, weights)


def _moments(x: torch.Tensor, mask: torch.Tensor, per_row: bool):
    """Steps 1-2 on [R, C]: (valid, d = x/P − μ₀ where valid else 0, pivot, Σd·m and Σd²·m per row), on
    one fp32 copy of x (zeroed where m = 0, so garbage there is never read)."""
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
    return valid, dev, pivot, centred, square


def _finish_output(dev: torch.Tensor, valid: torch.Tensor, stats: WhitenStats, shift_mean: bool):
    """Step 3 in place on d = x/P − μ₀ (about the P and μ₀ of ``stats``)."""
    dev.sub_(stats.correction.unsqueeze(-1)).div_(stats.spread.unsqueeze(-1))
    out = torch.where(valid, dev, 0.0)
    if not shift_mean:
        out.add_(stats.mean.unsqueeze(-1))
    return out


def _masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    """The three steps on [R, C] in plain PyTorch, per row and then combined, as the Triton kernels do;
    in place on one fp32 copy of x."""
    valid, dev, pivot, centred, square = _moments(x, mask, per_row)
    stats = finish_stats(pivot, centred, square, unbiased, eps, per_row)
    return _finish_output(dev, valid, stats, shift_mean)


def masked_whiten_global(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool,
    unbiased: bool,
    eps: float,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """:func:`_masked_whiten` of all of x with the statistics of every rank's x together
    (:func:`global_stats`); eager only (a collective), not a registered op."""
    if x.numel() == 0:  # nothing here, but the other ranks wait for this rank's row
        global_stats(*empty_moments(x.device), unbiased, eps, group)
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    valid, _, pivot, centred, square = _moments(x, mask, per_row=False)
    stats = global_stats(pivot, centred, square, unbiased, eps, group)
    dev = torch.where(valid, x.to(torch.float32), 0.0).mul_(stats.inv_scale).sub_(stats.pivot)
    return _finish_output(dev, valid, stats, shift_mean)


def _masked_whiten_fake(x, mask, shift_mean, unbiased, eps, per_row):
    return x.new_empty(x.shape, dtype=torch.float32)


masked_whiten_torch = torch_op("masked_whiten_torch", _masked_whiten, fake=_masked_whiten_fake)
