"""Float64 oracle of ``rlhf_kernels.token_stats_from_logits`` (``rlhf_kernels/ops/token_stats.py``): the
executable specification.  Written in differentiable torch operations, so that autograd on it gives the
reference gradients; the top-k comes from a full stable ``torch.sort`` (ties go to the smaller index)."""

from __future__ import annotations

import torch

from ..ops.token_stats import TokenStats


def transformed_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None
) -> torch.Tensor:
    """x' = softcap(logit_scale · x) / τ in float64, −inf kept −inf under the soft cap."""
    x = logits.double()
    z = x * logit_scale
    if softcap is not None:
        # a masked entry stays masked, a constant: zero gradient, as the limit of the capped slope
        z = torch.where(x == float("-inf"), float("-inf"), softcap * torch.tanh(z / softcap))
    return z / temperature


def token_stats_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    entropy: bool = False,
    sum_sq_probs: bool = False,
    top1_match: bool = False,
    mean_logit: bool = False,
    top_k: int = 0,
    ignore_index: int = -100,
) -> TokenStats:
    """Every output in float64; 0 (indices 0) where label == ignore_index, NaN log-prob and top-1 where a
    label lies outside [0, V)."""
    x = transformed_logits(logits, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    log_p = torch.log_softmax(x, dim=-1)
    p = log_p.exp()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    index = torch.where(in_range, labels, torch.zeros_like(labels)).long().unsqueeze(-1)

    def per_row(value: torch.Tensor, *, nan_out_of_range: bool = False) -> torch.Tensor:
        if nan_out_of_range:
            value = torch.where(in_range, value, float("nan"))
        return torch.where(ignored, torch.zeros_like(value), value)

    fields = [per_row(log_p.gather(-1, index).squeeze(-1), nan_out_of_range=True)]
    if entropy:
        # p log p → 0 as p → 0: masked (−inf) entries add nothing (and no NaN gradient)
        safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
        fields.append(per_row(-(p * safe_log_p).sum(-1)))
    else:
        fields.append(None)
    fields.append(per_row((p * p).sum(-1)) if sum_sq_probs else None)
    if top1_match:
        row_max = x.detach().amax(-1)
        match = (x.detach().gather(-1, index).squeeze(-1) == row_max).double()
        match = torch.where(torch.isnan(row_max), float("nan"), match)
        fields.append(per_row(match, nan_out_of_range=True))
    else:
        fields.append(None)
    fields.append(per_row(x.mean(-1)) if mean_logit else None)
    if top_k:
        order = torch.sort(x.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
        values = log_p.gather(-1, order)
        keep = ~ignored.unsqueeze(-1)
        fields.append(torch.where(keep, values, torch.zeros_like(values)))
        fields.append(torch.where(keep, order, torch.zeros_like(order)))
    return TokenStats(*fields)
