"""Per-token log-probabilities, entropy and token statistics straight from hidden states: lm_head +
log-softmax fused.

With x = h Wᵀ + b the raw logits of a row (h [H], W [V, H], b [V]) and, as in
:mod:`rlhf_kernels.ops.token_stats` (scale, then soft cap, then temperature),

    x' = softcap(logit_scale · x) / τ,   softcap(z) = c · tanh(z / c) (or z)
    lse    = log Σ_j exp(x'_j),   logp_y = x'_y − lse
    H      = log s − t / s,   s = Σ_j e^{x'_j − m},  t = Σ_j e^{x'_j − m}(x'_j − m),   m = max_j x'_j
    S      = Σ_j p_j² = q / s²,   q = Σ_j e^{2(x'_j − m)}          (sum_sq_probs)
    top1   = 1[x'_y = m]                                           (top1_match; ties count)
    M      = Σ_j x'_j / V                                          (mean_logit)

exactly as :func:`rlhf_kernels.token_stats_from_logits` defines them, but the [N, V] logits never exist:
the forward computes them tile by tile ([BLOCK_N, BLOCK_V], fp32 accumulation on the tensor cores) and
folds each tile into per-row online accumulators (m, s, t, q, Σx' and the label's x').  Accumulators of
disjoint vocabulary ranges merge exactly: rebased to a common maximum M,

    s' = e^{m − M} s,   t' = e^{m − M} (t + s (m − M)),   q' = e^{2(m − M)} q,

so the forward splits the vocabulary over several programs (more parallelism) and a weight sharded by
rows over tensor-parallel ranks merges the same way across ranks (:mod:`rlhf_kernels.parallel`).

Backward, with upstream gradients g, η, ϱ, r (of logp_y, H, S, M) per row, recomputes the logits tile by
tile:

    G_j = [g (1[j = y] − p_j) − η p_j (log p_j + H) + 2ϱ p_j (p_j − S) + r / V] · dx'_j/dx_j
    dx'/dx = (logit_scale / τ) · (1 − tanh²(logit_scale · x / c))   (without the tanh factor if no cap)
    d_hidden = G W,   d_weight = Gᵀ h,   d_bias = Σ_rows G

G is written, in the input dtype, into a [N, chunk] buffer one vocabulary chunk at a time, and the two
products run as tensor-core matrix products on that chunk (see :class:`LinearLogprobsConfig`); d_hidden
sums the chunks' products in fp32 and is rounded to the input dtype once, at the end.

Positions whose label equals ``ignore_index`` give 0 in every output and send exactly zero into G, and
they are never projected: the rows are ordered labelled-first on the device (a stable sort, no host
sync) and row tiles past the labelled count do no product (the PyTorch path drops them on the CPU).
A ``-inf`` bias entry masks that vocabulary entry (probability 0); NaN in gives NaN out.

``batch_invariant=True``: tiles, vocabulary splits and the split merge's order are fixed independently of
N, and d_hidden's product runs in a fixed-tile Triton kernel instead of cuBLAS (which chooses its
algorithm from N), so each row's outputs and d_hidden row are bitwise the same whatever the batch.

Kernels and their launch configuration: :mod:`rlhf_kernels.ops._linear_logprobs_kernels`.  Elsewhere:
the PyTorch path in :mod:`rlhf_kernels.ops.cpu.linear_logprobs`, ``LinearLogprobs`` in
:mod:`rlhf_kernels.modules`, vocabulary parallelism in :mod:`rlhf_kernels.parallel`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_label_range,
    check_positive,
    check_same_device,
    check_shape,
    compute_dtype,
)
from ._launch import acc_dtype, cdiv, triton, without_autocast, wrap_triton
from ._linear_logprobs_kernels import _GRAD_HIDDEN_BLOCK_H, LinearLogprobsConfig, _launch_config
from .cpu import linear_logprobs as cpu
from .token_stats import TokenStats, _scalars, check_top_k

if triton is not None:
    from ._linear_logprobs_kernels import (
        _linear_logprobs_bwd_kernel,
        _linear_logprobs_fwd_kernel,
        _linear_logprobs_grad_hidden_kernel,
    )

FAMILY = "linear_logprobs"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Launchers: each writes into outputs the caller allocated; a thin allocating wrapper sits on top.
# ---------------------------------------------------------------------------------------------------
def _row_order(labels: Tensor, ignore_index: int | None) -> tuple[Tensor | None, Tensor | None]:
    """(order, count): the rows with a label first (a stable sort) and their number, both on the device
    (no host sync); (None, None) when every row is computed."""
    if ignore_index is None:
        return None, None
    ignored = labels == ignore_index
    return torch.argsort(ignored.to(torch.int8), stable=True), (~ignored).sum()


@without_autocast
def _launch_stats_out(
    partials: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    inv_temperature: float, vocab_start: int, with_entropy: bool, logit_scale: float = 1.0,
    softcap: float = 0.0, with_sum_sq: bool = False, with_mean: bool = False,
    ignore_index: int | None = None, batch_invariant: bool = False,
    top_values: Tensor | None = None, top_index: Tensor | None = None,
) -> None:
    """Writes the per-split row accumulators (cpu.ACCUMULATORS) into ``partials`` [6, vocab_splits, N]
    (compute dtype; t, q and the total are 0 unless requested), and into ``top_values`` / ``top_index``
    [vocab_splits, N, k] each split's top-k x' and entries, unordered (unfilled: −inf at an index ≥ V).
    With ``ignore_index``, a row tile of ignored rows holds the accumulators of no entry."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    top_k = 0 if top_values is None else top_values.shape[-1]
    cfg = _launch_config(n_rows, vocab_size, hidden_size, hidden.dtype, hidden.device, batch_invariant,
                         softcap > 0 or with_sum_sq or with_mean, top_k)
    assert partials.shape == (6, cfg.vocab_splits, n_rows) and partials.is_contiguous()
    assert partials.dtype == compute_dtype(hidden)
    assert not top_k or top_values.shape == top_index.shape == (cfg.vocab_splits, n_rows, top_k)
    if n_rows == 0:
        return
    order, count = _row_order(labels, ignore_index)
    grid = (cdiv(n_rows, cfg.block_n) * cfg.vocab_splits,)
    wrap_triton(_linear_logprobs_fwd_kernel)[grid](
        hidden, weight, weight if bias is None else bias, labels,
        labels if order is None else order, labels if count is None else count, *partials.unbind(0),
        partials if top_values is None else top_values, labels if top_index is None else top_index,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        n_rows, vocab_size, hidden_size, vocab_start,
        *_scalars(hidden, logit_scale, softcap, inv_temperature),
        cfg.tiles_per_split, cfg.vocab_splits,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, HAS_ORDER=order is not None, HAS_SOFTCAP=softcap > 0,
        HAS_ENTROPY=with_entropy, HAS_SUM_SQ=with_sum_sq, HAS_MEAN=with_mean,
        TOP_K=top_k, BLOCK_TOPK=max(cfg.block_topk, 2), DOT_MODE=cfg.dot_mode, ACC=acc_dtype(hidden),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _merge_splits(
    partials: Tensor, in_order: bool, top_values: Tensor, top_index: Tensor, vocab_size: int
) -> tuple[Tensor, ...]:
    """The merged row accumulators from [6, splits, N] partials, then the top-k x' and indices [N, k] (or
    [0]) merged from the splits' sets by a row-wise sort (exact); ``in_order``: the splits' sums taken one
    split after another (elementwise additions, whose result cannot depend on N)."""
    m, s, t, z_label, q, total = partials.unbind(0)
    m_all = m.amax(dim=0)
    q = cpu.rebase_sq(m, s, q, m_all)
    s, t = cpu.rebase(m, s, t, m_all)
    add = (lambda x: functools.reduce(torch.add, x.unbind(0))) if in_order else (lambda x: x.sum(dim=0))
    if top_values.numel():
        splits, n_rows, top_k = top_values.shape
        candidates = lambda x: x.permute(1, 0, 2).reshape(n_rows, splits * top_k)  # noqa: E731
        top_values, top_index = cpu.merge_topk(candidates(top_values), candidates(top_index), top_k)
        top_index.clamp_(max=vocab_size - 1)  # a NaN row may keep empty slots (index ≥ V)
    return m_all, add(s), add(t), add(z_label), add(q), add(total), top_values, top_index


def _launch_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
    vocab_start: int, with_entropy: bool, logit_scale: float = 1.0, softcap: float = 0.0,
    with_sum_sq: bool = False, with_mean: bool = False, ignore_index: int | None = None,
    batch_invariant: bool = False, top_k: int = 0,
) -> tuple[Tensor, ...]:
    """Allocating wrapper, with the arguments and results of ``rlhf_kernels::linear_logprobs_stats_torch``:
    the merged row accumulators (cpu.ACCUMULATORS) [N], then the top-k x' and indices [N, k] or [0]."""
    n_rows = hidden.shape[0]
    cfg = _launch_config(n_rows, weight.shape[0], hidden.shape[1], hidden.dtype, hidden.device,
                         batch_invariant, softcap > 0 or with_sum_sq or with_mean, top_k)
    acc, top_shape = compute_dtype(hidden), (cfg.vocab_splits, n_rows, top_k) if top_k else (0,)
    partials = hidden.new_empty((6, cfg.vocab_splits, n_rows), dtype=acc)
    top_values = hidden.new_empty(top_shape, dtype=acc)
    top_index = labels.new_empty(top_shape, dtype=torch.int64)
    _launch_stats_out(partials, hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy,
                      logit_scale, softcap, with_sum_sq, with_mean, ignore_index, batch_invariant,
                      *((top_values, top_index) if top_k else ()))
    return _merge_splits(partials, batch_invariant, top_values, top_index, weight.shape[0])


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with the product's sums added in acc's dtype, never rounded to a's (issue 15)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))  # cuBLAS: 16-bit operands, fp32 result
    else:  # the interpreter on CPU, which has no mixed-dtype product
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _add_product_fixed_tiles(d_hidden: Tensor, grad_chunk: Tensor, weight_rows: Tensor,
                             cfg: LinearLogprobsConfig) -> None:
    """d_hidden += grad_chunk @ weight_rows with fixed tiles (batch_invariant).  The vocabulary step
    divides every chunk width (both are powers of two, chunks multiples of block_v), so a row's sum is the
    same sequence of tile products whatever the chunking."""
    n_rows, hidden_size = d_hidden.shape
    block_v = min(cfg.block_k, cfg.block_v)
    grid = (cdiv(n_rows, cfg.block_n), cdiv(hidden_size, _GRAD_HIDDEN_BLOCK_H))
    wrap_triton(_linear_logprobs_grad_hidden_kernel)[grid](
        d_hidden, grad_chunk, weight_rows,
        d_hidden.stride(0), grad_chunk.stride(0), weight_rows.stride(0), weight_rows.stride(1),
        n_rows, hidden_size, grad_chunk.shape[1],
        BLOCK_N=cfg.block_n, BLOCK_V=block_v, BLOCK_H=_GRAD_HIDDEN_BLOCK_H, DOT_MODE=cfg.dot_mode,
        ACC=acc_dtype(d_hidden), num_warps=8,  # 4 warps spilled in fp32 (16 B)
    )


