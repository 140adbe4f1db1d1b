"""Float64 oracle of log-probabilities, entropy and token statistics from hidden states through the
lm_head."""

from __future__ import annotations

import torch

from ..ops.token_stats import TokenStats
from .token_stats import token_stats_from_logits


def _labelled(hidden: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """``hidden`` in float64 with the ignored positions' rows replaced by 0 (differentiable: they get 0)."""
    return torch.where(ignored.unsqueeze(-1), 0.0, hidden.double())


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax((h Wᵀ + b) / τ)[label] (and −Σ p log p) in float64; 0 where label == ignore_index.

    Differentiable (in float64) with respect to hidden, weight and bias; ignored positions get no gradient
    (their hidden states are left out of the product: a NaN there reaches nothing, as in the library).
    """
    ignored = labels == ignore_index
    logits = _labelled(hidden, ignored) @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    index = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logprobs = torch.where(ignored, 0.0, log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1))
    if not return_entropy:
        return logprobs
    # H = lse − Σ p·z; masked (-inf) entries have p = 0 and contribute nothing (z replaced by 0 there so
    # that neither the value nor its gradient meets 0·∞).
    finite = torch.where(logits == float("-inf"), 0.0, logits)
    entropy = torch.logsumexp(logits, dim=-1) - (log_p.exp() * finite).sum(dim=-1)
    return logprobs, torch.where(ignored, 0.0, entropy)


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    **options,
) -> TokenStats:
    """``token_stats_from_logits``'s oracle on the float64 logits h Wᵀ + b (``options``: temperature,
    logit_scale, softcap, entropy, sum_sq_probs, top1_match, mean_logit, top_k); differentiable in float64."""
    logits = _labelled(hidden, labels == ignore_index) @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return token_stats_from_logits(logits, labels, ignore_index=ignore_index, **options)
