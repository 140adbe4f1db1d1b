"""Eager log-prob / entropy idioms of verl, OpenRLHF and TRL (written from their published semantics)."""

from __future__ import annotations

import torch


def verl_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """verl / OpenRLHF: log_softmax over the fp32 logits, then gather."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def verl_entropy(logits: torch.Tensor) -> torch.Tensor:
    """verl's entropy_from_logits: logsumexp(x) − Σ softmax(x)·x."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's selective_log_softmax: gather − logsumexp row by row for fp32/fp64 (saves memory),
    and a row-by-row log_softmax for half precision (logsumexp is unstable there)."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    out = []
    for row_logits, row_labels in zip(logits, index):
        row_log_p = torch.log_softmax(row_logits, dim=-1)
        out.append(row_log_p.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)
