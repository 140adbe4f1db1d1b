"""Eager lm_head + log-prob idioms: the textbook one, verl's fused linear cross entropy (its semantics), and
Liger's fused linear cross entropy when it is installed."""

from __future__ import annotations

import torch

from .logprobs import verl_entropy_from_logits


def eager_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unfused path of verl and OpenRLHF: logits = (hidden @ Wᵀ + b) in the input dtype, cast to
    fp32, divided by τ, log_softmax, gather (and entropy = logsumexp − Σ softmax·logits).  Holds the
    logits in the input dtype, their fp32 copy and the log-softmax, and autograd keeps them for the
    backward."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    logprobs = log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logprobs
    return logprobs, verl_entropy_from_logits(logits)


def verl_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none"):
    """What verl's fused kernel (verl.utils.kernel.linear_cross_entropy) computes: per-token
    (logprobs, entropy) of (hidden @ Wᵀ) / τ in fp32 (whatever the inputs' dtype), the reduction applied
    to the log-probs only."""
    logits = (hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().T) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


def liger_fused_linear_cross_entropy():
    """Σ log p[label] through Liger's fused linear cross entropy (reduction='sum': a scalar, with the
    gradients computed during its forward); None when liger-kernel is not installed."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, labels: -loss(weight, hidden, labels)