@without_autocast
def _launch_bwd_out(
    d_hidden: Tensor, d_weight: Tensor, d_bias: Tensor,
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    labels: Tensor, lse: Tensor, entropy: Tensor, inv_temperature: float, ignore_index: int, vocab_start: int,
    grad_sum_sq: Tensor | None = None, grad_mean_over_v: Tensor | None = None, sum_sq: Tensor | None = None,
    logit_scale: float = 1.0, softcap: float = 0.0, batch_invariant: bool = False,
    grad_topk: Tensor | None = None, topk_indices: Tensor | None = None,
) -> None:
    """Writes d_hidden [N, H] (compute dtype), d_weight [V, H] and d_bias [V], each as allocated by
    :func:`cpu.empty_grads`: a [0] output is not wanted.  grad_entropy is [0] when H has no gradient;
    grad_sum_sq (with the forward's sum_sq), grad_mean_over_v (r / V) and grad_topk [N, k] (with the
    forward's topk_indices [N, k], global ids) are None when absent."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    need_hidden, need_weight = d_hidden.dim() == 2, d_weight.dim() == 2
    write_bias = bias is not None and d_bias.numel() == vocab_size
    if need_hidden:
        d_hidden.zero_()  # chunks are summed into it
    if n_rows == 0 or not (need_hidden or need_weight or write_bias):
        d_weight.zero_()
        d_bias.zero_()
        return
    present = lambda x: x is not None and x.numel() > 0  # noqa: E731
    with_topk = present(grad_topk) and present(topk_indices)
    cfg = _launch_config(n_rows, vocab_size, hidden_size, hidden.dtype, hidden.device, batch_invariant,
                         softcap > 0 or present(grad_sum_sq) or present(grad_mean_over_v) or with_topk)
    row_blocks = cdiv(n_rows, cfg.block_n)
    acc = compute_dtype(hidden)
    bias_partial = hidden.new_empty((row_blocks if write_bias else 0, vocab_size), dtype=acc)
    order, count = _row_order(labels, ignore_index)
    per_row = [entropy, sum_sq, grad_logprobs, grad_entropy, grad_sum_sq, grad_mean_over_v]
    per_row = [x if present(x) else lse for x in per_row]  # placeholders where a flag is off
    top_k = topk_indices.shape[1] if with_topk else 0
    per_row += [grad_topk.contiguous(), grad_topk.sum(dim=1), topk_indices.contiguous()] if with_topk else [
        lse, lse, labels]
    buffer = hidden.new_empty((n_rows, min(cfg.bwd_chunk_v, vocab_size)))
    # d_weight = Gᵀ·hidden over every row: an ignored row has G = 0, but 0 · NaN would carry a NaN (or inf)
    # of its hidden state into d_weight, so the product reads ignored rows as 0 (one [N, H] copy).
    hidden_rows = torch.where((labels != ignore_index)[:, None], hidden, 0.0) if need_weight else hidden
    for begin in range(0, vocab_size, cfg.bwd_chunk_v):
        width = min(cfg.bwd_chunk_v, vocab_size - begin)
        grid = (row_blocks * cdiv(width, cfg.block_v),)
        # The kernel sees the chunk's rows of weight and bias (views: no copy, 64-bit base addresses).
        weight_rows = weight[begin : begin + width]
        wrap_triton(_linear_logprobs_bwd_kernel)[grid](
            buffer, bias_partial[:, begin:] if write_bias else lse,
            hidden, weight_rows, weight_rows if bias is None else bias[begin : begin + width], labels,
            order, count, lse, *per_row,
            buffer.stride(0), bias_partial.stride(0), hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1),
            n_rows, hidden_size, width, vocab_start + begin,
            *_scalars(hidden, logit_scale, softcap, inv_temperature), ignore_index,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
            HAS_BIAS=bias is not None, HAS_ORDER=True, HAS_SOFTCAP=softcap > 0,
            HAS_GRAD_ENTROPY=present(grad_entropy), HAS_GRAD_SUM_SQ=present(grad_sum_sq),
            HAS_GRAD_MEAN=present(grad_mean_over_v), TOP_K=top_k, WRITE_GRAD_BIAS=write_bias,
            DOT_MODE=cfg.dot_mode, ACC=acc_dtype(hidden), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        grad_chunk = buffer[:, :width]
        if need_weight:
            torch.mm(grad_chunk.T, hidden_rows, out=d_weight[begin : begin + width])
        if need_hidden and batch_invariant:
            _add_product_fixed_tiles(d_hidden, grad_chunk, weight_rows, cfg)
        elif need_hidden:
            _add_product(d_hidden, grad_chunk, weight_rows)
    if write_bias:
        d_bias.copy_(bias_partial.sum(dim=0))


def _launch_bwd(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    labels: Tensor, lse: Tensor, entropy: Tensor, inv_temperature: float, ignore_index: int, vocab_start: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, *extras,
) -> tuple[Tensor, Tensor, Tensor]:
    """Allocating wrapper, with the arguments of ``rlhf_kernels::linear_logprobs_bwd_torch``."""
    grads = cpu.empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    _launch_bwd_out(*grads, grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                    inv_temperature, ignore_index, vocab_start, *extras)
    return grads


# ---------------------------------------------------------------------------------------------------
# Routing ops (what autograd and torch.compile see) and autograd.
# ---------------------------------------------------------------------------------------------------
@kernel_op("linear_logprobs_stats")
def linear_logprobs_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
    vocab_start: int, with_entropy: bool, ignore_index: int | None = None, batch_invariant: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row accumulators (m, s, t, z_label) [N] over this weight's vocabulary rows; labels are global ids,
    this weight's row j is vocabulary entry vocab_start + j (z_label is 0 where the label is elsewhere).
    With ``ignore_index``, rows labelled with it are skipped (m = −inf, s = t = z_label = 0)."""
    m, s, t, z_label, *_ = _dispatch.route(
        FAMILY, hidden.device, triton=_launch_stats, torch=cpu.linear_logprobs_stats_torch
    )(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy, 1.0, 0.0, False, False,
      ignore_index, batch_invariant)
    return m, s, t, z_label


