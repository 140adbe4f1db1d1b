"""Thin adapters over the float64 oracles of ``rlhf_kernels/reference`` where an oracle itself hides a
NaN (each marked with the finding of issue 19 it works around, and the fix reported for the oracle)."""

from __future__ import annotations

import torch

from rlhf_kernels.reference import logprobs as ref_logprobs


def _nan_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows whose softmax is undefined: a NaN or +inf logit, or every logit −inf (the library gives NaN)."""
    z = logits.double() / temperature
    return (z.isnan() | (z == torch.inf)).any(-1) | (z == -torch.inf).all(-1)


def entropy_with_nan(logits: torch.Tensor, entropy: torch.Tensor, temperature: float) -> torch.Tensor:
    """FINDING (issue 19): ``reference/logprobs.py`` computes −Σ where(p > 0, p log p, 0), which turns a
    NaN p (a NaN or +inf logit, or a row of −inf) into a hidden 0.  Fix reported for the oracle: ``torch.where(p == 0, 0,
    p * log_p)``.  Until then the NaN rows are restored here."""
    return torch.where(_nan_rows(logits, temperature), torch.nan, entropy)


def logprobs_oracle(logits, labels, *, temperature, ignore_index, return_entropy):
    out = ref_logprobs.logprobs_from_logits(
        logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
    if not return_entropy:
        return [out]
    logprobs, entropy = out
    entropy = entropy_with_nan(logits, entropy, temperature).masked_fill(labels == ignore_index, 0.0)
    return [logprobs, entropy]


def kl_penalty_oracle(logprobs, ref_logprobs, estimator="k1", *, old_logprobs=None):
    """``reference.kl.kl_penalty`` with its straight-through sum parenthesised.

    FINDING (issue 19): the oracle writes ``value + w·k2 − (w·k2).detach()``; for |lp − ref| ≳ 1e8 the
    term w·k2 ≈ 5·(lp − ref)² is so large that value + w·k2 − w·k2 rounds to 0 in float64 (lp = 1e30,
    ref ≈ 0 gives 0 instead of 1e30), while the library gives 1e30.  Fix reported for
    ``reference/kl.py``: ``value + (w * k2 - (w * k2).detach())`` (or, as here, an explicit straight-through
    function, which also gives the finite value at lp = ±inf where s − s.detach() is inf − inf = NaN)."""
    from rlhf_kernels.reference import kl as ref_kl

    if not (estimator.endswith("+") or old_logprobs is not None):
        return ref_kl.kl_penalty(logprobs, ref_logprobs, estimator)
    value = ref_kl.kl_penalty(logprobs, ref_logprobs, estimator.rstrip("+")).detach()
    k2 = ref_kl.kl_penalty(logprobs, ref_logprobs, "k2")
    w = 1.0
    if old_logprobs is not None:
        w = torch.clamp(torch.exp(logprobs.double() - old_logprobs.double()), max=10.0).detach()
    return _StraightThrough.apply(value, w * k2)


class _StraightThrough(torch.autograd.Function):
    """The value of ``value``, the gradient of ``surrogate``: value + (s − s.detach()) without the
    arithmetic (inf − inf = NaN for lp = ±inf, where the forward value is finite)."""

    @staticmethod
    def forward(ctx, value, surrogate):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def kl_loss_oracle(logprobs, ref_logprobs, mask, *, estimator="k3", loss_agg="token-mean", normalizer=None,
                   old_logprobs=None):
    from rlhf_kernels.reference import aggregation as ref_agg

    per_token = kl_penalty_oracle(logprobs, ref_logprobs, estimator, old_logprobs=old_logprobs)
    return ref_agg.agg_loss(per_token, mask, loss_agg, normalizer)
