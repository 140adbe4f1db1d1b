"""Preference losses (DPO and its 13 chunk-fusable loss types, SimPO, CPO, ORPO, KTO) straight from hidden
states: the per-sequence log-probabilities are summed token by token from logits that never exist whole,
and the backward is formed during the forward.

Layout (TRL's ``concatenated_forward``): ``hidden`` [S, T, H] and ``labels`` [S, T] hold S padded sequences,
labels ``ignore_index`` on the prompt and the padding.  Paired losses (dpo, simpo, cpo, orpo): S = 2B, rows
[0, B) the chosen responses and [B, 2B) the rejected ones, pair b = (row b, row B + b).  KTO: S unpaired
responses with ``desirable`` [S].  A sequence's log-probability is c = Σ_t log p(y_t) over its counted
tokens, its length n the number of counted tokens (an empty response has c = 0, n = 0).

Why the backward can be formed in the forward: every supported loss is L = Σ_pairs ℓ(pair) / B (+ linear
terms such as the chosen NLL −Σ c / Σ n, whose denominators come from the labels alone), so ∂L/∂c of a
sequence depends only on its own pair's log-probabilities.  Chunks hold whole pairs; per chunk:

    1. logits of the chunk's tokens (the driver's product), log p(y_t) and lse (``logprobs_fwd``)
    2. c per sequence (segment sums), then g = ∂L/∂c by autograd through the sequence-level loss function
       itself (:mod:`rlhf_kernels.ops.preference_losses`), evaluated on the full [S] batch with this chunk's
       entries in place (the others are constants: ∂L/∂c_b does not read them)
    3. ``logprobs_bwd_inplace`` writes g · (1[j = y_t] − p_j) over the logits; the driver forms d_hidden,
       d_weight, d_bias (two more products)

Three matmul-sized passes, never an [N, V] buffer.  The loss value and the metrics come from one last call
of the same sequence-level function on all S log-probabilities.  DPO's "aot" and "aot_unpaired" sort the
log-ratios over the batch (every pair's gradient depends on the others' values), so they are refused.

The reference log-probabilities are either given ([S] sums) or computed in the same call from
``ref_hidden`` / ``ref_weight`` (:func:`rlhf_kernels.linear_logprobs`, no gradient).  The float64 oracle:
:mod:`rlhf_kernels.reference.linear_preference_loss`; docs/linear_preference_loss.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._validation import (
    check_choice,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_label_range,
    check_mask_tensor,
    check_ndim,
    check_same_device,
    check_shape,
    compute_dtype,
)
from . import _fused_linear
from . import preference_losses as seq
from .linear_logprobs import linear_logprobs
from .logprobs import logprobs_bwd_inplace, logprobs_fwd

FAMILY = "linear_preference_loss"
#: The sequence-level loss each ``loss`` name runs (its keyword arguments pass through ``**loss_kwargs``).
LOSSES: dict[str, Callable] = {
    "dpo": seq.dpo_loss, "simpo": seq.simpo_loss, "cpo": seq.cpo_loss, "orpo": seq.orpo_loss,
    "kto": seq.kto_loss,
}
#: DPO loss types whose per-pair gradient reads every pair (a sort over the batch): not fusable by chunks.
UNFUSABLE_DPO_LOSS_TYPES = ("aot", "aot_unpaired")
# Arguments the fused op computes itself (lengths from the labels, the NLL from the chosen tokens).
_COMPUTED_KWARGS = ("chosen_lengths", "rejected_lengths", "nll_loss")
# Value of the sequences outside a chunk in the chunk's evaluation of the loss: any value in every loss's
# domain (ORPO needs c/n < 0); they receive gradients that are discarded.
_PLACEHOLDER_LOGP = -1.0


def _dpo_loss_types(loss_kwargs: dict) -> tuple:
    """The DPO loss types asked for (their validity is dpo_loss's check)."""
    loss_type = loss_kwargs.get("loss_type", "sigmoid")
    if isinstance(loss_type, str):
        return (loss_type,)
    return tuple(loss_type) if isinstance(loss_type, (list, tuple)) else ()


def _needs_reference(loss: str, loss_kwargs: dict) -> bool:
    if loss != "dpo":
        return loss == "kto"
    return any(name not in seq.REFERENCE_FREE_LOSS_TYPES for name in _dpo_loss_types(loss_kwargs))


@dataclass
class _Problem:
    """Everything but the differentiable tensors; ``metrics`` is filled by the forward."""

    labels: Tensor  # [S·T]
    n_seq: int
    seq_len: int
    paired: bool
    loss: str
    loss_kwargs: dict
    ref_logps: Tensor | None  # [S], compute dtype
    desirable: Tensor | None  # [S] (kto)
    ignore_index: int
    grad_weight_accumulation: str
    metrics: dict = field(default_factory=dict)


def _sequence_loss(problem: _Problem, seq_logps: Tensor, lengths: Tensor) -> tuple[Tensor, dict]:
    """The sequence-level loss on all S log-probabilities (policy [S], lengths [S])."""
    fn, kwargs, ref = LOSSES[problem.loss], problem.loss_kwargs, problem.ref_logps
    if not problem.paired:
        return fn(seq_logps, ref, problem.desirable, **kwargs)
    b = problem.n_seq // 2
    chosen, rejected, n_chosen, n_rejected = seq_logps[:b], seq_logps[b:], lengths[:b], lengths[b:]
    if problem.loss == "dpo":
        refs = (None, None) if ref is None else (ref[:b], ref[b:])
        return fn(chosen, rejected, *refs, chosen_lengths=n_chosen, rejected_lengths=n_rejected, **kwargs)
    return fn(chosen, rejected, n_chosen, n_rejected, **kwargs)


def _chunks(
    problem: _Problem, rows_per_chunk: int, device: torch.device
) -> list[tuple[Tensor | slice, Tensor]]:
    """(token rows, sequence ids in row order) per chunk: whole pairs (paired) or whole responses.  A chunk
    holds at least one pair, whatever ``rows_per_chunk`` says."""
    t, n_seq = problem.seq_len, problem.n_seq
    if not problem.paired or rows_per_chunk >= n_seq * t:  # contiguous rows: responses, or everything
        step = max(1, n_seq) if problem.paired else max(1, rows_per_chunk // max(1, t))
        bounds = [(first, min(first + step, n_seq)) for first in range(0, n_seq, step)]
        return [(slice(first * t, last * t), torch.arange(first, last, device=device))
                for first, last in bounds]
    b = n_seq // 2
    step = max(1, rows_per_chunk // max(1, 2 * t))
    chunks = []
    for first in range(0, b, step):
        last = min(first + step, b)
        ids = torch.cat(
            (torch.arange(first, last, device=device), torch.arange(b + first, b + last, device=device))
        )
        rows = (ids.unsqueeze(-1) * t + torch.arange(t, device=device)).reshape(-1)
        chunks.append((rows, ids))
    return chunks


def _preference(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, problem: _Problem, *, grads: tuple[bool, ...]
) -> _fused_linear.ComputeResult:
    """(loss, (), d_hidden, d_weight, d_bias) (the compute of ``_fused_linear.fused_linear_apply``);
    fills ``problem.metrics``."""
    grad_hidden, grad_weight, grad_bias = grads
    need_grad = grad_hidden or grad_weight or grad_bias
    acc = compute_dtype(hidden, weight)
    labels, t = problem.labels, problem.seq_len
    lengths = (labels.view(problem.n_seq, t) != problem.ignore_index).sum(dim=-1)
    rows_per_chunk = _fused_linear.plan_chunk_rows(
        labels.numel(), weight.shape[0], device=hidden.device, dtype=acc
    )
    chunks = _chunks(problem, rows_per_chunk, hidden.device)
    placeholder = torch.full((problem.n_seq,), _PLACEHOLDER_LOGP, dtype=acc, device=hidden.device)
    ids_in_order = iter([ids for _, ids in chunks])  # the driver calls chunk_fn in chunk order

    def chunk_fn(logits: Tensor, rows) -> tuple[Tensor]:
        y = labels[rows]
        token_logps, _, lse = logprobs_fwd(logits, y, 1.0, problem.ignore_index, False, False)
        ids = next(ids_in_order)
        seq_logps = token_logps.view(ids.numel(), t).sum(dim=-1)
        if need_grad:
            with torch.enable_grad():
                mine = seq_logps.detach().requires_grad_()
                loss, _ = _sequence_loss(problem, placeholder.index_put((ids,), mine), lengths)
                (grad_seq,) = torch.autograd.grad(loss, mine)
            grad_tokens = grad_seq.to(acc).repeat_interleave(t)
            logprobs_bwd_inplace(grad_tokens, lse.new_empty(0), logits, y, lse, lse.new_empty(0), 1.0,
                                 problem.ignore_index)
        return (seq_logps,)

    outputs, d_hidden, d_weight, d_bias = _fused_linear.chunked_linear_loss(
        hidden, weight, bias, [rows for rows, _ in chunks], chunk_fn, need_grad=need_grad,
        grad_weight=grad_weight, grad_hidden=grad_hidden,
        grad_weight_accumulation=problem.grad_weight_accumulation,
        active_rows=labels != problem.ignore_index,
    )
    seq_logps = placeholder.clone()
    for (_, ids), (values,) in zip(chunks, outputs):
        seq_logps[ids] = values
    loss, metrics = _sequence_loss(problem, seq_logps, lengths)
    problem.metrics = {key: value.detach() for key, value in metrics.items()}
    problem.metrics["logps/sequences"] = seq_logps.detach()
    return loss.detach(), (), d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
def _reference_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                     ignore_index: int) -> Tensor:
    """Σ_t log π_ref per sequence [S], no gradient: the fused head (``linear_logprobs``), or for a float64
    head (which ``linear_logprobs`` does not take) the chunk driver's forward in float64."""
    if hidden.dtype != torch.float64:
        return linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index).sum(dim=-1)
    flat_labels = labels.reshape(-1)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    rows = _fused_linear.plan_chunk_rows(hidden2d.shape[0], weight.shape[0], device=hidden.device,
                                         dtype=torch.float64)

    def chunk_fn(logits: Tensor, chunk) -> tuple[Tensor]:
        return (logprobs_fwd(logits, flat_labels[chunk], 1.0, ignore_index, False, False)[0],)

    outputs, *_ = _fused_linear.chunked_linear_loss(
        hidden2d, weight, bias, _fused_linear.row_chunks(hidden2d.shape[0], rows), chunk_fn, need_grad=False
    )
    token_logps = torch.cat([out[0] for out in outputs]) if outputs else hidden2d.new_zeros(0)
    return token_logps.view(labels.shape).sum(dim=-1)


def _check_head(prefix: str, hidden: object, weight: object, bias: object, labels: Tensor) -> None:
    _fused_linear.check_head(hidden, weight, bias, prefix=prefix, ndim=3,
                             layout="[S, T, H] (S padded sequences of T tokens)")
    check_shape(f"{prefix}hidden", hidden, (*labels.shape, hidden.shape[2]), "(*labels.shape, H)")
    check_same_device(**{f"{prefix}hidden": hidden, "labels": labels})


def _check_loss(loss: object, loss_kwargs: dict, n_seq: int, desirable: object) -> bool:
    """Validates the loss choice and its arguments; returns whether it is paired."""
    check_choice("loss", loss, tuple(LOSSES))
    for name in _COMPUTED_KWARGS:
        if name in loss_kwargs:
            raise ValueError(f"linear_preference_loss computes {name} itself (from the labels and the chosen "
                             f"tokens); do not pass it")
    if loss == "dpo":
        for name in _dpo_loss_types(loss_kwargs):
            if name in UNFUSABLE_DPO_LOSS_TYPES:
                raise ValueError(
                    f"loss_type {name!r} sorts the log-ratios over the whole batch, so a pair's gradient "
                    "depends on every other pair and cannot be formed chunk by chunk; use linear_logprobs + "
                    "dpo_loss"
                )
    paired = loss != "kto"
    if paired:
        if desirable is not None:
            raise ValueError(
                f"desirable is read by loss 'kto' only (unpaired responses); got it with {loss!r}"
            )
        if n_seq % 2:
            raise ValueError(f"loss {loss!r} needs chosen and rejected rows in equal numbers (S = 2B: chosen "
                             f"rows [0, B), rejected rows [B, 2B)); got S = {n_seq} sequences")
    elif desirable is None:
        raise ValueError("loss 'kto' needs desirable [S] (True for a desirable response); got None")
    return paired


def linear_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    loss: str = "dpo",
    bias: Tensor | None = None,
    ref_logps: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    desirable: Tensor | None = None,
    ignore_index: int = -100,
    grad_weight_accumulation: str = "float32",
    **loss_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A preference loss of per-sequence log-probabilities computed from hidden states, logits never whole.

    Args:
        hidden: [S, T, H] float32, bfloat16, float16 or float64: S padded sequences (layout: the module
            docstring; paired losses: chosen rows [0, B), rejected rows [B, 2B)).
        weight: [V, H], hidden's dtype (the lm_head weight as stored).
        labels: [S, T] int64/int32 next-token ids in [0, V), ``ignore_index`` on the prompt and padding.
        loss: "dpo", "simpo", "cpo", "orpo" or "kto": :func:`rlhf_kernels.dpo_loss`, ``simpo_loss``,
            ``cpo_loss``, ``orpo_loss`` or ``kto_loss`` on the sequence sums; their keyword arguments
            (``beta``, ``loss_type``, ``loss_weights``, ``gamma``, ``kl_logps``, ...) pass through
            ``loss_kwargs``.  The
            lengths (and ORPO's NLL, −Σ c / Σ n over the chosen tokens) are computed here.  DPO's "aot" and
            "aot_unpaired" are refused (they couple every pair).
        bias: optional [V] in hidden's dtype (``-inf`` masks an entry).
        ref_logps: [S] the reference model's summed response log-probs (chosen then rejected), or None.
        ref_hidden, ref_weight, ref_bias: instead of ref_logps, the reference model's last hidden states
            [S, T, H_ref] and lm_head: its sums are computed here without a gradient.
        desirable: [S] bool or 0/1 (kto only).
        ignore_index: label of positions that do not count.
        grad_weight_accumulation: "float32" (default: d_weight summed over the chunks in fp32, rounded
            once) or "weight_dtype" (added into a d_weight in the weight's dtype, one rounding per chunk,
            without the 4·V·H-byte fp32 accumulator): ``_fused_linear.chunked_linear_loss``.

    Returns:
        (0-dim loss, metrics): the loss in fp32 (fp64 for fp64 inputs), differentiable with respect to
        hidden, weight and bias (never the reference inputs); the metrics of the sequence-level function
        plus "logps/sequences" [S].  Same values as that function on ``linear_logprobs(...).sum(-1)``.

    Example: B = 4 pairs of T = 512 tokens from a [8, 512, 4096] bf16 batch with a 151936-row head: the
    chunks hold whole pairs (2·512 rows per pair), the chunk buffer never [4096, 151936].
    """
    check_index_tensor("labels", labels)
    check_ndim("labels", labels, 2, "[S, T]")
    _check_head("", hidden, weight, bias, labels)
    _fused_linear.check_grad_weight_accumulation(grad_weight_accumulation)
    ignore_index = check_int("ignore_index", ignore_index)
    n_seq, seq_len = labels.shape
    paired = _check_loss(loss, loss_kwargs, n_seq, desirable)
    if desirable is not None:
        check_mask_tensor("desirable", desirable)
        check_shape("desirable", desirable, (n_seq,), "(S,) = (labels.shape[0],)")
        check_same_device(hidden=hidden, desirable=desirable)
    has_ref_head = ref_hidden is not None or ref_weight is not None
    if ref_logps is not None and has_ref_head:
        raise ValueError("give either ref_logps or ref_hidden/ref_weight, not both")
    if has_ref_head and (ref_hidden is None or ref_weight is None):
        raise ValueError(f"ref_hidden and ref_weight go together; got only "
                         f"{'ref_hidden' if ref_weight is None else 'ref_weight'}")
    if ref_bias is not None and not has_ref_head:
        raise ValueError("ref_bias needs ref_hidden and ref_weight")
    has_ref = ref_logps is not None or has_ref_head
    if _needs_reference(loss, loss_kwargs) and not has_ref:
        raise ValueError(f"loss {loss!r} (loss_type {loss_kwargs.get('loss_type', 'default')!r}) needs the "
                         "reference model: pass ref_logps [S] or ref_hidden and ref_weight")
    if has_ref and loss in ("simpo", "cpo", "orpo"):
        raise ValueError(f"loss {loss!r} is reference-free; ref_logps / ref_hidden must be None")
    check_label_range(labels, weight.shape[0], ignore_index, "weight.shape[0]")
    acc = compute_dtype(hidden, weight)
    flat_labels = labels.reshape(-1).contiguous()
    if ref_logps is not None:
        check_float_tensor("ref_logps", ref_logps, _fused_linear.HEAD_DTYPES)
        check_shape("ref_logps", ref_logps, (n_seq,), "(S,) = (labels.shape[0],)")
        check_same_device(hidden=hidden, ref_logps=ref_logps)
        ref = ref_logps.detach().to(acc)
    elif has_ref_head:
        _check_head("ref_", ref_hidden, ref_weight, ref_bias, labels)
        with torch.no_grad():
            ref = _reference_logps(ref_hidden.detach(), ref_weight.detach(), ref_bias, labels, ignore_index)
            ref = ref.to(acc)
    else:
        ref = None
    problem = _Problem(flat_labels, n_seq, seq_len, paired, loss, loss_kwargs, ref,
                       desirable, ignore_index, grad_weight_accumulation)
    # Validate the sequence-level arguments once, on zeros, before any product runs.
    _sequence_loss(problem, torch.zeros(n_seq, dtype=acc, device=hidden.device),
                   torch.ones(n_seq, dtype=torch.int64, device=hidden.device))
    (value,) = _fused_linear.fused_linear_apply(
        _preference, hidden.reshape(-1, hidden.shape[-1]), weight, bias, problem
    )
    return value, problem.metrics