@kernel_op("linear_logprobs_fwd")
def linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
    ignore_index: int, with_entropy: bool, logit_scale: float = 1.0, softcap: float = 0.0,
    with_sum_sq: bool = False, with_top1: bool = False, with_mean: bool = False,
    batch_invariant: bool = False, top_k: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logprobs, entropy, sum_sq_probs, top1_match, mean_logit [N] or [0], topk_logprobs [N, k] or [0],
    topk_indices [N, k] int64 or [0], lse [N]) for hidden [N, H], weight [V, H], labels [N] (as
    token_stats_fwd); softcap 0 means none, top_k 0 no top-k."""
    args = (hidden, weight, bias, labels, inv_temperature, 0, with_entropy, logit_scale, softcap)
    rest = (with_mean, ignore_index, batch_invariant, top_k)
    # The PyTorch path's log-sum-exp-only fold keeps no row maximum for top-1 to compare with: with
    # top1_match it takes the exponentials' fold (whose Σp² is then dropped).
    acc = _dispatch.route(
        FAMILY, hidden.device, triton=lambda: _launch_stats(*args, with_sum_sq, *rest),
        torch=lambda: cpu.linear_logprobs_stats_torch(*args, with_sum_sq or with_top1, *rest),
    )()
    return cpu.finalize_stats(
        acc, labels, weight.shape[0], ignore_index, with_entropy, with_sum_sq, with_top1, with_mean
    )


@kernel_op("linear_logprobs_bwd")
def linear_logprobs_bwd(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    labels: Tensor, lse: Tensor, entropy: Tensor, inv_temperature: float, ignore_index: int, vocab_start: int,
    vocab_total: int, need_hidden: bool, need_weight: bool, need_bias: bool,
    grad_sum_sq: Tensor | None = None, grad_mean: Tensor | None = None, sum_sq: Tensor | None = None,
    logit_scale: float = 1.0, softcap: float = 0.0, batch_invariant: bool = False,
    grad_topk: Tensor | None = None, topk_indices: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden [N, H] in the compute dtype, d_weight [V, H], d_bias [V]); each is [0] when not needed.
    grad_entropy is [0] when the entropy has no gradient, grad_sum_sq / grad_mean / grad_topk (with the
    forward's topk_indices [N, k]) None when those have none; lse, entropy and sum_sq are the global
    (all-rank) row values.  An out-of-range label produced a
    NaN log-prob: its gradient is NaN too, never a number."""
    valid = ((labels >= 0) & (labels < vocab_total)) | (labels == ignore_index)
    grad_logprobs = torch.where(valid, grad_logprobs, float("nan")).contiguous()
    grad_mean_over_v = None if grad_mean is None else (grad_mean / vocab_total).contiguous()
    return _dispatch.route(FAMILY, hidden.device, triton=_launch_bwd, torch=cpu.linear_logprobs_bwd_torch)(
        grad_logprobs, grad_entropy.contiguous(), hidden, weight, bias, labels, lse, entropy,
        inv_temperature, ignore_index, vocab_start, need_hidden, need_weight, need_bias,
        None if grad_sum_sq is None else grad_sum_sq.contiguous(), grad_mean_over_v, sum_sq,
        logit_scale, softcap, batch_invariant, None if grad_topk is None else grad_topk.contiguous(),
        topk_indices,
    )


