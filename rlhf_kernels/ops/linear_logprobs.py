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
rows over tensor-parallel ranks merges the same way across ranks (one all_reduce MAX, one SUM).

Backward, with upstream gradients g (of logp_y) and η (of H) per row, recomputes the logits tile by tile:

    G_j = ∂/∂logits_j = (1/τ) [ g (1[j = y] − p_j) − η p_j (log p_j + H) ]
    d_hidden = G W,   d_weight = Gᵀ h,   d_bias = Σ_rows G

G is written, in the input dtype, into a [N, chunk] buffer one vocabulary chunk at a time, and the two
products run as tensor-core matrix products on that chunk (see :class:`LinearLogprobsConfig`).

Positions whose label equals ``ignore_index`` give 0 and send exactly zero into G.  A ``-inf`` bias entry
masks that vocabulary entry (probability 0); NaN in gives NaN out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.library import triton_op, wrap_triton

from .. import _dispatch
from .._validation import (
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_positive,
    check_same_device,
    check_shape,
)
from .logprobs import _check_label_range

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = None

FAMILY = "linear_logprobs"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Rows (tokens) are tiled by BLOCK_N, the vocabulary by BLOCK_V, the hidden features
# (the products' reduction dimension) by BLOCK_K.
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dot(a, b, acc, DOT_MODE: tl.constexpr):
        # DOT_MODE 0: native tensor-core product (bf16/fp16; fp32 as TF32 when torch allows TF32).
        # 1: fp32 in full precision (torch's default for fp32 matmuls).
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
    def _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr,
        offs_n, offs_v, row_ok, col_ok,
        stride_hn, stride_hk, stride_wv, stride_wk,
        H, inv_temperature,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    ):
        """z = (h Wᵀ + b) / τ for rows offs_n and vocabulary entries offs_v, fp32 [BLOCK_N, BLOCK_V]."""
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + offs_k[None, :] * stride_hk
        w_ptrs = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k in range(0, H, BLOCK_K):
            k_ok = offs_k < H - k
            a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_MODE)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return acc * inv_temperature

    @triton.jit
    def _linear_logprobs_fwd_kernel(
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr,
        max_ptr, sum_ptr, tsum_ptr, label_logit_ptr,
        stride_hn, stride_hk,
        stride_wv, stride_wk,
        N, V, H, label_offset, inv_temperature, tiles_per_split, vocab_splits,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, DOT_MODE: tl.constexpr,
    ):
        # Split-fastest order: programs running together share a row block (its hidden rows stay in L2)
        # and walk the weight in step (each weight tile is read from HBM once per wave).
        pid = tl.program_id(0)
        split = pid % vocab_splits
        offs_n = (pid // vocab_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        label = tl.load(labels_ptr + offs_n, mask=row_ok, other=0).to(tl.int64) - label_offset

        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
        s = tl.zeros((BLOCK_N,), tl.float32)  # Σ e^{z − m}
        t = tl.zeros((BLOCK_N,), tl.float32)  # Σ e^{z − m}(z − m)
        z_label = tl.zeros((BLOCK_N,), tl.float32)
        first_tile = split * tiles_per_split
        last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BLOCK_V))
        for tile in range(first_tile, last_tile):
            offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = offs_v < V
            z = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_ok, col_ok,
                stride_hn, stride_hk, stride_wv, stride_wk, H, inv_temperature,
                BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_MODE,
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
        tl.store(label_logit_ptr + out, z_label, mask=row_ok)
        if HAS_ENTROPY:
            tl.store(tsum_ptr + out, t, mask=row_ok)

    @triton.jit
    def _linear_logprobs_bwd_kernel(
        grad_logits_ptr, grad_bias_ptr,
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr,
        lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        stride_gn, stride_gbn,
        stride_hn, stride_hk,
        stride_wv, stride_wk,
        N, H, chunk_width, label_offset, inv_temperature, ignore_index,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
        DOT_MODE: tl.constexpr,
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
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, row_ok, col_ok,
            stride_hn, stride_hk, stride_wv, stride_wk, H, inv_temperature,
            BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT_MODE,
        )
        label = tl.load(labels_ptr + offs_n, mask=row_ok, other=ignore_index).to(tl.int64)
        ignored = label == ignore_index
        lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
        g = tl.load(grad_logprobs_ptr + offs_n, mask=row_ok, other=0.0)
        logp = z - lse[:, None]
        p = tl.exp(logp)
        grad = tl.where(offs_v[None, :] == (label - label_offset)[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_GRAD_ENTROPY:
            eta = tl.load(grad_entropy_ptr + offs_n, mask=row_ok, other=0.0)
            entropy = tl.load(entropy_ptr + offs_n, mask=row_ok, other=0.0)
            grad -= eta[:, None] * tl.where(z == float("-inf"), 0.0, p * (logp + entropy[:, None]))
        grad = tl.where(ignored[:, None], 0.0, grad * inv_temperature)

        g_ptrs = grad_logits_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + offs_v[None, :]
        tl.store(g_ptrs, grad.to(grad_logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if WRITE_GRAD_BIAS:
            # One fp32 partial per (row block, column): summed afterwards in a fixed order (deterministic).
            gb_ptrs = grad_bias_ptr + pid_n.to(tl.int64) * stride_gbn + offs_v
            tl.store(gb_ptrs, tl.sum(grad, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# Launch configuration: the one place where tile sizes and the backward's split are chosen.
# ---------------------------------------------------------------------------------------------------
# Backward: bytes of the [N, chunk] gradient buffer (input dtype).  512 MiB holds 16384 columns for
# N = 16384 bf16 tokens: ~10 passes over V = 151936, each a pair of large tensor-core products.
_BWD_BUFFER_BYTES = 512 << 20
# PyTorch path: bytes per fp32 temporary (weight chunk, hidden chunk, logits chunk).
_TORCH_CHUNK_BYTES = 8 << 20
# Forward programs wanted per SM: enough waves that the last one's imbalance stays small.
_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class LinearLogprobsConfig:
    """How the Triton path tiles the work.

    block_n, block_v, block_k: a logits tile is [block_n tokens, block_v vocabulary entries], computed by
        tl.dot over the hidden dimension in steps of block_k.  128 x 128 x 64 in bf16/fp16 is the usual
        Hopper/Ampere tensor-core tile (32 KiB of operands per pipeline stage, a 64 KiB fp32 accumulator
        over 8 warps); fp32 halves block_k to keep the shared memory per stage the same.  Small problems
        shrink each block to the next power of two >= the size (at least 16, tl.dot's minimum).
    vocab_splits: forward programs per row block, each owning a contiguous range of vocabulary tiles; their
        (max, sum, entropy) accumulators are merged afterwards.  Chosen so that rows x splits fills the
        GPU _PROGRAMS_PER_SM times over (at least 8 splits when V allows, so programs in flight share few
        row blocks and walk the weight in step).
    bwd_chunk_v: the backward's split between recomputation and buffering.  The logits are recomputed
        once, tile by tile, and the gradient G is kept for bwd_chunk_v columns at a time in a [N,
        bwd_chunk_v] buffer (input dtype, at most _BWD_BUFFER_BYTES), from which d_hidden and d_weight are
        two large tensor-core products (cuBLAS).  Recomputing instead inside one fused kernel would need
        fp32 atomics into d_weight [V, H] (non-deterministic, 2.5 GB at V = 151936, H = 4096) or a second
        recomputation.
    group_n: row blocks per group in the backward kernel's grouped program order (L2 reuse).
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


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block(size: int, cap: int) -> int:
    """The power of two >= size, clamped to [16, cap].  Comparisons only: under torch.compile with dynamic
    shapes a symbolic size then costs a few range guards, not a specialisation (a recompile per size)."""
    block = 16
    while block < cap and block < size:
        block *= 2
    return block


def _launch_config(
    n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> LinearLogprobsConfig:
    wide = dtype == torch.float32
    block_n = _block(n_rows, 128)
    block_v = _block(vocab_size, 128)
    block_k = _block(hidden_size, 32 if wide else 64)
    vocab_tiles = triton.cdiv(vocab_size, block_v)
    row_blocks = triton.cdiv(max(n_rows, 1), block_n)
    if device.type == "cuda":
        programs = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)
        splits = max(8, triton.cdiv(programs, row_blocks))
    else:  # the interpreter: a few splits, so that tests exercise the merge
        splits = 4
    tiles_per_split = triton.cdiv(vocab_tiles, min(splits, vocab_tiles))
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split owns at least one tile
    element = torch.finfo(dtype).bits // 8
    chunk = block_v  # a power-of-two multiple of block_v (comparisons only, as in _block)
    while chunk < vocab_size and n_rows * 2 * chunk * element <= _BWD_BUFFER_BYTES:
        chunk *= 2
    return LinearLogprobsConfig(
        block_n=block_n, block_v=block_v, block_k=block_k,
        num_warps=8 if block_n * block_v >= 128 * 64 else 4, num_stages=2 if wide else 3,
        vocab_splits=splits, tiles_per_split=tiles_per_split, bwd_chunk_v=chunk, group_n=8,
    )


def _dot_mode(dtype: torch.dtype) -> int:
    """See _dot: fp32 products in full precision unless the user allowed TF32 for torch's matmuls."""
    if dtype == torch.bfloat16 and _dispatch.triton_interpreted():
        return 2
    return 1 if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else 0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 is accepted by the internal ops (for gradcheck) and computed in float64; all else in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# Accumulator algebra shared by the split merge, the tensor-parallel merge and both paths.
# ---------------------------------------------------------------------------------------------------
def _rebase(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, m_all: torch.Tensor):
    """(s, t) of a vocabulary range with max m, re-expressed relative to the overall max m_all."""
    m_ref = torch.where(m_all == float("-inf"), 0.0, m_all)
    shift = torch.where(s > 0, m - m_ref, 0.0)  # an empty range (s = 0) contributes nothing
    alpha = shift.exp()
    return s * alpha, alpha * (t + s * shift)


def _finalize(
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
    if with_entropy:
        entropy = torch.where(ignored, 0.0, log_s - t / s)
    else:
        entropy = lse.new_empty(0)
    return logprobs, entropy, lse


def _label_gradient(
    grad_logprobs: torch.Tensor, labels: torch.Tensor, vocab_total: int, ignore_index: int
) -> torch.Tensor:
    """An out-of-range label produced a NaN log-prob; its gradient is NaN too, never a number."""
    valid = ((labels >= 0) & (labels < vocab_total)) | (labels == ignore_index)
    return torch.where(valid, grad_logprobs, float("nan")).contiguous()


# ---------------------------------------------------------------------------------------------------
# PyTorch path (CPU and any device without a kernel): the same math, chunked over the vocabulary
# (outer) and tokens (inner) so that no fp32 temporary exceeds _TORCH_CHUNK_BYTES.
# ---------------------------------------------------------------------------------------------------
def _torch_chunks(n_rows: int, vocab_size: int, hidden_size: int) -> tuple[int, int]:
    """(rows, vocabulary entries) per chunk."""
    elements = _TORCH_CHUNK_BYTES // 4
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


@torch.library.custom_op("rlhf_kernels::linear_logprobs_stats_torch", mutates_args=())
def _linear_logprobs_stats_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    vocab_start: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    m = torch.full((n_rows,), float("-inf"), dtype=acc, device=hidden.device)
    s = torch.zeros_like(m)
    t = torch.zeros_like(m)
    z_label = torch.zeros_like(m)
    rows_per_chunk, vocab_per_chunk = _torch_chunks(n_rows, vocab_size, hidden.shape[1])
    local = labels.long() - vocab_start
    for v0 in range(0, vocab_size, vocab_per_chunk):
        width = min(vocab_per_chunk, vocab_size - v0)
        w = weight[v0 : v0 + width].to(acc)  # an alias for fp32 weights: only read
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
                s_old, _ = _rebase(m[r], s[r], t[r], m_new)
                s_chunk, _ = _rebase(lse_c, (lse_c != float("-inf")).to(acc), t[r], m_new)
                s[r] = s_old + s_chunk
                m[r] = m_new
                del z
                continue
            m_new = torch.maximum(m[r], z.amax(dim=1))
            m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)
            s_old, t_old = _rebase(m[r], s[r], t[r], m_new)
            z.sub_(m_ref.unsqueeze(1))  # z − m, in place: one chunk alive besides e
            e = z.exp()
            s[r] = s_old + e.sum(dim=1)
            # -inf entries have e = 0: clamped to the lowest finite value they give e·(z − m) = 0, not NaN,
            # with no extra temporary; NaN stays NaN.
            t[r] = t_old + e.mul_(z.clamp_(min=torch.finfo(acc).min)).sum(dim=1)
            m[r] = m_new
            del z, e  # before the next chunk's are allocated
    return m, s, t, z_label


@_linear_logprobs_stats_torch.register_fake
def _(hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy):
    out = hidden.new_empty(hidden.shape[0], dtype=_acc_dtype(hidden.dtype))
    return out, torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("rlhf_kernels::linear_logprobs_bwd_torch", mutates_args=())
def _linear_logprobs_bwd_torch(
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
    acc = _acc_dtype(hidden.dtype)
    need_bias = need_bias and bias is not None
    d_hidden = hidden.new_zeros((n_rows, hidden_size) if need_hidden else (0,), dtype=acc)
    d_weight = weight.new_empty(weight.shape if need_weight else (0,))
    d_bias = weight.new_empty(vocab_size if need_bias else 0)
    rows_per_chunk, vocab_per_chunk = _torch_chunks(n_rows, vocab_size, hidden_size)
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
                d_hidden[r].addmm_(grad, w)
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


@_linear_logprobs_bwd_torch.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, inv_temperature,
      ignore_index, vocab_start, need_hidden, need_weight, need_bias):
    return _empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    acc = _acc_dtype(hidden.dtype)
    d_hidden = hidden.new_empty(tuple(hidden.shape) if need_hidden else (0,), dtype=acc)
    d_weight = weight.new_empty(tuple(weight.shape) if need_weight else (0,))
    d_bias = weight.new_empty(weight.shape[0] if (need_bias and bias is not None) else 0)
    return d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------------
# Triton launchers.
# ---------------------------------------------------------------------------------------------------
def _launch_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    vocab_start: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    cfg = _launch_config(n_rows, vocab_size, hidden_size, hidden.dtype, hidden.device)
    partial = [
        torch.empty(cfg.vocab_splits, n_rows, dtype=torch.float32, device=hidden.device) for _ in range(4)
    ]
    m, s, t, z_label = partial
    if n_rows > 0:
        grid = (triton.cdiv(n_rows, cfg.block_n) * cfg.vocab_splits,)
        wrap_triton(_linear_logprobs_fwd_kernel)[grid](
            hidden, weight, weight if bias is None else bias, labels,
            m, s, t, z_label,
            hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1),
            n_rows, vocab_size, hidden_size, vocab_start, inv_temperature,
            cfg.tiles_per_split, cfg.vocab_splits,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            HAS_BIAS=bias is not None, HAS_ENTROPY=with_entropy, DOT_MODE=_dot_mode(hidden.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if not with_entropy:
        t = torch.zeros_like(s)  # unwritten by the kernel
    m_all = m.amax(dim=0)
    s, t = _rebase(m, s, t, m_all)
    return m_all, s.sum(dim=0), t.sum(dim=0), z_label.sum(dim=0)


def _launch_bwd(
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
    cfg = _launch_config(n_rows, vocab_size, hidden_size, hidden.dtype, hidden.device)
    write_bias = need_bias and bias is not None
    d_hidden, d_weight, d_bias = _empty_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    if need_hidden:
        d_hidden.zero_()
    row_blocks = triton.cdiv(n_rows, cfg.block_n)
    bias_partial = torch.zeros(row_blocks if write_bias else 0, vocab_size, dtype=torch.float32,
                               device=hidden.device)
    if n_rows == 0 or not (need_hidden or need_weight or write_bias):
        d_weight.zero_()
        d_bias.zero_()
        return d_hidden, d_weight, d_bias
    has_grad_entropy = grad_entropy.numel() > 0
    buffer = torch.empty(n_rows, min(cfg.bwd_chunk_v, vocab_size), dtype=hidden.dtype, device=hidden.device)
    for begin in range(0, vocab_size, cfg.bwd_chunk_v):
        width = min(cfg.bwd_chunk_v, vocab_size - begin)
        grid = (row_blocks * triton.cdiv(width, cfg.block_v),)
        # The kernel sees the chunk's rows of weight and bias (views: no copy, 64-bit base addresses).
        weight_rows = weight[begin : begin + width]
        wrap_triton(_linear_logprobs_bwd_kernel)[grid](
            buffer, bias_partial[:, begin:] if write_bias else lse,
            hidden, weight_rows, weight_rows if bias is None else bias[begin : begin + width], labels,
            lse, entropy if has_grad_entropy else lse,
            grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs,
            buffer.stride(0), bias_partial.stride(0),
            hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1),
            n_rows, hidden_size, width, vocab_start + begin, inv_temperature, ignore_index,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_n,
            HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy, WRITE_GRAD_BIAS=write_bias,
            DOT_MODE=_dot_mode(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        grad_chunk = buffer[:, :width]
        if need_weight:
            torch.mm(grad_chunk.T, hidden, out=d_weight[begin : begin + width])
        if need_hidden:
            d_hidden.add_(torch.mm(grad_chunk, weight_rows))
    if write_bias:
        d_bias = bias_partial.sum(dim=0).to(bias.dtype)
    return d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------------
# Registration: the ops autograd and torch.compile see.  Each routes by backend; under torch.compile
# the Triton route is traced into the graph and the PyTorch route stays one opaque op.
# ---------------------------------------------------------------------------------------------------
@triton_op("rlhf_kernels::linear_logprobs_stats", mutates_args=())
def linear_logprobs_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    vocab_start: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row accumulators (m, s, t, z_label) [N] over this weight's vocabulary rows; labels are global ids,
    this weight's row j is vocabulary entry vocab_start + j (z_label is 0 where the label is elsewhere)."""
    args = (hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy)
    if _dispatch.backend_for(FAMILY, hidden.device) == "triton":
        return _launch_stats(*args)
    return _dispatch.torch_path(_linear_logprobs_stats_torch)(*args)


@triton_op("rlhf_kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] or [0], lse [N]) for hidden [N, H], weight [V, H], labels [N]."""
    args = (hidden, weight, bias, labels, inv_temperature, 0, with_entropy)
    if _dispatch.backend_for(FAMILY, hidden.device) == "triton":
        m, s, t, z_label = _launch_stats(*args)
    else:
        m, s, t, z_label = _dispatch.torch_path(_linear_logprobs_stats_torch)(*args)
    return _finalize(m, s, t, z_label, labels, weight.shape[0], ignore_index, with_entropy)


@triton_op("rlhf_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
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
    vocab_total: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden [N, H] fp32, d_weight [V, H], d_bias [V]); each is empty when not needed.  grad_entropy is
    empty when the entropy has no gradient; lse and entropy are the global (all-rank) row values."""
    grad_logprobs = _label_gradient(grad_logprobs, labels, vocab_total, ignore_index)
    args = (
        grad_logprobs, grad_entropy.contiguous(), hidden, weight, bias, labels, lse, entropy,
        inv_temperature, ignore_index, vocab_start, need_hidden, need_weight, need_bias,
    )
    if _dispatch.backend_for(FAMILY, hidden.device) == "triton":
        return _launch_bwd(*args)
    return _dispatch.torch_path(_linear_logprobs_bwd_torch)(*args)


def _backward_grads(ctx, grad_logprobs, grad_entropy):
    """(d_hidden fp32 or None, d_weight or None, d_bias or None) for both autograd wirings."""
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
        return None, None, None
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if grad_entropy is None or entropy.numel() == 0:
        grad_entropy = lse.new_empty(0)
    d_hidden, d_weight, d_bias = linear_logprobs_bwd(
        grad_logprobs.contiguous(), grad_entropy, hidden, weight, bias, labels, lse, entropy,
        ctx.inv_temperature, ctx.ignore_index, ctx.vocab_start, ctx.vocab_total,
        need_hidden, need_weight, need_bias and bias is not None,
    )
    return (
        d_hidden if need_hidden else None,
        d_weight if need_weight else None,
        d_bias if need_bias and bias is not None else None,
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.inv_temperature = inv_temperature
    ctx.ignore_index = ignore_index
    ctx.vocab_start = 0
    ctx.vocab_total = weight.shape[0]
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    d_hidden, d_weight, d_bias = _backward_grads(ctx, grad_logprobs, grad_entropy)
    if d_hidden is not None:
        d_hidden = d_hidden.to(ctx.saved_tensors[0].dtype)
    return d_hidden, d_weight, d_bias, None, None, None, None


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    """The weight's rows are this rank's contiguous slice of the vocabulary.  Forward merges the row
    accumulators across ranks (all_reduce MAX of the max, SUM of the rebased sums and the label logit);
    backward sums d_hidden across ranks, as the hidden states feed every rank's slice."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy,
                vocab_start, vocab_total, group):
        import torch.distributed as dist

        m, s, t, z_label = linear_logprobs_stats(
            hidden, weight, bias, labels, inv_temperature, vocab_start, with_entropy
        )
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        s, t = _rebase(m, s, t, m_all)
        sums = torch.stack((s, t, z_label))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        logprobs, entropy, lse = _finalize(
            m_all, sums[0], sums[1], sums[2], labels, vocab_total, ignore_index, with_entropy
        )
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
        ctx.vocab_start, ctx.vocab_total, ctx.group = vocab_start, vocab_total, group
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        import torch.distributed as dist

        d_hidden, d_weight, d_bias = _backward_grads(ctx, grad_logprobs, grad_entropy)
        if ctx.needs_input_grad[0]:
            if d_hidden is None:  # no upstream gradient here, but the other ranks still reduce
                d_hidden = torch.zeros(ctx.saved_tensors[0].shape, dtype=torch.float32,
                                       device=ctx.saved_tensors[0].device)
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            d_hidden = d_hidden.to(ctx.saved_tensors[0].dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Public function and module.
# ---------------------------------------------------------------------------------------------------
def _check_same_dtype(name: str, tensor: torch.Tensor, hidden: torch.Tensor) -> None:
    if tensor.dtype != hidden.dtype:
        raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}); got {tensor.dtype}")


def _prepare(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, process_group):
    check_float_tensor("hidden", hidden)
    check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            "weight must be 2-D [V, H] (an nn.Linear lm_head weight as stored); "
            f"got shape {tuple(weight.shape)}"
        )
    vocab_size, hidden_size = weight.shape
    if vocab_size == 0 or hidden_size == 0:
        raise ValueError(f"weight must be non-empty [V, H] with V, H >= 1; got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden must have shape [..., H] with H = weight.shape[1] = {hidden_size}; "
            f"got {tuple(hidden.shape)}"
        )
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
    vocab_start, vocab_total = 0, vocab_size
    if process_group is not None:
        import torch.distributed as dist

        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup or None; "
                f"got {type(process_group).__name__}"
            )
        vocab_start = dist.get_rank(process_group) * vocab_size
        vocab_total = dist.get_world_size(process_group) * vocab_size
    _check_label_range(labels, vocab_total, ignore_index)
    return (
        hidden.reshape(-1, hidden_size), labels.reshape(-1).contiguous(), 1.0 / temperature, ignore_index,
        vocab_start, vocab_total,
    )


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
        ``weight`` and ``bias`` (gradients in their dtypes, accumulated in fp32).

    Peak extra memory is O(N) in the forward; the backward adds a [N, chunk] gradient buffer of at most
    512 MiB on the Triton path and fp32 chunks of at most 8 MiB on the PyTorch path, never [N, V].
    Labels are range-checked before launch (a device sync on CUDA unless ``RLHF_KERNELS_CHECK_INDICES=0``);
    unchecked out-of-range labels give NaN, never a wild read.
    """
    hidden2d, flat_labels, inv_temperature, ignore_index, vocab_start, vocab_total = _prepare(
        hidden, weight, labels, bias, temperature, ignore_index, return_entropy, process_group
    )
    if process_group is None:
        logprobs, entropy, _ = linear_logprobs_fwd(
            hidden2d, weight, bias, flat_labels, inv_temperature, ignore_index, return_entropy
        )
    else:
        logprobs, entropy = _VocabParallelLinearLogprobs.apply(
            hidden2d, weight, bias, flat_labels, inv_temperature, ignore_index, return_entropy,
            vocab_start, vocab_total, process_group,
        )
    logprobs = logprobs.view(labels.shape)
    if return_entropy:
        return logprobs, entropy.view(labels.shape)
    return logprobs


class LinearLogprobs(nn.Module):
    """Wraps a model's lm_head (``nn.Linear(H, V)``, or any module with a [V, H] ``weight`` and optional
    ``bias``) so that a patched forward gets log-probs (and entropy) from hidden states directly:

        head = LinearLogprobs(model.lm_head, temperature=0.7)
        logprobs, entropy = head(hidden_states[:, :-1], input_ids[:, 1:], return_entropy=True)

    The lm_head stays a submodule: its parameters are shared, not copied, and receive the gradients.
    """

    def __init__(self, lm_head: nn.Module, *, temperature: float = 1.0, ignore_index: int = -100,
                 process_group=None) -> None:
        super().__init__()
        weight = getattr(lm_head, "weight", None)
        if not isinstance(lm_head, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                "lm_head must be an nn.Module with a 2-D [V, H] weight (e.g. nn.Linear); "
                f"got {type(lm_head).__name__}"
            )
        self.lm_head = lm_head
        self.temperature = check_positive("temperature", temperature)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.process_group = process_group

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float | None = None,
                return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return linear_logprobs(
            hidden, self.lm_head.weight, labels, bias=getattr(self.lm_head, "bias", None),
            temperature=self.temperature if temperature is None else temperature,
            ignore_index=self.ignore_index, return_entropy=return_entropy, process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"
