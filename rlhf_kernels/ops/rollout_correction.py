"""Rollout-training mismatch correction (verl 0.9.1's ``rollout_corr_helper``): truncated importance
weights (TIS) or IcePop weights at token or sequence level, rejection sampling by k1/k2/k3 divergences
(token, sequence sum / mean / max, chained), optional batch normalisation, and verl's diagnostics.

Plain PyTorch: every quantity is an O(B·T) elementwise map followed by a masked row reduction (several
statistics stacked into one reduction where they are known at the same time) and O(B) batch reductions.
The op is memory-bound and far cheaper than the log-prob pass that produces its inputs, so it has no
Triton kernel and no dispatch entry.  Nothing reads a value back to the host: every branch verl takes
on data (``if weights_mean > 1e-8``, ``if mask_count > 1``, boolean indexing of valid rows) is a
``torch.where``, and metrics are 0-dim tensors.  docs/rollout_correction.md has the math and the mapping
to verl's config fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .._validation import FLOAT_DTYPES, check_choice, check_float_tensor, check_real, compute_dtype
from .aggregation import check_token_inputs
from .cpu.ppo_losses import LOG_RATIO_CLAMP

FAMILY = "rollout_correction"

Tensor = torch.Tensor
Threshold = float | tuple[float, float]

#: verl's SAFETY_BOUND: log-ratios (and sequence log-ratio sums) are clamped to ±20 before exp.
SAFETY_BOUND = LOG_RATIO_CLAMP
#: verl's ε in the effective sample size 1 / mean((w / (mean w + ε))²).
ESS_EPS = 1e-8
#: Batch normalisation divides by the mean weight only where it exceeds this (verl's guard).
NORMALIZE_MIN_MEAN = 1e-8
LEVELS = ("token", "sequence")
#: verl's SUPPORTED_ROLLOUT_RS_OPTIONS, in its documentation order.
REJECTION_OPTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)


# ---------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------
def _positive(name: str, value: object) -> float:
    value = check_real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def _bounds(name: str, value: object, pair_allowed: bool = True) -> tuple[float | None, float]:
    """(lower or None, upper) from a positive float upper bound or a (lower, upper) pair."""
    if isinstance(value, (tuple, list)) and pair_allowed:
        if len(value) != 2:
            raise ValueError(f"{name} must be an upper bound or a (lower, upper) pair; got {value!r}")
        lower, upper = _positive(f"{name} lower bound", value[0]), _positive(f"{name} upper bound", value[1])
        if lower > upper:
            raise ValueError(f"{name} must have lower <= upper; got ({lower}, {upper})")
        return lower, upper
    if isinstance(value, (tuple, list)):
        raise ValueError(f"{name} takes a single upper bound (only k1 options take a pair); got {value!r}")
    return None, _positive(name, value)


def _rejection_rules(rejection: object) -> list[tuple[str, float, float]]:
    """[(option, lower, upper)]: lower/upper are log-ratio bounds (log of the ratio bounds) for k1 options,
    (0, upper) for k2/k3 ones."""
    if rejection is None:
        return []
    if not isinstance(rejection, Mapping) or not rejection:
        raise TypeError(
            "rejection must be None or a non-empty mapping {option: threshold}, option one of "
            f"{REJECTION_OPTIONS}; got {rejection!r}"
        )
    rules = []
    for option, spec in rejection.items():
        if option not in REJECTION_OPTIONS:
            raise ValueError(f"rejection option must be one of {REJECTION_OPTIONS}; got {option!r}")
        name = f"rejection[{option!r}]"
        if option.endswith("k1"):
            lower, upper = _bounds(name, spec)
            lower = 1.0 / upper if lower is None else lower  # verl: a single bound u means [1/u, u]
            rules.append((option, math.log(lower), math.log(upper)))
        else:
            rules.append((option, 0.0, _bounds(name, spec, pair_allowed=False)[1]))
    return rules


# ---------------------------------------------------------------------------------------------------
# Masked reductions (valid = mask != 0; masked positions contribute exactly 0 whatever they hold)
# ---------------------------------------------------------------------------------------------------
class _Masked:
    def __init__(self, mask: Tensor, dtype: torch.dtype) -> None:
        self.valid = mask != 0
        self.m = torch.where(self.valid, mask.to(dtype), 0.0)
        self.row_count = self.m.sum(-1)  # n_b
        self.count = self.row_count.sum()  # N
        self.row_valid = self.row_count > 0
        self.valid_rows = self.row_valid.to(dtype).sum()
        self.dtype = dtype

    def zero(self, x: Tensor) -> Tensor:
        return torch.where(self.valid, x, 0.0)

    def row_sums(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """Σ_t x·m of each x, in one stacked reduction."""
        stacked = torch.stack([x.to(self.dtype).expand(self.m.shape) for x in xs])
        return tuple(torch.where(self.valid, stacked * self.m, 0.0).sum(-1).unbind(0))

    def row_means(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(s / self.row_count.clamp(min=1.0) for s in self.row_sums(*xs))

    def means(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """Token means Σ x·m / max(N, 1)."""
        return tuple(s.sum() / self.count.clamp(min=1.0) for s in self.row_sums(*xs))

    def max(self, x: Tensor) -> Tensor:
        return torch.where(self.valid, x, -math.inf).amax()

    def min(self, x: Tensor) -> Tensor:
        return torch.where(self.valid, x, math.inf).amin()

    def std(self, x: Tensor) -> Tensor:
        """Population std of x over valid tokens, 0 unless N > 1.  verl computes E[x²] − E[x]² (clamped at
        0); the centred form is the same quantity without the cancellation (whose rounding the square root
        amplifies to ~1e-4·|x| in fp32 when x is constant)."""
        (mean,) = self.means(x)
        (var,) = self.means((x - mean) ** 2)
        return torch.where(self.count > 1, var.sqrt(), 0.0)

    # over the rows with at least one valid token
    def rows_mean(self, r: Tensor) -> Tensor:
        return torch.where(self.row_valid, r.to(self.dtype), 0.0).sum() / self.valid_rows.clamp(min=1.0)

    def rows_max(self, r: Tensor) -> Tensor:
        return torch.where(self.row_valid, r, -math.inf).amax()

    def rows_min(self, r: Tensor) -> Tensor:
        return torch.where(self.row_valid, r, math.inf).amin()

    def rows_std(self, r: Tensor) -> Tensor:
        """Unbiased std over valid rows (torch.std), 0 unless there are at least two."""
        centred = torch.where(self.row_valid, r - self.rows_mean(r), 0.0)
        var = (centred * centred).sum() / (self.valid_rows - 1).clamp(min=1.0)
        return torch.where(self.valid_rows > 1, var.sqrt(), 0.0)


def _masked_inputs(mask: Tensor, x: Tensor, y: Tensor) -> tuple[_Masked, Tensor, Tensor]:
    """(the mask's reductions in the compute dtype of x and y; x, y detached in it, 0 where masked)."""
    b = _Masked(mask, compute_dtype(x, y))
    return b, b.zero(x.detach().to(b.dtype)), b.zero(y.detach().to(b.dtype))


def _all_rows_std(r: Tensor) -> Tensor:
    """torch.std over all B rows (unbiased), 0 for B = 1."""
    return r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)


