"""Log-probabilities (and entropy) renormalised over the tokens a sampler could have drawn: Triton
kernels, launchers, registration and the public function.  The PyTorch path is
``rlhf_kernels/ops/cpu/sampling_logprobs.py``; the float64 oracle (with ``torch.sort``)
``rlhf_kernels/reference/sampling_logprobs.py``.

A rollout sampled with temperature τ, min-p, top-k and top-p (vLLM's order) drew each token from
q = softmax(x') restricted to a kept set K, x' = logits / τ.  Every filter keeps an upper set of values
(whole groups of tied values), so K = {j : x'_j ≥ t} for one threshold t per row:

    min-p  x'_j ≥ max x' + log(min_p)
    top-k  x'_j ≥ the k-th largest surviving value, counted with multiplicity
    top-p  Σ_{i surviving, x'_i > x'_j} q_i < p     (the token that crosses p is kept)

and, with lse_K = log Σ_{j∈K} e^{x'_j}:

    logp_y = x'_y − lse_K  for y ∈ K,  −inf otherwise
    H      = −Σ_{j∈K} q_j log q_j,   mask_mass = Σ_{j∈K} softmax(x')_j

Gradients (the threshold is piecewise constant, so none flows through it), upstream g and h:

    ∂/∂x_j = (1/τ)·[g·(1[j = y] − q_j) − h·q_j·(log q_j + H)]  for j ∈ K,  0 for j ∉ K

with g taken as 0 where logp_y = −inf (a label outside K, or on a −inf logit): the value is constant
there, and no NaN reaches the logits.

The threshold is found without sorting: x' maps to an order-preserving integer key (the float's bits,
magnitude flipped for negatives; ±0 share a key), and a radix search fixes the key of t four bits per
streaming pass, counting (top-k) or summing e^{x'−m} (top-p) above 16 candidate keys at once.  Digits
that the lower bound (min-p / top-k threshold) shares with the row maximum take no pass, and a count
stops once the candidate holds exactly k keys.  A row in fp32 takes 1 pass (max, Σe, NaN check) + at
most 8 (top-k, if on) + at most 8 (top-p, if on) + 1 (lse, entropy): every pass reads the row, nothing
of size V is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_in_range,
    check_index_tensor,
    check_int,
    check_label_range,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)
from ._launch import acc_dtype, pow2_between, row_layout, scalar_parts, tl, triton, wrap_triton
from .cpu import sampling_logprobs as cpu
from .logprobs import _check_logits

FAMILY = "sampling_logprobs"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  One program per row, rows addressed through two row dimensions as in
# ``ops/logprobs.py``; τ⁻¹, p and log(min_p) arrive as ``_launch.scalar_parts``.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    from ._launch import scalar_arg

    _RADIX_BITS = tl.constexpr(4)  # key bits fixed per selection pass
    _RADIX = tl.constexpr(16)  # candidates per pass

    @triton.jit
    def _load_scaled(base, offs, stride_xv, V, inv_temperature, ACC: tl.constexpr):
        x = tl.load(base + offs.to(tl.int64) * stride_xv, mask=offs < V, other=float("-inf"))
        return x.to(ACC) * inv_temperature

    @triton.jit
    def _sort_key(x, KEY: tl.constexpr, KEY_BITS: tl.constexpr):
        """Integer key ordered as x (non-NaN): the bits, with the magnitude bits of negatives flipped."""
        bits = tl.where(x == 0, 0.0, x).to(KEY, bitcast=True)  # −0 → +0 first
        magnitude = ~(tl.full((), 1, KEY) << (KEY_BITS - 1))
        return tl.where(bits >= 0, bits, bits ^ magnitude)

    @triton.jit
    def _radix_select(
        base, stride_xv, V, inv_temperature, m_ref, floor, ceiling, target,
        BY_MASS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, KEY: tl.constexpr,
        KEY_BITS: tl.constexpr,
    ):
        """A key with the kept set of T, the largest key with W(T) ≥ target, where W(T) = #{key ≥ T}
        (BY_MASS off) or Σ_{key ≥ T, key ≥ floor} e^{x'−m} (BY_MASS on; the target is then relative
        to W(floor)); ``ceiling`` ≥ every key.  Returns T, or a key T' ≤ T with no key in [T', T),
        or a key ≤ floor where T < floor.

        Fixes 4 bits per pass from the top: digits that floor and ceiling share are T's (floor ≤ T ≤
        ceiling, or the answer is ≤ floor anyway) and take no pass; candidate d (0..15) is the prefix
        with digit d, digit 0 taken where none qualifies.  A count stops once W(prefix) = target:
        then no key lies in [prefix, T)."""
        digits = tl.arange(0, _RADIX)
        prefix = tl.full((), 1, KEY) << (KEY_BITS - 1)  # the smallest key
        offset_floor = floor ^ prefix  # floor − smallest key: its digits in unsigned order
        spread = floor ^ ceiling
        unscaled = floor == floor  # the mass target is scaled by W(prefix) = W(floor) at the first pass
        done = floor != floor  # a count reached its target
        for level in tl.static_range(KEY_BITS // _RADIX_BITS):
            shift = KEY_BITS - _RADIX_BITS * (level + 1)
            shared = (spread >> shift) == 0  # true for the first levels only
            searched = ~(shared | done)
            candidates = prefix + (digits.to(KEY) << shift)  # wraps to the right key in two's complement
            totals = tl.zeros((_RADIX,), ACC)
            if searched:
                for start in range(0, V, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    x = _load_scaled(base, offs, stride_xv, V, inv_temperature, ACC)
                    key = _sort_key(x, KEY, KEY_BITS)
                    if BY_MASS:
                        weight = tl.where((key >= floor) & (offs < V), tl.exp(x - m_ref), 0.0)
                    else:
                        weight = (offs < V).to(ACC)
                    above = key[None, :] >= candidates[:, None]
                    totals += tl.sum(tl.where(above, weight[None, :], 0.0), axis=1)
            if BY_MASS:  # candidate 0 ≤ floor: W(candidate 0) is the surviving mass
                first = searched & unscaled
                target = tl.where(first, target * tl.sum(tl.where(digits == 0, totals, 0.0), axis=0), target)
                unscaled = unscaled & ~searched
            chosen = tl.max(tl.where(totals >= target, digits, 0), axis=0)
            if not BY_MASS:
                at_chosen = tl.sum(tl.where(digits == chosen, totals, 0.0), axis=0)
                done = done | (searched & (at_chosen == target))
            chosen = tl.where(searched, chosen, tl.where(shared, (offset_floor >> shift) & (_RADIX - 1), 0))
            prefix = prefix + (chosen.to(KEY) << shift)
        return prefix

    # Reads the N·V logits at most 2 + 8·(top-k on) + 8·(top-p on) times (fp32; twice the selection
    # passes in fp64); writes 5 values per row.  top_k = 1 must stay a runtime int (Triton specialises
    # ints equal to 1 into constants, and the kernel converts it to a float).
    @triton.jit(do_not_specialize=["top_k"])
    def _sampling_logprobs_fwd_kernel(
        logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, mass_ptr, lse_ptr, threshold_ptr,
        stride_x0, stride_x1, stride_xv,
        rows1, V, top_k,
        inv_t_hi, inv_t_mid, inv_t_lo, top_p_hi, top_p_mid, top_p_lo,
        log_min_p_hi, log_min_p_mid, log_min_p_lo, ignore_index,
        BLOCK_V: tl.constexpr, SELECT_BLOCK: tl.constexpr, HAS_TOP_K: tl.constexpr,
        HAS_TOP_P: tl.constexpr, HAS_ENTROPY: tl.constexpr, ACC: tl.constexpr, KEY: tl.constexpr,
        KEY_BITS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + (row // rows1) * stride_x0 + (row % rows1) * stride_x1
        label = tl.load(labels_ptr + row).to(tl.int64)
        inv_temperature = scalar_arg(inv_t_hi, inv_t_mid, inv_t_lo, ACC)

        # Pass 1: m = max x', Σ e^{x'−m} over the whole row, NaN count.
        m = tl.full((), float("-inf"), ACC)
        s_all = tl.zeros((), ACC)
        nans = tl.zeros((), tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = _load_scaled(base, offs, stride_xv, V, inv_temperature, ACC)
            nans += tl.sum((x != x).to(tl.int32), axis=0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(tl.where(s_all > 0, m - m_ref, 0.0))
            s_all = s_all * alpha + tl.sum(tl.exp(x - m_ref), axis=0)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        # NaN or +inf in the row, or no finite logit: NaN outputs
        # (as the PyTorch path and logprobs_from_logits)
        bad = (nans > 0) | (m == float("-inf")) | (m == float("inf"))

        # The threshold key: min-p, then top-k, then top-p among the survivors.
        threshold = _sort_key(m + scalar_arg(log_min_p_hi, log_min_p_mid, log_min_p_lo, ACC), KEY, KEY_BITS)
        ceiling = _sort_key(m, KEY, KEY_BITS)
        if HAS_TOP_K:
            kth = _radix_select(
                base, stride_xv, V, inv_temperature, m_ref, threshold, ceiling, top_k.to(ACC),
                False, SELECT_BLOCK, ACC, KEY, KEY_BITS,
            )
            threshold = tl.maximum(threshold, kth)
        if HAS_TOP_P:
            top_p = scalar_arg(top_p_hi, top_p_mid, top_p_lo, ACC)
            nucleus = _radix_select(
                base, stride_xv, V, inv_temperature, m_ref, threshold, ceiling, top_p,
                True, SELECT_BLOCK, ACC, KEY, KEY_BITS,
            )
            threshold = tl.maximum(threshold, nucleus)

        # Last pass: s = Σ_K e^{x'−m}, t = Σ_K e^{x'−m}(x'−m) (the maximum is always kept).
        s = tl.zeros((), ACC)
        t = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = _load_scaled(base, offs, stride_xv, V, inv_temperature, ACC)
            kept = (_sort_key(x, KEY, KEY_BITS) >= threshold) & (offs < V)
            e = tl.where(kept, tl.exp(x - m_ref), 0.0)
            s += tl.sum(e, axis=0)
            if HAS_ENTROPY:
                t += tl.sum(e * tl.where(x == float("-inf"), 0.0, x - m_ref), axis=0)
        # s, s_all ≥ 1 (the maximum is kept) unless the row has no finite logit: keep NaN out of 0/0
        s = tl.where(bad, 1.0, s)
        s_all = tl.where(bad, 1.0, s_all)
        log_s = tl.log(s)
        lse = tl.where(bad, float("nan"), m_ref + log_s)

        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        safe_label = tl.where(in_range, label, 0)
        x_label = tl.load(base + safe_label * stride_xv).to(ACC) * inv_temperature
        label_finite = (_sort_key(x_label, KEY, KEY_BITS) >= threshold) & (x_label > float("-inf"))
        # (x'_y − m) − log s, not x'_y − lse: lse = m + log s rounds log s away when |m| ≫ 1 (1e4, 1e30)
        logprob = tl.where(label_finite, (x_label - m_ref) - log_s, float("-inf"))
        logprob = tl.where(in_range & ~bad, logprob, float("nan"))
        tl.store(logprobs_ptr + row, tl.where(ignored, 0.0, logprob))
        mass = tl.where(bad, float("nan"), s / s_all)
        tl.store(mass_ptr + row, tl.where(ignored, 0.0, mass))
        tl.store(lse_ptr + row, lse)
        tl.store(threshold_ptr + row, threshold.to(tl.int64))
        if HAS_ENTROPY:
            entropy = tl.where(bad, float("nan"), log_s - t / s)
            tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))

    # Reads the N·V logits once and writes the N·V gradient once.
    @triton.jit
    def _sampling_logprobs_bwd_kernel(
        grad_logits_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        logits_ptr, labels_ptr, lse_ptr, entropy_ptr, threshold_ptr,
        stride_x0, stride_x1, stride_xv,
        rows1, V,
        inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
        BLOCK_V: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, ACC: tl.constexpr, KEY: tl.constexpr,
        KEY_BITS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_base = logits_ptr + (row // rows1) * stride_x0 + (row % rows1) * stride_x1
        g_base = grad_logits_ptr + row * V  # a fresh contiguous [N, V] gradient
        label = tl.load(labels_ptr + row).to(tl.int64)
        inv_temperature = scalar_arg(inv_t_hi, inv_t_mid, inv_t_lo, ACC)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        lse = tl.load(lse_ptr + row)
        threshold = tl.load(threshold_ptr + row).to(KEY)
        # a NaN row (lse = NaN) takes the smallest key: NaN reaches every entry of its gradient
        threshold = tl.where(lse != lse, tl.full((), 1, KEY) << (KEY_BITS - 1), threshold)
        x_label = tl.load(x_base + tl.where(in_range, label, 0) * stride_xv).to(ACC) * inv_temperature
        label_finite = (_sort_key(x_label, KEY, KEY_BITS) >= threshold) & (x_label > float("-inf"))
        g = tl.where(label_finite, tl.load(grad_logprobs_ptr + row), 0.0)
        g = tl.where(in_range, g, float("nan"))  # an unchecked bad label: a NaN row, never a number
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        # Where q_y > 1/2 the label column is rewritten last as minus the sum of the others (the row sums
        # to 0; ops/logprobs.py's backward says why): g·(1 − q_y) read as g − g·q_y is 0 once q_y rounds
        # to 1.  (q_y > 1/2 implies the label is kept and finite.)
        own = in_range & ~ignored
        label_col = tl.where(own, label, -1)
        rewrite = own & label_finite & (tl.exp(x_label - lse) > 0.5)  # False for a NaN row
        rest = tl.zeros((), ACC)  # Σ_{j≠y} of the row's gradient before the 1/τ
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = _load_scaled(x_base, offs, stride_xv, V, inv_temperature, ACC)
            kept = _sort_key(x, KEY, KEY_BITS) >= threshold
            log_q = x - lse
            q = tl.where(kept, tl.exp(log_q), 0.0)
            grad = tl.where(offs == label, g, 0.0) - g * q
            if HAS_GRAD_ENTROPY:
                grad -= g_h * q * tl.where(kept & (x > float("-inf")), log_q + entropy, 0.0)
            rest += tl.sum(tl.where((offs < V) & (offs != label_col), grad, 0.0), axis=0)
            grad = tl.where(ignored, 0.0, grad * inv_temperature)
            tl.store(g_base + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=offs < V)
        # rewritten after every thread's stores (a store mask that skipped it would cost them their width)
        tl.debug_barrier()
        tl.store(
            g_base + tl.where(own, label, 0),
            (-rest * inv_temperature).to(grad_logits_ptr.dtype.element_ty),
            mask=rewrite,
        )


# ---------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LaunchConfig:
    block_v: int  # streaming passes (max, lse, backward)
    select_block: int  # selection passes: a [16, select_block] comparison tile
    num_warps: int


def _launch_config(vocab_size: int) -> _LaunchConfig:
    """One row per program.  Streaming passes as in ``ops/logprobs.py`` (blocks of up to 4096); the
    selection passes compare each element with 16 candidates, so their blocks stop at 1024 (16·1024
    comparisons over 8 warps: 64 per thread)."""
    block_v = pow2_between(vocab_size, 16, 4096)
    return _LaunchConfig(
        block_v=block_v,
        select_block=pow2_between(vocab_size, 16, 1024),
        num_warps=4 if block_v <= 1024 else 8,
    )


def _key_args(logits: torch.Tensor) -> dict:
    return {"KEY": tl.int64, "KEY_BITS": 64} if compute_dtype(logits) == torch.float64 else {
        "KEY": tl.int32, "KEY_BITS": 32}


# ---------------------------------------------------------------------------------------------------
# Launchers: they write into outputs the caller allocated.
# ---------------------------------------------------------------------------------------------------
def _launch_fwd(
    outputs: cpu.Outputs,
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    top_k: int,
    top_p: float,
    log_min_p: float,
    ignore_index: int,
) -> None:
    """Writes (logprobs [N], entropy [N] unless empty, mask_mass [N], lse [N], threshold [N] int64)
    for ``logits`` [..., V] (any strides) and ``labels`` [N]; float outputs contiguous in the
    arithmetic dtype.  ``top_k`` in [1, V) turns top-k on, ``top_p`` < 1 top-p."""
    logprobs, entropy, mask_mass, lse, threshold = outputs
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    dtype = compute_dtype(logits)
    assert all(t.is_contiguous() and t.dtype == dtype for t in (logprobs, entropy, mask_mass, lse))
    assert threshold.is_contiguous() and threshold.dtype == torch.int64
    with_entropy = entropy.numel() > 0
    logits, _, rows1, s0, s1, sv = row_layout(logits)
    cfg = _launch_config(vocab_size)
    wrap_triton(_sampling_logprobs_fwd_kernel)[(n_rows,)](
        logits, labels, logprobs, entropy if with_entropy else logprobs, mask_mass, lse, threshold,
        s0, s1, sv,
        rows1, vocab_size, top_k,
        *scalar_parts(inv_temperature, dtype), *scalar_parts(top_p, dtype), *scalar_parts(log_min_p, dtype),
        ignore_index,
        BLOCK_V=cfg.block_v, SELECT_BLOCK=cfg.select_block, HAS_TOP_K=0 < top_k < vocab_size,
        HAS_TOP_P=top_p < 1.0, HAS_ENTROPY=with_entropy, ACC=acc_dtype(logits), num_warps=cfg.num_warps,
        **_key_args(logits),
    )


def _launch_bwd(
    grad_logits: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    threshold: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    """Writes the logits gradient into ``grad_logits`` (contiguous, the logits' shape and dtype);
    ``grad_entropy`` is empty ([0]) when the entropy has no gradient."""
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    assert grad_logits.is_contiguous() and grad_logits.shape == logits.shape
    logits, _, rows1, s0, s1, sv = row_layout(logits)
    has_grad_entropy = grad_entropy.numel() > 0
    cfg = _launch_config(vocab_size)
    wrap_triton(_sampling_logprobs_bwd_kernel)[(n_rows,)](
        grad_logits, grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs,
        logits, labels, lse, entropy if has_grad_entropy else lse, threshold,
        s0, s1, sv,
        rows1, vocab_size,
        *scalar_parts(inv_temperature, compute_dtype(logits)), ignore_index,
        BLOCK_V=cfg.block_v, HAS_GRAD_ENTROPY=has_grad_entropy, ACC=acc_dtype(logits),
        num_warps=cfg.num_warps, **_key_args(logits),
    )


def _fwd_triton(logits: torch.Tensor, labels: torch.Tensor, *settings) -> cpu.Outputs:
    """``settings``: (inv_temperature, top_k, top_p, log_min_p, ignore_index, with_entropy)."""
    outputs = cpu.empty_outputs(logits, labels.numel(), settings[-1])
    _launch_fwd(outputs, logits, labels, *settings[:-1])
    return outputs


def _bwd_triton(grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor, *rest):
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_bwd(grad_logits, grad_logprobs, grad_entropy, logits, *rest)
    return grad_logits


# ---------------------------------------------------------------------------------------------------
# Registration: the routing ops autograd and torch.compile see.
# ---------------------------------------------------------------------------------------------------
@kernel_op("sampling_logprobs_fwd")
def sampling_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    top_k: int,
    top_p: float,
    log_min_p: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] or [0], mask_mass [N], lse over the kept set [N], threshold key [N]
    int64: the kept set is {key ≥ it}; a top-k-only kernel key may lie below the k-th key, with no key
    between) for logits [..., V] and labels [N]; fp32 (fp64 for fp64 logits)."""
    return _dispatch.route(FAMILY, logits.device, triton=_fwd_triton, torch=cpu.sampling_logprobs_fwd_torch)(
        logits, labels, inv_temperature, top_k, top_p, log_min_p, ignore_index, with_entropy
    )


@kernel_op("sampling_logprobs_bwd")
def sampling_logprobs_bwd(
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
    """The logits gradient (logits' dtype and shape); ``grad_entropy`` is empty when H has none."""
    return _dispatch.route(FAMILY, logits.device, triton=_bwd_triton, torch=cpu.sampling_logprobs_bwd_torch)(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, threshold, inv_temperature, ignore_index
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, inv_temperature, _, _, _, ignore_index, _ = inputs
    _, entropy, mask_mass, lse, threshold = output
    ctx.save_for_backward(logits, labels, lse, entropy, threshold)
    ctx.inv_temperature = inv_temperature
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(mask_mass, lse, threshold)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, *_):
    logits, labels, lse, entropy, threshold = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = lse.new_empty(0)
    grad_logits = sampling_logprobs_bwd(
        grad_logprobs.contiguous(), grad_entropy.contiguous(), logits, labels, lse, entropy, threshold,
        ctx.inv_temperature, ctx.ignore_index,
    )
    return grad_logits, None, None, None, None, None, None, None


sampling_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
def _check_top_k(top_k: object, vocab_size: int) -> int:
    top_k = check_int("top_k", top_k)
    if not -1 <= top_k <= vocab_size:
        raise ValueError(
            f"top_k must be 0 or -1 (off) or in [1, {vocab_size}] (the vocabulary size, "
            f"logits.shape[-1]); got {top_k}"
        )
    return top_k if 0 < top_k < vocab_size else 0


def _check_top_p(top_p: object) -> float:
    top_p = check_real("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    return top_p


def sampling_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_mask_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-token log-probabilities of ``labels`` under the distribution the sampler drew from:
    softmax(logits / temperature) restricted to the min-p / top-k / top-p kept set and renormalised.

    Args:
        logits: [..., V] float32, bfloat16 or float16 (float64 too: then computed and returned in
            float64), any strides.  Leading dimensions may be 0 (empty results).
        labels: [...] = ``logits.shape[:-1]``, int64 or int32, each in [0, V) or ``ignore_index``.
        temperature: > 0, applied first (x' = logits / temperature).
        top_k: keep the values ≥ the k-th largest x' (ties kept); 0 or -1 (or V) is off.
        top_p: in (0, 1]: keep the smallest set of top values whose mass reaches top_p, the value that
            crosses it included (ties kept); 1 is off.
        min_p: in [0, 1]: keep x' ≥ max x' + log(min_p) (applied before top-k, as vLLM does); 0 is off.
        ignore_index: label value of positions that give 0 and receive zero gradient.
        return_entropy: also return the entropy of the renormalised distribution.
        return_mask_mass: also return the kept set's mass under softmax(x') (no gradient).

    Returns:
        ``logprobs`` [...] float32 (float64 for float64 logits), or a tuple ``(logprobs, entropy)``,
        ``(logprobs, mask_mass)`` or ``(logprobs, entropy, mask_mass)``.  A label outside the kept set
        gets −inf and no gradient from its log-prob; a row holding NaN (or only −inf) gives NaN.

    Example: logits [[ln 4, ln 3, ln 2, ln 1]] with top_k=2 keep the first two tokens (q = 4/7, 3/7):
    label 1 gives log(3/7) = −0.847, label 2 gives −inf, and mask_mass is 7/10.

    Reads the logits at most 2 + 8·[top-k on] + 8·[top-p on] times (fp32) and never sorts a row; the
    backward reads them once and writes the gradient once.  Labels are range-checked as in
    ``logprobs_from_logits`` (a host sync on CUDA, ``set_index_checks(False)`` turns it off).
    """
    logits = _check_logits(logits)
    check_index_tensor("labels", labels)
    check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    inv_temperature = 1.0 / check_positive("temperature", temperature)
    top_k = _check_top_k(top_k, logits.shape[-1])
    top_p = _check_top_p(top_p)
    min_p = check_in_range("min_p", min_p, 0.0, 1.0)
    log_min_p = math.log(min_p) if min_p > 0 else -math.inf
    ignore_index = check_int("ignore_index", ignore_index)
    check_label_range(labels, logits.shape[-1], ignore_index, "logits.shape[-1]")
    logprobs, entropy, mask_mass, _, _ = sampling_logprobs_fwd(
        logits, labels.reshape(-1).contiguous(), inv_temperature, top_k, top_p, log_min_p, ignore_index,
        bool(return_entropy),
    )
    outputs = [logprobs.view(labels.shape)]
    if return_entropy:
        outputs.append(entropy.view(labels.shape))
    if return_mask_mass:
        outputs.append(mask_mass.view(labels.shape))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