def save_for_backward(ctx, hidden, weight, bias, labels, lse, entropy, inv_temperature: float,
                      ignore_index: int, vocab_start: int, vocab_total: int, sum_sq=None,
                      logit_scale: float = 1.0, softcap: float = 0.0, batch_invariant: bool = False,
                      topk_indices=None) -> None:
    """What :func:`backward_grads` reads, for both autograd wirings (this one and parallel.py's)."""
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy,
                          lse.new_empty(0) if sum_sq is None else sum_sq,
                          topk_indices if topk_indices is not None and topk_indices.dim() == 2 else None)
    ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
    ctx.vocab_start, ctx.vocab_total = vocab_start, vocab_total
    ctx.transform = (logit_scale, softcap, batch_invariant)
    ctx.set_materialize_grads(False)


def backward_grads(ctx, grad_logprobs, grad_entropy, grad_sum_sq=None, grad_mean=None, grad_topk=None):
    """(d_hidden in the compute dtype or None, d_weight or None, d_bias or None)."""
    hidden, weight, bias, labels, lse, entropy, sum_sq, topk_indices = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    # sum_sq_probs, mean_logit and the top-k are [0] when not requested: their gradient is then none
    grad_sum_sq, grad_mean = (g if g is not None and g.numel() else None for g in (grad_sum_sq, grad_mean))
    grad_topk = grad_topk if topk_indices is not None else None
    upstream = (grad_logprobs, grad_entropy, grad_sum_sq, grad_mean, grad_topk)
    if all(g is None for g in upstream) or not (need_hidden or need_weight or need_bias):
        return None, None, None
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if grad_entropy is None or entropy.numel() == 0:
        grad_entropy = lse.new_empty(0)
    d_hidden, d_weight, d_bias = linear_logprobs_bwd(
        grad_logprobs.contiguous(), grad_entropy, hidden, weight, bias, labels, lse, entropy,
        ctx.inv_temperature, ctx.ignore_index, ctx.vocab_start, ctx.vocab_total,
        need_hidden, need_weight, need_bias, grad_sum_sq, grad_mean,
        None if grad_sum_sq is None else sum_sq, *ctx.transform,
        grad_topk, None if grad_topk is None else topk_indices,
    )
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias else None)