# ---------------------------------------------------------------------------------------------------
# The three parts: IS weights, rejection, off-policy diagnostics
# ---------------------------------------------------------------------------------------------------
def _is_weights(
    b: _Masked, log_ratio: Tensor, seq_log_ratio: Tensor, level: str, lower: float | None, upper: float,
    batch_normalize: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    if level == "token":
        raw = b.zero(torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)))
    else:
        raw = b.zero(torch.exp(seq_log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))[:, None].expand(b.m.shape))
    if lower is None:  # TIS (comparisons keep NaN)
        weights = torch.where(raw > upper, upper, raw)
    else:  # IcePop
        weights = torch.where((raw < lower) | (raw > upper), 0.0, raw)
    low = 1.0 / upper if lower is None else lower
    mean_w, mean_w2, high_frac, low_frac, oob = b.means(
        weights, weights * weights, raw > upper, raw < low, (raw < low) | (raw > upper)
    )
    metrics = {"rollout_is_mean": mean_w}
    if level == "token":
        metrics["rollout_is_ratio_fraction_high"] = high_frac
        metrics["rollout_is_ratio_fraction_low"] = low_frac
        metrics["rollout_is_max"] = b.max(weights)
        metrics["rollout_is_min"] = b.min(weights)
    else:  # over all B rows, an empty row's log-ratio sum being 0 (verl)
        metrics["rollout_is_max"] = torch.exp(seq_log_ratio.amax().clamp(max=SAFETY_BOUND))
        metrics["rollout_is_min"] = torch.exp(seq_log_ratio.amin())
        metrics["rollout_is_ratio_fraction_high"] = (seq_log_ratio > math.log(upper)).to(b.dtype).mean()
        metrics["rollout_is_ratio_fraction_low"] = (seq_log_ratio < math.log(low)).to(b.dtype).mean()
    # the weights are already in [0, upper]: verl's clamp before std / ESS changes nothing
    metrics["rollout_is_std"] = b.std(weights)
    metrics["rollout_is_eff_sample_size"] = torch.where(
        mean_w2 > 0, (mean_w + ESS_EPS) ** 2 / mean_w2, 0.0  # 0 where every weight is 0 (verl divides by 0)
    )
    row_w, row_raw = b.row_means(weights, raw)  # over all B rows, an empty row's mean being 0 (verl)
    metrics["rollout_is_seq_mean"] = row_w.mean()
    metrics["rollout_is_seq_std"] = _all_rows_std(row_w)
    metrics["rollout_is_seq_max"] = row_w.amax()
    metrics["rollout_is_seq_min"] = row_w.amin()
    metrics["rollout_is_seq_max_deviation"] = (row_w - 1.0).abs().amax()
    metrics["rollout_is_seq_fraction_high"] = (row_raw > upper).to(b.dtype).mean()
    metrics["rollout_is_seq_fraction_low"] = (row_raw < low).to(b.dtype).mean()
    if lower is not None:
        metrics["rollout_is_oob_ratio"] = oob
    if batch_normalize:
        mean = mean_w if level == "token" else b.rows_mean(row_w)
        normalizes = mean > NORMALIZE_MIN_MEAN
        weights = torch.where(normalizes, weights / torch.where(normalizes, mean, 1.0), weights)
        metrics["rollout_is_batch_norm_factor"] = torch.where(normalizes, mean, 1.0)
    return weights, metrics


