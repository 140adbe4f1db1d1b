"""Float64 oracle of the fused distillation loss: both models' logits materialised in float64, the
divergences written out from their definitions (docs/linear_distill_loss.md)."""

from __future__ import annotations

import torch


def _logits(hidden, weight, bias, temperature):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return logits / temperature


def _kl(log_p, log_q):
    """KL(p ‖ q) = Σ p (log p − log q) per row, 0·log 0 = 0.  Entries with p = 0 are replaced by safe
    values before any arithmetic, so that neither the value nor the gradient meets 0·∞; a NaN entry is not
    one of them (NaN in, NaN out)."""
    present = log_p != float("-inf")
    p = torch.where(present, log_p, 0.0).exp()
    diff = torch.where(present, log_p - torch.where(present, log_q, 0.0), 0.0)
    return torch.where(present, p * diff, 0.0).sum(dim=-1)


def linear_distill_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *, divergence="forward_kl",
    beta=0.5, temperature=1.0, ignore_index=-100, student_bias=None, teacher_bias=None,
):
    """Σ_tokens D(token) / max(1, counted tokens) in float64; differentiable with respect to the student's
    tensors (the teacher's are detached).  "jsd" with β = 0 / 1 is the forward / reverse KL (TRL's rule)."""
    log_ps = torch.log_softmax(_logits(student_hidden, student_weight, student_bias, temperature), dim=-1)
    with torch.no_grad():
        log_pt = torch.log_softmax(_logits(teacher_hidden, teacher_weight, teacher_bias, temperature), dim=-1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        per_token = _kl(log_pt, log_ps)
    elif divergence == "reverse_kl":
        per_token = _kl(log_ps, log_pt)
    else:
        beta_t = torch.tensor(float(beta), dtype=torch.float64)
        # log M; where both models mask an entry, −inf without a logaddexp (whose gradient there is NaN)
        neither = (log_ps == float("-inf")) & (log_pt == float("-inf"))
        safe_s, safe_t = torch.where(neither, 0.0, log_ps), torch.where(neither, 0.0, log_pt)
        log_m = torch.where(
            neither, float("-inf"), torch.logaddexp(safe_s + torch.log1p(-beta_t), safe_t + torch.log(beta_t))
        )
        per_token = beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)
    per_token = per_token.reshape(student_hidden.shape[:-1])
    if labels is None:
        return per_token.sum() / max(per_token.numel(), 1)
    counted = labels != ignore_index
    return torch.where(counted, per_token, 0.0).sum() / counted.sum().clamp(min=1)
