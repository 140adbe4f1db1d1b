"""Float64 oracles of the KL estimators and the KL loss (the one copy: token rewards use it too)."""

from __future__ import annotations

import torch

from .aggregation import agg_loss


def kl_penalty(logprobs, ref_logprobs, estimator="k1", *, old_logprobs=None):
    """k1 = lp − ref; abs = |lp − ref|; k2 = ½(lp − ref)²; k3 = clamp(e^d − d − 1, −10, 10) with
    d = clamp(ref − lp, −20, 20); float64, differentiable through autograd.  A trailing "+": the value of
    the named estimator, the gradient of k2 (straight-through); with ``old_logprobs``: value of the named
    estimator, gradient w·(lp − ref), w = min(e^{lp − old}, 10) detached (importance-weighted unbiased)."""
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
            old_logprobs=None):
    """agg(k(lp, ref), mask) with :func:`kl_penalty` and the aggregation oracle."""
    per_token = kl_penalty(logprobs, ref_logprobs, estimator, old_logprobs=old_logprobs)
    return agg_loss(per_token, mask, loss_agg, normalizer)