def _passes(stat: Tensor, is_k1: bool, lower: float, upper: float) -> Tensor:
    """k1 keeps lower ≤ stat ≤ upper (log-ratio bounds), k2/k3 keep stat ≤ upper; NaN fails both."""
    return (stat >= lower) & (stat <= upper) if is_k1 else stat <= upper


def _rejection(
    b: _Masked, log_ratio: Tensor, rules: list[tuple[str, float, float]]
) -> tuple[Tensor, dict[str, Tensor]]:
    """(keep [B, T] bool, metrics): a token is kept when every option keeps it (or it is masked)."""
    clamped = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    divergences = {
        "k1": -clamped, "k2": 0.5 * clamped * clamped, "k3": torch.exp(clamped) - 1.0 - clamped
    }
    keep_all = torch.ones_like(b.valid)
    metrics: dict[str, Tensor] = {}
    for option, lower, upper in rules:
        k = divergences[option[-2:]]
        is_k1 = option.endswith("k1")
        if option.startswith("token"):
            token_stat, row_stat = k, b.row_means(k)[0]
            keep = _passes(k, is_k1, lower, upper)
        else:
            if option.startswith("seq_sum"):
                row_stat = b.row_sums(k)[0]
            elif option.startswith("seq_mean"):
                row_stat = b.row_means(k)[0]
            else:
                row_stat = torch.where(b.row_valid, torch.where(b.valid, k, -math.inf).amax(-1), 0.0)
            token_stat = row_stat[:, None].expand(b.m.shape)
            keep = _passes(row_stat, is_k1, lower, upper)[:, None].expand(b.m.shape)
        p = f"rollout_rs_{option}"
        mean, high, low, rejected = b.means(token_stat, token_stat > upper, token_stat < lower, ~keep)
        metrics[f"{p}_mean"] = mean
        if option.startswith("token"):
            metrics[f"{p}_max"], metrics[f"{p}_min"] = b.max(k), b.min(k)
            metrics[f"{p}_fraction_high"] = high
            metrics[f"{p}_fraction_low"] = low if is_k1 else torch.zeros_like(high)
        else:
            metrics[f"{p}_max"], metrics[f"{p}_min"] = b.rows_max(row_stat), b.rows_min(row_stat)
            metrics[f"{p}_fraction_high"] = b.rows_mean(row_stat > upper)
            metrics[f"{p}_fraction_low"] = b.rows_mean(row_stat < lower) if is_k1 else torch.zeros_like(high)
        metrics[f"{p}_std"] = b.std(token_stat.clamp(min=lower, max=upper))
        metrics[f"{p}_seq_mean"] = b.rows_mean(row_stat)
        metrics[f"{p}_seq_std"] = b.rows_std(row_stat)
        metrics[f"{p}_seq_max"] = b.rows_max(row_stat)
        metrics[f"{p}_seq_min"] = b.rows_min(row_stat)
        metrics[f"{p}_seq_max_deviation"] = b.rows_max(row_stat.abs())
        metrics[f"{p}_seq_fraction_high"] = b.rows_mean(row_stat > upper)
        if is_k1:
            metrics[f"{p}_seq_fraction_low"] = b.rows_mean(row_stat < lower)
        metrics[f"{p}_masked_fraction"] = rejected
        metrics[f"{p}_seq_masked_fraction"] = b.rows_mean((~keep & b.valid).any(-1))
        keep_all = keep_all & keep
    if rules:
        metrics["rollout_rs_masked_fraction"] = b.means(~keep_all)[0]
        metrics["rollout_rs_seq_masked_fraction"] = (~keep_all & b.valid).any(-1).to(b.dtype).mean()
    return keep_all, metrics


