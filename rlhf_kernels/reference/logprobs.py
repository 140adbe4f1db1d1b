"""Float64 oracle of per-token log-probabilities and entropy: the executable specification of
``rlhf_kernels.logprobs_from_logits`` / ``entropy_from_logits`` (``rlhf_kernels/ops/logprobs.py``)."""

from __future__ import annotations

import torch


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    batch_invariant: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / τ)[label] (and −Σ p log p) in float64; 0 where label == ignore_index, NaN
    where a label lies outside [0, V) (what the unchecked library gives).  ``inplace_backward`` and
    ``batch_invariant`` are accepted for the public signature and have no effect: the oracle never
    writes to its input and computes each row alone.  (``process_group`` has no oracle: the sharded
    op is tested against the unsharded one, ``tests/test_parallel.py``.)"""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    index = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    logprobs = log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(in_range, logprobs, float("nan")).masked_fill(ignored, 0.0)
    if not return_entropy:
        return logprobs
    p = log_p.exp()
    # p log p → 0 as p → 0: masked (-inf) vocabulary entries contribute nothing.
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1)  # NaN p stays NaN
    return logprobs, entropy.masked_fill(ignored, 0.0)


def logprobs_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The analytic logits gradient in float64 (autograd through p log p is NaN at p = 0):

    ∂/∂x_j = (1/τ)·[g·(1[j = y] − p_j) − h·p_j·(log p_j + H)], zero at ignored positions and NaN
    throughout a row whose label lies outside [0, V).
    """
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = log_p.exp()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    index = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    one_hot = torch.nn.functional.one_hot(index, logits.shape[-1]).double()
    grad = grad_logprobs.double().unsqueeze(-1) * (one_hot - p)
    if grad_entropy is not None:
        entropy = -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1, keepdim=True)
        grad = grad - grad_entropy.double().unsqueeze(-1) * torch.where(p > 0, p * (log_p + entropy), 0.0)
    # the row sums to 0: the label column as minus the sum of the others (one_hot − p rounds 1 − p_y)
    column = index.unsqueeze(-1)
    at_label = grad.gather(-1, column)
    rest = grad.scatter(-1, column, 0.0).sum(-1, keepdim=True)
    grad = grad.scatter(-1, column, torch.where(at_label.isnan(), at_label, -rest))
    grad = torch.where(in_range.unsqueeze(-1), grad / temperature, float("nan"))
    return grad.masked_fill(ignored.unsqueeze(-1), 0.0)


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, batch_invariant: bool = True
) -> torch.Tensor:
    """−Σ p log p of softmax(logits / τ) over the last dimension, in float64."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)[1]
