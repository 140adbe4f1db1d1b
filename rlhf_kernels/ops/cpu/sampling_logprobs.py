"""The PyTorch path of ``sampling_logprobs`` (CPU tensors, or any device forced to ``torch``).

The math is that of the Triton kernels in ``rlhf_kernels/ops/sampling_logprobs.py`` (see its
docstring): the kept set is {key(x') ≥ T} over the order-preserving integer keys of x' = logits / τ.
No row is sorted: the top-k threshold is ``torch.topk``'s k-th value; the top-p threshold is decided
among the leading values ``torch.topk`` returns (the k survivors of top-k; else the 256, 4096, 32768
largest, widening while a row's nucleus is wider), and rows still undecided take the kernels' radix
search, here 8 bits per pass with a ``scatter_add_`` histogram (4 passes in fp32, 8 in fp64).  Rows run in the
chunks of ``ops/cpu/logprobs.py`` (about 8 MiB of fp32 per temporary): no full-size copy of the logits
exists.  Registered as the opaque custom ops ``rlhf_kernels::sampling_logprobs_fwd_torch`` and
``sampling_logprobs_bwd_torch``.  On CPU
tensors the fallback runs on the undecided rows only (a data-dependent branch, no device involved);
on other devices on every row, so that nothing synchronises the host.
"""

from __future__ import annotations

import math

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype
from .logprobs import _label_terms, _row_chunks, _rows_per_chunk, _scaled_rows

RADIX_BITS = 8  # bits of the key decided per histogram pass (256 buckets, plus "below" and "above")

# (logprobs [N], entropy [N] or [0], mask_mass [N], lse [N] over the kept set, threshold [N] int64)
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def empty_outputs(logits: torch.Tensor, n_rows: int, with_entropy: bool) -> Outputs:
    """Uninitialised outputs in the arithmetic dtype of ``logits`` (the threshold keys in int64): what
    every forward implementation (and its fake) returns."""
    logprobs = logits.new_empty(n_rows, dtype=compute_dtype(logits))
    entropy = logits.new_empty(n_rows if with_entropy else 0, dtype=logprobs.dtype)
    threshold = logits.new_empty(n_rows, dtype=torch.int64)
    return logprobs, entropy, torch.empty_like(logprobs), torch.empty_like(logprobs), threshold


def sort_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys (int32 for fp32, int64 for fp64) ordered as the values: a < b ⟺ key(a) < key(b)
    for non-NaN a, b; −0 and +0 share one key.  Negative floats have their magnitude bits flipped."""
    x = x + 0.0  # −0.0 + 0.0 = +0.0
    bits = x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    return torch.where(bits >= 0, bits, bits ^ torch.iinfo(bits.dtype).max)


def key_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values of int64 ``keys`` made by :func:`sort_keys` from ``dtype`` (the map is its own
    inverse on the bits): key(x) ≥ T ⟺ x ≥ key_values(T) for non-NaN x, so a row compares floats."""
    bits = keys.to(torch.int32 if dtype == torch.float32 else torch.int64)
    return torch.where(bits >= 0, bits, bits ^ torch.iinfo(bits.dtype).max).view(dtype)


