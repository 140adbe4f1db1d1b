"""PyTorch path of linear_logprobs (CPU, and any device without a kernel): the math of
:mod:`rlhf_kernels.ops.linear_logprobs`, chunked over the vocabulary (outer) and tokens (inner) so that
no temporary in the compute dtype exceeds :data:`CHUNK_BYTES`, never an [N, V] tensor.

Also the accumulator algebra that the Triton path's split merge and the vocabulary-parallel merge share
(:func:`rebase`), and the gradient allocation that the backward's fake and the Triton launcher share
(:func:`empty_grads`).
"""

from __future__ import annotations

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype
from .._launch import without_autocast

# Bytes per temporary in the compute dtype (weight chunk, hidden chunk, logits chunk).
CHUNK_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------------
# Accumulator algebra shared by both paths and the tensor-parallel merge.
# ---------------------------------------------------------------------------------------------------
def rebase(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, m_all: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of a vocabulary range with max m, re-expressed relative to the overall max m_all."""
    m_ref = torch.where(m_all == float("-inf"), 0.0, m_all)
    shift = torch.where(s > 0, m - m_ref, 0.0)  # an empty range (s = 0) contributes nothing
    alpha = shift.exp()
    return s * alpha, alpha * (t + s * shift)


def finalize(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, z_label: torch.Tensor, labels: torch.Tensor,
    vocab_total: int, ignore_index: int, with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy or [0], lse) from the merged row accumulators."""
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab_total)
    m_ref = torch.where(m == float("-inf"), 0.0, m)
    log_s = s.log()
    lse = m_ref + log_s
    logprobs = torch.where(ignored, 0.0, torch.where(in_range, z_label - lse, float("nan")))
    entropy = torch.where(ignored, 0.0, log_s - t / s) if with_entropy else lse.new_empty(0)
    return logprobs, entropy, lse


