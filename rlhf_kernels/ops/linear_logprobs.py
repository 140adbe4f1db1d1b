"""Per-token log-probabilities and entropy straight from hidden states: lm_head + log-softmax fused.

With z = (h Wᵀ + b) / τ the scaled logits of a row (h [H], W [V, H], b [V], τ the temperature):

    lse    = log Σ_j exp(z_j)
    logp_y = z_y − lse
    H      = log s − t / s,   s = Σ_j e^{z_j − m},  t = Σ_j e^{z_j − m}(z_j − m),   m = max_j z_j

exactly as :func:`rlhf_kernels.logprobs_from_logits` defines them, but the [N, V] logits never exist:
the forward computes them tile by tile ([BLOCK_N, BLOCK_V], fp32 accumulation on the tensor cores) and
folds each tile into per-row online accumulators (m, s, t and the label's logit z_y).  Accumulators of
disjoint vocabulary ranges merge exactly: rebased to a common maximum M,

    s' = e^{m − M} s,   t' = e^{m − M} (t + s (m − M)),

so the forward splits the vocabulary over several programs (more parallelism) and a weight sharded by
rows over tensor-parallel ranks merges the same way across ranks (:mod:`rlhf_kernels.parallel`).

Backward, with upstream gradients g (of logp_y) and η (of H) per row, recomputes the logits tile by tile:

    G_j = ∂/∂logits_j = (1/τ) [ g (1[j = y] − p_j) − η p_j (log p_j + H) ]
    d_hidden = G W,   d_weight = Gᵀ h,   d_bias = Σ_rows G

G is written, in the input dtype, into a [N, chunk] buffer one vocabulary chunk at a time, and the two
products run as tensor-core matrix products on that chunk (see :class:`LinearLogprobsConfig`); d_hidden
sums the chunks' products in fp32 and is rounded to the input dtype once, at the end.

Positions whose label equals ``ignore_index`` give 0 and send exactly zero into G.  A ``-inf`` bias entry
masks that vocabulary entry (probability 0); NaN in gives NaN out.

Elsewhere: the PyTorch path in :mod:`rlhf_kernels.ops.cpu.linear_logprobs`, ``LinearLogprobs`` in
:mod:`rlhf_kernels.modules`, vocabulary parallelism in :mod:`rlhf_kernels.parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from ._launch import (
    acc_dtype,
    cdiv,
    pow2_between,
    scalar_parts,
    sm_count,
    tl,
    triton,
    without_autocast,
    wrap_triton,
)
from .cpu import linear_logprobs as cpu

FAMILY = "linear_logprobs"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Rows (tokens) are tiled by BLOCK_N, the vocabulary by BLOCK_V, the hidden features
# (the products' reduction dimension) by BLOCK_K.  ACC is the arithmetic dtype (fp32; fp64 for fp64
# inputs); 1/τ arrives as scalar_parts and is read with scalar_arg.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    from ._launch import scalar_arg

    @triton.jit
    def _dot(a, b, acc, DOT_MODE: tl.constexpr):
        # DOT_MODE 0: native tensor-core product (bf16/fp16; fp32 as TF32 when torch allows TF32).
        # 1: fp32 / fp64 in full precision (torch's default for fp32 matmuls).
        # 2: operands widened to fp32 first: Triton's interpreter multiplies bf16 tiles as raw 16-bit
        #    integers (its dot has no bf16 case); widening is exact, so the interpreter stays a true check.
        if DOT_MODE == 1:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif DOT_MODE == 2:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _to_buffer_dtype(x, dtype: tl.constexpr, DOT_MODE: tl.constexpr):
        # DOT_MODE 2 (bf16 in the interpreter): the interpreter's fp32 -> bf16 cast truncates, where a GPU
        # rounds to nearest even; rounding the fp32 bits first makes the interpreter round as the GPU does.
        if DOT_MODE == 2:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_ok, col_ok,
        stride_hn, stride_hk, stride_wv, stride_wk, H, inv_temperature,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
    ):
        """z = (h Wᵀ + b) / τ for rows offs_n and vocabulary entries offs_v, [BLOCK_N, BLOCK_V] in ACC."""
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + offs_k[None, :] * stride_hk
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
        return acc * inv_temperature

    # Reads hidden [N, H] once per vocabulary split and weight [V, H] once per row block (each weight tile
    # once per wave from HBM, see the program order); writes 4 · splits · N accumulators.
    @triton.jit
    def _linear_logprobs_fwd_kernel(
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr, max_ptr, sum_ptr, tsum_ptr, label_logit_ptr,
        stride_hn, stride_hk, stride_wv, stride_wk,
        N, V, H, label_offset, inv_t_hi, inv_t_mid, inv_t_lo, tiles_per_split, vocab_splits,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, DOT_MODE: tl.constexpr, ACC: tl.constexpr,
    ):
        # Split-fastest order: programs running together share a row block (its hidden rows stay in L2)
        # and walk the weight in step (each weight tile is read from HBM once per wave).
        pid = tl.program_id(0)
        split = pid % vocab_splits
        offs_n = (pid // vocab_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        label = tl.load(labels_ptr + offs_n, mask=row_ok, other=0).to(tl.int64) - label_offset
        inv_temperature = scalar_arg(inv_t_hi, inv_t_mid, inv_t_lo, ACC)

        m = tl.full((BLOCK_N,), float("-inf"), ACC)  # running max of z
        s = tl.zeros((BLOCK_N,), ACC)  # Σ e^{z − m}
        t = tl.zeros((BLOCK_N,), ACC)  # Σ e^{z − m}(z − m); stays 0 without HAS_ENTROPY
        z_label = tl.zeros((BLOCK_N,), ACC)
        first_tile = split * tiles_per_split
        last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BLOCK_V))
        for tile in range(first_tile, last_tile):
            offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = offs_v < V
            z = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_ok, col_ok,
                stride_hn, stride_hk, stride_wv, stride_wk, H, inv_temperature,
                BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_MODE, ACC,
            )
            z = tl.where(col_ok[None, :], z, float("-inf"))
            is_label = (offs_v[None, :] == label[:, None]) & col_ok[None, :]
            z_label += tl.sum(tl.where(is_label, z, 0.0), axis=1)
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
            s = s * alpha + tl.sum(e, axis=1)
            m = m_new

        out = split.to(tl.int64) * N + offs_n
        tl.store(max_ptr + out, m, mask=row_ok)
        tl.store(sum_ptr + out, s, mask=row_ok)
        tl.store(tsum_ptr + out, t, mask=row_ok)
        tl.store(label_logit_ptr + out, z_label, mask=row_ok)

    # Per vocabulary chunk: reads hidden [N, H] once per column block and the chunk's weight rows once per
    # row block; writes G [N, chunk] in the input dtype (and row-block partial sums of G for d_bias).
    @triton.jit
    def _linear_logprobs_bwd_kernel(
        grad_logits_ptr, grad_bias_ptr,
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr,
        lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        stride_gn, stride_gbn, stride_hn, stride_hk, stride_wv, stride_wk,
        N, H, chunk_width, label_offset, inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
        DOT_MODE: tl.constexpr, ACC: tl.constexpr,
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

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # within the chunk
        row_ok = offs_n < N
        col_ok = offs_v < chunk_width
        inv_temperature = scalar_arg(inv_t_hi, inv_t_mid, inv_t_lo, ACC)
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_ok, col_ok,
            stride_hn, stride_hk, stride_wv, stride_wk, H, inv_temperature,
            BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_MODE, ACC,
        )
        label = tl.load(labels_ptr + offs_n, mask=row_ok, other=ignore_index).to(tl.int64)
        ignored = label == ignore_index
        lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0).to(ACC)
        g = tl.load(grad_logprobs_ptr + offs_n, mask=row_ok, other=0.0).to(ACC)
        logp = z - lse[:, None]
        p = tl.exp(logp)
        grad = tl.where(offs_v[None, :] == (label - label_offset)[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_GRAD_ENTROPY:
            eta = tl.load(grad_entropy_ptr + offs_n, mask=row_ok, other=0.0).to(ACC)
            entropy = tl.load(entropy_ptr + offs_n, mask=row_ok, other=0.0).to(ACC)
            grad -= eta[:, None] * tl.where(z == float("-inf"), 0.0, p * (logp + entropy[:, None]))
        grad = tl.where(ignored[:, None], 0.0, grad * inv_temperature)

        g_ptrs = grad_logits_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + offs_v[None, :]
        grad_out = _to_buffer_dtype(grad, grad_logits_ptr.dtype.element_ty, DOT_MODE)
        tl.store(g_ptrs, grad_out, mask=row_ok[:, None] & col_ok[None, :])
        if WRITE_GRAD_BIAS:
            # One partial per (row block, column), in ACC: summed afterwards in a fixed order (deterministic).
            gb_ptrs = grad_bias_ptr + pid_n.to(tl.int64) * stride_gbn + offs_v
            tl.store(gb_ptrs, tl.sum(grad, axis=0), mask=col_ok)


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


@dataclass(frozen=True)
class LinearLogprobsConfig:
    """How the Triton path tiles the work.

    block_n, block_v, block_k: a logits tile is [block_n tokens, block_v vocabulary entries], computed by
        tl.dot over the hidden dimension in steps of block_k.  128 x 128 x 64 in bf16/fp16 is the usual
        Hopper/Ampere tensor-core tile (32 KiB of operands per pipeline stage, a 64 KiB fp32 accumulator
        over 8 warps); wider dtypes shrink block_k (fp32 32, fp64 16) to keep the bytes per stage, and
        fp64 also caps the tile at 64 x 64.  Small problems shrink each block to the next power of two
        >= the size (at least 16, tl.dot's minimum).
    vocab_splits, tiles_per_split: forward programs per row block, each owning a contiguous range of
        tiles_per_split vocabulary tiles; their (max, sum, entropy) accumulators are merged afterwards.
        Chosen so that rows x splits fills the GPU _PROGRAMS_PER_SM times over (at least _MIN_SPLITS
        when V allows, so programs in flight share few row blocks and walk the weight in step).
    bwd_chunk_v: the backward recomputes the logits once and keeps G for bwd_chunk_v columns at a time in
        a [N, bwd_chunk_v] buffer (input dtype, at most _BWD_BUFFER_BYTES), from which d_hidden and
        d_weight are two large tensor-core products (cuBLAS).  One fused kernel instead would need fp32
        atomics into d_weight [V, H] (non-deterministic, 2.5 GB at V = 151936, H = 4096) or a second
        recomputation.
    group_n: row blocks per group in the backward kernel's grouped program order (L2 reuse).
    dot_mode: how the kernels call tl.dot (see _dot): 0 native, 1 full-precision fp32/fp64, 2 bf16
        widened to fp32 (the interpreter).
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


def _launch_config(
    n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> LinearLogprobsConfig:
    element = dtype.itemsize
    # fp32 products in full precision unless the user allowed TF32 for torch's matmuls (see _dot).
    full_precision = dtype == torch.float64 or (
        dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    )
    dot_mode = 2 if dtype == torch.bfloat16 and _dispatch.triton_interpreted() else int(full_precision)
    tile = 128 if element <= 4 else 64
    block_n = pow2_between(n_rows, 16, tile)
    # Register budget 255/thread, no spills (bench/static/budgets.py, python -m bench.static): one CTA
    # of 8 warps per SM by design.  At 128x128 tiles the entropy epilogue spilled (bf16, K = 64: 4 B;
    # fp32 without TF32, whose products keep fp32 operands: 8 B on triton 3.9, 572 B on 3.6), hence
    # K = 32 for 16-bit inputs and half-width vocabulary tiles for full-precision fp32.
    block_v = pow2_between(vocab_size, 16, tile // 2 if dot_mode == 1 and element == 4 else tile)
    block_k = pow2_between(hidden_size, 16, 32 if element == 2 else 128 // element)
    vocab_tiles = cdiv(vocab_size, block_v)
    row_blocks = cdiv(max(n_rows, 1), block_n)
    if device.type == "cuda":
        splits = max(_MIN_SPLITS, cdiv(_PROGRAMS_PER_SM * sm_count(device), row_blocks))
    else:
        splits = _INTERPRETER_SPLITS
    tiles_per_split = cdiv(vocab_tiles, min(splits, vocab_tiles))
    splits = cdiv(vocab_tiles, tiles_per_split)  # every split owns at least one tile
    chunk = block_v  # a power-of-two multiple of block_v (comparisons only, as in pow2_between)
    while chunk < vocab_size and n_rows * 2 * chunk * element <= _BWD_BUFFER_BYTES:
        chunk *= 2
    return LinearLogprobsConfig(
        block_n=block_n, block_v=block_v, block_k=block_k,
        num_warps=8 if block_n * block_v >= 128 * 64 else 4, num_stages=3 if element == 2 else 2,
        vocab_splits=splits, tiles_per_split=tiles_per_split, bwd_chunk_v=chunk, group_n=8,
        dot_mode=dot_mode,
    )


# ---------------------------------------------------------------------------------------------------
# Launchers: each writes into outputs the caller allocated; a thin allocating wrapper sits on top.
# ---------------------------------------------------------------------------------------------------
@without_autocast
def _launch_stats_out(
    partials: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    inv_temperature: float, vocab_start: int, with_entropy: bool,
) -> None:
    """Writes the per-split row accumulators (m, s, t, z_label) into ``partials`` [4, vocab_splits, N]
    (compute dtype; t is 0 without ``with_entropy``)."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    cfg = _launch_config(n_rows, vocab_size, hidden_size, hidden.dtype, hidden.device)
    assert partials.shape == (4, cfg.vocab_splits, n_rows) and partials.is_contiguous()
    assert partials.dtype == compute_dtype(hidden)
    if n_rows == 0:
        return
    m, s, t, z_label = partials.unbind(0)
    grid = (cdiv(n_rows, cfg.block_n) * cfg.vocab_splits,)
    wrap_triton(_linear_logprobs_fwd_kernel)[grid](
        hidden, weight, weight if bias is None else bias, labels, m, s, t, z_label,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        n_rows, vocab_size, hidden_size, vocab_start, *scalar_parts(inv_temperature, partials.dtype),
        cfg.tiles_per_split, cfg.vocab_splits,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, HAS_ENTROPY=with_entropy, DOT_MODE=cfg.dot_mode, ACC=acc_dtype(hidden),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
    vocab_start: int, with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Allocating wrapper: the merged row accumulators (m, s, t, z_label) [N]."""
    cfg = _launch_config(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, hidden.device)
    partials = hidden.new_empty((4, cfg.vocab_splits, hidden.shape[0]), dtype=compute_dtype(hidden))
    _launch_stats_out(partials, hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy)
    m, s, t, z_label = partials.unbind(0)
    m_all = m.amax(dim=0)
    s, t = cpu.rebase(m, s, t, m_all)
    return m_all, s.sum(dim=0), t.sum(dim=0), z_label.sum(dim=0)


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with the product's sums added in acc's dtype, never rounded to a's (issue 15)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))  # cuBLAS: 16-bit operands, fp32 result
    else:  # the interpreter on CPU, which has no mixed-dtype product
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@without_autocast
def _launch_bwd_out(
    d_hidden: Tensor, d_weight: Tensor, d_bias: Tensor,
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    labels: Tensor, lse: Tensor, entropy: Tensor, inv_temperature: float, ignore_index: int, vocab_start: int,
) -> None:
    """Writes d_hidden [N, H] (compute dtype), d_weight [V, H] and d_bias [V], each as allocated by
    :func:`cpu.empty_grads`: a [0] output is not wanted.  grad_entropy is [0] when H has no gradient."""
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
    cfg = _launch_config(n_rows, vocab_size, hidden_size, hidden.dtype, hidden.device)
    row_blocks = cdiv(n_rows, cfg.block_n)
    acc = compute_dtype(hidden)
    bias_partial = hidden.new_empty((row_blocks if write_bias else 0, vocab_size), dtype=acc)
    has_grad_entropy = grad_entropy.numel() > 0
    buffer = hidden.new_empty((n_rows, min(cfg.bwd_chunk_v, vocab_size)))
    for begin in range(0, vocab_size, cfg.bwd_chunk_v):
        width = min(cfg.bwd_chunk_v, vocab_size - begin)
        grid = (row_blocks * cdiv(width, cfg.block_v),)
        # The kernel sees the chunk's rows of weight and bias (views: no copy, 64-bit base addresses).
        weight_rows = weight[begin : begin + width]
        wrap_triton(_linear_logprobs_bwd_kernel)[grid](
            buffer, bias_partial[:, begin:] if write_bias else lse,
            hidden, weight_rows, weight_rows if bias is None else bias[begin : begin + width], labels,
            lse, entropy if has_grad_entropy else lse,
            grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs,
            buffer.stride(0), bias_partial.stride(0), hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1),
            n_rows, hidden_size, width, vocab_start + begin, *scalar_parts(inv_temperature, acc),
            ignore_index,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
            HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy, WRITE_GRAD_BIAS=write_bias,
            DOT_MODE=cfg.dot_mode, ACC=acc_dtype(hidden), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        grad_chunk = buffer[:, :width]
        if need_weight:
            torch.mm(grad_chunk.T, hidden, out=d_weight[begin : begin + width])
        if need_hidden:
            _add_product(d_hidden, grad_chunk, weight_rows)
    if write_bias:
        d_bias.copy_(bias_partial.sum(dim=0))


def _launch_bwd(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    labels: Tensor, lse: Tensor, entropy: Tensor, inv_temperature: float, ignore_index: int, vocab_start: int,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Allocating wrapper, with the arguments of ``rlhf_kernels::linear_logprobs_bwd_torch``."""
    grads = cpu.empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    _launch_bwd_out(*grads, grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                    inv_temperature, ignore_index, vocab_start)
    return grads


# ---------------------------------------------------------------------------------------------------
# Routing ops (what autograd and torch.compile see) and autograd.
# ---------------------------------------------------------------------------------------------------
@kernel_op("linear_logprobs_stats")
def linear_logprobs_stats(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
    vocab_start: int, with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row accumulators (m, s, t, z_label) [N] over this weight's vocabulary rows; labels are global ids,
    this weight's row j is vocabulary entry vocab_start + j (z_label is 0 where the label is elsewhere)."""
    return _dispatch.route(
        FAMILY, hidden.device, triton=_launch_stats, torch=cpu.linear_logprobs_stats_torch
    )(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy)


@kernel_op("linear_logprobs_fwd")
def linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
    ignore_index: int, with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs [N], entropy [N] or [0], lse [N]) for hidden [N, H], weight [V, H], labels [N]."""
    m, s, t, z_label = _dispatch.route(
        FAMILY, hidden.device, triton=_launch_stats, torch=cpu.linear_logprobs_stats_torch
    )(hidden, weight, bias, labels, inv_temperature, 0, with_entropy)
    return cpu.finalize(m, s, t, z_label, labels, weight.shape[0], ignore_index, with_entropy)


@kernel_op("linear_logprobs_bwd")
def linear_logprobs_bwd(
    grad_logprobs: Tensor, grad_entropy: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    labels: Tensor, lse: Tensor, entropy: Tensor, inv_temperature: float, ignore_index: int, vocab_start: int,
    vocab_total: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden [N, H] in the compute dtype, d_weight [V, H], d_bias [V]); each is [0] when not needed.
    grad_entropy is [0] when the entropy has no gradient; lse and entropy are the global (all-rank) row
    values.  An out-of-range label produced a NaN log-prob: its gradient is NaN too, never a number."""
    valid = ((labels >= 0) & (labels < vocab_total)) | (labels == ignore_index)
    grad_logprobs = torch.where(valid, grad_logprobs, float("nan")).contiguous()
    return _dispatch.route(FAMILY, hidden.device, triton=_launch_bwd, torch=cpu.linear_logprobs_bwd_torch)(
        grad_logprobs, grad_entropy.contiguous(), hidden, weight, bias, labels, lse, entropy,
        inv_temperature, ignore_index, vocab_start, need_hidden, need_weight, need_bias,
    )


def save_for_backward(ctx, hidden, weight, bias, labels, lse, entropy, inv_temperature: float,
                      ignore_index: int, vocab_start: int, vocab_total: int) -> None:
    """What :func:`backward_grads` reads, for both autograd wirings (this one and parallel.py's)."""
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
    ctx.vocab_start, ctx.vocab_total = vocab_start, vocab_total
    ctx.set_materialize_grads(False)


def backward_grads(ctx, grad_logprobs, grad_entropy):
    """(d_hidden in the compute dtype or None, d_weight or None, d_bias or None)."""
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
        return None, None, None
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if grad_entropy is None or entropy.numel() == 0:
        grad_entropy = lse.new_empty(0)
    d_hidden, d_weight, d_bias = linear_logprobs_bwd(
        grad_logprobs.contiguous(), grad_entropy, hidden, weight, bias, labels, lse, entropy,
        ctx.inv_temperature, ctx.ignore_index, ctx.vocab_start, ctx.vocab_total,
        need_hidden, need_weight, need_bias,
    )
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias else None)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, inv_temperature, ignore_index, _ = inputs
    _, entropy, lse = output
    save_for_backward(ctx, hidden, weight, bias, labels, lse, entropy, inv_temperature, ignore_index,
                      0, weight.shape[0])


def _backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    d_hidden, d_weight, d_bias = backward_grads(ctx, grad_logprobs, grad_entropy)
    if d_hidden is not None:
        d_hidden = d_hidden.to(ctx.saved_tensors[0].dtype)  # the one rounding of d_hidden
    return d_hidden, d_weight, d_bias, None, None, None, None


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
def _check_same_dtype(name: str, tensor: torch.Tensor, hidden: torch.Tensor) -> None:
    if tensor.dtype != hidden.dtype:
        raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}); got {tensor.dtype}")


def _prepare(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, process_group):
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
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool; got {type(return_entropy).__name__}")
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
        ignore_index: label value of positions that give 0 and receive zero gradient.
        return_entropy: also return H = −Σ p log p per position.
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
    hidden2d, flat_labels, inv_temperature, ignore_index = _prepare(
        hidden, weight, labels, bias, temperature, ignore_index, return_entropy, process_group
    )
    if process_group is None:
        logprobs, entropy, _ = linear_logprobs_fwd(
            hidden2d, weight, bias, flat_labels, inv_temperature, ignore_index, return_entropy
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


def __getattr__(name: str):
    # LinearLogprobs lives in rlhf_kernels.modules (which imports this module): re-exported lazily.
    if name == "LinearLogprobs":
        from ..modules import LinearLogprobs

        return LinearLogprobs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
