"""The PyTorch path of the distillation row math of ``linear_distill_loss`` (CPU tensors, or any device
forced to the ``torch`` backend): the divergence of each row of a student logits chunk from the same row
of a teacher logits chunk, and its gradient written over the student logits.  The math is that of
:mod:`rlhf_kernels.ops.linear_distill_loss` (see its docstring); rows are processed a few at a time
(about :data:`CHUNK_BYTES` of the compute dtype per temporary) so that the temporaries stay far below the
chunk itself.  Registered as the opaque custom op ``rlhf_kernels::linear_distill_rows_torch``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._registration import torch_op

CHUNK_BYTES = 8 << 20
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _plogq(p: Tensor, log_ratio: Tensor) -> Tensor:
    """p · log_ratio with 0 where p = 0 (masked entries: 0 · (−inf − x) is 0, not NaN)."""
    return torch.where(p == 0, 0.0, p * log_ratio)  # p == 0, not p > 0: NaN stays NaN


def row_terms(
    log_ps: Tensor, log_pt: Tensor, divergence: str, beta: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(p_S, p_T, d or None, sums [2, k]) of k rows from their log-probabilities (over this vocabulary range):
    sums[0] = Σ of the p_T-side terms, sums[1] = Σ p_S d (the module docstring's d)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "forward_kl":  # KL(T ‖ S); ∂/∂s = p_S − p_T
        teacher_sum = _plogq(pt, log_pt - log_ps).sum(dim=-1)
        return ps, pt, None, torch.stack((teacher_sum, torch.zeros_like(teacher_sum)))
    if divergence == "reverse_kl":  # KL(S ‖ T); ∂/∂s = p_S (d − KL), d = log p_S − log p_T
        d = torch.where(ps == 0, 0.0, log_ps - log_pt)
        kl_student = (ps * d).sum(dim=-1)
        return ps, pt, d, torch.stack((torch.zeros_like(kl_student), kl_student))
    # generalised JSD: β KL(T ‖ M) + (1 − β) KL(S ‖ M); ∂/∂s = (1 − β) p_S (d − KL(S ‖ M)),
    # d = log p_S − log M
    log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
    d = torch.where(ps == 0, 0.0, log_ps - log_m)
    return ps, pt, d, torch.stack((_plogq(pt, log_pt - log_m).sum(dim=-1), (ps * d).sum(dim=-1)))


def finish_rows(
    ps: Tensor, pt: Tensor, d: Tensor | None, sums: Tensor, divergence: str, beta: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """(divergence [k], gradient [k, V] or None) from :func:`row_terms` with ``sums`` over the whole
    vocabulary."""
    teacher_sum, kl_student = sums[0], sums[1]
    if divergence == "forward_kl":
        return teacher_sum, (ps - pt) if need_grad else None
    if divergence == "reverse_kl":
        loss, scale = kl_student, 1.0
    else:
        loss, scale = beta * teacher_sum + (1.0 - beta) * kl_student, 1.0 - beta
    if not need_grad:
        return loss, None
    return loss, d.sub_(kl_student.unsqueeze(-1)).mul_(ps).mul_(scale)


def _rows_out(
    student: Tensor, teacher: Tensor, divergence: str, beta: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """(loss [k], gradient [k, V] or None) of k rows, before masking and scaling."""
    log_ps = torch.log_softmax(student, dim=-1)
    log_pt = torch.log_softmax(teacher, dim=-1)
    ps, pt, d, sums = row_terms(log_ps, log_pt, divergence, beta)
    return finish_rows(ps, pt, d, sums, divergence, beta, need_grad)


def _linear_distill_rows(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, grad_scale: Tensor, divergence: str,
    beta: float, ignore_index: int, need_grad: bool,
) -> Tensor:
    """Per-row divergence [n] (0 at ignored rows); with ``need_grad`` writes grad_scale · ∂D/∂s over
    ``student_logits`` [n, V] (exactly 0 at ignored rows, whatever the logits hold)."""
    n_rows, vocab_size = student_logits.shape
    loss = student_logits.new_empty(n_rows)
    step = max(1, CHUNK_BYTES // (student_logits.element_size() * max(vocab_size, 1)))
    for begin in range(0, n_rows, step):
        rows = slice(begin, min(begin + step, n_rows))
        ignored = (labels[rows] == ignore_index).unsqueeze(-1)
        row_loss, grad = _rows_out(student_logits[rows], teacher_logits[rows], divergence, beta, need_grad)
        loss[rows] = row_loss.masked_fill(ignored.squeeze(-1), 0.0)
        if need_grad:
            student_logits[rows] = grad.mul_(grad_scale).masked_fill_(ignored, 0.0)
    return loss


linear_distill_rows_torch = torch_op(
    "linear_distill_rows_torch",
    _linear_distill_rows,
    fake=lambda student_logits, *_: student_logits.new_empty(student_logits.shape[0]),
    mutates_args=("student_logits",),
)


def linear_distill_rows_parallel(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, grad_scale: Tensor, divergence: str,
    beta: float, ignore_index: int, need_grad: bool, group,
) -> Tensor:
    """The row op over a vocabulary sharded across ``group``: each rank holds the same rows' logits over its
    contiguous slice of both models' vocabularies.  Three all-reduces of O(rows) values per call (the row
    maxima, the rebased exponential sums, the per-row divergence sums); plain PyTorch over the whole chunk,
    eager only.  Returns the global per-row divergence (the same on every rank); with ``need_grad`` writes
    this rank's slice of grad_scale · ∂D/∂s over ``student_logits``."""
    import torch.distributed as dist

    maxima = torch.stack((student_logits.max(dim=-1).values, teacher_logits.max(dim=-1).values))
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    maxima = torch.where(maxima == float("-inf"), 0.0, maxima)  # all -inf rows stay finite here
    exp_sums = torch.stack((
        (student_logits - maxima[0].unsqueeze(-1)).exp().sum(dim=-1),
        (teacher_logits - maxima[1].unsqueeze(-1)).exp().sum(dim=-1),
    ))
    dist.all_reduce(exp_sums, group=group)
    lse = maxima + exp_sums.log()
    log_ps = student_logits - lse[0].unsqueeze(-1)
    log_pt = teacher_logits - lse[1].unsqueeze(-1)
    ps, pt, d, sums = row_terms(log_ps, log_pt, divergence, beta)
    dist.all_reduce(sums, group=group)
    loss, grad = finish_rows(ps, pt, d, sums, divergence, beta, need_grad)
    ignored = labels == ignore_index
    if need_grad:
        student_logits.copy_(grad.mul_(grad_scale).masked_fill_(ignored.unsqueeze(-1), 0.0))
    return loss.masked_fill(ignored, 0.0)
