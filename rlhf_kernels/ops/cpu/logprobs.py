"""The PyTorch path of ``logprobs_from_logits`` / ``entropy_from_logits`` (CPU tensors, or any device
forced to the ``torch`` backend).

The math is that of the Triton kernels in ``rlhf_kernels/ops/logprobs.py`` (see its docstring), run over
chunks of rows (about 8 MiB of fp32 per temporary, two or three alive at a time) so that no full-size
fp32 copy of the logits ever exists.  Registered as the opaque custom ops
``rlhf_kernels::logprobs_fwd_torch``, ``logprobs_bwd_torch`` and ``logprobs_bwd_inplace_torch``.

Labels outside [0, V) that are not ``ignore_index`` (reachable only with the range check switched off)
give a NaN log-prob and a NaN gradient row; they are never used as an index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype
from .._launch import row_layout

# Bytes of fp32 per chunk temporary: large enough for ATen's vectorised row kernels, small enough that
# the two or three alive at a time stay far below a [N, V] logits tensor.
CHUNK_BYTES = 8 << 20


def _rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _row_chunks(x: torch.Tensor, rows_per_chunk: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yields ``(rows, chunk)`` covering the rows of ``x [..., V]`` in order: ``rows`` the slice of
    flattened row indices, ``chunk`` a view of those rows of ``x`` ([k, V] or [k0, rows1, V]; a copy only
    when ``x`` needs more than two row dimensions, see ``row_layout``).  Nothing for an empty ``x``."""
    x, rows0, rows1, s0, s1, sv = row_layout(x)
    if rows0 * rows1 == 0:
        return
    view = x.as_strided((rows0, rows1, x.shape[-1]), (s0, s1, sv))
    if rows1 >= rows_per_chunk or rows0 == 1:
        for r0 in range(rows0):
            for r1 in range(0, rows1, rows_per_chunk):
                chunk = view[r0, r1 : r1 + rows_per_chunk]
                first = r0 * rows1 + r1
                yield slice(first, first + chunk.shape[0]), chunk
    else:
        step = max(1, rows_per_chunk // rows1)
        for r0 in range(0, rows0, step):
            chunk = view[r0 : r0 + step]
            yield slice(r0 * rows1, (r0 + chunk.shape[0]) * rows1), chunk


def rowwise(reduce: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``reduce(x)`` for a reduction over the last dimension of ``x [k, V]``, each row reduced in the
    same order whatever k (batch invariance, issue 15).  ATen splits a reduction with a single output
    over threads once it has 32768 elements, an order unlike that of k ≥ 2 outputs (one thread per
    row): a lone row is reduced as two copies of itself."""
    if x.shape[0] == 1:
        return reduce(x.expand(2, *x.shape[1:]))[:1]
    return reduce(x)


def exact_label_column(grad: torch.Tensor, at_label: torch.Tensor, rewrite: torch.Tensor) -> None:
    """Rewrites the label column (``at_label`` [k, 1]) of the gradient rows ``grad`` [k, V], where
    ``rewrite`` [k, 1], as minus the sum of the other columns: the softmax terms of a row sum to 0, and
    where p_y > 1/2 the direct g·(1 − p_y) loses the digits of 1 − p_y (0 once p_y rounds to 1; module
    docstring of ``ops/logprobs.py``).  One more read of the rows."""
    direct = grad.gather(-1, at_label)
    rest = rowwise(lambda v: v.sum(dim=-1, keepdim=True), grad.scatter_(-1, at_label, 0.0))
    grad.scatter_(-1, at_label, torch.where(rewrite, rest.neg_(), direct))


def _label_terms(
    labels: torch.Tensor, vocab_size: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ignored, in_range, safe): ``safe`` is the label where it is in range and 0 elsewhere."""
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab_size)
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    return ignored, in_range, safe


def _scaled_rows(chunk: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """x' = chunk / τ as [k, V] in the arithmetic dtype; the chunk's own values when τ = 1 (never
    modified)."""
    rows = chunk.reshape(-1, chunk.shape[-1])
    if inv_temperature == 1.0:
        return rows
    return rows.to(compute_dtype(chunk), copy=True).mul_(inv_temperature)


def empty_outputs(
    logits: torch.Tensor, n_rows: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (logprobs [N], entropy [N] or [0], lse [N]) in the arithmetic dtype of ``logits``:
    what every forward implementation (and its fake) returns."""
    logprobs = logits.new_empty(n_rows, dtype=compute_dtype(logits))
    entropy = logits.new_empty(n_rows if with_entropy else 0, dtype=logprobs.dtype)
    return logprobs, entropy, torch.empty_like(logprobs)


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
def _logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab_size = logits.shape[-1]
    logprobs, entropy, lse = empty_outputs(logits, labels.numel(), with_entropy)
    ignored, in_range, safe = _label_terms(labels, vocab_size, ignore_index)
    for rows, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        x = _scaled_rows(chunk, inv_temperature)
        # ATen's fused log_softmax (upcasting inside) is the fastest CPU pass; lse comes back from it
        # at the row's argmax, where log p = m − lse exactly.  NaN/+inf rows give NaN throughout.
        m, argmax = x.max(dim=-1, keepdim=True)
        log_p = torch.log_softmax(x, dim=-1, dtype=logprobs.dtype)
        row_lse = m.to(log_p.dtype) - log_p.gather(-1, argmax)
        # an all -inf row has no probability mass (log_softmax gives NaN): lse = -inf, as the kernel's
        lse[rows] = row_lse.masked_fill_(m == float("-inf"), float("-inf")).squeeze(-1)
        label_log_p = log_p.gather(-1, safe[rows].unsqueeze(-1)).squeeze(-1)
        logprobs[rows] = torch.where(in_range[rows], label_log_p, float("nan"))
        if with_entropy:
            # H = −Σ p·log p; log p = -inf (masked entries, p = 0) is clamped so that they add 0
            # rather than NaN, while NaN stays NaN.  torch.sum's cascade keeps fp32 sums accurate at
            # V ~ 1e5 (a plain dot product loses ~2e-5 relative there).
            prob = log_p.exp()
            log_p.clamp_(min=torch.finfo(log_p.dtype).min)
            entropy[rows] = rowwise(lambda v: v.sum(dim=-1), prob.mul_(log_p)).neg_()
    logprobs.masked_fill_(ignored, 0.0)
    if with_entropy:
        entropy.masked_fill_(ignored, 0.0)
    return logprobs, entropy, lse


logprobs_fwd_torch = torch_op(
    "logprobs_fwd_torch",
    _logprobs_fwd,
    fake=lambda logits, labels, inv_temperature, ignore_index, with_entropy: empty_outputs(
        logits, labels.numel(), with_entropy
    ),
)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------
def logprobs_bwd_out(
    grad_logits: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    """Writes the logits gradient into ``grad_logits``: a contiguous tensor of the logits' shape, or
    ``logits`` itself (in place: each chunk's gradient is computed whole before it is written back).

    Per row, (1/τ)·[g·(1[j = y] − p_j) − h·p_j·(log p_j + H)] = p_j·(a + b·log p_j) + (g/τ)·1[j = y]
    with a = −(g + h·H)/τ and b = −h/τ: two passes over the chunk besides log p and p, and one more
    where p_y > 1/2 for the label column (``exact_label_column``).
    ``grad_entropy`` is empty when the entropy has no gradient.
    """
    vocab_size = logits.shape[-1]
    in_place = grad_logits is logits
    assert in_place or grad_logits.is_contiguous(), "a separate gradient buffer must be contiguous"
    flat_grad = None if in_place else grad_logits.view(-1, vocab_size)
    for rows, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        ignored, in_range, safe = _label_terms(labels[rows], vocab_size, ignore_index)
        g = torch.where(in_range, grad_logprobs[rows], float("nan")).unsqueeze(-1) * inv_temperature
        log_p = torch.sub(_scaled_rows(chunk, inv_temperature), lse[rows].unsqueeze(-1))  # promotes
        p = log_p.exp()
        at_label = safe.unsqueeze(-1)
        rewrite = in_range.unsqueeze(-1) & (p.gather(-1, at_label) > 0.5)  # False for a NaN row
        if grad_entropy.numel():
            h = grad_entropy[rows].unsqueeze(-1) * inv_temperature
            a = -(g + h * entropy[rows].unsqueeze(-1))
            # log p = -inf (masked entries, p = 0) is set to 0 so that p·(a + b·log p) is 0, not NaN (a clamp
            # to the dtype's minimum overflows to -inf again once multiplied by |b| > 1)
            grad = log_p.masked_fill_(log_p == float("-inf"), 0.0).mul_(-h).add_(a).mul_(p)
        else:
            grad = p.mul_(-g)
        grad.scatter_add_(-1, at_label, g)
        exact_label_column(grad, at_label, rewrite)
        grad[ignored] = 0.0  # whatever the row holds, NaN included
        target = chunk if in_place else flat_grad[rows]
        target.copy_(grad.view(target.shape))


def _logprobs_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    logprobs_bwd_out(
        grad_logits, grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index
    )
    return grad_logits


def _logprobs_bwd_inplace(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    """The public function has refused layouts whose rows are not views or whose memory overlaps."""
    logprobs_bwd_out(
        logits, grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index
    )


logprobs_bwd_torch = torch_op(
    "logprobs_bwd_torch",
    _logprobs_bwd,
    fake=lambda grad_logprobs, grad_entropy, logits, *_: logits.new_empty(logits.shape),
)
logprobs_bwd_inplace_torch = torch_op(
    "logprobs_bwd_inplace_torch", _logprobs_bwd_inplace, fake=lambda *_: None, mutates_args=("logits",)
)