_FWD_DEFAULTS = (1.0, 0.0, False, False, False, False, 0)  # logit_scale ... batch_invariant, top_k


def _setup_context(ctx, inputs, output) -> None:
    ctx.n_inputs = len(inputs)
    inputs = tuple(inputs) + _FWD_DEFAULTS[len(inputs) - 7 :]
    hidden, weight, bias, labels, inv_temperature, ignore_index, _, logit_scale, softcap = inputs[:9]
    _, entropy, sum_sq, top1, _, _, topk_indices, lse = output
    ctx.mark_non_differentiable(top1, topk_indices, lse)
    save_for_backward(ctx, hidden, weight, bias, labels, lse, entropy, inv_temperature, ignore_index,
                      0, weight.shape[0], sum_sq, logit_scale, softcap, inputs[12], topk_indices)


def _backward(ctx, grad_logprobs, grad_entropy, grad_sum_sq, _grad_top1, grad_mean, grad_topk, _grad_index,
              _grad_lse):
    d_hidden, d_weight, d_bias = backward_grads(ctx, grad_logprobs, grad_entropy, grad_sum_sq, grad_mean,
                                                grad_topk)
    if d_hidden is not None:
        d_hidden = d_hidden.to(ctx.saved_tensors[0].dtype)  # the one rounding of d_hidden
    return (d_hidden, d_weight, d_bias) + (None,) * (ctx.n_inputs - 3)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------
