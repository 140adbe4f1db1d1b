"""PyTorch path of linear_logprobs / linear_token_stats (CPU, and any device without a kernel): the math
of :mod:`rlhf_kernels.ops.linear_logprobs`, chunked over the vocabulary (outer) and tokens (inner) so
that no temporary in the compute dtype exceeds :data:`CHUNK_BYTES`, never an [N, V] tensor.

Labelled rows only: on CPU the rows whose label is ``ignore_index`` are dropped before any product
(``nonzero``, which syncs nothing on the CPU), so the cost follows the number of labelled tokens; on
other devices every row is computed (``nonzero`` would sync) and ignored rows are masked.

``batch_invariant``: every product has exactly :data:`INVARIANT_ROWS` rows (the last chunk of rows is
padded with zeros) and the vocabulary chunk depends on V and H only, so each row's values and gradient
are bitwise the same whatever the batch size, the row's position and the other rows (ATen's CPU
products and row reductions compute each row of a fixed-shape operand the same way at every position:
``tests/test_linear_logprobs.py::test_batch_invariant_bitwise``).

Also the accumulator algebra that the Triton path's split merge and the vocabulary-parallel merge share
(:func:`rebase`, :func:`finalize`), and the gradient allocation that the backward's fake and the Triton
launcher share (:func:`empty_grads`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..._registration import torch_op
from ..._validation import compute_dtype
from .._launch import without_autocast
from .token_stats import transformed

# Bytes per temporary in the compute dtype (weight chunk, hidden chunk, logits chunk).
CHUNK_BYTES = 8 << 20
# batch_invariant: rows per product, whatever N (the last chunk padded to it).
INVARIANT_ROWS = 256
# Row accumulators, in this order: running max m, s = Σ e^{x'−m}, t = Σ e^{x'−m}(x'−m), the label's x',
# q = Σ e^{2(x'−m)}, total = Σ x'.  t, q, total stay 0 unless requested.
ACCUMULATORS = ("max", "sum", "tsum", "label_logit", "qsum", "total")
# With a top-k, two more: the k largest x' per row (descending) and their vocabulary entries (int64).
# Outputs of the forward: token_stats' (logprobs, entropy, sum_sq_probs, top1_match, mean_logit,
# topk_logprobs, topk_indices, lse).
Outputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]


# ---------------------------------------------------------------------------------------------------
# Accumulator algebra shared by both paths and the tensor-parallel merge.
# ---------------------------------------------------------------------------------------------------
def _rescale(m: torch.Tensor, s: torch.Tensor, m_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α = e^{m − M}, m − M) re-expressing a range's sums relative to the overall max M = m_all."""
    m_ref = torch.where(m_all == float("-inf"), 0.0, m_all)
    shift = torch.where(s > 0, m - m_ref, 0.0)  # an empty range (s = 0) contributes nothing
    return shift.exp(), shift


