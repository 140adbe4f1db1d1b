"""Float64 oracle of log-probabilities renormalised over a sampler's kept set: the executable
specification of ``rlhf_kernels/ops/sampling_logprobs.py``, written with ``torch.sort`` (the way vLLM's
PyTorch sampler finds its masks) rather than with the kernels' threshold searches.

Kept set, in vLLM's order (temperature, min-p, top-k, top-p), every filter keeping whole groups of tied
values, so that the kept set is always {x' ≥ threshold} for x' = logits / τ:

    min-p:  x'_j ≥ max x' + log(min_p)
    top-k:  x'_j ≥ the k-th largest surviving value (counted with multiplicity)
    top-p:  the mass (softmax over the survivors) of the values strictly greater than x'_j is < p
"""

from __future__ import annotations

import math

import torch


def kept_mask(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Bool [..., V]: the tokens the sampler could have drawn (see the module docstring)."""
    x = logits.detach().double() / temperature
    vocab = x.shape[-1]
    keep = torch.ones_like(x, dtype=torch.bool)
    if min_p > 0:
        keep &= x >= x.amax(-1, keepdim=True) + math.log(min_p)
    if 0 < top_k < vocab:
        values, _ = torch.sort(x.masked_fill(~keep, -math.inf), dim=-1, descending=True)
        keep &= x >= values[..., top_k - 1 : top_k]
    if top_p < 1:
        values, _ = torch.sort(x.masked_fill(~keep, -math.inf), dim=-1, descending=True)
        probs = torch.softmax(values, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass ahead in the sorted order
        # the mass strictly above a value is the mass ahead of the first of its tied copies
        first = torch.ones_like(keep)
        first[..., 1:] = values[..., 1:] != values[..., :-1]
        mass_above = torch.where(first, mass_before, -math.inf).cummax(dim=-1).values
        kept_sorted = mass_above < top_p
        threshold = torch.where(kept_sorted, values, math.inf).amin(-1, keepdim=True)
        keep &= x >= threshold
    return keep


def sampling_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_mask_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """log q_label with q = softmax(x') over the kept set (−inf for a label outside it or on a −inf
    logit, with no gradient), the entropy −Σ q log q, and the kept set's mass under softmax(x') (no
    gradient); 0 at ``ignore_index``, NaN for a label outside [0, V) and throughout a row holding NaN
    or only −inf.
    Differentiable (autograd) with respect to ``logits``; the kept set is a constant."""
    keep = kept_mask(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    x = logits.double() / temperature
    log_q = torch.log_softmax(x.masked_fill(~keep, -math.inf), dim=-1)
    vocab = logits.shape[-1]
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    index = torch.where(in_range, labels, torch.zeros_like(labels)).long().unsqueeze(-1)
    finite = keep & (x > -math.inf)
    label_finite = finite.gather(-1, index).squeeze(-1)
    logprobs = torch.where(label_finite, log_q.gather(-1, index).squeeze(-1), -math.inf)
    logprobs = torch.where(in_range, logprobs, math.nan)
    # NaN anywhere, or no finite logit at all (log_softmax's own NaN): the row is NaN
    row_nan = logits.detach().isnan().any(-1) | (logits.detach() == -math.inf).all(-1)
    logprobs = torch.where(row_nan, math.nan, logprobs).masked_fill(ignored, 0.0)
    outputs = [logprobs]
    if return_entropy:
        safe_log_q = torch.where(finite, log_q, 0.0)  # q log q → 0 as q → 0, and no NaN gradient
        entropy = -(safe_log_q.exp() * safe_log_q).masked_fill(~finite, 0.0).sum(-1)
        entropy = torch.where(row_nan, math.nan, entropy)
        outputs.append(entropy.masked_fill(ignored, 0.0))
    if return_mask_mass:
        x = x.detach()
        mass = torch.exp(torch.logsumexp(x.masked_fill(~keep, -math.inf), -1) - torch.logsumexp(x, -1))
        outputs.append(torch.where(row_nan, math.nan, mass).masked_fill(ignored, 0.0))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
