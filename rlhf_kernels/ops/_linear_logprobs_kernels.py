"""Triton kernels of :mod:`rlhf_kernels.ops.linear_logprobs` and their launch configuration (the math is
in that module's docstring; the launchers live there too).

Rows (tokens) are tiled by BLOCK_N, the vocabulary by BLOCK_V, the hidden features (the products'
reduction dimension) by BLOCK_K.  ACC is the arithmetic dtype (fp32; fp64 for fp64 inputs).  The float
hyperparameters (logit_scale, the soft cap c and 1/c, 1/τ) arrive as ``scalar_parts`` and are read with
token_stats' ``_hyperparameters``; the logit transform and the gradient terms are token_stats' device
functions (``_transform``, ``_grad_terms``), so both families share one definition of the math.

Labelled rows only: the kernels address rows through ``order`` (a stable ordering with the labelled rows
first) and read their number ``count`` on the device; a row tile past it does no product (the forward
stores the accumulators of no entry, the backward a zero gradient), so the cost follows the number of
labelled tokens without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dispatch
from ._launch import cdiv, pow2_between, sm_count, tl, triton

if triton is not None:
    from .token_stats import _grad_terms, _hyperparameters, _transform

    @triton.jit
    def _dot(a, b, acc, DOT_MODE: tl.constexpr):
        # DOT_MODE 0: native tensor-core product (bf16/fp16; fp32 as TF32 when torch allows TF32).
        # 1: fp32 / fp64 in full precision (torch's default for fp32 matmuls).
        # 2: operands widened to fp32 first: Triton's interpreter multiplies bf16 tiles as raw 16-bit
        #    integers (its dot has no bf16 case); widening is exact, so the interpreter stays a true check.
        # 3: batch_invariant under the interpreter, whose dot (numpy's BLAS) sums a row differently
        #    depending on its position in the tile (rows in groups of 6 on OpenBLAS): a broadcast product
        #    summed over k in order, the same for every row.  On a GPU one MMA tile computes every row the
        #    same way, so modes 0 and 1 are already position-independent there.
        if DOT_MODE == 1:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif DOT_MODE == 2:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT_MODE == 3:
            acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _to_buffer_dtype(x, dtype: tl.constexpr, DOT_MODE: tl.constexpr):
        # Interpreted bf16 (DOT_MODE 2 or 3): the interpreter's fp32 -> bf16 cast truncates, where a GPU
        # rounds to nearest even; rounding the fp32 bits first makes the interpreter round as the GPU does.
        if DOT_MODE >= 2 and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _row_block(order_ptr, count_ptr, block, N, BLOCK_N: tl.constexpr, HAS_ORDER: tl.constexpr):
        """(rows [BLOCK_N] int64, row_ok, whether the block holds a labelled row) of row tile ``block``."""
        idx = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = idx < N
        if HAS_ORDER:
            rows = tl.load(order_ptr + idx, mask=row_ok, other=0).to(tl.int64)
            busy = block * BLOCK_N < tl.load(count_ptr)
        else:
            rows = idx.to(tl.int64)
            busy = block * BLOCK_N < N
        return rows, row_ok, busy

    @triton.jit
    def _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, row_ok, col_ok,
        stride_hn, stride_hk, stride_wv, stride_wk, H,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
    ):
        """Raw logits h Wᵀ + b for ``rows`` and vocabulary entries offs_v, [BLOCK_N, BLOCK_V] in ACC
        (H = 0 skips the product)."""
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hk
        w_ptrs = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
        for k in range(0, H, BLOCK_K):
            k_ok = offs_k < H - k
            a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_MODE)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_v, mask=col_ok, other=0.0).to(ACC)[None, :]
        return acc

    @triton.jit
    def _topk_merge_rows(top_v, top_i, z, offs, avail, NO_INDEX):
        """Merges a tile's entries (z [BLOCK_N, BLOCK_V] at vocabulary entries offs [BLOCK_V], where
        ``avail``) into each row's running top-k set (top_v, top_i [BLOCK_N, BLOCK_TOPK], unordered;
        slots past k hold +inf, so they are never the worst; empty slots −inf at indices ≥ V), in the
        order larger value, then smaller index (token_stats' ``_topk_merge``, per row).  One round per
        entry that enters some row's set: after a split's first tiles, most tiles end after one
        comparison.  NO_INDEX: an index above every real and empty-slot one."""
        cand_v = tl.max(tl.where(avail, z, float("-inf")), axis=1)
        cand_i = tl.min(tl.where(avail & (z == cand_v[:, None]), offs[None, :], NO_INDEX), axis=1)
        worst_v = tl.min(top_v, axis=1)
        worst_i = tl.max(tl.where(top_v == worst_v[:, None], top_i, -1), axis=1)
        enter = (cand_i < NO_INDEX) & ((cand_v > worst_v) | ((cand_v == worst_v) & (cand_i < worst_i)))
        while tl.max(enter.to(tl.int32), axis=0) > 0:
            replace = enter[:, None] & (top_i == worst_i[:, None])
            top_v = tl.where(replace, cand_v[:, None], top_v)
            top_i = tl.where(replace, cand_i[:, None], top_i)
            # a row whose best remaining entry did not enter is done: later ones are no better
            avail = avail & enter[:, None] & (offs[None, :] != cand_i[:, None])
            cand_v = tl.max(tl.where(avail, z, float("-inf")), axis=1)
            cand_i = tl.min(tl.where(avail & (z == cand_v[:, None]), offs[None, :], NO_INDEX), axis=1)
            worst_v = tl.min(top_v, axis=1)
            worst_i = tl.max(tl.where(top_v == worst_v[:, None], top_i, -1), axis=1)
            enter = (cand_i < NO_INDEX) & ((cand_v > worst_v) | ((cand_v == worst_v) & (cand_i < worst_i)))
        return top_v, top_i

    # Reads the labelled rows of hidden [N, H] once per vocabulary split and weight [V, H] once per row
    # block (each weight tile once per wave from HBM, see the program order); writes 6 · splits · N
    # accumulators (and 2k · splits · N for the top-k).
    @triton.jit
    def _linear_logprobs_fwd_kernel(
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr, order_ptr, count_ptr,
        max_ptr, sum_ptr, tsum_ptr, label_logit_ptr, qsum_ptr, total_ptr, topk_val_ptr, topk_idx_ptr,
        stride_hn, stride_hk, stride_wv, stride_wk,
        N, V, H, label_offset,
        scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
        inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo,
        tiles_per_split, vocab_splits,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr, HAS_MEAN: tl.constexpr,
        TOP_K: tl.constexpr, BLOCK_TOPK: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
    ):
        # Split-fastest order: programs running together share a row block (its hidden rows stay in L2)
        # and walk the weight in step (each weight tile is read from HBM once per wave).
        pid = tl.program_id(0)
        split = pid % vocab_splits
        rows, row_ok, busy = _row_block(order_ptr, count_ptr, pid // vocab_splits, N, BLOCK_N, HAS_ORDER)
        label = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64) - label_offset
        scale, cap, inv_cap, inv_t = _hyperparameters(
            scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
            inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo, ACC,
        )

        m = tl.full((BLOCK_N,), float("-inf"), ACC)  # running max of x'
        s = tl.zeros((BLOCK_N,), ACC)  # Σ e^{x' − m}
        t = tl.zeros((BLOCK_N,), ACC)  # Σ e^{x' − m}(x' − m); stays 0 without HAS_ENTROPY
        q = tl.zeros((BLOCK_N,), ACC)  # Σ e^{2(x' − m)}; stays 0 without HAS_SUM_SQ
        total = tl.zeros((BLOCK_N,), ACC)  # Σ x'; stays 0 without HAS_MEAN
        z_label = tl.zeros((BLOCK_N,), ACC)
        slots = tl.arange(0, BLOCK_TOPK)
        top_v = tl.where(slots < TOP_K, float("-inf"), float("inf")).to(ACC)[None, :] + tl.zeros(
            (BLOCK_N, BLOCK_TOPK), ACC)  # the running top-k x' (unordered); +inf: no slot
        top_i = V + slots[None, :] + tl.zeros((BLOCK_N, BLOCK_TOPK), tl.int32)  # empty slots: ≥ V
        first_tile = split * tiles_per_split
        last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BLOCK_V))
        last_tile = tl.where(busy, last_tile, first_tile)  # only ignored rows: no tile at all
        for tile in range(first_tile, last_tile):
            offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = offs_v < V
            x = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, row_ok, col_ok,
                stride_hn, stride_hk, stride_wv, stride_wk, H,
                BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_MODE, ACC,
            )
            z, _ = _transform(x, scale, cap, inv_cap, inv_t, HAS_SOFTCAP)
            if HAS_MEAN:
                total += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            is_label = (offs_v[None, :] == label[:, None]) & col_ok[None, :]
            z_label += tl.sum(tl.where(is_label, z, 0.0), axis=1)
            if TOP_K > 0:
                top_v, top_i = _topk_merge_rows(
                    top_v, top_i, z, offs_v, row_ok[:, None] & col_ok[None, :], V + BLOCK_TOPK
                )
            m_new = tl.maximum(m, tl.max(z, axis=1))
            # Reference point for this tile's exponentials; stays finite while a row is all -inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            shift = tl.where(s > 0, m - m_ref, 0.0)
            alpha = tl.exp(shift)
            zc = z - m_ref[:, None]
            e = tl.exp(zc)
            if HAS_ENTROPY:
                # -inf entries have probability 0: their e·(z − m) is 0, not 0·(−inf).
                t = alpha * (t + s * shift) + tl.sum(tl.where(z == float("-inf"), 0.0, e * zc), axis=1)
            if HAS_SUM_SQ:
                q = q * (alpha * alpha) + tl.sum(e * e, axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            m = m_new

        out = split.to(tl.int64) * N + rows
        tl.store(max_ptr + out, m, mask=row_ok)
        tl.store(sum_ptr + out, s, mask=row_ok)
        tl.store(tsum_ptr + out, t, mask=row_ok)
        tl.store(label_logit_ptr + out, z_label, mask=row_ok)
        tl.store(qsum_ptr + out, q, mask=row_ok)
        tl.store(total_ptr + out, total, mask=row_ok)
        if TOP_K > 0:
            top_out = out[:, None] * TOP_K + slots[None, :]
            top_ok = row_ok[:, None] & (slots < TOP_K)[None, :]
            tl.store(topk_val_ptr + top_out, top_v, mask=top_ok)
            tl.store(topk_idx_ptr + top_out, top_i.to(tl.int64), mask=top_ok)

    # Per vocabulary chunk: reads the labelled rows of hidden [N, H] once per column block and the chunk's
    # weight rows once per row block; writes G [N, chunk] in the input dtype (zero rows for ignored
    # tokens) and row-block partial sums of G for d_bias.
    @triton.jit
    def _linear_logprobs_bwd_kernel(
        grad_logits_ptr, grad_bias_ptr,
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr, order_ptr, count_ptr,
        lse_ptr, entropy_ptr, sum_sq_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_sum_sq_ptr,
        grad_mean_ptr, grad_topk_ptr, grad_topk_sum_ptr, topk_idx_ptr,
        stride_gn, stride_gbn, stride_hn, stride_hk, stride_wv, stride_wk,
        N, H, chunk_width, label_offset,
        scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
        inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo,
        ignore_index,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_GRAD_ENTROPY: tl.constexpr, HAS_GRAD_SUM_SQ: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr,
        TOP_K: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
    ):
        # Grouped order (as in a tiled matrix product): GROUP_N row blocks sweep the chunk's vocabulary
        # tiles together, so both operands of the programs in flight stay in L2.
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles_v = tl.cdiv(chunk_width, BLOCK_V)
        per_group = GROUP_N * tiles_v
        first_n = (pid // per_group) * GROUP_N
        group_rows = tl.minimum(tiles_n - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_rows
        pid_v = (pid % per_group) // group_rows

        rows, row_ok, busy = _row_block(order_ptr, count_ptr, pid_n, N, BLOCK_N, HAS_ORDER)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # within the chunk
        col_ok = offs_v < chunk_width
        scale, cap, inv_cap, inv_t = _hyperparameters(
            scale_hi, scale_mid, scale_lo, cap_hi, cap_mid, cap_lo,
            inv_cap_hi, inv_cap_mid, inv_cap_lo, inv_t_hi, inv_t_mid, inv_t_lo, ACC,
        )
        x = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, offs_v, row_ok, col_ok,
            stride_hn, stride_hk, stride_wv, stride_wk, tl.where(busy, H, 0),
            BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_MODE, ACC,
        )
        label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        ignored = label == ignore_index
        # an ignored row's lse may be −inf (no entry folded): a finite stand-in, its G is 0 anyway
        lse = tl.where(ignored, 0.0, tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC))[:, None]
        g = tl.load(grad_logprobs_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        coef_p = -g  # the coefficient of p_j in G_j
        entropy = lse  # placeholders, unused unless the flag is set
        g_h = lse
        g_q = lse
        g_mean_over_v = lse
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
            entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        if HAS_GRAD_SUM_SQ:
            g_q = tl.load(grad_sum_sq_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
            coef_p -= 2.0 * g_q * tl.load(sum_sq_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        if HAS_GRAD_MEAN:  # the upstream gradient of the mean logit, already divided by V
            g_mean_over_v = tl.load(grad_mean_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        if TOP_K > 0:  # the top-k log-probs' upstream gradients w, here Σ_k w_k (TOP_K 0: none)
            coef_p -= tl.load(grad_topk_sum_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        grad, slope = _grad_terms(
            x, offs_v[None, :], (label - label_offset)[:, None], lse, entropy, g, coef_p, g_h, g_q,
            g_mean_over_v, scale, cap, inv_cap, inv_t,
            HAS_SOFTCAP, HAS_GRAD_ENTROPY, HAS_GRAD_SUM_SQ, HAS_GRAD_MEAN,
        )
        grad = grad * slope
        if TOP_K > 0:
            # the one-hot terms w_k·1[j = i_k], in ACC before the one rounding: slot by slot, a tile
            # operation only where some row of the tile has its k-th entry in this tile
            tile_start = pid_v * BLOCK_V
            for slot in range(TOP_K):
                at = rows * TOP_K + slot
                index = tl.load(topk_idx_ptr + at, mask=row_ok, other=-1) - label_offset
                inside = row_ok & (index >= tile_start) & (index < tile_start + BLOCK_V)
                if tl.max(inside.to(tl.int32), axis=0) > 0:
                    w = tl.load(grad_topk_ptr + at, mask=inside, other=0.0).to(ACC)
                    grad += tl.where(offs_v[None, :] == index[:, None], w[:, None] * slope, 0.0)
        grad = tl.where(ignored[:, None], 0.0, grad)

        g_ptrs = grad_logits_ptr + rows[:, None] * stride_gn + offs_v[None, :]
        grad_out = _to_buffer_dtype(grad, grad_logits_ptr.dtype.element_ty, DOT_MODE)
        tl.store(g_ptrs, grad_out, mask=row_ok[:, None] & col_ok[None, :])
        if WRITE_GRAD_BIAS:
            # One partial per (row block, column), in ACC: summed afterwards in a fixed order (deterministic).
            gb_ptrs = grad_bias_ptr + pid_n.to(tl.int64) * stride_gbn + offs_v
            tl.store(gb_ptrs, tl.sum(grad, axis=0), mask=col_ok)

    # batch_invariant: d_hidden [N, H] (ACC) += G [N, chunk] · W[chunk] [chunk, H] with fixed tiles, each
    # row's sum taken tile by tile in vocabulary order (cuBLAS picks its algorithm, split-K included, from
    # N).  Reads G once per column block of d_hidden and W[chunk] once per row block.
    @triton.jit
    def _linear_logprobs_grad_hidden_kernel(
        d_hidden_ptr, grad_logits_ptr, weight_ptr,
        stride_dn, stride_gn, stride_wv, stride_wk,
        N, H, chunk_width,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        DOT_MODE: tl.constexpr, ACC: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_v = tl.arange(0, BLOCK_V)
        row_ok = offs_n < N
        col_ok = offs_h < H
        d_ptrs = d_hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_dn + offs_h[None, :]
        acc = tl.load(d_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        g_ptrs = grad_logits_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + offs_v[None, :]
        w_ptrs = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wk
        for v in range(0, chunk_width, BLOCK_V):
            v_ok = offs_v < chunk_width - v
            a = tl.load(g_ptrs, mask=row_ok[:, None] & v_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=v_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_MODE)
            g_ptrs += BLOCK_V
            w_ptrs += BLOCK_V * stride_wv
        tl.store(d_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch configuration: the one place where tile sizes, the forward's splits and the backward's chunk
# are chosen.
# ---------------------------------------------------------------------------------------------------
# Backward: bytes of the [N, chunk] gradient buffer (input dtype).  512 MiB holds 16384 columns for
# N = 16384 bf16 tokens: ~10 passes over V = 151936, each a pair of large tensor-core products.
_BWD_BUFFER_BYTES = 512 << 20
# Forward programs wanted per SM: enough waves that the last one's imbalance stays small.
_PROGRAMS_PER_SM = 4
# At least this many forward splits on a GPU, so that programs in flight share few row blocks.
_MIN_SPLITS = 8
# Forward splits in Triton's interpreter: a few, so that the tests exercise the merge.
_INTERPRETER_SPLITS = 4
# batch_invariant on a GPU: forward splits whatever N (16 x 128 rows fill 132 SMs from N = 1024).
_INVARIANT_SPLITS = 16
# batch_invariant: columns of d_hidden per program of the fixed-tile d_hidden product.
_GRAD_HIDDEN_BLOCK_H = 64
# Forward with a top-k: rows per tile, so that 64 slots of (value, index) per row fit in registers
# beside the logits tile (64 x 64 x 2 words over 8 warps: 32 registers per thread; over 4 warps the
# 64 x 64 tile spilled 24 B in bf16 and 120 B in fp32, python -m bench.static).
_TOPK_BLOCK_N = 64
_TOPK_MAX = 64


@dataclass(frozen=True)
class LinearLogprobsConfig:
    """How the Triton path tiles the work.

    block_n, block_v, block_k: a logits tile is [block_n tokens, block_v vocabulary entries], computed by
        tl.dot over the hidden dimension in steps of block_k.  128 x 128 x 64 in bf16/fp16 is the usual
        Hopper/Ampere tensor-core tile (32 KiB of operands per pipeline stage, a 64 KiB fp32 accumulator
        over 8 warps); wider dtypes shrink block_k (fp32 32, fp64 16) to keep the bytes per stage, and
        fp64 also caps the tile at 64 x 64.  Small problems shrink each block to the next power of two
        >= the size (at least 16, tl.dot's minimum); batch_invariant keeps block_n at the full tile.
    vocab_splits, tiles_per_split: forward programs per row block, each owning a contiguous range of
        tiles_per_split vocabulary tiles; their accumulators are merged afterwards.  Chosen so that rows
        x splits fills the GPU _PROGRAMS_PER_SM times over (at least _MIN_SPLITS when V allows, so
        programs in flight share few row blocks and walk the weight in step); batch_invariant:
        _INVARIANT_SPLITS, from V alone.
    bwd_chunk_v: the backward recomputes the logits once and keeps G for bwd_chunk_v columns at a time in
        a [N, bwd_chunk_v] buffer (input dtype, at most _BWD_BUFFER_BYTES), from which d_hidden and
        d_weight are two large tensor-core products (cuBLAS; d_hidden's in a fixed-tile Triton kernel
        under batch_invariant, whose result does not depend on the chunk: fp32 partial sums are stored
        exactly between chunks).  One fused kernel instead would need fp32 atomics into d_weight [V, H]
        (non-deterministic, 2.5 GB at V = 151936, H = 4096) or a second recomputation.
    group_n: row blocks per group in the backward kernel's grouped program order (L2 reuse).
    dot_mode: how the kernels call tl.dot (see _dot): 0 native, 1 full-precision fp32/fp64, 2 bf16
        widened to fp32 (the interpreter), 3 an in-order broadcast product (batch_invariant in the
        interpreter).
    block_topk: slots of the forward's running top-k per row (the next power of two >= k; 0 without).
        A top-k keeps block_n x block_topk values and indices in registers beside the logits tile: the
        forward then takes the statistics' narrower tiles and at most _TOPK_BLOCK_N rows per tile.
    """

    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    vocab_splits: int
    tiles_per_split: int
    bwd_chunk_v: int
    group_n: int
    dot_mode: int
    block_topk: int = 0


def _launch_config(
    n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
    batch_invariant: bool = False, statistics: bool = False, top_k: int = 0,
) -> LinearLogprobsConfig:
    """``statistics``: a soft cap, Σp² or the mean logit (or their gradients) are on; ``top_k``: the
    forward keeps a running top-k (0: none)."""
    element = dtype.itemsize
    statistics = statistics or top_k > 0
    # fp32 products in full precision unless the user allowed TF32 for torch's matmuls (see _dot).
    full_precision = dtype == torch.float64 or (
        dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    )
    interpreted = _dispatch.triton_interpreted()
    if batch_invariant and interpreted:
        dot_mode = 3
    else:
        dot_mode = 2 if dtype == torch.bfloat16 and interpreted else int(full_precision)
    tile = 128 if element <= 4 else 64
    rows_tile = min(tile, _TOPK_BLOCK_N) if top_k else tile
    block_n = rows_tile if batch_invariant else pow2_between(n_rows, 16, rows_tile)
    # Register budget 255/thread, no spills (bench/static/budgets.py, python -m bench.static): one CTA
    # of 8 warps per SM by design.  At 128x128 tiles the entropy epilogue spilled (bf16, K = 64: 4 B;
    # fp32 without TF32, whose products keep fp32 operands: 8 B on triton 3.9, 572 B on 3.6), hence
    # K = 32 for 16-bit inputs and half-width vocabulary tiles for full-precision fp32.  With the
    # statistics (a soft cap, Σp², the mean: two more accumulators, tanh and its slope) 128 x 128 spilled
    # too (forward 8 B bf16 / 24 B fp32, backward 52 B bf16): vocabulary tiles halved for them as well.
    widest = tile // (2 if (dot_mode == 1 and element == 4) or statistics else 1)
    if top_k and dot_mode == 1 and element == 4:
        widest //= 2  # full-precision fp32 with a top-k spilled 16 B at 64 x 64 tiles (8 warps)
    block_v = pow2_between(vocab_size, 16, widest)
    # full-precision fp32 with the statistics spilled 12 B even at 32-wide vocabulary tiles: K = 16
    deepest = 32 if element == 2 else 128 // element // (2 if statistics and dot_mode == 1 else 1)
    block_k = pow2_between(hidden_size, 16, deepest)
    vocab_tiles = cdiv(vocab_size, block_v)
    row_blocks = cdiv(max(n_rows, 1), block_n)
    if device.type != "cuda":
        splits = _INTERPRETER_SPLITS
    elif batch_invariant:
        splits = _INVARIANT_SPLITS
    else:
        splits = max(_MIN_SPLITS, cdiv(_PROGRAMS_PER_SM * sm_count(device), row_blocks))
    tiles_per_split = cdiv(vocab_tiles, min(splits, vocab_tiles))
    splits = cdiv(vocab_tiles, tiles_per_split)  # every split owns at least one tile
    chunk = block_v  # a power-of-two multiple of block_v (comparisons only, as in pow2_between)
    while chunk < vocab_size and n_rows * 2 * chunk * element <= _BWD_BUFFER_BYTES:
        chunk *= 2
    return LinearLogprobsConfig(
        block_n=block_n, block_v=block_v, block_k=block_k,
        num_warps=8 if block_n * block_v >= 128 * 64 or top_k else 4, num_stages=3 if element == 2 else 2,
        vocab_splits=splits, tiles_per_split=tiles_per_split, bwd_chunk_v=chunk, group_n=8,
        dot_mode=dot_mode, block_topk=pow2_between(top_k, 2, _TOPK_MAX) if top_k else 0,
    )