def _check_same_dtype(name: str, tensor: torch.Tensor, hidden: torch.Tensor) -> None:
    if tensor.dtype != hidden.dtype:
        raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}); got {tensor.dtype}")


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def _prepare(hidden, weight, labels, bias, temperature, ignore_index, process_group=None):
    check_float_tensor("hidden", hidden)
    check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError("weight must be 2-D [V, H] (an nn.Linear lm_head weight as stored); "
                         f"got shape {tuple(weight.shape)}")
    vocab_size, hidden_size = weight.shape
    if vocab_size == 0 or hidden_size == 0:
        raise ValueError(f"weight must be non-empty [V, H] with V, H >= 1; got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden must have shape [..., H] with H = weight.shape[1] = {hidden_size}; "
                         f"got {tuple(hidden.shape)}")
    _check_same_dtype("weight", weight, hidden)
    check_index_tensor("labels", labels)
    check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        check_float_tensor("bias", bias)
        check_shape("bias", bias, (vocab_size,), "(weight.shape[0],)")
        _check_same_dtype("bias", bias, hidden)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    vocab_total = vocab_size
    if process_group is not None:
        from ..parallel import vocab_range  # parallel.py imports this module

        _, vocab_total = vocab_range(process_group, vocab_size)
    check_label_range(labels, vocab_total, ignore_index, "weight.shape[0] over all ranks")
    return hidden.reshape(-1, hidden_size), labels.reshape(-1).contiguous(), 1.0 / temperature, ignore_index


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    batch_invariant: bool = False,
    process_group=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropy) of ``labels`` under
    ``softmax((hidden @ weight.T + bias) / τ)``, without materialising the [N, V] logits.

    Same results as ``logprobs_from_logits(hidden @ weight.T + bias, labels, temperature=τ, ...)``, with the
    logits kept in fp32 (never rounded to the input dtype).

    Args:
        hidden: [..., H] float32, bfloat16 or float16 (e.g. the last hidden states), any strides.
        weight: [V, H], hidden's dtype: the lm_head ``nn.Linear`` weight as stored.  With
            ``process_group``, this rank's rows [rank·V, (rank+1)·V) of a [world·V, H] weight.
        labels: [...] = ``hidden.shape[:-1]``, int64 or int32, each a global vocabulary id in
            [0, world·V) or ``ignore_index``.
        bias: optional [V] in hidden's dtype (this rank's slice with ``process_group``).  ``-inf`` entries
            mask vocabulary entries (probability 0).
        temperature: > 0; the logits are divided by it.
        ignore_index: label value of positions that give 0 and receive zero gradient; they are never
            projected (the cost follows the number of labelled positions).
        return_entropy: also return H = −Σ p log p per position.
        batch_invariant: each position's outputs and hidden gradient are bitwise the same whatever the
            batch size, the position and the other positions (fixed tiles, splits and summation order;
            off by default: a fixed-tile d_hidden product instead of cuBLAS's).  Not with process_group.
        process_group: vocabulary (tensor) parallelism: the log-sum-exp, entropy and label logit are
            combined across the group's ranks (two all_reduce per forward, one over d_hidden per backward).
            Every rank must pass the same hidden and labels and backpropagate the same upstream gradient.

    Returns:
        ``logprobs`` [...] float32, or ``(logprobs, entropy)``.  Differentiable with respect to ``hidden``,
        ``weight`` and ``bias`` (gradients in their dtypes, accumulated in fp32 and rounded once).

    Example: hidden [2, 5, 4096] bf16, weight [151936, 4096] bf16, labels [2, 5] → logprobs [2, 5] fp32.

    Peak extra memory is O(N) in the forward; the backward adds a [N, chunk] gradient buffer of at most
    512 MiB on the Triton path and fp32 chunks of at most 8 MiB on the PyTorch path, never [N, V].
    Labels are range-checked before launch (a device sync on CUDA unless ``RLHF_KERNELS_CHECK_INDICES=0``);
    unchecked out-of-range labels give NaN, never a wild read.
    """
    return_entropy = _check_bool("return_entropy", return_entropy)
    batch_invariant = _check_bool("batch_invariant", batch_invariant)
    if batch_invariant and process_group is not None:
        raise ValueError("batch_invariant=True is not supported with a process_group (yet); got both")
    hidden2d, flat_labels, inv_temperature, ignore_index = _prepare(
        hidden, weight, labels, bias, temperature, ignore_index, process_group
    )
    if process_group is None:
        logprobs, entropy, *_ = linear_logprobs_fwd(
            hidden2d, weight, bias, flat_labels, inv_temperature, ignore_index, return_entropy,
            1.0, 0.0, False, False, False, batch_invariant,
        )
    else:
        from ..parallel import vocab_parallel_linear_logprobs

        logprobs, entropy = vocab_parallel_linear_logprobs(
            hidden2d, weight, bias, flat_labels, inv_temperature, ignore_index, return_entropy, process_group
        )
    logprobs = logprobs.view(labels.shape)
    if return_entropy:
        return logprobs, entropy.view(labels.shape)
    return logprobs


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    entropy: bool = False,
    sum_sq_probs: bool = False,
    top1_match: bool = False,
    mean_logit: bool = False,
    top_k: int = 0,
    ignore_index: int = -100,
    batch_invariant: bool = False,
) -> TokenStats:
    """:func:`rlhf_kernels.token_stats_from_logits` of the logits ``hidden @ weight.T + bias``, without
    materialising them: log-probabilities plus the requested statistics of p = softmax(x'), all in the
    one pass of :func:`linear_logprobs`, where x' = softcap(logit_scale · logits) / temperature.

    Args:
        hidden, weight, labels, bias, ignore_index, batch_invariant: as :func:`linear_logprobs`.
        temperature, logit_scale: > 0.  softcap: None, or c > 0 for z ← c·tanh(z/c) (after the scale,
            before the temperature, as Gemma-2).
        entropy: H = −Σ p log p.  sum_sq_probs: Σ p² (verl's optimal-token baseline).  top1_match: 1.0
            where the label's logit is the row's maximum (ties count), else 0.0.  mean_logit: Σ x'/V.
        top_k: 0, or 1 ≤ k ≤ min(64, V): the k largest log p per position, descending, and their token
            indices (int64; ties go to the smaller index), as token_stats_from_logits.

    Returns:
        :class:`rlhf_kernels.TokenStats`: ``logprobs`` [...] and the requested fields, [...] or [..., k]
        for the top-k, float32 (float64 for float64 inputs); fields not requested are None.
        Differentiable with respect to hidden, weight and bias through logprobs, entropy, sum_sq_probs,
        mean_logit and topk_logprobs (gradients: this module's docstring, plus Σ_k w_k (1[j = i_k] − p_j)
        for upstream w of the top-k log-probs); top1_match and topk_indices are not.

    Example: hidden [[1, 0]], weight [[0, 0], [0, 0], [ln 2, 0]] (logits [0, 0, ln 2]), labels [2] give
    logprobs [ln ½], sum_sq_probs [0.375], top1_match [1.0], mean_logit [ln 2 / 3], and with top_k=2
    topk_logprobs [[ln ½, ln ¼]], topk_indices [[2, 0]].
    """
    logit_scale = check_positive("logit_scale", logit_scale)
    softcap = 0.0 if softcap is None else check_positive("softcap", softcap)
    flags = tuple(_check_bool(name, value) for name, value in (
        ("entropy", entropy), ("sum_sq_probs", sum_sq_probs), ("top1_match", top1_match),
        ("mean_logit", mean_logit), ("batch_invariant", batch_invariant)))
    hidden2d, flat_labels, inv_temperature, ignore_index = _prepare(
        hidden, weight, labels, bias, temperature, ignore_index
    )
    top_k = check_top_k(top_k, weight.shape[0])
    out = linear_logprobs_fwd(
        hidden2d, weight, bias, flat_labels, inv_temperature, ignore_index, flags[0], logit_scale, softcap,
        *flags[1:], top_k,
    )
    shape = labels.shape
    fields = [out[0].view(shape)] + [o.view(shape) if on else None for o, on in zip(out[1:5], flags)]
    if top_k:
        fields += [out[5].view(*shape, top_k), out[6].view(*shape, top_k)]
    return TokenStats(*fields)


def __getattr__(name: str):
    # LinearLogprobs lives in rlhf_kernels.modules (which imports this module): re-exported lazily.
    if name == "LinearLogprobs":
        from ..modules import LinearLogprobs

        return LinearLogprobs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
