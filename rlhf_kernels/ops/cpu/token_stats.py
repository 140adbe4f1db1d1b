"""The PyTorch path of ``token_stats_from_logits`` (CPU tensors, or any device forced to ``torch``).

The math is that of ``rlhf_kernels/ops/token_stats.py`` (see its docstring), run over the same chunks
of rows as ``ops/cpu/logprobs.py`` (about 8 MiB of fp32 per temporary, three alive at a time): no
full-size fp32 copy of the logits ever exists.  Registered as the opaque custom ops
``rlhf_kernels::token_stats_fwd_torch`` and ``token_stats_bwd_torch``.
"""

from __future__ import annotations

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype
from .logprobs import _label_terms, _row_chunks, _rows_per_chunk, exact_label_column, rowwise

TOP_K_MAX = 64  # the kernels keep a per-row running top-k of at most this many slots

# (logprobs, entropy, sum_sq_probs, top1_match, mean_logit, topk_logprobs, topk_indices, lse)
Outputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]


def empty_outputs(
    logits: torch.Tensor,
    n_rows: int,
    with_entropy: bool,
    with_sum_sq: bool,
    with_top1: bool,
    with_mean: bool,
    top_k: int,
) -> Outputs:
    """Uninitialised (logprobs, entropy, sum_sq_probs, top1_match, mean_logit, topk_logprobs,
    topk_indices, lse) in the arithmetic dtype of ``logits``: [N], [N, k] for the top-k (int64 indices),
    [0] for an output not requested.  What every forward implementation (and its fake) returns."""
    dtype = compute_dtype(logits)

    def new(wanted: bool, *shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return logits.new_empty(shape if wanted else (0,), dtype=dtype)

    return (
        new(True, n_rows),
        new(with_entropy, n_rows),
        new(with_sum_sq, n_rows),
        new(with_top1, n_rows),
        new(with_mean, n_rows),
        new(top_k > 0, n_rows, top_k),
        new(top_k > 0, n_rows, top_k, dtype=torch.int64),
        new(True, n_rows),
    )


def transformed(
    chunk: torch.Tensor, logit_scale: float, softcap: float, inv_temperature: float, with_slope: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x' = softcap(logit_scale·x)/τ as [k, V] in the arithmetic dtype, dx'/dx or None); −inf stays
    −inf under the soft cap (softcap 0 means none).  x' is the chunk's own memory (never to be
    modified) when the transform is the identity on fp32/fp64 logits, a fresh tensor otherwise."""
    rows = chunk.reshape(-1, chunk.shape[-1])
    if softcap > 0:
        u = rows.to(compute_dtype(chunk)) * (logit_scale / softcap)
        slope = None
        if with_slope:
            # 1 − tanh² u = 4e/(1 + e)², e = e^{−2|u|}: no cancellation where the slope is small
            e = u.abs().mul_(-2.0).exp_()
            slope = e.mul(4.0 * logit_scale * inv_temperature).div_(e.add_(1.0).square_())
        x = torch.where(rows == float("-inf"), float("-inf"), u.tanh_().mul_(softcap * inv_temperature))
        return x, slope
    factor = logit_scale * inv_temperature
    if factor == 1.0 and rows.dtype == compute_dtype(chunk):
        return rows, None
    return rows.to(compute_dtype(chunk), copy=True).mul_(factor), None


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
def _token_stats_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    softcap: float,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    with_sum_sq: bool,
    with_top1: bool,
    with_mean: bool,
    top_k: int,
) -> Outputs:
    vocab_size = logits.shape[-1]
    outputs = empty_outputs(
        logits, labels.numel(), with_entropy, with_sum_sq, with_top1, with_mean, top_k
    )
    logprobs, entropy, sum_sq, top1, mean, topk_values, topk_indices, lse = outputs
    ignored, in_range, safe = _label_terms(labels, vocab_size, ignore_index)
    for rows, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        x, _ = transformed(chunk, logit_scale, softcap, inv_temperature)
        m, argmax = x.max(dim=-1, keepdim=True)
        log_p = torch.log_softmax(x, dim=-1)
        row_lse = m - log_p.gather(-1, argmax)  # exact at the argmax, as ops/cpu/logprobs.py
        row_lse.masked_fill_(m == float("-inf"), float("-inf"))  # an all -inf row, as the kernel
        lse[rows] = row_lse.squeeze(-1)
        label_x = x.gather(-1, safe[rows].unsqueeze(-1))
        logprobs[rows] = torch.where(in_range[rows], (label_x - row_lse).squeeze(-1), float("nan"))
        if with_top1:
            match = (label_x == m).squeeze(-1).to(top1.dtype)
            top1[rows] = torch.where(in_range[rows] & ~row_lse.squeeze(-1).isnan(), match, float("nan"))
        if with_mean:
            mean[rows] = rowwise(lambda v: v.mean(dim=-1), x)
        if top_k:
            # torch.topk puts NaN first; ties in x' keep an implementation-defined order (documented)
            values, index = x.topk(top_k, dim=-1)
            topk_values[rows] = values - row_lse
            topk_indices[rows] = index
        p = log_p.exp() if with_entropy or with_sum_sq else None
        if with_sum_sq:
            sum_sq[rows] = rowwise(lambda v: torch.linalg.vector_norm(v, dim=-1), p).square_()
        if with_entropy:
            # H = −Σ p·log p; masked entries (log p = −inf, p = 0) add 0, not NaN
            p.mul_(log_p.clamp_(min=torch.finfo(log_p.dtype).min))
            entropy[rows] = rowwise(lambda v: v.sum(dim=-1), p).neg_()
    for out in outputs[:5]:
        if out.numel():
            out.masked_fill_(ignored, 0.0)
    if top_k:
        topk_values.masked_fill_(ignored.unsqueeze(-1), 0.0)
        topk_indices.masked_fill_(ignored.unsqueeze(-1), 0)
    return outputs


token_stats_fwd_torch = torch_op(
    "token_stats_fwd_torch",
    _token_stats_fwd,
    fake=lambda logits, labels, logit_scale, softcap, inv_temperature, ignore_index, *flags: empty_outputs(
        logits, labels.numel(), *flags
    ),
)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------
def token_stats_bwd_out(
    grad_logits: torch.Tensor,
    grads: tuple[torch.Tensor, ...],
    logits: torch.Tensor,
    labels: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    logit_scale: float,
    softcap: float,
    inv_temperature: float,
    ignore_index: int,
    vocab_start: int = 0,
    vocab_total: int = -1,
) -> None:
    """Writes the logits gradient into ``grad_logits`` (contiguous, the logits' shape); ``grads``,
    ``saved`` and the vocabulary shard as for the Triton launcher ``ops/token_stats.py::_launch_bwd``.

    Per row, G = p·(a + b·log p + c·p) + r/V + g·1[j = y] + Σ_k w_k·1[j = i_k], times dx'/dx, with
    a = −(g + h·H + 2q·S + Σ_k w_k), b = −h, c = 2q.  Unsharded, where p_y > 1/2, the label column's
    terms but r/V are minus the sum of the others' (``cpu/logprobs.py::exact_label_column``).
    """
    grad_logprobs, grad_entropy, grad_sum_sq, grad_mean, grad_topk = grads
    lse, entropy, sum_sq, topk_indices = saved
    vocab_size = logits.shape[-1]
    flat_grad = grad_logits.view(-1, vocab_size)
    vocab_total = vocab_size if vocab_total < 0 else vocab_total
    for rows, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        ignored, in_range, _ = _label_terms(labels[rows], vocab_total, ignore_index)
        _, owned, safe = _label_terms(labels[rows] - vocab_start, vocab_size, ignore_index)
        g = torch.where(in_range, grad_logprobs[rows], float("nan")).unsqueeze(-1)
        x, slope = transformed(chunk, logit_scale, softcap, inv_temperature, with_slope=True)
        log_p = torch.sub(x, lse[rows].unsqueeze(-1))  # x may be the logits' own memory
        p = log_p.exp()
        at_label = safe.unsqueeze(-1)
        rewrite = owned.unsqueeze(-1) & (p.gather(-1, at_label) > 0.5)  # False for a NaN row
        a = -g
        if grad_topk.numel():
            a = a - grad_topk[rows].sum(dim=-1, keepdim=True)
        if grad_sum_sq.numel():
            q = grad_sum_sq[rows].unsqueeze(-1)
            a = a - 2 * q * sum_sq[rows].unsqueeze(-1)
        if grad_entropy.numel():
            h = grad_entropy[rows].unsqueeze(-1)
            a = a - h * entropy[rows].unsqueeze(-1)
            # log p = −inf (p = 0) is set to 0 so that p·(…) is 0, not NaN (a clamp to the dtype's minimum
            # overflows to −inf again once multiplied by |h| > 1)
            inner = log_p.masked_fill_(log_p == float("-inf"), 0.0).mul_(-h).add_(a)
        else:
            inner = log_p.zero_().add_(a)
        if grad_sum_sq.numel():
            inner.add_(p * (2 * q))
        grad = inner.mul_(p)
        grad.scatter_add_(-1, at_label, torch.where(owned.unsqueeze(-1), g, 0.0))
        if grad_topk.numel():
            grad.scatter_add_(-1, topk_indices[rows], grad_topk[rows])
        if vocab_size == vocab_total:  # a shard holds no other shard's columns
            exact_label_column(grad, at_label, rewrite)
        if grad_mean.numel():
            grad.add_(grad_mean[rows].unsqueeze(-1) / vocab_size)
        grad.mul_(slope if slope is not None else logit_scale * inv_temperature)
        grad[ignored] = 0.0  # whatever the row holds, NaN included
        flat_grad[rows] = grad


def _token_stats_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_sum_sq: torch.Tensor,
    grad_mean: torch.Tensor,
    grad_topk: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    sum_sq: torch.Tensor,
    topk_indices: torch.Tensor,
    logit_scale: float,
    softcap: float,
    inv_temperature: float,
    ignore_index: int,
    vocab_start: int = 0,
    vocab_total: int = -1,
) -> torch.Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    token_stats_bwd_out(
        grad_logits, (grad_logprobs, grad_entropy, grad_sum_sq, grad_mean, grad_topk), logits, labels,
        (lse, entropy, sum_sq, topk_indices), logit_scale, softcap, inv_temperature, ignore_index,
        vocab_start, vocab_total,
    )
    return grad_logits


token_stats_bwd_torch = torch_op(
    "token_stats_bwd_torch",
    _token_stats_bwd,
    fake=lambda *args: args[5].new_empty(args[5].shape),
)