def radix_select(keys: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The largest T (int64 [k, 1]) with Σ_{keys ≥ T} weights ≥ target ([k, 1]), per row of keys
    [k, V]; the smallest key value when no T qualifies.  Decides RADIX_BITS bits of T per pass: bucket
    the keys that share T's decided high bits by their next digit, and take the largest digit whose
    suffix sum still reaches the target.  The candidates prefix + d·2^shift (d < 2^RADIX_BITS) stay
    inside the previous pass's range, so they never overflow the key type."""
    keys = keys.contiguous()  # what searchsorted reads without a copy per pass
    key_bits = 8 * keys.element_size()
    radix = 1 << RADIX_BITS
    digits = torch.arange(radix, device=keys.device)
    prefix = torch.full((keys.shape[0], 1), -(1 << (key_bits - 1)), dtype=torch.int64, device=keys.device)
    for shift in range(key_bits - RADIX_BITS, -1, -RADIX_BITS):
        # bucket = #{candidates ≤ key}: 0 below the prefix, d + 1 for digit d (the last one also takes
        # the keys above the prefix's range).  For int64 keys by comparisons: key − prefix can overflow.
        if keys.dtype == torch.int32:  # key − prefix is exact in int64: the digit by arithmetic
            bucket = keys.long().sub_(prefix).div_(1 << shift, rounding_mode="floor").clamp_(-1, radix - 1)
            bucket.add_(1)
        else:
            candidates = prefix + (digits << shift)  # within the key range, see the doc
            bucket = torch.searchsorted(candidates, keys, right=True)
        histogram = weights.new_zeros(keys.shape[0], radix + 1).scatter_add_(1, bucket, weights)
        at_least = histogram.flip(-1).cumsum(-1).flip(-1)[:, 1:]  # Σ_{key ≥ candidate d}
        chosen = torch.where(at_least >= target, digits, 0).amax(-1, keepdim=True)  # d = 0 always holds
        prefix = prefix + (chosen << shift)
    return prefix


def _top_p_from_leaders(
    values: torch.Tensor, m_ref: torch.Tensor, floor: torch.Tensor, target: torch.Tensor, complete: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold [k, 1], decided [k, 1]): the top-p threshold key found among the leading ``values``
    [k, L] of each row (``torch.topk``'s, descending: no sort of the row), and whether it is exact.

    Whether value v survives top-p depends only on the mass of the values strictly above v, all of which
    are among the leaders when v is; so the decision is exact for every leader, and the threshold is
    decided unless every surviving leader is kept while more survivors lie below them (``complete``:
    none can, as after top-k, whose survivors are the leaders and their ties)."""
    leaders = values.shape[-1]
    value_keys = sort_keys(values).long()
    survives = value_keys >= floor
    e = torch.where(survives, torch.exp(values - m_ref), 0.0)
    before = torch.cumsum(e, dim=-1) - e  # the mass ahead in the list
    negated = values.neg().contiguous()
    n_above = torch.searchsorted(negated, negated).clamp_(max=leaders - 1)  # values strictly above
    kept = survives & (before.gather(-1, n_above) < target)
    largest = torch.iinfo(torch.int64).max
    threshold = torch.where(kept, value_keys, largest).amin(-1, keepdim=True)
    covers_survivors = ~survives[:, -1:] | complete
    return threshold, (survives & ~kept).any(-1, keepdim=True) | covers_survivors


# Top-p without top-k on CPU: the leaders torch.topk fetches, widening while rows stay undecided (a
# wide nucleus); torch.topk of 32768 of 151936 values costs about a third of a sort of the row.
TOP_P_LEADERS = (256, 4096, 32768)


def _top_p_threshold(
    x: torch.Tensor, e: torch.Tensor, m_ref: torch.Tensor, floor: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The top-p threshold key [k, 1] among the values ≥ the key ``floor`` (top-p without top-k).

    On CPU: from torch.topk leaders (:data:`TOP_P_LEADERS`), then the radix search for the rows still
    undecided.  Elsewhere: the radix search on every row (choosing rows would read device memory)."""
    nucleus = floor.clone()
    pending: torch.Tensor | slice = slice(None)
    if x.device.type == "cpu":
        for count in TOP_P_LEADERS:
            count = min(count, x.shape[-1])
            leaders = torch.topk(x[pending], count, dim=-1).values
            found, decided = _top_p_from_leaders(
                leaders, m_ref[pending], floor[pending], target[pending], count == x.shape[-1]
            )
            nucleus[pending] = found
            rows = torch.arange(x.shape[0])[pending]
            pending = rows[~decided.squeeze(-1)]
            if pending.numel() == 0:
                return nucleus
    # fp64 sums: at V ~ 1e5 an fp32 histogram errs by ~1e-5 of the mass, a few tokens at the boundary
    mass = torch.where(x[pending] >= key_values(floor[pending], x.dtype), e[pending], 0.0).double()
    nucleus[pending] = radix_select(sort_keys(x[pending]), mass, target[pending].double())
    return nucleus


def _chunk_forward(
    x: torch.Tensor, top_k: int, top_p: float, log_min_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(threshold key [k, 1], its value [k, 1], m_ref [k, 1], e = exp(x' − m_ref), bad [k, 1]) for
    x' [k, V]; bad: a row holding NaN or no finite logit, whose outputs are NaN."""
    m = x.amax(-1, keepdim=True)
    bad = x.isnan().any(-1, keepdim=True) | (m == -math.inf)
    m_ref = torch.where(m == -math.inf, 0.0, m)  # a row of −inf keeps finite exponents
    e = torch.exp(x - m_ref)
    threshold = sort_keys(m + log_min_p).long()  # min-p (log 0 = −inf: every key)
    leaders = None
    if 0 < top_k < x.shape[-1]:  # the k-th largest value, counted with multiplicity
        leaders = torch.topk(x, top_k, dim=-1).values
        threshold = torch.maximum(threshold, sort_keys(leaders[:, -1:]).long())
    if top_p < 1.0:
        surviving = x >= key_values(threshold, x.dtype)
        target = torch.where(surviving, e, 0.0).sum(-1, keepdim=True) * top_p
        if leaders is not None:  # top-k's survivors are its leaders and their ties: always decided
            nucleus = _top_p_from_leaders(leaders, m_ref, threshold, target, True)[0]
        else:
            nucleus = _top_p_threshold(x, e, m_ref, threshold, target)
        threshold = torch.maximum(threshold, nucleus)
    return threshold, key_values(threshold, x.dtype), m_ref, e, bad


def _sampling_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    top_k: int,
    top_p: float,
    log_min_p: float,
    ignore_index: int,
    with_entropy: bool,
) -> Outputs:
    vocab_size = logits.shape[-1]
    logprobs, entropy, mask_mass, lse, threshold = empty_outputs(logits, labels.numel(), with_entropy)
    ignored, in_range, safe = _label_terms(labels, vocab_size, ignore_index)
    for rows, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        x = _scaled_rows(chunk, inv_temperature).to(logprobs.dtype)
        thr, thr_value, m_ref, e, bad = _chunk_forward(x, top_k, top_p, log_min_p)
        kept = x >= thr_value
        kept_e = torch.where(kept, e, 0.0)
        s = kept_e.sum(-1, keepdim=True)
        row_lse = torch.where(bad, math.nan, m_ref + s.log())
        lse[rows] = row_lse.squeeze(-1)
        threshold[rows] = thr.squeeze(-1)
        mask_mass[rows] = (s / e.sum(-1, keepdim=True)).masked_fill(bad, math.nan).squeeze(-1)
        label = safe[rows].unsqueeze(-1)
        x_label = x.gather(-1, label)
        label_finite = kept.gather(-1, label) & (x_label > -math.inf)
        logprob = torch.where(label_finite, x_label - row_lse, -math.inf)
        logprob = torch.where(bad, math.nan, logprob).squeeze(-1)
        logprobs[rows] = torch.where(in_range[rows], logprob, math.nan)
        if with_entropy:
            # H = log s − t/s with t = Σ_kept e·(x' − m): −inf entries (e = 0) add 0, not 0·(−inf)
            t = (kept_e * torch.where(x > -math.inf, x - m_ref, 0.0)).sum(-1, keepdim=True)
            entropy[rows] = (s.log() - t / s).masked_fill(bad, math.nan).squeeze(-1)
    for out in (logprobs, entropy if with_entropy else None, mask_mass):
        if out is not None:
            out.masked_fill_(ignored, 0.0)
    return logprobs, entropy, mask_mass, lse, threshold


sampling_logprobs_fwd_torch = torch_op(
    "sampling_logprobs_fwd_torch",
    _sampling_logprobs_fwd,
    fake=lambda logits, labels, *args: empty_outputs(logits, labels.numel(), args[-1]),
)


def _sampling_logprobs_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    threshold: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """(1/τ)·[g·(1[j = y] − q_j) − h·q_j·(log q_j + H)] on the kept set, 0 elsewhere; g is 0 where the
    log-prob is −inf (a label outside the kept set or on a −inf logit)."""
    vocab_size = logits.shape[-1]
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    flat_grad = grad_logits.view(-1, vocab_size)
    for rows, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        x = _scaled_rows(chunk, inv_temperature).to(lse.dtype)
        ignored, in_range, safe = _label_terms(labels[rows], vocab_size, ignore_index)
        row_lse = lse[rows].unsqueeze(-1)
        kept = (x >= key_values(threshold[rows].unsqueeze(-1), x.dtype)) | row_lse.isnan()
        label = safe.unsqueeze(-1)
        label_finite = kept.gather(-1, label) & (x.gather(-1, label) > -math.inf)
        g = torch.where(label_finite, grad_logprobs[rows].unsqueeze(-1), 0.0)
        g = torch.where(in_range.unsqueeze(-1), g, math.nan) * inv_temperature
        log_q = torch.sub(x, row_lse)
        # outside the kept set x' < t ≤ lse, so exp(log q) ≤ 1 and q·0 is 0 (never inf·0)
        q = log_q.exp().mul_(kept)
        if grad_entropy.numel():
            h = grad_entropy[rows].unsqueeze(-1) * inv_temperature
            # −inf entries (q = 0) would give 0·(−inf): their log q is read as 0
            term = log_q.masked_fill_(log_q == -math.inf, 0.0).add_(entropy[rows].unsqueeze(-1)).mul_(h)
            grad = term.add_(g).mul_(q).neg_()  # −q·(g + h·(log q + H))
        else:
            grad = q.mul_(-g)
        grad.scatter_add_(-1, label, g)
        grad[ignored] = 0.0  # whatever the row holds, NaN included
        flat_grad[rows] = grad.view(-1, vocab_size)
    return grad_logits


sampling_logprobs_bwd_torch = torch_op(
    "sampling_logprobs_bwd_torch",
    _sampling_logprobs_bwd,
    fake=lambda grad_logprobs, grad_entropy, logits, *_: logits.new_empty(logits.shape),
)