def rebase(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, m_all: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of a vocabulary range with max m, re-expressed relative to the overall max m_all."""
    alpha, shift = _rescale(m, s, m_all)
    return s * alpha, alpha * (t + s * shift)


def rebase_sq(m: torch.Tensor, s: torch.Tensor, q: torch.Tensor, m_all: torch.Tensor) -> torch.Tensor:
    """q = Σ e^{2(x'−m)} of a range re-expressed relative to m_all (scaled by α²)."""
    alpha, _ = _rescale(m, s, m_all)
    return q * (alpha * alpha)


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


def finalize_stats(
    acc: tuple[torch.Tensor, ...], labels: torch.Tensor, vocab_total: int, ignore_index: int,
    with_entropy: bool, with_sum_sq: bool, with_top1: bool, with_mean: bool,
) -> Outputs:
    """(logprobs, entropy, sum_sq_probs, top1_match, mean_logit [N] or [0], topk_logprobs, topk_indices
    [N, k] or [0], lse [N]) from the merged accumulators (:data:`ACCUMULATORS`, then the top-k x' and
    indices [N, k] or [0]).  top1_match compares the label's x' with the row max: both are the same
    rounded value when the label is the argmax, so the test is exact."""
    m, s, t, z_label, q, total, top_values, top_index = acc
    logprobs, entropy, lse = finalize(m, s, t, z_label, labels, vocab_total, ignore_index, with_entropy)
    ignored = labels == ignore_index
    empty = lambda: lse.new_empty(0)  # noqa: E731  (one each: a custom op's outputs may not alias)
    sum_sq = torch.where(ignored, 0.0, q / (s * s)) if with_sum_sq else empty()
    top1 = empty()
    if with_top1:
        valid = (labels >= 0) & (labels < vocab_total) & ~lse.isnan()
        top1 = torch.where(ignored, 0.0, torch.where(valid, (z_label == m).to(lse.dtype), float("nan")))
    mean = torch.where(ignored, 0.0, total / vocab_total) if with_mean else empty()
    if top_values.numel():
        kept = ~ignored.unsqueeze(1)
        topk_logprobs = torch.where(kept, top_values - lse.unsqueeze(1), 0.0)
        topk_indices = torch.where(kept, top_index, 0)
    else:
        topk_logprobs, topk_indices = empty(), top_index.new_empty(0)
    return logprobs, entropy, sum_sq, top1, mean, topk_logprobs, topk_indices, lse


def chunk_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of z [n, width] (k ≤ width) and their columns, as a set in which
    ties at the k-th value went to the smaller columns (torch.topk leaves that choice to the
    implementation).  Rows where an entry equal to the k-th value was left out take a stable sort: on the
    CPU those rows only, elsewhere every row (selecting them would sync)."""
    values, index = z.topk(k, dim=1)
    kth = values[:, -1:]
    short = (z == kth).sum(dim=1) > (values == kth).sum(dim=1)
    rows = short.nonzero().squeeze(1) if z.device.type == "cpu" else None
    if rows is None or rows.numel():
        tied = z if rows is None else z[rows]
        order = torch.sort(tied, dim=1, descending=True, stable=True)
        if rows is None:
            return order.values[:, :k], order.indices[:, :k]
        values[rows], index[rows] = order.values[:, :k], order.indices[:, :k]
    return values, index


def merge_topk(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of candidate sets [n, c] (distinct indices per row) in the order value descending, then
    index ascending (NaN first, as torch.sort): a sort by index, then a stable sort by value."""
    index, by_index = index.sort(dim=1)
    values, by_value = values.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return values[:, :k], index.gather(1, by_value[:, :k])


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
def chunk_sizes(
    n_rows: int, vocab_size: int, hidden_size: int, batch_invariant: bool = False
) -> tuple[int, int]:
    """(rows, vocabulary entries) per chunk; with ``batch_invariant`` independent of ``n_rows``."""
    elements = CHUNK_BYTES // 4
    vocab_chunk = max(1, min(vocab_size, elements // max(hidden_size, 1)))
    if batch_invariant:
        return INVARIANT_ROWS, max(1, min(vocab_chunk, elements // INVARIANT_ROWS))
    rows = max(1, min(n_rows, elements // vocab_chunk, elements // max(hidden_size, 1)))
    return rows, vocab_chunk


def active_rows(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor | None:
    """Indices of the labelled rows on the CPU; None (every row) elsewhere or when all are labelled."""
    if ignore_index is None or labels.device.type != "cpu":
        return None
    active = (labels != ignore_index).nonzero().squeeze(1)
    return None if active.numel() == labels.numel() else active


def _row_chunks(hidden: torch.Tensor, rows_per_chunk: int, batch_invariant: bool):
    """Yields (row slice, number of rows, hidden rows in the compute dtype): padded with zero rows to
    ``rows_per_chunk`` under ``batch_invariant``, so that every product has the same shape."""
    acc = compute_dtype(hidden)
    for r0 in range(0, hidden.shape[0], rows_per_chunk):
        h = hidden[r0 : r0 + rows_per_chunk].to(acc)
        n = h.shape[0]
        if batch_invariant and n < rows_per_chunk:
            h = F.pad(h, (0, 0, 0, rows_per_chunk - n))
        yield slice(r0, r0 + n), n, h


def _logits_chunk(h, w, b, logit_scale, softcap, inv_temperature, with_slope=False):
    """(x' = softcap(logit_scale·(h Wᵀ + b)) / τ for a chunk, dx'/dx or None when it is the constant
    logit_scale/τ); without a soft cap in one pass over the output."""
    if softcap == 0:
        factor = logit_scale * inv_temperature
        if b is not None:
            return torch.addmm(b, h, w.T, beta=factor, alpha=factor), None
        z = h @ w.T
        return (z.mul_(factor) if factor != 1.0 else z), None
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    return transformed(z, logit_scale, softcap, inv_temperature, with_slope)


def _fold(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy, logit_scale, softcap,
          with_sum_sq, with_mean, batch_invariant, top_k=0):
    """The row accumulators (:data:`ACCUMULATORS`) over every row of ``hidden``, then the top-k x' and
    their indices [N, k] (or [0]): each chunk's top-k merged into the running set, chunk after chunk."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden)
    m = torch.full((n_rows,), float("-inf"), dtype=acc, device=hidden.device)
    s, t, z_label, q, total = (torch.zeros_like(m) for _ in range(5))
    rows_per_chunk, vocab_per_chunk = chunk_sizes(n_rows, vocab_size, hidden.shape[1], batch_invariant)
    local = labels.long() - vocab_start
    exponentials = with_entropy or with_sum_sq
    top_values = m.new_empty(n_rows, 0)
    top_index = labels.new_empty(n_rows, 0, dtype=torch.int64)
    for v0 in range(0, vocab_size, vocab_per_chunk):
        width = min(vocab_per_chunk, vocab_size - v0)
        if top_k:  # the running set grows to k entries over the first chunks
            kept = min(top_k, top_values.shape[1] + width)
            merged_values, merged_index = m.new_empty(n_rows, kept), top_index.new_empty(n_rows, kept)
        w = weight[v0 : v0 + width].to(acc)  # an alias for weights in the compute dtype: only read
        b = None if bias is None else bias[v0 : v0 + width].to(acc)
        for r, n, h in _row_chunks(hidden, rows_per_chunk, batch_invariant):
            z, _ = _logits_chunk(h, w, b, logit_scale, softcap, inv_temperature)
            z = z[:n]
            if top_k:  # before z is overwritten below
                values, index = chunk_topk(z, min(top_k, width))
                merged_values[r], merged_index[r] = merge_topk(
                    torch.cat((top_values[r], values), 1), torch.cat((top_index[r], index + v0), 1), kept
                )
            col = local[r] - v0
            hit = (col >= 0) & (col < width)
            z_hit = z.gather(1, col.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
            z_label[r] += torch.where(hit, z_hit, 0.0)
            if with_mean:
                total[r] += z.sum(dim=1)
            if not exponentials:
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
            if with_sum_sq:
                q[r] = rebase_sq(m[r], s[r], q[r], m_new)
            z.sub_(m_ref.unsqueeze(1))  # z − m in place (the chunk's own product): one chunk alive besides e
            # without the entropy, z − m is not needed again: the exponentials overwrite it (no allocation)
            e = z.exp() if with_entropy else z.exp_()
            s[r] = s_old + e.sum(dim=1)
            if with_sum_sq:
                q[r] += torch.linalg.vector_norm(e, dim=1).square_()
            if with_entropy:
                # -inf entries have e = 0: clamped to the lowest finite value they give e·(z − m) = 0, not
                # NaN, with no extra temporary; NaN stays NaN.
                t[r] = t_old + e.mul_(z.clamp_(min=torch.finfo(acc).min)).sum(dim=1)
            m[r] = m_new
            del z, e  # before the next chunk's are allocated
        if top_k:
            top_values, top_index = merged_values, merged_index
    if not top_k:
        top_values, top_index = m.new_empty(0), top_index.new_empty(0)
    return m, s, t, z_label, q, total, top_values, top_index


@without_autocast
def _stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    vocab_start: int,
    with_entropy: bool,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    with_sum_sq: bool = False,
    with_mean: bool = False,
    ignore_index: int | None = None,
    batch_invariant: bool = False,
    top_k: int = 0,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:
    extras = (logit_scale, softcap, with_sum_sq, with_mean, batch_invariant, top_k)
    active = active_rows(labels, ignore_index)
    if active is None:
        return _fold(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy, *extras)
    part = _fold(hidden[active], weight, bias, labels[active], inv_temperature, vocab_start, with_entropy,
                 *extras)
    out = _stats_fake(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy, top_k=top_k)
    for full, value, neutral in zip(out, part, (float("-inf"), 0, 0, 0, 0, 0, 0, 0), strict=True):
        if full.numel():  # an ignored row holds the accumulators of no entry at all
            full.fill_(neutral)[active] = value
    return out


def _stats_fake(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy, logit_scale=1.0,
                softcap=0.0, with_sum_sq=False, with_mean=False, ignore_index=None, batch_invariant=False,
                top_k=0):
    out = hidden.new_empty(hidden.shape[0], dtype=compute_dtype(hidden))
    top = (hidden.shape[0], top_k) if top_k else (0,)
    return (out,) + tuple(torch.empty_like(out) for _ in range(5)) + (
        out.new_empty(top), out.new_empty(top, dtype=torch.int64))


def _grad_chunk(h, w, b, lse, entropy, g, eta, q2, coef, r_mean, col, width, logit_scale, softcap,
                inv_temperature, topk_w=None, topk_col=None):
    """G·dx'/dx for one chunk (rows of h × entries of w): with p = e^{x' − lse},
    G = p·(coef + 2q·p) − η·p·(log p + H) + r/V + g·1[j = y] + Σ_k w_k·1[j = i_k],
    coef = −g − 2q·S − Σ_k w_k (upstream gradients g, η, q2 = 2q, r_mean = r/V per row, each [rows, 1] or
    None, and topk_w = w [rows, k] at the chunk's columns topk_col; folded with the constant slope by the
    caller when there is no soft cap)."""
    logp, slope = _logits_chunk(h, w, b, logit_scale, softcap, inv_temperature, with_slope=True)
    logp.sub_(lse)
    # One chunk-sized temporary at most besides the product: p overwrites log p unless the entropy or
    # Σp² needs a second buffer, and G overwrites p (r/V added in the same pass).
    p = logp.exp_() if eta is None and q2 is None else logp.exp()
    if eta is not None:
        # p·(log p + H), with log p = -inf clamped so that masked entries give 0, not NaN
        logp.clamp_(min=torch.finfo(logp.dtype).min).add_(entropy).mul_(p).mul_(eta)
    factor = coef if q2 is None else torch.addcmul(coef, p, q2, out=logp if eta is None else None)
    grad = p.mul_(factor) if r_mean is None else torch.addcmul(r_mean, p, factor, out=p)
    if eta is not None:
        grad.sub_(logp)
    del logp, factor
    hit = ((col >= 0) & (col < width)).unsqueeze(1)
    grad.scatter_add_(1, col.clamp(0, width - 1).unsqueeze(1), torch.where(hit, g, 0.0))
    if topk_w is not None:  # top-k entries outside the chunk add 0 at a clamped column
        hit = (topk_col >= 0) & (topk_col < width)
        grad.scatter_add_(1, topk_col.clamp(0, width - 1), torch.where(hit, topk_w, 0.0))
    return grad if slope is None else grad.mul_(slope)


def _bwd_rows(grads, hidden, weight, bias, labels, lse, entropy, sum_sq, inv_temperature, ignore_index,
              vocab_start, need_hidden, need_weight, need_bias, logit_scale, softcap, batch_invariant):
    """(d_hidden, d_weight, d_bias) over every row of ``hidden`` (ignored rows send zero)."""
    grad_logprobs, grad_entropy, grad_sum_sq, grad_mean_over_v, grad_topk, topk_indices = grads
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    acc = compute_dtype(hidden)
    d_hidden, d_weight, d_bias = empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    d_hidden.zero_()  # summed over vocabulary chunks in the compute dtype, rounded once by the caller
    rows_per_chunk, vocab_per_chunk = chunk_sizes(n_rows, vocab_size, hidden_size, batch_invariant)
    kept = (labels != ignore_index).to(acc)
    local = labels.long() - vocab_start
    # G is linear in the upstream gradients: without a soft cap the constant slope logit_scale/τ is folded
    # into them (one pass less per chunk); ignored rows get all-zero coefficients.
    c = kept * (logit_scale * inv_temperature if softcap == 0 else 1.0)
    g = grad_logprobs.to(acc) * c
    coef = -g
    eta = q2 = r_mean = None
    if grad_entropy.numel():
        eta = grad_entropy.to(acc) * c
    if grad_sum_sq.numel():
        q2 = 2 * grad_sum_sq.to(acc) * c
        coef = coef - q2 * sum_sq
    if grad_mean_over_v.numel():
        r_mean = grad_mean_over_v.to(acc) * c
    topk_w = topk_local = None
    if grad_topk.numel():
        topk_w = grad_topk.to(acc) * c.unsqueeze(1)
        coef = coef - topk_w.sum(dim=1)
        topk_local = topk_indices - vocab_start
    column = lambda x, r: None if x is None else x[r].unsqueeze(1)  # noqa: E731
    for v0 in range(0, vocab_size, vocab_per_chunk):
        width = min(vocab_per_chunk, vocab_size - v0)
        w = weight[v0 : v0 + width].to(acc)
        b = None if bias is None else bias[v0 : v0 + width].to(acc)
        d_w = None
        if need_weight:  # accumulate in place when the weight's dtype is the accumulation dtype
            d_w = d_weight[v0 : v0 + width].zero_() if weight.dtype == acc else w.new_zeros(w.shape)
        d_b = w.new_zeros(width) if need_bias else None
        for r, n, h in _row_chunks(hidden, rows_per_chunk, batch_invariant):
            pad = (0, 0, 0, h.shape[0] - n)  # zero coefficients on padded rows: zero gradient there
            per_row = [None if x is None else F.pad(column(x, r), pad)
                       for x in (lse, entropy if eta is not None else None, g, eta, q2, coef, r_mean)]
            top = [None, None] if topk_w is None else [F.pad(topk_w[r], pad), F.pad(topk_local[r] - v0, pad)]
            grad = _grad_chunk(h, w, b, *per_row, F.pad(local[r] - v0, pad[2:]), width, logit_scale,
                               softcap, inv_temperature, *top)
            # an ignored (or padded) row's G is 0 whatever its logits hold, NaN included
            grad.masked_fill_(F.pad(kept[r], pad[2:]).unsqueeze(1) == 0, 0.0)
            if need_hidden and batch_invariant:  # the same fixed-shape product for every chunk
                d_hidden[r] += torch.mm(grad, w)[:n]
            elif need_hidden:
                d_hidden[r].addmm_(grad, w)  # grad and w in the compute dtype: no rounding per chunk
            if need_weight:
                d_w.addmm_(grad.T, h)
            if need_bias:
                d_b += grad.sum(dim=0)
            del grad  # before the next chunk's is allocated
        if need_weight and d_w.data_ptr() != d_weight[v0 : v0 + width].data_ptr():
            d_weight[v0 : v0 + width] = d_w
        if need_bias:
            d_bias[v0 : v0 + width] = d_b
    return d_hidden, d_weight, d_bias


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
    grad_sum_sq: torch.Tensor | None = None,
    grad_mean_over_v: torch.Tensor | None = None,
    sum_sq: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    batch_invariant: bool = False,
    grad_topk: torch.Tensor | None = None,
    topk_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_bias = need_bias and bias is not None
    empty = lse.new_empty(0)
    if grad_topk is None or topk_indices is None:
        grad_topk, topk_indices = empty, labels.new_empty(0, dtype=torch.int64)
    per_row = [grad_logprobs, grad_entropy, empty if grad_sum_sq is None else grad_sum_sq,
               empty if grad_mean_over_v is None else grad_mean_over_v, grad_topk, topk_indices, lse, entropy,
               empty if sum_sq is None else sum_sq]
    active = active_rows(labels, ignore_index)
    rows = (hidden, labels) if active is None else (hidden[active], labels[active])
    if active is not None:
        per_row = [x[active] if x.numel() else x for x in per_row]
    grads, (lse, entropy, sum_sq) = per_row[:6], per_row[6:]
    d_hidden, d_weight, d_bias = _bwd_rows(
        grads, rows[0], weight, bias, *rows[1:], lse, entropy, sum_sq, inv_temperature, ignore_index,
        vocab_start, need_hidden, need_weight, need_bias, logit_scale, softcap, batch_invariant,
    )
    if active is not None and need_hidden:
        full = torch.zeros(hidden.shape, dtype=d_hidden.dtype, device=hidden.device)
        full[active] = d_hidden
        d_hidden = full
    return d_hidden, d_weight, d_bias


def _bwd_fake(grad_logprobs, grad_entropy, hidden, weight, bias, *rest):
    need_hidden, need_weight, need_bias = rest[6:9]
    return empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


# Row accumulators (ACCUMULATORS) [N] in the compute dtype over this weight's rows: the contract of the
# routing op rlhf_kernels::linear_logprobs_stats (which returns the first four).
linear_logprobs_stats_torch = torch_op("linear_logprobs_stats_torch", _stats, fake=_stats_fake)
# (d_hidden [N, H] in the compute dtype, d_weight, d_bias): rlhf_kernels::linear_logprobs_bwd's contract.
linear_logprobs_bwd_torch = torch_op("linear_logprobs_bwd_torch", _bwd, fake=_bwd_fake)
