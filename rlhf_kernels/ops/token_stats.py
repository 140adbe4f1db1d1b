"""Per-token statistics of the policy head in the same streaming pass as the log-probabilities: Triton
kernels, launch config, launchers, registration and the public function.  The PyTorch path is
``rlhf_kernels/ops/cpu/token_stats.py``; the float64 oracle ``rlhf_kernels/reference/token_stats.py``.

The logits the softmax sees, in this order (Gemma-2's: scale, then soft cap, then temperature):

    z = logit_scale · x,   z ← c · tanh(z / c) if softcap = c,   x' = z / τ
    lse = log Σ_j e^{x'_j},  p = e^{x' − lse}

Outputs per position (each opt-in but the log-prob; every one fp32, fp64 for fp64 logits):

    logprobs       x'_y − lse
    entropy        H = −Σ p log p = log s − t/s                      (as in ``ops/logprobs.py``)
    sum_sq_probs   S = Σ p_j² = Σ e^{2(x'−m)} / s²                  (online, rescaled by α² = e^{2(m−m')})
    top1_match     1 if x'_y = max_j x'_j (ties count as a match), else 0
    mean_logit     M = (1/V) Σ_j x'_j
    topk_logprobs  the k largest log p (descending), k ≤ 64; ``topk_indices`` their tokens (int64,
                   ties broken towards the smaller index)

Gradients (upstream g, h, q, r, w_k for logprobs, H, S, M, topk_logprobs; top1_match and the indices
are not differentiable):

    G_j = g(1[j=y] − p_j) − h p_j (log p_j + H) + 2q p_j (p_j − S) + r/V + Σ_k w_k 1[j=i_k] − (Σ_k w_k) p_j
    ∂/∂x_j = G_j · (1/τ) · dz_j/dx_j,   dz/dx = logit_scale · (1 − tanh²(logit_scale·x/c))  (or logit_scale)

Positions whose label equals ``ignore_index`` give 0 in every output (indices included) and receive
exactly zero gradient.  ``-inf`` logits are masked entries (probability 0; they stay −inf under the soft
cap); NaN in a row gives NaN in its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_index_tensor,
    check_int,
    check_label_range,
    check_positive,
    check_same_device,
    check_shape,
    compute_dtype,
)
from ._launch import acc_dtype, pow2_between, row_layout, scalar_parts, tl, triton, wrap_triton
from .cpu import token_stats as cpu
from .logprobs import _check_logits, check_flag, forward_row_layout, label_vocab

FAMILY = "token_stats"
TOP_K_MAX = cpu.TOP_K_MAX


def check_top_k(top_k: object, vocab_size: int) -> int:
    """``top_k``: 0 (off) or 1 ≤ k ≤ min(TOP_K_MAX, V) (also used by ``linear_token_stats``)."""
    top_k = check_int("top_k", top_k)
    if not 0 <= top_k <= min(TOP_K_MAX, vocab_size):
        raise ValueError(
            f"top_k must be 0 (off) or in [1, min({TOP_K_MAX}, V = {vocab_size})]; got {top_k}"
        )
    return top_k
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  One program per row, rows addressed through two row dimensions (as ops/logprobs.py).
# Float hyperparameters arrive as three fp32 parts each (``_launch.scalar_parts``): logit_scale, the
# soft cap c and 1/c, and 1/τ.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    from ._launch import scalar_arg

    @triton.jit
    def _tanh(u):
        """(tanh u, 1 − tanh² u).  Triton 3.x has no tl.tanh, and libdevice's does not run in the
        interpreter.  With e = e^{−2|u|} ≤ 1 (never overflows): tanh|u| = (1 − e)/(1 + e), and
        1 − tanh² = 4e/(1 + e)² without the cancellation of 1 − th·th where the slope is small."""
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0, -th, th), 4.0 * e / ((1.0 + e) * (1.0 + e))

    @triton.jit
    def _hyperparameters(
        scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
        inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo, ACC: tl.constexpr,
    ):
        """(logit_scale, c, 1/c, 1/τ) in ACC from their ``_scalars`` parts."""
        return (
            scalar_arg(scale_hi, scale_mid, scale_lo, ACC),
            scalar_arg(cap_hi, cap_mid, cap_lo, ACC),
            scalar_arg(inv_cap_hi, inv_cap_mid, inv_cap_lo, ACC),
            scalar_arg(inv_t_hi, inv_t_mid, inv_t_lo, ACC),
        )

    @triton.jit
    def _transform(x, scale, cap, inv_cap, inv_t, HAS_SOFTCAP: tl.constexpr):
        """(x', dx'/dx) for raw logits x: scale, soft cap (−inf stays −inf), 1/τ."""
        z = x * scale
        slope = scale * inv_t
        if HAS_SOFTCAP:
            th, sech2 = _tanh(z * inv_cap)
            z = tl.where(x == float("-inf"), float("-inf"), cap * th)
            slope = slope * sech2
        return z * inv_t, slope

    @triton.jit
    def _topk_merge(top_v, top_i, active, x, offs, avail, V):
        """Merges a block's candidates (x at offs where avail) into the running top-k set (top_v, top_i;
        unordered, slots ``active``; empty slots hold −inf with index V + slot).  Order: larger value,
        then smaller index.  One round per candidate that enters the set: after the first blocks of a
        row, most blocks end after the first comparison."""
        sentinel = V  # cand_i for an exhausted block
        cand_v = tl.max(tl.where(avail, x, float("-inf")), axis=0)
        cand_i = tl.min(tl.where(avail & (x == cand_v), offs, sentinel), axis=0)
        worst_v = tl.min(tl.where(active, top_v, float("inf")), axis=0)
        worst_i = tl.max(tl.where(active & (top_v == worst_v), top_i, -1), axis=0)
        while (cand_i < V) & ((cand_v > worst_v) | ((cand_v == worst_v) & (cand_i < worst_i))):
            top_v = tl.where(top_i == worst_i, cand_v, top_v)
            top_i = tl.where(top_i == worst_i, cand_i, top_i)
            avail = avail & (offs != cand_i)
            cand_v = tl.max(tl.where(avail, x, float("-inf")), axis=0)
            cand_i = tl.min(tl.where(avail & (x == cand_v), offs, sentinel), axis=0)
            worst_v = tl.min(tl.where(active, top_v, float("inf")), axis=0)
            worst_i = tl.max(tl.where(active & (top_v == worst_v), top_i, -1), axis=0)
        return top_v, top_i

    # Reads the N·V logits once; writes a few floats per row (and 2k for the top-k).
    @triton.jit
    def _token_stats_fwd_kernel(
        logits_ptr, labels_ptr,
        logprobs_ptr, entropy_ptr, sum_sq_ptr, top1_ptr, mean_ptr, topk_val_ptr, topk_idx_ptr, lse_ptr,
        stride_x0, stride_x1, stride_xv,
        rows1, V,
        scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
        inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo,
        ignore_index,
        BLOCK_V: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr,
        HAS_TOP1: tl.constexpr, HAS_MEAN: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + (row // rows1) * stride_x0 + (row % rows1) * stride_x1
        label = tl.load(labels_ptr + row).to(tl.int64)
        scale, cap, inv_cap, inv_t = _hyperparameters(
            scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
            inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo, ACC,
        )

        m = tl.full((), float("-inf"), ACC)  # running max of x'
        s = tl.zeros((), ACC)  # Σ e^{x' − m}
        t = tl.zeros((), ACC)  # Σ e^{x' − m}(x' − m)
        q = tl.zeros((), ACC)  # Σ e^{2(x' − m)}
        total = tl.zeros((), ACC)  # Σ x'
        slots = tl.arange(0, BLOCK_K)
        active = slots < TOP_K
        top_v = tl.full((BLOCK_K,), float("-inf"), ACC)
        top_i = V + slots
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            x = tl.load(base + offs.to(tl.int64) * stride_xv, mask=in_vocab, other=float("-inf"))
            x, _ = _transform(x.to(ACC), scale, cap, inv_cap, inv_t, HAS_SOFTCAP)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite while the row is all -inf
            shift = tl.where(s > 0, m - m_ref, 0.0)
            alpha = tl.exp(shift)
            e = tl.exp(x - m_ref)
            if HAS_ENTROPY:
                masked_zero = e * tl.where(x == float("-inf"), 0.0, x - m_ref)  # no 0·(−inf)
                t = alpha * (t + s * shift) + tl.sum(masked_zero, axis=0)
            if HAS_SUM_SQ:
                q = q * (alpha * alpha) + tl.sum(e * e, axis=0)
            if HAS_MEAN:
                total += tl.sum(tl.where(in_vocab, x, 0.0), axis=0)
            if TOP_K > 0:
                top_v, top_i = _topk_merge(top_v, top_i, active, x, offs, in_vocab, V)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(s)
        lse = m_ref + log_s

        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        safe_label = tl.where(in_range, label, 0)
        x_label, _ = _transform(
            tl.load(base + safe_label * stride_xv).to(ACC), scale, cap, inv_cap, inv_t, HAS_SOFTCAP
        )
        logprob = tl.where(in_range, (x_label - m_ref) - log_s, float("nan"))  # exact if m + log s = m
        tl.store(logprobs_ptr + row, tl.where(ignored, 0.0, logprob))
        tl.store(lse_ptr + row, lse)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(ignored, 0.0, log_s - t / s))
        if HAS_SUM_SQ:
            tl.store(sum_sq_ptr + row, tl.where(ignored, 0.0, q / (s * s)))
        if HAS_TOP1:
            match = tl.where(x_label == m, 1.0, 0.0)
            match = tl.where(in_range & (lse == lse), match, float("nan"))
            tl.store(top1_ptr + row, tl.where(ignored, 0.0, match))
        if HAS_MEAN:
            tl.store(mean_ptr + row, tl.where(ignored, 0.0, total / V))
        if TOP_K > 0:
            # the set in order: TOP_K rounds of (largest value, smallest index) over BLOCK_K slots
            avail = active
            for r in range(TOP_K):
                best_v = tl.max(tl.where(avail, top_v, float("-inf")), axis=0)
                best_i = tl.min(tl.where(avail & (top_v == best_v), top_i, 2 * V + BLOCK_K), axis=0)
                avail = avail & (top_i != best_i)
                # a NaN row may leave empty slots (index ≥ V): clamp so that indices stay in range
                index = tl.minimum(best_i, V - 1).to(tl.int64)
                tl.store(topk_val_ptr + row * TOP_K + r, tl.where(ignored, 0.0, best_v - lse))
                tl.store(topk_idx_ptr + row * TOP_K + r, tl.where(ignored, 0, index))

    @triton.jit
    def _grad_terms(
        x, offs, label, lse, entropy, g_lp, coef_p, g_h, g_q, g_mean_over_v,
        scale, cap, inv_cap, inv_t,
        HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, HAS_GRAD_SUM_SQ: tl.constexpr,
        HAS_GRAD_MEAN: tl.constexpr,
    ):
        """(G_j without the top-k one-hot terms (module docstring), dx'_j/dx_j) for raw logits x: the
        gradient is their product.  Without the mean's r/V, G sums to 0 over a row."""
        xp, slope = _transform(x, scale, cap, inv_cap, inv_t, HAS_SOFTCAP)
        logp = xp - lse
        p = tl.exp(logp)
        grad = tl.where(offs == label, g_lp, 0.0) + coef_p * p
        if HAS_GRAD_ENTROPY:
            grad -= g_h * tl.where(xp == float("-inf"), 0.0, p * (logp + entropy))
        if HAS_GRAD_SUM_SQ:
            grad += 2.0 * g_q * p * p
        if HAS_GRAD_MEAN:
            grad += g_mean_over_v
        return grad, slope

    # Reads the N·V logits once, writes the N·V gradient once (plus k elements per row rewritten).
    @triton.jit
    def _token_stats_bwd_kernel(
        grad_logits_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_sum_sq_ptr, grad_mean_ptr, grad_topk_ptr,
        logits_ptr, labels_ptr, lse_ptr, entropy_ptr, sum_sq_ptr, topk_idx_ptr,
        stride_x0, stride_x1, stride_xv,
        rows1, V, vocab_start, vocab_total,
        scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
        inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo,
        ignore_index,
        BLOCK_V: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, HAS_GRAD_SUM_SQ: tl.constexpr,
        HAS_GRAD_MEAN: tl.constexpr, HAS_GRAD_TOPK: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_base = logits_ptr + (row // rows1) * stride_x0 + (row % rows1) * stride_x1
        g_base = grad_logits_ptr + row * V  # a fresh contiguous [N, V] gradient
        label = tl.load(labels_ptr + row).to(tl.int64)
        scale, cap, inv_cap, inv_t = _hyperparameters(
            scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
            inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo, ACC,
        )
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < vocab_total)
        local_label = label - vocab_start  # this shard's column of the label (outside [0, V): none)
        lse = tl.load(lse_ptr + row)
        # An out-of-range label produced a NaN log-prob; its gradient row is NaN too.
        g_lp = tl.where(in_range, tl.load(grad_logprobs_ptr + row), float("nan"))
        coef_p = -g_lp  # the coefficient of p_j in G_j
        entropy = lse  # placeholders, unused unless the flag is set
        g_h = lse
        g_q = lse
        g_mean_over_v = lse
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        if HAS_GRAD_SUM_SQ:
            g_q = tl.load(grad_sum_sq_ptr + row)
            coef_p -= 2.0 * g_q * tl.load(sum_sq_ptr + row)
        if HAS_GRAD_MEAN:
            g_mean_over_v = tl.load(grad_mean_ptr + row) / V
        slots = tl.arange(0, BLOCK_K)
        in_k = slots < TOP_K
        if HAS_GRAD_TOPK:
            w = tl.load(grad_topk_ptr + row * TOP_K + slots, mask=in_k, other=0.0)
            coef_p -= tl.sum(w, axis=0)
        # Unsharded, where p_y > 1/2, the label column is rewritten last as minus the sum of the others'
        # softmax terms (they sum to 0 over the row; ops/logprobs.py's backward says why): g·(1 − p_y) read
        # as g − g·p_y is 0 once p_y is within fp32 rounding of 1.  A shard holds no other shard's columns.
        own = in_range & ~ignored & (V == vocab_total)
        label_col = tl.where(own, local_label, -1)
        rest = tl.zeros((), ACC)  # Σ_{j≠y} of the softmax terms (pre-slope, without the mean's r/V)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            x = tl.load(x_base + offs.to(tl.int64) * stride_xv, mask=in_vocab, other=float("-inf"))
            grad, slope = _grad_terms(
                x.to(ACC), offs, local_label, lse, entropy, g_lp, coef_p, g_h, g_q, g_mean_over_v,
                scale, cap, inv_cap, inv_t, HAS_SOFTCAP, HAS_GRAD_ENTROPY, HAS_GRAD_SUM_SQ, False,
            )
            rest += tl.sum(tl.where(in_vocab & (offs != label_col), grad, 0.0), axis=0)
            if HAS_GRAD_MEAN:
                grad += g_mean_over_v
            grad = tl.where(ignored, 0.0, grad * slope)
            tl.store(g_base + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_vocab)
        if HAS_GRAD_TOPK:
            # The one-hot terms w_k·1[j = i_k] touch k entries: rewrite those (indices are distinct)
            # after every thread's dense stores, recomputing the dense terms in ACC (no double rounding).
            tl.debug_barrier()
            index = tl.load(topk_idx_ptr + row * TOP_K + slots, mask=in_k, other=0)
            x = tl.load(x_base + index * stride_xv, mask=in_k, other=0.0)
            grad, slope = _grad_terms(
                x.to(ACC), index, local_label, lse, entropy, g_lp, coef_p, g_h, g_q, g_mean_over_v,
                scale, cap, inv_cap, inv_t, HAS_SOFTCAP, HAS_GRAD_ENTROPY, HAS_GRAD_SUM_SQ, HAS_GRAD_MEAN,
            )
            grad = tl.where(ignored, 0.0, (grad + w) * slope)
            rest += tl.sum(tl.where(in_k & (index != label_col), w, 0.0), axis=0)
            tl.store(g_base + index, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_k)
        # One element per row, rewritten after every thread's stores above (a store mask that skipped it
        # would cost the dense stores their vector width).
        tl.debug_barrier()
        x_label, slope = _transform(
            tl.load(x_base + tl.where(own, local_label, 0) * stride_xv).to(ACC), scale, cap, inv_cap, inv_t,
            HAS_SOFTCAP,
        )
        grad = -rest
        if HAS_GRAD_MEAN:
            grad += g_mean_over_v
        tl.store(
            g_base + tl.where(own, local_label, 0),
            (grad * slope).to(grad_logits_ptr.dtype.element_ty),
            mask=own & (tl.exp(x_label - lse) > 0.5),  # False for a NaN row
        )


# ---------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------
# Register budget 64/thread, 96 with top-k (bench/static/budgets.py, checked by tests/test_static.py):
# as logprobs; top-k keeps the k best pairs in registers (5 CTAs of 4 warps per SM).
@dataclass(frozen=True)
class _LaunchConfig:
    block_v: int
    block_k: int
    num_warps: int


def _launch_config(vocab_size: int, top_k: int) -> _LaunchConfig:
    """One row per program, the vocabulary streamed in blocks of at most 4096 (as ``ops/logprobs.py``).

    With a top-k, blocks of at most 1024: each round of the merge reduces over a whole block, and a row's
    first block takes k rounds.
    """
    block_v = pow2_between(vocab_size, 16, 1024 if top_k else 4096)
    return _LaunchConfig(
        block_v=block_v, block_k=pow2_between(top_k, 2, TOP_K_MAX), num_warps=4 if block_v <= 1024 else 8
    )


def _scalars(logits: torch.Tensor, logit_scale: float, softcap: float, inv_temperature: float) -> list:
    """The twelve fp32 kernel arguments of the four float hyperparameters (softcap 0 means none)."""
    dtype = compute_dtype(logits)
    inv_cap = 1.0 / softcap if softcap > 0 else 0.0
    return [part for v in (logit_scale, softcap, inv_cap, inv_temperature) for part in scalar_parts(v, dtype)]


# ---------------------------------------------------------------------------------------------------
# Launchers: they write into outputs the caller allocated.
# ---------------------------------------------------------------------------------------------------
def _launch_fwd(
    outputs: tuple[torch.Tensor, ...],
    logits: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    softcap: float,
    inv_temperature: float,
    ignore_index: int,
    top_k: int,
) -> None:
    """Writes ``outputs`` = (logprobs, entropy, sum_sq_probs, top1_match, mean_logit, topk_logprobs,
    topk_indices, lse) as ``cpu.empty_outputs`` allocates them (an output not requested is empty) for
    ``logits`` [..., V] (any strides) and ``labels`` [N]."""
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    logprobs, entropy, sum_sq, top1, mean, topk_values, topk_indices, lse = outputs
    assert all(t.is_contiguous() for t in outputs)
    logits, rows1, s0, s1, sv = forward_row_layout(logits)
    cfg = _launch_config(vocab_size, top_k)
    wrap_triton(_token_stats_fwd_kernel)[(n_rows,)](
        logits, labels, *(t if t.numel() else lse for t in outputs[:5]),
        topk_values if top_k else lse, topk_indices if top_k else labels, lse,
        s0, s1, sv,
        rows1, vocab_size,
        *_scalars(logits, logit_scale, softcap, inv_temperature), ignore_index,
        BLOCK_V=cfg.block_v, TOP_K=top_k, BLOCK_K=cfg.block_k, HAS_SOFTCAP=softcap > 0,
        HAS_ENTROPY=entropy.numel() > 0, HAS_SUM_SQ=sum_sq.numel() > 0, HAS_TOP1=top1.numel() > 0,
        HAS_MEAN=mean.numel() > 0, ACC=acc_dtype(logits), num_warps=cfg.num_warps,
    )


def _launch_bwd(
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
    """Writes the logits gradient into ``grad_logits`` (contiguous, the logits' shape and dtype).
    ``grads`` = (logprobs [N], entropy, sum_sq_probs, mean_logit [N] or [0], topk_logprobs [N, k] or
    [0]); ``saved`` = (lse, entropy, sum_sq_probs, topk_indices) from the forward.  Vocabulary-sharded
    logits (``rlhf_kernels/parallel.py``): they are the columns [vocab_start, vocab_start + V) of a
    vocabulary of ``vocab_total`` (-1: V), labels are ids in it, and ``saved`` holds statistics over
    all of it; the label's one-hot term lands on the shard that holds the label."""
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    assert grad_logits.is_contiguous()
    grad_logprobs, grad_entropy, grad_sum_sq, grad_mean, grad_topk = grads
    lse, entropy, sum_sq, topk_indices = saved
    top_k = topk_indices.shape[-1] if topk_indices.dim() == 2 else 0
    logits, _, rows1, s0, s1, sv = row_layout(logits)
    cfg = _launch_config(vocab_size, top_k)
    wrap_triton(_token_stats_bwd_kernel)[(n_rows,)](
        grad_logits, *(g if g.numel() else grad_logprobs for g in grads),
        logits, labels, lse, entropy if entropy.numel() else lse, sum_sq if sum_sq.numel() else lse,
        topk_indices if top_k else labels,
        s0, s1, sv,
        rows1, vocab_size, vocab_start, vocab_size if vocab_total < 0 else vocab_total,
        *_scalars(logits, logit_scale, softcap, inv_temperature), ignore_index,
        BLOCK_V=cfg.block_v, TOP_K=top_k, BLOCK_K=cfg.block_k, HAS_SOFTCAP=softcap > 0,
        HAS_GRAD_ENTROPY=grad_entropy.numel() > 0, HAS_GRAD_SUM_SQ=grad_sum_sq.numel() > 0,
        HAS_GRAD_MEAN=grad_mean.numel() > 0, HAS_GRAD_TOPK=grad_topk.numel() > 0, ACC=acc_dtype(logits),
        num_warps=cfg.num_warps,
    )


def _fwd_triton(logits, labels, logit_scale, softcap, inv_temperature, ignore_index, *flags):
    outputs = cpu.empty_outputs(logits, labels.numel(), *flags)
    _launch_fwd(outputs, logits, labels, logit_scale, softcap, inv_temperature, ignore_index, flags[-1])
    return outputs


def _bwd_triton(g_lp, g_h, g_q, g_mean, g_topk, logits, labels, lse, entropy, sum_sq, topk_indices, *rest):
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_bwd(
        grad_logits, (g_lp, g_h, g_q, g_mean, g_topk), logits, labels, (lse, entropy, sum_sq, topk_indices),
        *rest,
    )
    return grad_logits


# ---------------------------------------------------------------------------------------------------
# Registration: the routing ops autograd and torch.compile see.
# ---------------------------------------------------------------------------------------------------
@kernel_op("token_stats_fwd")
def token_stats_fwd(
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
) -> cpu.Outputs:
    """(logprobs, entropy, sum_sq_probs, top1_match, mean_logit [N] or [0], topk_logprobs [N, k] or [0],
    topk_indices [N, k] int64 or [0], lse [N]) for logits [..., V], labels [N]; softcap 0 means none."""
    return _dispatch.route(FAMILY, logits.device, triton=_fwd_triton, torch=cpu.token_stats_fwd_torch)(
        logits, labels, logit_scale, softcap, inv_temperature, ignore_index,
        with_entropy, with_sum_sq, with_top1, with_mean, top_k,
    )


@kernel_op("token_stats_bwd")
def token_stats_bwd(
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
    """The logits gradient (logits' dtype and shape); an empty upstream gradient means none.
    ``vocab_start``/``vocab_total``: a vocabulary shard's columns, as for ``_launch_bwd``."""
    return _dispatch.route(FAMILY, logits.device, triton=_bwd_triton, torch=cpu.token_stats_bwd_torch)(
        grad_logprobs, grad_entropy, grad_sum_sq, grad_mean, grad_topk, logits, labels, lse, entropy,
        sum_sq, topk_indices, logit_scale, softcap, inv_temperature, ignore_index, vocab_start, vocab_total,
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, logit_scale, softcap, inv_temperature, ignore_index = inputs[:6]
    _, entropy, sum_sq, top1, _, _, topk_indices, lse = output
    ctx.mark_non_differentiable(top1, topk_indices, lse)
    ctx.save_for_backward(logits, labels, lse, entropy, sum_sq, topk_indices)
    ctx.scalars = (logit_scale, softcap, inv_temperature, ignore_index)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lp, g_h, g_q, _g_top1, g_mean, g_topk, _g_idx, _g_lse):
    logits, labels, lse, entropy, sum_sq, topk_indices = ctx.saved_tensors
    empty = lse.new_empty(0)
    grads = [
        torch.zeros_like(lse) if g_lp is None else g_lp.contiguous(),
        *(empty if g is None else g.contiguous() for g in (g_h, g_q, g_mean, g_topk)),
    ]
    grad_logits = token_stats_bwd(*grads, logits, labels, lse, entropy, sum_sq, topk_indices, *ctx.scalars)
    return (grad_logits,) + (None,) * 10


token_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
class TokenStats(NamedTuple):
    """The per-position outputs of :func:`token_stats_from_logits`; None where not requested."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    sum_sq_probs: torch.Tensor | None = None
    top1_match: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None


def token_stats_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    entropy: bool = False,
    sum_sq_probs: bool = False,
    top1_match: bool = False,
    mean_logit: bool = False,
    top_k: int = 0,
    ignore_index: int = -100,
    batch_invariant: bool = True,
    process_group=None,
) -> TokenStats:
    """Log-probabilities of ``labels`` plus the requested statistics of p = softmax(x'), all in the one
    streaming pass over the logits, where x' = softcap(logit_scale · logits) / temperature.

    Args:
        logits: [..., V] float32, bfloat16 or float16 (float64: computed in float64), any strides.
        labels: [...] = ``logits.shape[:-1]``, int64 or int32, each in [0, V) or ``ignore_index``.
        temperature, logit_scale: > 0.  softcap: None, or c > 0 for z ← c·tanh(z/c) (after the scale,
            before the temperature, as Gemma-2).
        entropy: H = −Σ p log p.  sum_sq_probs: Σ p² (verl's optimal-token baseline).  top1_match: 1.0
            where the label's logit is the row's maximum (ties count), else 0.0.  mean_logit: Σ x'/V.
        top_k: 0, or 1 ≤ k ≤ min(64, V): the k largest log p per position, descending, and their token
            indices (int64; ties go to the smaller index).
        ignore_index: label value of positions that give 0 in every output and receive zero gradient.
        batch_invariant: every output and the gradient of a row are bitwise the same whatever the
            number of rows, the row's position and the other rows; always the case, at no cost (as
            :func:`rlhf_kernels.logprobs_from_logits`): the flag states the guarantee, False is accepted.
        process_group: vocabulary (tensor) parallelism, as :func:`rlhf_kernels.logprobs_from_logits`:
            this rank's columns [rank·V, (rank+1)·V) of the vocabulary, global labels.  logprobs,
            entropy and sum_sq_probs only (top1_match, mean_logit and top_k raise ``ValueError``).

    Returns:
        :class:`TokenStats`: ``logprobs`` [...] and the requested fields ([...], or [..., k] for the
        top-k), float32 (float64 for float64 logits); fields not requested are None.  Differentiable:
        logprobs, entropy, sum_sq_probs, mean_logit, topk_logprobs (gradients: module docstring of
        ``rlhf_kernels/ops/token_stats.py``); top1_match and topk_indices are not.

    Example: logits [[0, 0, ln 2]], labels [2] give logprobs [ln ½], sum_sq_probs [(1 + 1 + 4)/16 =
    0.375], top1_match [1.0], mean_logit [ln 2 / 3], and with top_k=2 topk_logprobs [[ln ½, ln ¼]],
    topk_indices [[2, 0]].
    """
    logits = _check_logits(logits)
    check_index_tensor("labels", labels)
    check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    inv_temperature = 1.0 / check_positive("temperature", temperature)
    logit_scale = check_positive("logit_scale", logit_scale)
    softcap = 0.0 if softcap is None else check_positive("softcap", softcap)
    ignore_index = check_int("ignore_index", ignore_index)
    vocab_size = logits.shape[-1]
    top_k = check_top_k(top_k, vocab_size)
    check_flag("batch_invariant", batch_invariant)
    flags = (bool(entropy), bool(sum_sq_probs), bool(top1_match), bool(mean_logit))
    if process_group is not None and (flags[2] or flags[3] or top_k):
        raise ValueError(
            "with process_group, token_stats_from_logits computes logprobs, entropy and sum_sq_probs; "
            f"got top1_match={top1_match}, mean_logit={mean_logit}, top_k={top_k} (set them off)"
        )
    vocab, vocab_from = label_vocab(logits, process_group)
    check_label_range(labels, vocab, ignore_index, vocab_from)
    flat_labels = labels.reshape(-1).contiguous()
    if process_group is None:
        out = token_stats_fwd(
            logits, flat_labels, logit_scale, softcap, inv_temperature, ignore_index, *flags, top_k
        )
    else:
        from ..parallel import vocab_parallel_token_stats

        lp, h, q = vocab_parallel_token_stats(
            logits, flat_labels, logit_scale, softcap, inv_temperature, ignore_index, *flags[:2],
            process_group,
        )
        out = (lp, h, q, None, None)
    shape = labels.shape
    fields = [out[0].view(shape)] + [o.view(shape) if on else None for o, on in zip(out[1:5], flags)]
    if top_k:
        fields += [out[5].view(*shape, top_k), out[6].view(*shape, top_k)]
    return TokenStats(*fields)
