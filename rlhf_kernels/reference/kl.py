"""Float64 oracles of the KL estimators and the KL loss (the one copy: token rewards use it too)."""

from __future__ import annotations

import torch

from .aggregation import agg_loss


def kl_penalty(logprobs, ref_logprobs, estimator="k1", *, old_logprobs=None,
               kl_correction="unbiased_gradient"):
    """k1 = lp − ref; abs = |lp − ref|; k2 = ½(lp − ref)²; k3 = clamp(e^d − d − 1, −10, 10) with
    d = clamp(ref − lp, −20, 20); float64, differentiable through autograd.  A trailing "+": the value of
    the named estimator, the gradient of k2 (straight-through); with ``old_logprobs``: value of the named
    estimator, gradient w·(lp − ref), w = min(e^{lp − old}, 10) detached (importance-weighted unbiased);
    with ``kl_correction="bias_correction"``: k·e^{lp − old}, differentiated through both factors (TRL)."""
    if old_logprobs is not None and kl_correction == "bias_correction":
        value = kl_penalty(logprobs, ref_logprobs, estimator)
        return value * torch.exp(logprobs.double() - old_logprobs.double())
    if estimator.endswith("+") or old_logprobs is not None:
        value = kl_penalty(logprobs, ref_logprobs, estimator.rstrip("+")).detach()
        k2 = kl_penalty(logprobs, ref_logprobs, "k2")
        w = 1.0
        if old_logprobs is not None:
            w = torch.clamp(torch.exp(logprobs.double() - old_logprobs.double()), max=10.0).detach()
        return value + (w * k2 - (w * k2).detach())  # exactly value (a large one stays), gradient w·∂k2
    lp = logprobs.double()
    ref = ref_logprobs.double()
    if estimator == "k1":
        return lp - ref
    if estimator == "abs":
        return (lp - ref).abs()
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    if estimator in ("k3", "low_var_kl"):
        d = torch.clamp(ref - lp, -20, 20)
        return torch.clamp(torch.exp(d) - d - 1, -10, 10)
    raise ValueError(f"unknown estimator {estimator!r}")


def kl_loss(logprobs, ref_logprobs, mask, *, estimator="k3", loss_agg="token-mean", normalizer=None,
            old_logprobs=None, kl_correction="unbiased_gradient", importance_sampling_level="token"):
    """agg(k(lp, ref), mask) with :func:`kl_penalty` and the aggregation oracle; the sequence-level
    bias correction weights row b by exp(Σ_t (lp − old)·m / max(Σ_t m, 1)), summed row by row."""
    valid = mask != 0
    if importance_sampling_level == "sequence":
        per_token = kl_penalty(torch.where(valid, logprobs.double(), 0.0), ref_logprobs, estimator)
        rows = []
        for b in range(mask.shape[0]):
            m = [float(x) for x in mask[b]]
            total = sum((logprobs[b, t].double() - old_logprobs[b, t].double()) * m[t]
                        for t in range(len(m)) if m[t] != 0)
            one = torch.ones((), dtype=torch.float64)
            rows.append(torch.exp(total / max(sum(m), 1.0)) if any(m) else one)
        per_token = per_token * torch.stack(rows)[:, None]
        return agg_loss(per_token, mask, loss_agg, normalizer)
    per_token = kl_penalty(logprobs, ref_logprobs, estimator, old_logprobs=old_logprobs,
                           kl_correction=kl_correction)
    return agg_loss(per_token, mask, loss_agg, normalizer)
