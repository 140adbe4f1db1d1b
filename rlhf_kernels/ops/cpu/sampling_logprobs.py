"""The PyTorch path of ``sampling_logprobs`` (CPU tensors, or any device forced to ``torch``).

The math is that of the Triton kernels in ``rlhf_kernels/ops/sampling_logprobs.py`` (see its
docstring): the kept set is {key(x') ≥ T} over the order-preserving integer keys of x' = logits / τ.
No row is sorted: the top-k threshold is ``torch.topk``'s k-th value; the top-p threshold is decided
among the leading values ``torch.topk`` returns (the k survivors of top-k; else the 256 largest), and
rows still undecided (a wide nucleus) take, on CPU at V ≥ 32768, a float64 histogram of the mass over
x' − m (64 buckets per unit) and an exact decision inside the bucket where the mass reaches p (its
values fetched with ``torch.topk``); elsewhere the radix search (two 65536-bucket passes over int32
keys, 8 passes of 8 bits over int64 ones).  Rows run in the chunks of ``ops/cpu/logprobs.py`` (about
8 MiB of fp32 per temporary): no full-size copy of the logits exists.  Registered as the opaque custom
ops ``rlhf_kernels::sampling_logprobs_fwd_torch`` and ``sampling_logprobs_bwd_torch``.  On CPU tensors
the leaders and the histogram take data-dependent sizes (no device involved); on other devices every
row takes the radix search, so that nothing synchronises the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype
from .logprobs import _label_terms, _row_chunks, _rows_per_chunk, _scaled_rows, exact_label_column

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
    flips = (bits >> (8 * bits.element_size() - 1)).bitwise_and_(torch.iinfo(bits.dtype).max)
    return flips.bitwise_xor_(bits)  # the magnitude bits of negatives flipped, others kept


def key_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values of int64 ``keys`` made by :func:`sort_keys` from ``dtype`` (the map is its own
    inverse on the bits): key(x) ≥ T ⟺ x ≥ key_values(T) for non-NaN x, so a row compares floats."""
    bits = keys.to(torch.int32 if dtype == torch.float32 else torch.int64)
    return torch.where(bits >= 0, bits, bits ^ torch.iinfo(bits.dtype).max).view(dtype)


# Rows at least this long take the two-pass search of int32 keys: its [k, 65536] float64 histogram is
# then at most 4× the size of the rows' fp32 values.
WIDE_HISTOGRAM_MIN_VOCAB = 32768


