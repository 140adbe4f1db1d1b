"""Float64 oracle of ``rollout_correction`` (and ``bypass_mode_policy_loss``), written row by row from the
formulas of docs/rollout_correction.md: Python loops over rows and boolean indexing, no shared code with
``ops/rollout_correction.py``.  Slow and simple on purpose."""

from __future__ import annotations

import math

import torch

from . import policy_losses as ref_losses

BOUND = 20.0
K1_OPTIONS = ("token_k1", "seq_sum_k1", "seq_mean_k1")


def _f(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _std_unbiased(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mu = _mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


def _population_std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mu = _mean(values)
    return math.sqrt(_mean([(v - mu) ** 2 for v in values]))


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def rollout_correction(logprobs, rollout_logprobs, mask, *, level="token", threshold=2.0, rejection=None,
                       batch_normalize=False):
    lp_all = logprobs.detach().double().cpu()
    ro_all = rollout_logprobs.detach().double().cpu()
    valid = (mask != 0).cpu()
    B, T = lp_all.shape
    rows = [[t for t in range(T) if valid[b, t]] for b in range(B)]
    ratio = [[float(lp_all[b, t] - ro_all[b, t]) for t in rows[b]] for b in range(B)]  # ℓ per valid token
    tokens = [x for r in ratio for x in r]
    row_sum = [sum(r) for r in ratio]  # S_b (0 for an empty row)
    n = len(tokens)
    clamp = lambda x: min(max(x, -BOUND), BOUND)  # noqa: E731
    metrics: dict[str, float] = {}

    weights = torch.zeros(B, T, dtype=torch.float64)
    if level is not None:
        lower, upper = (threshold if isinstance(threshold, tuple) else (None, threshold))
        low = 1.0 / upper if lower is None else lower
        raw = [[_exp(clamp(x)) for x in r] if level == "token" else [_exp(clamp(row_sum[b]))] * len(r)
               for b, r in enumerate(ratio)]
        if lower is None:
            w = [[min(x, upper) if x == x else x for x in r] for r in raw]
        else:
            w = [[0.0 if (x < lower or x > upper) else x for x in r] for r in raw]
        flat_w = [x for r in w for x in r]
        flat_raw = [x for r in raw for x in r]
        metrics["rollout_is_mean"] = _mean(flat_w)
        if level == "token":
            metrics["rollout_is_ratio_fraction_high"] = _mean([float(x > upper) for x in flat_raw])
            metrics["rollout_is_ratio_fraction_low"] = _mean([float(x < low) for x in flat_raw])
            metrics["rollout_is_max"] = max(flat_w) if flat_w else 0.0
            metrics["rollout_is_min"] = min(flat_w) if flat_w else 0.0
        else:
            metrics["rollout_is_max"] = _exp(min(max(row_sum), BOUND))
            metrics["rollout_is_min"] = _exp(min(row_sum))
            metrics["rollout_is_ratio_fraction_high"] = _mean([float(s > math.log(upper)) for s in row_sum])
            metrics["rollout_is_ratio_fraction_low"] = _mean([float(s < math.log(low)) for s in row_sum])
        metrics["rollout_is_std"] = _population_std(flat_w)
        mean_sq = _mean([x * x for x in flat_w])
        metrics["rollout_is_eff_sample_size"] = (_mean(flat_w) + 1e-8) ** 2 / mean_sq if mean_sq > 0 else 0.0
        row_w = [_mean(r) for r in w]
        row_raw = [_mean(r) for r in raw]
        metrics["rollout_is_seq_mean"] = _mean(row_w)
        metrics["rollout_is_seq_std"] = _std_unbiased(row_w)
        metrics["rollout_is_seq_max"] = max(row_w)
        metrics["rollout_is_seq_min"] = min(row_w)
        metrics["rollout_is_seq_max_deviation"] = max(abs(x - 1.0) for x in row_w)
        metrics["rollout_is_seq_fraction_high"] = _mean([float(x > upper) for x in row_raw])
        metrics["rollout_is_seq_fraction_low"] = _mean([float(x < low) for x in row_raw])
        if lower is not None:
            metrics["rollout_is_oob_ratio"] = _mean([float(x < lower or x > upper) for x in flat_raw])
        if batch_normalize:
            mu = _mean(flat_w) if level == "token" else _mean([row_w[b] for b in range(B) if rows[b]])
            factor = mu if mu > 1e-8 else 1.0
            w = [[x / factor for x in r] for r in w]
            metrics["rollout_is_batch_norm_factor"] = factor
        for b in range(B):
            for t, x in zip(rows[b], w[b]):
                weights[b, t] = x

    keep = valid.clone()
    if rejection:
        kinds = {
            "k1": lambda x: -clamp(x),
            "k2": lambda x: 0.5 * clamp(x) ** 2,
            "k3": lambda x: _exp(clamp(x)) - 1.0 - clamp(x),
        }
        final_keep = [[True] * len(r) for r in ratio]
        for option, spec in rejection.items():
            k1 = option in K1_OPTIONS
            if k1:
                lo, up = spec if isinstance(spec, tuple) else (1.0 / spec, spec)
                lo, up = math.log(lo), math.log(up)
            else:
                lo, up = 0.0, spec
            ok = (lambda s, lo=lo, up=up: lo <= s <= up) if k1 else (lambda s, up=up: s <= up)
            k = [[kinds[option[-2:]](x) for x in r] for r in ratio]
            if option.startswith("token"):
                tok_stat = k
                seq_values = [_mean(r) for r in k]
                kept = [[ok(x) for x in r] for r in k]
            else:
                if option.startswith("seq_sum"):
                    seq_values = [sum(r) for r in k]
                elif option.startswith("seq_mean"):
                    seq_values = [_mean(r) for r in k]
                else:
                    seq_values = [max(r) if r else 0.0 for r in k]
                tok_stat = [[seq_values[b]] * len(r) for b, r in enumerate(k)]
                kept = [[ok(seq_values[b])] * len(r) for b, r in enumerate(k)]
            flat = [x for r in tok_stat for x in r]
            valid_seq = [seq_values[b] for b in range(B) if rows[b]]
            p = f"rollout_rs_{option}"
            metrics[f"{p}_mean"] = _mean(flat)
            if option.startswith("token"):
                metrics[f"{p}_max"] = max(flat) if flat else 0.0
                metrics[f"{p}_min"] = min(flat) if flat else 0.0
                metrics[f"{p}_fraction_high"] = _mean([float(x > up) for x in flat])
                metrics[f"{p}_fraction_low"] = _mean([float(x < lo) for x in flat]) if k1 else 0.0
            else:
                metrics[f"{p}_max"] = max(valid_seq) if valid_seq else 0.0
                metrics[f"{p}_min"] = min(valid_seq) if valid_seq else 0.0
                metrics[f"{p}_fraction_high"] = _mean([float(x > up) for x in valid_seq])
                metrics[f"{p}_fraction_low"] = _mean([float(x < lo) for x in valid_seq]) if k1 else 0.0
            metrics[f"{p}_std"] = _population_std([min(max(x, lo), up) for x in flat])
            metrics[f"{p}_seq_mean"] = _mean(valid_seq)
            metrics[f"{p}_seq_std"] = _std_unbiased(valid_seq)
            metrics[f"{p}_seq_max"] = max(valid_seq) if valid_seq else 0.0
            metrics[f"{p}_seq_min"] = min(valid_seq) if valid_seq else 0.0
            metrics[f"{p}_seq_max_deviation"] = max(abs(x) for x in valid_seq) if valid_seq else 0.0
            metrics[f"{p}_seq_fraction_high"] = _mean([float(x > up) for x in valid_seq])
            if k1:
                metrics[f"{p}_seq_fraction_low"] = _mean([float(x < lo) for x in valid_seq])
            metrics[f"{p}_masked_fraction"] = _mean([float(not x) for r in kept for x in r])
            seq_masked = [float(not all(kept[b])) for b in range(B) if rows[b]]
            metrics[f"{p}_seq_masked_fraction"] = _mean(seq_masked)
            final_keep = [[a and c for a, c in zip(fr, kr)] for fr, kr in zip(final_keep, kept)]
        metrics["rollout_rs_masked_fraction"] = _mean([float(not x) for r in final_keep for x in r])
        metrics["rollout_rs_seq_masked_fraction"] = _mean([float(not all(r)) for r in final_keep])
        for b in range(B):
            for t, x in zip(rows[b], final_keep[b]):
                keep[b, t] = x
    keep_mask = mask.cpu().masked_fill(~keep, 0)

    row_lp = [_mean([float(lp_all[b, t]) for t in rows[b]]) for b in range(B)]
    row_ro = [_mean([float(ro_all[b, t]) for t in rows[b]]) for b in range(B)]
    diff = [q - r for q, r in zip(row_ro, row_lp)]
    metrics.update({
        "training_ppl": _mean([_exp(-r) for r in row_lp]),
        "training_log_ppl": _mean([-r for r in row_lp]),
        "kl": _mean([-x for x in tokens]),
        "k3_kl": _mean([_exp(x) - x - 1.0 for x in tokens]),
        "rollout_ppl": _mean([_exp(-q) for q in row_ro]),
        "rollout_log_ppl": _mean([-q for q in row_ro]),
        "log_ppl_diff": _mean(diff),
        "log_ppl_abs_diff": _mean([abs(d) for d in diff]),
        "log_ppl_diff_max": max(diff),
        "log_ppl_diff_min": min(diff),
        "ppl_ratio": _mean([_exp(d) for d in diff]),
        "chi2_token": _mean([_exp(clamp(x)) ** 2 for x in tokens]) - 1.0,
        "chi2_seq": _mean([_exp(2.0 * clamp(s)) for s in row_sum]) - 1.0,
    })
    if n == 0:
        metrics = {key: 0.0 for key in metrics}
    return (weights if level is not None else None), keep_mask, {k: _f(v) for k, v in metrics.items()}


def bypass_mode_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, loss_type="ppo_clip", level=None, threshold=2.0,
    rejection=None, batch_normalize=False, clip_low=0.2, clip_high=None, dual_clip=3.0, is_weights=None,
    loss_agg="token-mean", normalizer=None,
):
    """verl's "bypass_mode": rollout correction of (logprobs, old_logprobs = the rollout's), then PPO-clip on
    the kept tokens without weights, or REINFORCE −A·lp·w on the kept tokens."""
    weights, keep, metrics = rollout_correction(
        logprobs, old_logprobs, mask, level=level, threshold=threshold, rejection=rejection,
        batch_normalize=batch_normalize,
    )
    if loss_type == "ppo_clip":
        loss, pg = ref_losses.POLICY_LOSSES["vanilla"](
            logprobs, old_logprobs, advantages, keep, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, loss_agg=loss_agg, normalizer=normalizer,
        )
    else:
        loss, pg = ref_losses.POLICY_LOSSES["gpg"](
            logprobs, old_logprobs, advantages, keep, is_weights=weights, loss_agg=loss_agg,
            normalizer=normalizer,
        )
        kept = keep.bool()
        diff = (old_logprobs.double() - logprobs.detach().double())[kept]
        pg = dict(pg, approx_kl=_f(diff.mean() if diff.numel() else 0.0))
    return loss, {**pg, **metrics}


def is_correction(old_logprobs, rollout_logprobs, mask, *, level="token", mode="mask", gating="ratio",
                  threshold=(0.5, 5.0)):
    """OpenRLHF's PolicyLoss coefficient, token by token in Python floats (see docs/rollout_correction.md)."""
    low, high = threshold if isinstance(threshold, tuple) else (0.0, threshold)
    old = old_logprobs.detach().double().cpu()
    ro = rollout_logprobs.detach().double().cpu()
    m = mask.double().cpu()
    B, T = old.shape
    clip = lambda x: min(max(x, 1e-6), 1 - 1e-6)  # noqa: E731

    def token_stat(b, t):
        ell = float(old[b, t] - ro[b, t])
        if gating == "ratio":
            return ell if level == "sequence" else _exp(ell)
        p, q = clip(_exp(float(ro[b, t]))), clip(_exp(float(old[b, t])))
        if gating == "binary_kl":
            return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        return abs(p - q)

    coef = torch.zeros(B, T, dtype=torch.float64)
    rejected_tokens, rejected_rows, tokens = 0.0, 0, 0.0
    for b in range(B):
        valid = [t for t in range(T) if m[b, t] != 0]
        if level == "sequence":
            weight = sum(float(m[b, t]) for t in valid)
            if not valid:
                rejected_rows += 1
                continue
            stat = sum(token_stat(b, t) * float(m[b, t]) for t in valid) / weight
            stat = _exp(stat) if gating == "ratio" else stat
            keep = low <= stat <= high
            rejected_rows += not keep
            for t in valid:
                coef[b, t] = _exp(float(old[b, t] - ro[b, t])) if keep else 0.0
            continue
        for t in valid:
            stat = token_stat(b, t)
            out = stat < low or stat > high
            if mode == "clip":
                coef[b, t] = min(max(stat, low), high)
            else:
                coef[b, t] = 0.0 if out else _exp(float(old[b, t] - ro[b, t]))
            rejected_tokens += float(m[b, t]) * out
            tokens += float(m[b, t])
    kl = sum(float((ro[b, t] - old[b, t]) * m[b, t]) for b in range(B) for t in range(T) if m[b, t] != 0)
    weight = float(m[m != 0].sum())
    filter_ratio = rejected_rows / B if level == "sequence" else (rejected_tokens / tokens if tokens else 0.0)
    return coef, {"vllm_kl": _f(kl / weight if weight else 0.0), "is_filter_ratio": _f(filter_ratio)}


def off_policy_mask(advantages, logprobs, sampling_logprobs, mask, threshold):
    """TRL's keep = (A ≥ 0) | (mean over valid tokens of (sampling − lp), NaN as 0, ≤ threshold)."""
    lp, sp, m = logprobs.double().cpu(), sampling_logprobs.double().cpu(), mask.double().cpu()
    B, T = lp.shape
    adv = advantages.double().cpu().reshape(B, -1)
    out = torch.zeros(adv.shape, dtype=torch.float64)
    for b in range(B):
        total = 0.0
        for t in range(T):
            if m[b, t] != 0:
                d = float(sp[b, t] - lp[b, t])
                total += (0.0 if d != d else d) * float(m[b, t])
        mean_kl = total / max(float(m[b].sum()), 1.0)
        for j in range(adv.shape[1]):
            out[b, j] = float(adv[b, j] >= 0 or mean_kl <= threshold)
    return out.to(mask.dtype)
