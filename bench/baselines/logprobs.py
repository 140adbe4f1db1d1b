"""Eager log-prob / entropy idioms: the textbook one, and verl's, TRL's and OpenRLHF's functions (versions
in ``bench/baselines/__init__.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# The textbook idiom (no framework's exact code): what the logprobs benchmark measures as "eager"
# ---------------------------------------------------------------------------------------------------
def eager_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax over the logits upcast to fp32, then gather: fp32 log-probs.  It holds the fp32 copy
    of the logits and the log-softmax (and autograd keeps them for the backward)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# verl (verl.utils.torch_functional)
# ---------------------------------------------------------------------------------------------------
def verl_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """flash-attn cross-entropy semantics (verl's path on GPUs): log-probs computed and returned in fp32
    (fp64 for fp64 logits, as an exact reference), label −100 gives 0.  verl's fallback without
    flash-attn (gather − logsumexp) computes the same numbers in the logits' dtype."""
    x = logits.float() if logits.dtype != torch.float64 else logits
    ignored = labels == -100
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    out = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return torch.where(ignored, torch.zeros_like(out), out)


def verl_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp(x) − Σ softmax(x)·x, in the logits' dtype."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# ---------------------------------------------------------------------------------------------------
# TRL (trl.trainer.utils)
# ---------------------------------------------------------------------------------------------------
def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits).gather(index) for an index of shape (...) or (..., K): gather − logsumexp
    row by row for fp32/fp64 (saves memory), a row-by-row log_softmax for half precision (logsumexp is
    unstable there); the result has the logits' dtype and the index's shape."""
    squeeze = index.ndim == logits.ndim - 1
    if squeeze:
        index = index.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        out = selected - lse.unsqueeze(-1)
    else:
        out = torch.stack(
            [F.log_softmax(row, dim=-1).gather(dim=-1, index=idx) for row, idx in zip(logits, index)]
        )
    return out.squeeze(-1) if squeeze else out


def trl_entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """−Σ p·log p from a log_softmax, over chunks of ``chunk_size`` flattened rows."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = F.log_softmax(chunk, dim=-1)
        parts.append(-(torch.exp(logp) * logp).sum(-1))
    return torch.cat(parts, dim=0).reshape(logits.shape[:-1])


# ---------------------------------------------------------------------------------------------------
# OpenRLHF (openrlhf.models.utils)
# ---------------------------------------------------------------------------------------------------
def openrlhf_log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Divides ``logits`` in place by the temperature (as OpenRLHF does), then gather − logsumexp for
    fp32/fp64 and a per-row log_softmax for half precision; the result has the logits' dtype."""
    if temperature != 1.0:
        logits.div_(temperature)
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return selected - torch.logsumexp(logits, dim=-1)
    rows = [F.log_softmax(row, dim=-1).gather(-1, lab.unsqueeze(-1)) for row, lab in zip(logits, labels)]
    return torch.stack(rows).squeeze(-1)


# OpenRLHF's compute_entropy is the same formula as verl's entropy_from_logits (logits' dtype).
openrlhf_compute_entropy = verl_entropy_from_logits