def radix_select(keys: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The largest T (int64 [k, 1]) with Σ_{keys ≥ T} weights ≥ target ([k, 1]), per row of keys
    [k, V] (weights ≥ 0); the smallest key value when no T qualifies.  int32 keys of long rows: two
    passes of a 65536-bucket histogram (:func:`_select_int32`); else 8 bits per pass, bucketing the keys
    that share T's decided high bits by their next digit and taking the largest digit whose suffix sum
    still reaches the target.  The candidates prefix + d·2^shift (d < 256) stay inside the previous
    pass's range, so they never overflow the key type (key − prefix could: digits by searchsorted)."""
    if keys.dtype == torch.int32 and keys.shape[-1] >= WIDE_HISTOGRAM_MIN_VOCAB:
        return _select_int32(keys, weights, target)
    keys = keys.long().contiguous()  # what searchsorted reads without a copy per pass
    radix = 256
    digits = torch.arange(radix, device=keys.device)
    prefix = torch.full((keys.shape[0], 1), -(1 << 63), dtype=torch.int64, device=keys.device)
    for shift in range(56, -1, -8):
        # bucket = #{candidates ≤ key}: 0 below the prefix, d + 1 for digit d (the last one also takes
        # the keys above the prefix's range)
        bucket = torch.searchsorted(prefix + (digits << shift), keys, right=True)
        histogram = weights.new_zeros(keys.shape[0], radix + 1).scatter_add_(1, bucket, weights)
        chosen = _largest_digit(histogram[:, 1:], histogram[:, 1:].sum(-1, keepdim=True), target)
        prefix = prefix + (chosen << shift)
    return prefix


def _largest_digit(histogram: torch.Tensor, total: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The largest d (int64 [k, 1]) with total − Σ_{b < d} histogram[:, b] ≥ target, else 0: the
    suffix sums never increase (weights ≥ 0, rounding is monotone), so d is a count minus one."""
    at_least = torch.cumsum(histogram, -1).sub_(histogram).neg_().add_(total)
    return (at_least >= target).sum(-1, keepdim=True).sub_(1).clamp_(min=0)


def _select_int32(keys: torch.Tensor, weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`radix_select` of int32 keys: the mass per high half-word (65536 buckets), then per low
    half-word inside the chosen high bucket, the mass above it added back; both histograms by one
    ``index_add_`` over int32 indices row·65536 + digit."""
    rows, radix = keys.shape[0], 1 << 16
    offsets = torch.arange(rows, dtype=torch.int32, device=keys.device).mul_(radix).unsqueeze(-1)
    weights = weights.reshape(-1)
    high = keys >> 16  # in [−32768, 32768)
    flat = (high + (offsets + radix // 2)).view(-1)
    histogram = weights.new_zeros(rows * radix).index_add_(0, flat, weights).view(rows, radix)
    total = histogram.sum(-1, keepdim=True)
    chosen_high = _largest_digit(histogram, total, target)
    at_chosen = torch.cumsum(histogram, -1).gather(-1, chosen_high)  # Σ_{b ≤ chosen}
    above = total - at_chosen  # the mass of the high buckets above the chosen one
    chosen_high = chosen_high - radix // 2
    inside = (high == chosen_high.int()).view(-1)
    flat = torch.bitwise_and(keys, radix - 1, out=flat.view(keys.shape)).add_(offsets).view(-1)
    histogram = weights.new_zeros(rows * radix).index_add_(0, flat, weights * inside).view(rows, radix)
    chosen_low = _largest_digit(histogram, histogram.sum(-1, keepdim=True) + above, target)
    return chosen_high * radix + chosen_low


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
    # the values strictly above each: the position where its tie group starts (a running maximum)
    group_start = torch.ones_like(survives)
    group_start[:, 1:] = values[:, 1:] != values[:, :-1]
    positions = torch.arange(leaders, device=values.device)
    n_above = torch.where(group_start, positions, 0).cummax(-1).values
    kept = survives & (before.gather(-1, n_above) < target)
    largest = torch.iinfo(torch.int64).max
    threshold = torch.where(kept, value_keys, largest).amin(-1, keepdim=True)
    covers_survivors = ~survives[:, -1:] | complete
    return threshold, (survives & ~kept).any(-1, keepdim=True) | covers_survivors


# Top-p without top-k on CPU: the leaders torch.topk fetches first (a peaked row's nucleus lies among
# its 256 largest values); the rows they leave undecided (a wide nucleus) take the mass histogram
# (:func:`_top_p_by_histogram`) at V ≥ WIDE_HISTOGRAM_MIN_VOCAB, else the radix search.
TOP_P_LEADERS = (256,)
BUCKETS_PER_UNIT = 64  # histogram buckets per unit of x' − m (4096 buckets: x' − m down to −64)
BUCKETS = 4096


class _TopP(NamedTuple):
    """Per-row inputs of a top-p search without top-k: x' [k, V], z = x' − m_ref, e = exp(z) zeroed
    below the floor key [k, 1], m_ref [k, 1], target = p·Σ e [k, 1] (NaN for a row holding NaN)."""

    x: torch.Tensor
    z: torch.Tensor
    e: torch.Tensor
    m_ref: torch.Tensor
    floor: torch.Tensor
    target: torch.Tensor

    def rows(self, pending: torch.Tensor | slice) -> _TopP:
        return _TopP(*(t[pending] for t in self))


def _top_p_threshold(rows: _TopP) -> torch.Tensor:
    """The top-p threshold key [k, 1] among the values ≥ the floor key (top-p without top-k).

    On CPU: from torch.topk leaders (:data:`TOP_P_LEADERS`), then the mass histogram for the rows still
    undecided.  Elsewhere: the radix search on every row (choosing rows would read device memory)."""
    x, vocab_size = rows.x, rows.x.shape[-1]
    nucleus = rows.floor.clone()
    pending: torch.Tensor | slice = slice(None)
    if x.device.type == "cpu":
        for count in TOP_P_LEADERS:
            count = min(count, vocab_size)
            left = rows.rows(pending)
            leaders = torch.topk(left.x, count, dim=-1).values
            found, decided = _top_p_from_leaders(
                leaders, left.m_ref, left.floor, left.target, count == vocab_size
            )
            nucleus[pending] = found
            pending = torch.arange(x.shape[0])[pending][~decided.squeeze(-1)]
            if pending.numel() == 0:
                return nucleus
            if pending.numel() == x.shape[0]:
                pending = slice(None)  # every row: no copies
        if vocab_size >= WIDE_HISTOGRAM_MIN_VOCAB:
            nucleus[pending] = _top_p_by_histogram(rows.rows(pending))
            return nucleus
    # fp64 sums: at V ~ 1e5 an fp32 histogram errs by ~1e-5 of the mass, a few tokens at the boundary
    left = rows.rows(pending)
    nucleus[pending] = radix_select(sort_keys(left.x), left.e.double(), left.target.double())
    return nucleus


def _top_p_by_histogram(rows: _TopP) -> torch.Tensor:
    """The top-p threshold key [k, 1] on CPU (a data-dependent width): the surviving mass per bucket of
    x' − m (:data:`BUCKETS_PER_UNIT` per unit; the last bucket takes the rest, −inf and NaN), summed
    in float64 from the top to the bucket where it reaches the target; every value of the buckets
    above is kept, of those below dropped, and the values of that bucket (fetched with torch.topk)
    are decided exactly as leaders are, with the mass above the bucket taken off the target.

    x ↦ bucket is monotone (rounding is), so the buckets hold ranges of values, ties together."""
    x, z, e, m_ref, floor, target = rows
    offsets = torch.arange(x.shape[0], dtype=z.dtype).mul_(BUCKETS).unsqueeze(-1)  # exact: < 2^24
    bucket = torch.add(offsets, z, alpha=-BUCKETS_PER_UNIT)  # row·4096 + 64·(m − x')
    bucket = torch.fmin(bucket, offsets + (BUCKETS - 1), out=bucket)  # NaN and −inf: the last bucket
    flat = bucket.to(torch.int32)  # truncation: the floor of values ≥ 0
    # float64 sums: at V ~ 1e5 float32 ones err by ~1e-6 of the mass, a token at the boundary when p → 1
    mass = e.double().view(-1)
    histogram = mass.new_zeros(x.shape[0] * BUCKETS).index_add_(0, flat.view(-1), mass).view(-1, BUCKETS)
    through = histogram.cumsum(-1)  # the mass of the buckets up to each (largest values first)
    chosen = torch.searchsorted(through, target.double()).clamp_(max=BUCKETS - 1)  # first reaching it
    above = through.gather(-1, chosen) - histogram.gather(-1, chosen)
    chosen = chosen.masked_fill_(target.isnan(), BUCKETS)  # a NaN row's values are not fetched
    inside = flat == chosen.to(torch.int32) + offsets.to(torch.int32)
    counts = inside.sum(-1, keepdim=True, dtype=torch.int32).long()
    values = torch.topk(torch.where(inside, x, -math.inf), max(1, int(counts.max())), dim=-1).values
    # the bucket's smallest value is the floor of its list: the −inf padding after it never survives
    smallest = values.gather(-1, (counts - 1).clamp_(min=0))
    floor = torch.maximum(floor, sort_keys(smallest).long())
    found = _top_p_from_leaders(values, m_ref, floor, target - above, True)[0]
    # nothing kept: the target exceeds the surviving mass (rounding, p → 1): every survivor is kept
    return torch.where(found == torch.iinfo(torch.int64).max, floor, found)


def _chunk_forward(
    x: torch.Tensor, top_k: int, top_p: float, log_min_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(threshold key [k, 1], its value [k, 1], m_ref [k, 1], e = exp(x' − m_ref), Σ e [k, 1], bad
    [k, 1]) for x' [k, V]; bad: a row holding NaN or no finite logit, whose outputs are NaN."""
    m = x.amax(-1, keepdim=True)
    m_ref = torch.where(m == -math.inf, 0.0, m)  # a row of −inf keeps finite exponents
    z = x - m_ref
    e = torch.exp(z)
    e_sum = e.sum(-1, keepdim=True)
    bad = e_sum.isnan() | (m == -math.inf)  # a NaN (or +inf: inf − inf) makes its e, and Σ e, NaN
    threshold = sort_keys(m + log_min_p).long()  # min-p (log 0 = −inf: every key)
    leaders = None
    if 0 < top_k < x.shape[-1]:  # the k-th largest value, counted with multiplicity
        leaders = torch.topk(x, top_k, dim=-1).values
        threshold = torch.maximum(threshold, sort_keys(leaders[:, -1:]).long())
    if top_p < 1.0:
        if leaders is None and log_min_p == -math.inf:  # every value survives
            surviving_e = e
            target = e_sum * top_p
        else:
            surviving_e = e.masked_fill(x < key_values(threshold, x.dtype), 0.0)
            target = surviving_e.sum(-1, keepdim=True) * top_p
        if leaders is not None:  # top-k's survivors are its leaders and their ties: always decided
            nucleus = _top_p_from_leaders(leaders, m_ref, threshold, target, True)[0]
        else:
            nucleus = _top_p_threshold(_TopP(x, z, surviving_e, m_ref, threshold, target))
        threshold = torch.maximum(threshold, nucleus)
    return threshold, key_values(threshold, x.dtype), m_ref, e, e_sum, bad


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
        thr, thr_value, m_ref, e, e_sum, bad = _chunk_forward(x, top_k, top_p, log_min_p)
        kept = x >= thr_value
        kept_e = torch.where(kept, e, 0.0)
        s = kept_e.sum(-1, keepdim=True)
        row_lse = torch.where(bad, math.nan, m_ref + s.log())
        lse[rows] = row_lse.squeeze(-1)
        threshold[rows] = thr.squeeze(-1)
        mask_mass[rows] = (s / e_sum).masked_fill(bad, math.nan).squeeze(-1)
        label = safe[rows].unsqueeze(-1)
        x_label = x.gather(-1, label)
        label_finite = kept.gather(-1, label) & (x_label > -math.inf)
        # (x'_y − m) − log s, not x'_y − lse: lse = m + log s rounds log s away when |m| ≫ 1 (1e4, 1e30)
        logprob = torch.where(label_finite, (x_label - m_ref) - s.log(), -math.inf)
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
    in_place = grad_logits.dtype == lse.dtype  # fp32 / fp64 logits: no [k, V] copy; else rounded once
    for rows, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        x = _scaled_rows(chunk, inv_temperature).to(lse.dtype)
        ignored, in_range, safe = _label_terms(labels[rows], vocab_size, ignore_index)
        row_lse = lse[rows].unsqueeze(-1)
        # a NaN row (lse = NaN) needs no kept set: its q = exp(x' − NaN) is NaN, and NaN·0 is NaN
        kept = x >= key_values(threshold[rows].unsqueeze(-1), x.dtype)
        label = safe.unsqueeze(-1)
        label_finite = kept.gather(-1, label) & (x.gather(-1, label) > -math.inf)
        g = torch.where(label_finite, grad_logprobs[rows].unsqueeze(-1), 0.0)
        g = torch.where(in_range.unsqueeze(-1), g, math.nan) * inv_temperature
        log_q = torch.sub(x, row_lse)
        rewrite = in_range.unsqueeze(-1) & label_finite & (log_q.gather(-1, label).exp() > 0.5)  # not NaN
        grad = flat_grad[rows] if in_place else torch.empty_like(x)
        # outside the kept set x' < t ≤ lse, so exp(log q) ≤ 1 and q·0 is 0 (never inf·0)
        if grad_entropy.numel():
            q = log_q.exp().mul_(kept)
            h = grad_entropy[rows].unsqueeze(-1) * inv_temperature
            # −inf entries (q = 0) would give 0·(−inf): their log q is read as 0
            term = log_q.masked_fill_(log_q == -math.inf, 0.0).add_(entropy[rows].unsqueeze(-1)).mul_(h)
            torch.mul(term.add_(g), q, out=grad).neg_()  # −q·(g + h·(log q + H))
        else:
            torch.mul(log_q.exp_().mul_(kept), -g, out=grad)
        grad.scatter_add_(-1, label, g)
        exact_label_column(grad, label, rewrite)  # where q_y > 1/2
        grad[ignored] = 0.0  # whatever the row holds, NaN included
        if not in_place:
            flat_grad[rows] = grad
    return grad_logits


sampling_logprobs_bwd_torch = torch_op(
    "sampling_logprobs_bwd_torch",
    _sampling_logprobs_bwd,
    fake=lambda grad_logprobs, grad_entropy, logits, *_: logits.new_empty(logits.shape),
)