def empty_grads(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (d_hidden [N, H] in the compute dtype, d_weight [V, H], d_bias [V]); [0] when not
    needed.  d_hidden stays in the compute dtype until the autograd wiring rounds it once (issue 15)."""
    d_hidden = hidden.new_empty(tuple(hidden.shape) if need_hidden else (0,), dtype=compute_dtype(hidden))
    d_weight = weight.new_empty(tuple(weight.shape) if need_weight else (0,))
    d_bias = weight.new_empty(weight.shape[0] if (need_bias and bias is not None) else 0)
    return d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------------
# The chunked implementation.
# ---------------------------------------------------------------------------------------------------
def chunk_sizes(n_rows: int, vocab_size: int, hidden_size: int) -> tuple[int, int]:
    """(rows, vocabulary entries) per chunk."""
    elements = CHUNK_BYTES // 4
    vocab_chunk = max(1, min(vocab_size, elements // max(hidden_size, 1)))
    rows = max(1, min(n_rows, elements // vocab_chunk, elements // max(hidden_size, 1)))
    return rows, vocab_chunk


def _logits_chunk(hidden_rows, weight_rows, bias_rows, inv_temperature, acc_dtype):
    """(h Wᵀ + b) / τ for a chunk, in one pass over the output."""
    h = hidden_rows.to(acc_dtype)
    if bias_rows is not None:
        return torch.addmm(bias_rows, h, weight_rows.T, beta=inv_temperature, alpha=inv_temperature)
    z = h @ weight_rows.T
    return z.mul_(inv_temperature) if inv_temperature != 1.0 else z


@without_autocast
def _stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    vocab_start: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden)
    m = torch.full((n_rows,), float("-inf"), dtype=acc, device=hidden.device)
    s = torch.zeros_like(m)
    t = torch.zeros_like(m)
    z_label = torch.zeros_like(m)
    rows_per_chunk, vocab_per_chunk = chunk_sizes(n_rows, vocab_size, hidden.shape[1])
    local = labels.long() - vocab_start
    for v0 in range(0, vocab_size, vocab_per_chunk):
        width = min(vocab_per_chunk, vocab_size - v0)
        w = weight[v0 : v0 + width].to(acc)  # an alias for weights in the compute dtype: only read
        b = None if bias is None else bias[v0 : v0 + width].to(acc)
        for r0 in range(0, n_rows, rows_per_chunk):
            r = slice(r0, r0 + rows_per_chunk)
            z = _logits_chunk(hidden[r], w, b, inv_temperature, acc)
            col = local[r] - v0
            hit = (col >= 0) & (col < width)
            z_hit = z.gather(1, col.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
            z_label[r] += torch.where(hit, z_hit, 0.0)
            if not with_entropy:
                # One fused pass: the chunk is (max, sum) = (lse_c, 1), or (−inf, 0) when it is all −inf.
                lse_c = torch.logsumexp(z, dim=1)
                m_new = torch.maximum(m[r], lse_c)
                s_old, _ = rebase(m[r], s[r], t[r], m_new)
                s_chunk, _ = rebase(lse_c, (lse_c != float("-inf")).to(acc), t[r], m_new)
                s[r] = s_old + s_chunk
                m[r] = m_new
                del z
                continue
            m_new = torch.maximum(m[r], z.amax(dim=1))
            m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)
            s_old, t_old = rebase(m[r], s[r], t[r], m_new)
            z.sub_(m_ref.unsqueeze(1))  # z − m, in place: one chunk alive besides e
            e = z.exp()
            s[r] = s_old + e.sum(dim=1)
            # -inf entries have e = 0: clamped to the lowest finite value they give e·(z − m) = 0, not NaN,
            # with no extra temporary; NaN stays NaN.
            t[r] = t_old + e.mul_(z.clamp_(min=torch.finfo(acc).min)).sum(dim=1)
            m[r] = m_new
            del z, e  # before the next chunk's are allocated
    return m, s, t, z_label


def _stats_fake(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy):
    out = hidden.new_empty(hidden.shape[0], dtype=compute_dtype(hidden))
    return out, torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)


@without_autocast
def _bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    vocab_start: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    acc = compute_dtype(hidden)
    need_bias = need_bias and bias is not None
    d_hidden, d_weight, d_bias = empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    d_hidden.zero_()  # summed over vocabulary chunks in the compute dtype, rounded once by the caller
    rows_per_chunk, vocab_per_chunk = chunk_sizes(n_rows, vocab_size, hidden_size)
    ignored = labels == ignore_index
    local = labels.long() - vocab_start
    has_entropy = grad_entropy.numel() > 0
    # G is linear in g and η: folding 1/τ into them saves a pass over every chunk.
    grad_logprobs = grad_logprobs.to(acc) * inv_temperature
    grad_entropy = grad_entropy.to(acc) * inv_temperature
    for v0 in range(0, vocab_size, vocab_per_chunk):
        width = min(vocab_per_chunk, vocab_size - v0)
        w = weight[v0 : v0 + width].to(acc)
        b = None if bias is None else bias[v0 : v0 + width].to(acc)
        d_w = None
        if need_weight:  # accumulate in place when the weight's dtype is the accumulation dtype
            d_w = d_weight[v0 : v0 + width].zero_() if weight.dtype == acc else w.new_zeros(w.shape)
        d_b = w.new_zeros(width) if need_bias else None
        for r0 in range(0, n_rows, rows_per_chunk):
            r = slice(r0, r0 + rows_per_chunk)
            h = hidden[r].to(acc)
            logp = _logits_chunk(h, w, b, inv_temperature, acc).sub_(lse[r].unsqueeze(1))
            grad = logp.exp()  # p, turned into the gradient in place: two chunks alive at most
            g = grad_logprobs[r].unsqueeze(1)
            if has_entropy:
                # −η·p·(log p + H), with log p = -inf clamped so that masked entries give 0, not NaN
                logp.clamp_(min=torch.finfo(acc).min).add_(entropy[r].unsqueeze(1)).mul_(grad)
                grad.mul_(-g).sub_(logp.mul_(grad_entropy[r].unsqueeze(1)))
            else:
                grad.mul_(-g)
            col = local[r] - v0
            hit = ((col >= 0) & (col < width)).unsqueeze(1)
            grad.scatter_add_(1, col.clamp(0, width - 1).unsqueeze(1), torch.where(hit, g, 0.0))
            grad.masked_fill_(ignored[r].unsqueeze(1), 0.0)
            if need_hidden:
                d_hidden[r].addmm_(grad, w)  # grad and w in the compute dtype: no rounding per chunk
            if need_weight:
                d_w.addmm_(grad.T, h)
            if need_bias:
                d_b += grad.sum(dim=0)
            del logp, grad  # before the next chunk's are allocated
        if need_weight and d_w.data_ptr() != d_weight[v0 : v0 + width].data_ptr():
            d_weight[v0 : v0 + width] = d_w
        if need_bias:
            d_bias[v0 : v0 + width] = d_b
    return d_hidden, d_weight, d_bias


def _bwd_fake(grad_logprobs, grad_entropy, hidden, weight, bias, *rest):
    *_, need_hidden, need_weight, need_bias = rest
    return empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


# Row accumulators (m, s, t, z_label) [N] in the compute dtype over this weight's rows: the contract of
# rlhf_kernels::linear_logprobs_stats.
linear_logprobs_stats_torch = torch_op("linear_logprobs_stats_torch", _stats, fake=_stats_fake)
# (d_hidden [N, H] in the compute dtype, d_weight, d_bias): rlhf_kernels::linear_logprobs_bwd's contract.
linear_logprobs_bwd_torch = torch_op("linear_logprobs_bwd_torch", _bwd, fake=_bwd_fake)
