"""Vocabulary (tensor) parallelism for :func:`rlhf_kernels.linear_logprobs` and for logits already split
over the vocabulary (``logprobs_from_logits`` / ``entropy_from_logits`` / ``token_stats_from_logits``
with ``process_group``, at the end of this file).

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

from . import _dispatch
from ._validation import compute_dtype
from .ops import linear_logprobs as ops
from .ops import token_stats
from .ops.cpu.linear_logprobs import finalize, rebase, rebase_sq
from .ops.cpu.token_stats import transformed


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


# ---------------------------------------------------------------------------------------------------
# Vocabulary-sharded logits: logprobs_from_logits / entropy_from_logits / token_stats_from_logits with
# ``process_group``.  Each rank holds logits [..., V] for the columns [rank·V, (rank+1)·V) of a
# vocabulary of world·V (Megatron's and verl's tensor-parallel lm_head output) and the same labels.
# ---------------------------------------------------------------------------------------------------
def check_consistent_shards(group: dist.ProcessGroup, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raises ``ValueError`` on every rank when the ranks disagree on the shard width V, the number of
    rows or the labels (an order-sensitive checksum): one all_reduce of 8 int64 and a host read, made
    only while index checks are on (``RLHF_KERNELS_CHECK_INDICES``), like the label range check."""
    if torch.compiler.is_compiling() or not _dispatch.index_checks_enabled():
        return
    flat = labels.reshape(-1).long()
    position = torch.arange(1, flat.numel() + 1, device=flat.device)
    mine = torch.stack((
        torch.tensor(logits.shape[-1], device=flat.device), torch.tensor(flat.numel(), device=flat.device),
        flat.sum(), (flat * position).sum(),
    ))
    extremes = torch.cat((mine, -mine))
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    high, low = extremes[:4].tolist(), [-v for v in extremes[4:].tolist()]  # host sync: the check
    for what, hi, lo in zip(("logits.shape[-1] (the shard width V)", "the number of rows", "the labels",
                             "the labels"), high, low):
        if hi != lo:
            raise ValueError(
                f"process_group: every rank must pass logits [..., V] with the same V and rows, and the "
                f"same global labels; {what} differ across ranks (this rank: V = {logits.shape[-1]}, "
                f"rows = {flat.numel()})"
            )


class _VocabParallelTokenStats(torch.autograd.Function):
    """Forward: this shard's (lse, H, Σp²) from the token_stats kernel become row accumulators relative
    to m = lse (s = 1, t = −H, q = Σp²; s = 0 for an all −inf shard), merged across ranks as the
    linear_logprobs ones: all_reduce(MAX) of lse, all_reduce(SUM) of the rebased (s, t, label x', q),
    ≤ 5·N floats.  Backward: the token_stats backward with the merged lse, H and Σp², local to each
    rank (the label's one-hot term lands on its shard): no communication."""

    @staticmethod
    def forward(ctx, logits, labels, logit_scale, softcap, inv_temperature, ignore_index, with_entropy,
                with_sum_sq, group):
        vocab = logits.shape[-1]
        vocab_start, vocab_total = vocab_range(group, vocab)
        zeros = torch.zeros_like(labels)  # label 0 exists on every shard; its log-prob is discarded
        _, entropy, sum_sq, _, _, _, _, lse = token_stats.token_stats_fwd(
            logits, zeros, logit_scale, softcap, inv_temperature, -1, with_entropy, with_sum_sq, False,
            False, 0,
        )
        local = labels.long() - vocab_start
        owned = (local >= 0) & (local < vocab)
        column = torch.where(owned, local, 0).view(*logits.shape[:-1], 1)
        x_label, _ = transformed(logits.gather(-1, column), logit_scale, softcap, inv_temperature)
        z_label = torch.where(owned, x_label.view(-1), 0.0)

        m_all = lse.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        s = (lse != float("-inf")).to(lse.dtype)  # NaN stays in: s = 1, m = NaN
        t = torch.where(s > 0, -entropy, 0.0) if with_entropy else torch.zeros_like(lse)
        s_all, t = rebase(lse, s, t, m_all)
        sums = [s_all, t, z_label]
        if with_sum_sq:
            sums.append(rebase_sq(lse, s, torch.where(s > 0, sum_sq, 0.0), m_all))
        sums = torch.stack(sums)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        logprobs, entropy, lse = finalize(
            m_all, sums[0], sums[1], sums[2], labels, vocab_total, ignore_index, with_entropy
        )
        if with_sum_sq:
            sum_sq = torch.where(labels == ignore_index, 0.0, sums[3] / (sums[0] * sums[0]))
        ctx.save_for_backward(logits, labels, lse, entropy, sum_sq)
        ctx.scalars = (logit_scale, softcap, inv_temperature, ignore_index, vocab_start, vocab_total)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, sum_sq

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, grad_sum_sq):
        logits, labels, lse, entropy, sum_sq = ctx.saved_tensors
        logit_scale, softcap, inv_temperature, ignore_index, vocab_start, vocab_total = ctx.scalars
        empty = lse.new_empty(0)
        grad_logits = token_stats.token_stats_bwd(
            torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs.contiguous(),
            empty if grad_entropy is None else grad_entropy.contiguous(),
            empty if grad_sum_sq is None else grad_sum_sq.contiguous(),
            empty, empty, logits, labels, lse, entropy, sum_sq, labels.new_empty(0),
            logit_scale, softcap, inv_temperature, ignore_index, vocab_start, vocab_total,
        )
        return (grad_logits,) + (None,) * 8


def vocab_parallel_token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    softcap: float,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    with_sum_sq: bool,
    process_group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] or [0], sum_sq_probs [N] or [0]) over the whole vocabulary for this
    rank's logits [..., V] and global labels [N] (softcap 0: none), validated by the public functions."""
    check_consistent_shards(process_group, logits, labels)
    return _VocabParallelTokenStats.apply(
        logits, labels, logit_scale, softcap, inv_temperature, ignore_index, with_entropy, with_sum_sq,
        process_group,
    )