def _off_policy_metrics(
    b: _Masked, logprobs: Tensor, rollout_logprobs: Tensor, log_ratio: Tensor, seq_log_ratio: Tensor
) -> dict[str, Tensor]:
    """verl's compute_offpolicy_metrics; row means over all B rows (an empty row's mean being 0)."""
    clamped = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    row_lp, row_rollout = b.row_means(logprobs, rollout_logprobs)
    kl, k3, rho_square = b.means(-log_ratio, torch.exp(log_ratio) - log_ratio - 1.0, torch.exp(clamped) ** 2)
    diff = row_rollout - row_lp
    return {
        "training_ppl": torch.exp(-row_lp).mean(),
        "training_log_ppl": (-row_lp).mean(),
        "kl": kl,
        "k3_kl": k3,
        "rollout_ppl": torch.exp(-row_rollout).mean(),
        "rollout_log_ppl": (-row_rollout).mean(),
        "log_ppl_diff": diff.mean(),
        "log_ppl_abs_diff": diff.abs().mean(),
        "log_ppl_diff_max": diff.amax(),
        "log_ppl_diff_min": diff.amin(),
        "ppl_ratio": torch.exp(diff).mean(),
        "chi2_token": rho_square - 1.0,
        "chi2_seq": torch.exp(2.0 * seq_log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean() - 1.0,
    }


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------
def rollout_correction(
    logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, level: str | None = "token",
    threshold: Threshold = 2.0, rejection: Mapping[str, Threshold] | None = None,
    batch_normalize: bool = False,
) -> tuple[Tensor | None, Tensor, dict[str, Tensor]]:
    """Importance weights, rejection mask and diagnostics for the mismatch between the training policy
    (``logprobs``) and the rollout engine (``rollout_logprobs``): verl's
    ``compute_rollout_correction_and_rejection_mask``.

    Shapes: ``logprobs``, ``rollout_logprobs`` [B, T] of one floating dtype, ``mask`` [B, T] (bool, integer
    or floating 0/1).  With ℓ = logprobs − rollout_logprobs, ℓ̂ = clamp(ℓ, ±20) and S_b = Σ_t ℓ·m:

    - ``level="token"``: w = e^ℓ̂; ``"sequence"``: w = e^{clamp(S_b, ±20)} on every token of row b; ``None``:
      no weights (``is_weights`` is None).  ``threshold=u`` truncates (TIS): min(w, u);
      ``threshold=(lo, u)`` is IcePop: w where lo ≤ w ≤ u, else 0.  ``batch_normalize`` divides by the
      mean weight (over tokens; over valid rows' means at sequence level) where that mean exceeds 1e-8.
    - ``rejection={"token_k1": (0.5, 2.0), "seq_mean_k3": 0.01, ...}`` (any of ``REJECTION_OPTIONS``,
      chained: a token is kept when every option keeps it) with k1 = −ℓ̂, k2 = ½ℓ̂², k3 = e^ℓ̂ − 1 − ℓ̂ per
      token, summed / averaged / maxed over a row for ``seq_*``; k2/k3 keep stat ≤ u, k1 keeps
      log lo ≤ stat ≤ log u (a single u means lo = 1/u).  Token IS with sequence rejection is fine.

    Returns ``(is_weights, keep_mask, metrics)``: weights [B, T] in the dtype of ``logprobs`` (0 at masked
    positions, no gradient), ``keep_mask`` = ``mask`` with rejected tokens set to 0 (mask's dtype; a copy
    of ``mask`` without ``rejection``) and verl's metrics under verl's names without the
    ``rollout_corr/`` prefix, as 0-dim tensors in the compute dtype (fp32; fp64 for fp64 inputs).
    Masked positions never matter, whatever they hold.  A batch without a valid token gives all-zero
    weights, ``keep_mask`` = ``mask`` and every metric 0 (verl raises); the effective sample size is 0
    when every weight is 0 (verl divides by zero).  Example: one row ℓ = (0.1, 3.0), m = (1, 1),
    level "token", threshold 2: weights (e^0.1, 2.0).
    """
    check_token_inputs(mask, logprobs=logprobs, rollout_logprobs=rollout_logprobs)
    if level is not None:
        check_choice("level", level, LEVELS)
    lower, upper = _bounds("threshold", threshold)
    rules = _rejection_rules(rejection)
    if not isinstance(batch_normalize, bool):
        raise TypeError(f"batch_normalize must be a bool; got {type(batch_normalize).__name__}")
    with torch.no_grad():
        b, lp, rollout = _masked_inputs(mask, logprobs, rollout_logprobs)
        log_ratio = lp - rollout
        (seq_log_ratio,) = b.row_sums(log_ratio)
        metrics: dict[str, Tensor] = {}
        weights = None
        if level is not None:
            weights, metrics = _is_weights(b, log_ratio, seq_log_ratio, level, lower, upper, batch_normalize)
            weights = weights.to(logprobs.dtype)
        keep, rs_metrics = _rejection(b, log_ratio, rules)
        metrics.update(rs_metrics)
        metrics.update(_off_policy_metrics(b, lp, rollout, log_ratio, seq_log_ratio))
        has_tokens = b.count > 0
        metrics = {key: torch.where(has_tokens, value, 0.0) for key, value in metrics.items()}
        keep_mask = mask.masked_fill(~keep, 0) if rules else mask.clone()
    return weights, keep_mask, metrics


# ---------------------------------------------------------------------------------------------------
# OpenRLHF 0.11.2's PolicyLoss correction and TRL 1.16's off-policy sequence mask
# ---------------------------------------------------------------------------------------------------
IS_CORRECTION_MODES = ("mask", "clip")
IS_CORRECTION_GATINGS = ("ratio", "binary_kl", "tv")
#: OpenRLHF clamps both token probabilities to [1e-6, 1 − 1e-6] before the binary KL / TV statistics.
IS_CORRECTION_PROB_CLAMP = 1e-6


def _correction_threshold(threshold: object, gating: str) -> tuple[float, float]:
    if isinstance(threshold, (tuple, list)):
        if len(threshold) != 2:
            raise ValueError(f"threshold must be a (low, high) pair or an upper bound; got {threshold!r}")
        low, high = check_real("threshold low", threshold[0]), check_real("threshold high", threshold[1])
    else:
        low, high = 0.0, check_real("threshold", threshold)
    if low > high:
        raise ValueError(f"threshold must have low <= high; got ({low}, {high})")
    if gating != "ratio" and low > 0:
        raise ValueError(
            f"gating={gating!r} takes an upper bound only (low <= 0); got threshold ({low}, {high})"
        )
    return low, high


def is_correction(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, level: str = "token",
    mode: str = "mask", gating: str = "ratio", threshold: Threshold = (0.5, 5.0),
) -> tuple[Tensor, dict[str, Tensor]]:
    """OpenRLHF 0.11.2's train/rollout importance-sampling correction of ``PolicyLoss``: a per-token
    coefficient that multiplies each token's policy loss (https://fengyao.notion.site/off-policy-rl).

    Shapes: ``old_logprobs`` (the trainer's log-probabilities of the sampled tokens), ``rollout_logprobs``
    (the rollout engine's) [B, T] floating; ``mask`` [B, T] bool / integer / floating.  With
    ℓ = old − rollout, a statistic per unit (token, or row for ``level="sequence"``):

    - ``gating="ratio"``: e^ℓ per token; per row e^{mean_t ℓ} (the masked geometric mean of the ratio).
    - ``"binary_kl"``: p·log(p/q) + (1−p)·log((1−p)/(1−q)) with p = e^rollout, q = e^old, both clamped to
      [1e-6, 1 − 1e-6]; ``"tv"``: |p − q|; per row, their masked mean.

    ``mode="mask"`` keeps a unit when low ≤ stat ≤ high, and its tokens' coefficient is the token ratio
    e^ℓ (0 for rejected units); ``mode="clip"`` (token level, ratio gating only) uses clamp(stat, low,
    high).  ``threshold``: (low, high) for the ratio; an upper bound δ (or (low ≤ 0, δ)) for the
    divergences.  Returns ``(coefficient, metrics)``: coefficient [B, T] in the compute dtype (fp32; fp64
    for fp64 inputs), 0 at masked positions, no gradient; metrics ``vllm_kl`` (masked mean of
    rollout − old) and ``is_filter_ratio`` (the masked fraction of rejected/clipped tokens; at sequence
    level the fraction of the B rows rejected, a row without valid tokens counting as rejected, as in
    OpenRLHF), 0-dim.  Masked positions never matter, whatever they hold; a batch without valid tokens
    gives 0 for ``vllm_kl`` and the token-level ``is_filter_ratio`` (OpenRLHF: NaN).  Example:
    ℓ = (0.1, 2.0), threshold (0.5, 5.0), token level, mask mode: coefficient (e^0.1, e^2.0); with
    threshold (0.5, 2.0): (e^0.1, 0).
    """
    check_token_inputs(mask, old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    check_choice("level", level, LEVELS)
    check_choice("mode", mode, IS_CORRECTION_MODES)
    check_choice("gating", gating, IS_CORRECTION_GATINGS)
    if mode == "clip" and (level != "token" or gating != "ratio"):
        raise ValueError(
            f"mode='clip' needs level='token' and gating='ratio'; got level={level!r}, gating={gating!r}"
        )
    low, high = _correction_threshold(threshold, gating)
    with torch.no_grad():
        b, old, rollout = _masked_inputs(mask, old_logprobs, rollout_logprobs)
        log_ratio = old - rollout
        sequence = level == "sequence"

        def row_mean(x: Tensor) -> Tensor:  # Σ x·m / Σ m (OpenRLHF's masked mean: no clamp of Σ m)
            return (b.row_sums(x)[0] / torch.where(b.row_valid, b.row_count, 1.0))[:, None]

        def token_mean(x: Tensor) -> Tensor:
            return b.row_sums(x)[0].sum() / torch.where(b.count > 0, b.count, 1.0)

        if gating == "ratio":
            stat = torch.exp(row_mean(log_ratio) if sequence else log_ratio)
        else:
            p = rollout.exp().clamp(IS_CORRECTION_PROB_CLAMP, 1 - IS_CORRECTION_PROB_CLAMP)
            q = old.exp().clamp(IS_CORRECTION_PROB_CLAMP, 1 - IS_CORRECTION_PROB_CLAMP)
            if gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if sequence:
                stat = row_mean(stat)
        if mode == "clip":
            coefficient = stat.clamp(min=low, max=high)
            rejected = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coefficient = torch.where(keep, log_ratio.exp(), 0.0)
            rejected = ~keep
        if sequence:
            flags = (rejected[:, 0] | ~b.row_valid).to(b.dtype)  # mean over rows; 0 for B = 0 (empty rule)
            filter_ratio = flags.sum() / max(flags.shape[0], 1)
        else:
            filter_ratio = token_mean(rejected)
        vllm_kl = token_mean(rollout - old)
        coefficient = b.zero(coefficient.expand(b.m.shape))
    return coefficient, {"vllm_kl": vllm_kl, "is_filter_ratio": filter_ratio}


def off_policy_mask(
    advantages: Tensor, logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, threshold: float,
) -> Tensor:
    """TRL 1.16's off-policy sequence mask (DeepSeek-V3.2, eq. 9; ``GRPOConfig.off_policy_mask_threshold``):
    drop a sequence whose advantage is negative and whose policy drifted from the sampler.

    Shapes: ``logprobs`` (current policy), ``sampling_logprobs`` (the sampler's: vLLM's, or the old
    policy's) [B, T] floating; ``mask`` [B, T]; ``advantages`` [B] (or [B, 1], or [B, T] for per-token
    advantages).  With D_b = Σ_t (sampling − logprobs)·m / max(Σ_t m, 1) (NaN log-ratios, tokens the
    sampler could not score, count as 0, as TRL's ``nan_to_num``):

        keep = (A ≥ 0) | (D_b ≤ threshold)

    Returns keep in ``mask``'s dtype, [B, 1] (or [B, T] for [B, T] advantages): multiply the per-token
    loss by it.  No gradient, no host sync.  Masked positions never matter, whatever they hold (TRL
    multiplies by the mask: ±inf there would poison the row's mean).  Example: A = (−1, −1, 2),
    D = (0.1, 0.9, 0.9), threshold 0.5: keep = (1, 0, 1).
    """
    check_token_inputs(mask, logprobs=logprobs, sampling_logprobs=sampling_logprobs)
    check_float_tensor("advantages", advantages, FLOAT_DTYPES + (torch.float64,))
    rows = logprobs.shape[0]
    if tuple(advantages.shape) in ((rows,), (rows, 1)):
        advantages = advantages.reshape(rows, 1)
    elif tuple(advantages.shape) != tuple(logprobs.shape):
        raise ValueError(
            f"advantages must have shape ({rows},), ({rows}, 1) or logprobs.shape = {tuple(logprobs.shape)}; "
            f"got {tuple(advantages.shape)}"
        )
    threshold = check_real("threshold", threshold)
    with torch.no_grad():
        b, lp, sampling = _masked_inputs(mask, logprobs, sampling_logprobs)
        kl = torch.nan_to_num(sampling - lp, nan=0.0)
        (mean_kl,) = b.row_means(kl)
        keep = (advantages >= 0) | (mean_kl[:, None] <= threshold)
    return keep.to(mask.dtype)
