"""Vocabulary (tensor) parallelism for :func:`rlhf_kernels.linear_logprobs`.

Each rank holds a contiguous slice of the lm_head's rows, [rank·V, (rank+1)·V) of a [world·V, H]
weight (Megatron's and verl's sharding), and the same hidden states and labels.  The row accumulators
of disjoint vocabulary ranges merge exactly (see :mod:`rlhf_kernels.ops.linear_logprobs`): forward is
one ``all_reduce(MAX)`` of the row maxima and one ``all_reduce(SUM)`` of the rebased (s, t, z_label),
4·N floats; backward computes this rank's d_weight / d_bias slice and all-reduces d_hidden (N·H floats
in the compute dtype, rounded to the input dtype once, after the sum), since hidden feeds every slice.
Eager only: a ``torch.autograd.Function`` around the registered ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._validation import compute_dtype
from .ops import linear_logprobs as ops
from .ops.cpu.linear_logprobs import finalize, rebase


def vocab_range(process_group: object, local_vocab: int) -> tuple[int, int]:
    """(first global vocabulary id of this rank's slice, global vocabulary size)."""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or None; "
            f"got {type(process_group).__name__}"
        )
    return dist.get_rank(process_group) * local_vocab, dist.get_world_size(process_group) * local_vocab


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    """Forward merges the row accumulators across ranks (all_reduce MAX of the max, SUM of the rebased
    sums and the label logit); backward sums d_hidden across ranks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, group):
        vocab_start, vocab_total = vocab_range(group, weight.shape[0])
        m, s, t, z_label = ops.linear_logprobs_stats(
            hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy
        )
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        s, t = rebase(m, s, t, m_all)
        sums = torch.stack((s, t, z_label))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        logprobs, entropy, lse = finalize(
            m_all, sums[0], sums[1], sums[2], labels, vocab_total, ignore_index, with_entropy
        )
        ops.save_for_backward(ctx, hidden, weight, bias, labels, lse, entropy, inv_temperature, ignore_index,
                              vocab_start, vocab_total)
        ctx.group = group
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden = ctx.saved_tensors[0]
        d_hidden, d_weight, d_bias = ops.backward_grads(ctx, grad_logprobs, grad_entropy)
        if ctx.needs_input_grad[0]:
            if d_hidden is None:  # no upstream gradient here, but the other ranks still reduce
                d_hidden = torch.zeros(hidden.shape, dtype=compute_dtype(hidden), device=hidden.device)
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            d_hidden = d_hidden.to(hidden.dtype)  # the one rounding of d_hidden
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    process_group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] or [0]) for hidden [N, H], this rank's weight rows [V, H] and global
    labels [N], already validated by :func:`rlhf_kernels.linear_logprobs`."""
    return _VocabParallelLinearLogprobs.apply(
        hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, process_group
    )
