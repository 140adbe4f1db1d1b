"""Per-token log-probabilities and entropy from logits.

With x' = logits / τ (τ the temperature) over the vocabulary of size V:

    lse    = log Σ_j exp(x'_j)
    logp_y = x'_y − lse
    H      = −Σ_j p_j log p_j = log s − t / s,   s = Σ_j e^{x'_j − m},  t = Σ_j e^{x'_j − m}(x'_j − m)

where m is the running maximum.  Keeping t relative to m avoids the cancellation of lse − E[x'] when
logits are large (|x| ~ 1e4 gives lse ~ 1e4, so the naive difference loses every digit of a small H).

Gradients, for a row with upstream gradients g (of logp_y) and h (of H):

    ∂/∂x_j = (1/τ) · [ g·(1[j = y] − p_j) − h·p_j·(log p_j + H) ]

Forward reads the logits once (online log-sum-exp) and writes O(N) outputs; backward reads them once
and writes the gradient once (optionally over the logits buffer).  Positions whose label equals
``ignore_index`` give 0 and receive exactly zero gradient, whatever their logits hold.  ``-inf``
logits are masked vocabulary entries (probability 0); ``+inf`` or NaN logits give NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = None

FAMILY = "logprobs"
# fp64 is accepted too (computed in fp64, fp64 outputs): for gradcheck and debugging.
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  One program per row; rows are addressed through two row dimensions (r0, r1) so that
# slices such as logits[:, :-1] run without a copy.
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _logprobs_fwd_kernel(
        logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
        stride_x0, stride_x1, stride_xv,
        rows1, V, inv_temperature, ignore_index,
        BLOCK_V: tl.constexpr, HAS_ENTROPY: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + (row // rows1) * stride_x0 + (row % rows1) * stride_x1
        label = tl.load(labels_ptr + row).to(tl.int64)

        m = tl.full((), float("-inf"), ACC)  # running max of x'
        s = tl.zeros((), ACC)  # Σ e^{x' − m}
        t = tl.zeros((), ACC)  # Σ e^{x' − m}(x' − m)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + offs.to(tl.int64) * stride_xv, mask=offs < V, other=float("-inf"))
            x = x.to(ACC) * inv_temperature
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # Reference point for this block's exponentials; stays finite while the row is all -inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            shift = tl.where(s > 0, m - m_ref, 0.0)
            alpha = tl.exp(shift)
            e = tl.exp(x - m_ref)
            if HAS_ENTROPY:
                # -inf entries have probability 0: their e·(x − m) is 0, not 0·(−inf).
                masked_zero = tl.where(x == float("-inf"), 0.0, e * (x - m_ref))
                t = alpha * (t + s * shift) + tl.sum(masked_zero, axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(s)
        lse = m_ref + log_s

        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        safe_label = tl.where(in_range, label, 0)
        x_label = tl.load(base + safe_label * stride_xv).to(ACC) * inv_temperature
        logprob = tl.where(in_range, x_label - lse, float("nan"))
        tl.store(logprobs_ptr + row, tl.where(ignored, 0.0, logprob))
        tl.store(lse_ptr + row, lse)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(ignored, 0.0, log_s - t / s))

    @triton.jit
    def _logprobs_bwd_kernel(
        grad_logits_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        logits_ptr, labels_ptr, lse_ptr, entropy_ptr,
        stride_x0, stride_x1, stride_xv,
        stride_g0, stride_g1, stride_gv,
        rows1_x, rows1_g, V, inv_temperature, ignore_index,
        BLOCK_V: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_base = logits_ptr + (row // rows1_x) * stride_x0 + (row % rows1_x) * stride_x1
        g_base = grad_logits_ptr + (row // rows1_g) * stride_g0 + (row % rows1_g) * stride_g1
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        lse = tl.load(lse_ptr + row)
        # An out-of-range label produced a NaN log-prob; its gradient is NaN too, never a number.
        g_lp = tl.where(in_range, tl.load(grad_logprobs_ptr + row), float("nan"))
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            x = tl.load(x_base + offs.to(tl.int64) * stride_xv, mask=in_vocab, other=float("-inf"))
            x = x.to(ACC) * inv_temperature
            logp = x - lse
            p = tl.exp(logp)
            grad = tl.where(offs == label, g_lp, 0.0) - g_lp * p
            if HAS_GRAD_ENTROPY:
                grad -= g_h * tl.where(x == float("-inf"), 0.0, p * (logp + entropy))
            grad = tl.where(ignored, 0.0, grad * inv_temperature)
            tl.store(
                g_base + offs.to(tl.int64) * stride_gv,
                grad.to(grad_logits_ptr.dtype.element_ty),
                mask=in_vocab,
            )


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    """Arithmetic and output dtype: fp32, or fp64 for fp64 logits (for gradcheck and debugging)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _acc_dtype(logits: torch.Tensor):
    return tl.float64 if logits.dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class _LaunchConfig:
    block_v: int
    num_warps: int


def _launch_config(vocab_size: int) -> _LaunchConfig:
    """One row per program; the vocabulary streams through in blocks of at most 4096 elements.

    4096 fp32 values over 8 warps is 16 per thread: enough loads in flight to stream the row while the
    online reductions stay in registers.  Short rows take one block sized to the row.
    """
    block_v = min(triton.next_power_of_2(vocab_size), 4096)
    return _LaunchConfig(block_v=block_v, num_warps=4 if block_v <= 1024 else 8)


# ---------------------------------------------------------------------------------------------------
# Row layout: view [..., V] as [rows0, rows1, V] without copying whenever the strides allow it.
# ---------------------------------------------------------------------------------------------------
def _merged_row_dims(x: torch.Tensor) -> list[list[int]]:
    """[size, stride] of the leading dimensions after merging those whose strides chain."""
    merged: list[list[int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    return merged


def _row_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """Returns (tensor, rows0, rows1, stride0, stride1, stride_v).

    Leading dimensions are merged where their strides chain; a tensor needing more than two row
    dimensions (rare: e.g. a slice of a slice of a 4-D tensor) is copied once with ``reshape``.
    """
    merged = _merged_row_dims(x)
    if len(merged) > 2:
        x = x.reshape(-1, x.shape[-1])
        merged = [[x.shape[0], x.stride(0)]]
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (rows0, stride0), (rows1, stride1) = merged
    return x, rows0, rows1, stride0, stride1, x.stride(-1)


def _row_chunks(x: torch.Tensor, rows_per_chunk: int):
    """Yields (first_row, chunk [k, V]) covering all rows of x [..., V] in order, copying no more
    than one chunk at a time."""
    x, rows0, rows1, s0, s1, sv = _row_layout(x)
    view = x.as_strided((rows0, rows1, x.shape[-1]), (s0, s1, sv))
    if rows1 >= rows_per_chunk or rows0 == 1:
        for r0 in range(rows0):
            for r1 in range(0, rows1, rows_per_chunk):
                yield r0 * rows1 + r1, view[r0, r1 : r1 + rows_per_chunk]
    else:
        step = max(1, rows_per_chunk // rows1)
        for r0 in range(0, rows0, step):
            yield r0 * rows1, view[r0 : r0 + step].reshape(-1, x.shape[-1])


def _rows_per_chunk(vocab_size: int) -> int:
    """Rows per chunk on the PyTorch path: about 8 MiB of fp32 per temporary (two or three alive)."""
    return max(1, (8 << 20) // (4 * vocab_size))


# ---------------------------------------------------------------------------------------------------
# PyTorch path (CPU and any device without a kernel): the same math, chunked over rows so that no
# full-size fp32 copy of the logits ever exists.
# ---------------------------------------------------------------------------------------------------
def _label_terms(labels: torch.Tensor, vocab_size: int, ignore_index: int):
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab_size)
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    return ignored, in_range, safe


def _logprobs_fwd_plain(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    logprobs = torch.empty(n_rows, dtype=_out_dtype(logits), device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=logprobs.dtype, device=logits.device)
    ignored, in_range, safe = _label_terms(labels, vocab_size, ignore_index)
    for first, chunk in _row_chunks(logits, _rows_per_chunk(vocab_size)):
        rows = slice(first, first + chunk.shape[0])
        x = _scaled(chunk, inv_temperature)
        # ATen's fused log_softmax (upcasting inside) is the fastest CPU pass; lse comes back from it
        # at the row's argmax, where log p = m − lse exactly.  NaN/+inf rows give NaN throughout.
        m, argmax = x.max(dim=-1, keepdim=True)
        log_p = torch.log_softmax(x, dim=-1, dtype=logprobs.dtype)
        lse[rows] = (m.to(log_p.dtype) - log_p.gather(-1, argmax)).squeeze(-1)
        label_log_p = log_p.gather(-1, safe[rows].unsqueeze(-1)).squeeze(-1)
        logprobs[rows] = torch.where(in_range[rows], label_log_p, float("nan"))
        if with_entropy:
            # H = −Σ p·log p; log p = -inf (masked entries, p = 0) is clamped so that they add 0
            # rather than NaN, while NaN stays NaN.  torch.sum's cascade keeps fp32 sums accurate at
            # V ~ 1e5 (a plain dot product loses ~2e-5 relative there).
            prob = log_p.exp()
            log_p.clamp_(min=torch.finfo(log_p.dtype).min)
            entropy[rows] = prob.mul_(log_p).sum(dim=-1).neg_()
    logprobs.masked_fill_(ignored, 0.0)
    if with_entropy:
        entropy.masked_fill_(ignored, 0.0)
    return logprobs, entropy, lse


_logprobs_fwd_torch = torch.library.custom_op(
    "rlhf_kernels::logprobs_fwd_torch", _logprobs_fwd_plain, mutates_args=()
)


@_logprobs_fwd_torch.register_fake
def _(logits, labels, inv_temperature, ignore_index, with_entropy):
    n_rows = labels.numel()
    out = logits.new_empty(n_rows, dtype=_out_dtype(logits))
    return out, logits.new_empty(n_rows if with_entropy else 0, dtype=out.dtype), torch.empty_like(out)


def _scaled(chunk: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """x' = chunk / τ in the arithmetic dtype; the chunk itself when τ = 1 (never modified)."""
    if inv_temperature == 1.0:
        return chunk
    return chunk.to(_out_dtype(chunk), copy=True).mul_(inv_temperature)


def _grad_rows_torch(
    chunk: torch.Tensor,
    rows: slice,
    labels: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """The gradient of one chunk of rows, in the arithmetic dtype.

    Per row, (1/τ)·[g·(1[j = y] − p_j) − h·p_j·(log p_j + H)] = p_j·(a + b·log p_j) + (g/τ)·1[j = y]
    with a = −(g + h·H)/τ and b = −h/τ: two passes over the chunk besides log p and p.
    """
    ignored, in_range, safe = _label_terms(labels[rows], chunk.shape[-1], ignore_index)
    g = torch.where(in_range, grad_logprobs[rows], float("nan")).unsqueeze(-1) * inv_temperature
    log_p = torch.sub(_scaled(chunk, inv_temperature), lse[rows].unsqueeze(-1))  # promotes to fp32
    p = log_p.exp()
    if grad_entropy.numel():
        h = grad_entropy[rows].unsqueeze(-1) * inv_temperature
        a = -(g + h * entropy[rows].unsqueeze(-1))
        # log p = -inf (masked entries, p = 0) is clamped so that p·(a + b·log p) is 0, not NaN
        grad = log_p.clamp_(min=torch.finfo(log_p.dtype).min).mul_(-h).add_(a).mul_(p)
    else:
        grad = p.mul_(-g)
    grad.scatter_add_(-1, safe.unsqueeze(-1), g)
    grad[ignored] = 0.0  # whatever the row holds, NaN included
    return grad


def _grad_chunks(logits: torch.Tensor, labels, grad_logprobs, grad_entropy, lse, entropy, inv_temperature,
                 ignore_index):
    """Yields (rows, logits chunk, its gradient) over all rows, one ~8 MiB chunk alive at a time."""
    for first, chunk in _row_chunks(logits, _rows_per_chunk(logits.shape[-1])):
        rows = slice(first, first + chunk.shape[0])
        yield rows, chunk, _grad_rows_torch(
            chunk, rows, labels, grad_logprobs, grad_entropy, lse, entropy, inv_temperature, ignore_index
        )


def _logprobs_bwd_plain(
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
    flat = grad_logits.view(-1, logits.shape[-1])
    args = (labels, grad_logprobs, grad_entropy, lse, entropy, inv_temperature, ignore_index)
    for rows, _, grad in _grad_chunks(logits, *args):
        flat[rows] = grad
    return grad_logits


_logprobs_bwd_torch = torch.library.custom_op(
    "rlhf_kernels::logprobs_bwd_torch", _logprobs_bwd_plain, mutates_args=()
)


@_logprobs_bwd_torch.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index):
    return logits.new_empty(logits.shape)


def _logprobs_bwd_inplace_plain(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    args = (labels, grad_logprobs, grad_entropy, lse, entropy, inv_temperature, ignore_index)
    for _, chunk, grad in _grad_chunks(logits, *args):
        chunk.copy_(grad)  # a view of logits: the public function refuses layouts that need a copy


_logprobs_bwd_inplace_torch = torch.library.custom_op(
    "rlhf_kernels::logprobs_bwd_inplace_torch", _logprobs_bwd_inplace_plain, mutates_args=("logits",)
)


# ---------------------------------------------------------------------------------------------------
# Triton launchers.
# ---------------------------------------------------------------------------------------------------
def _launch_fwd(
    logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, _, rows1, s0, s1, sv = _row_layout(logits)
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    logprobs = torch.empty(n_rows, dtype=_out_dtype(logits), device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=logprobs.dtype, device=logits.device)
    if n_rows == 0:
        return logprobs, entropy, lse
    cfg = _launch_config(vocab_size)
    wrap_triton(_logprobs_fwd_kernel)[(n_rows,)](
        logits, labels, logprobs, entropy if with_entropy else logprobs, lse,
        s0, s1, sv,
        rows1, vocab_size, inv_temperature, ignore_index,
        BLOCK_V=cfg.block_v, HAS_ENTROPY=with_entropy, ACC=_acc_dtype(logits), num_warps=cfg.num_warps,
    )
    return logprobs, entropy, lse


def _launch_bwd(
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
    logits, _, rows1, s0, s1, sv = _row_layout(logits)
    grad_view, _, grad_rows1, g0, g1, gv = _row_layout(grad_logits)
    assert grad_view is grad_logits, "the gradient must not need a copy to be addressed by rows"
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    has_grad_entropy = grad_entropy.numel() > 0
    cfg = _launch_config(vocab_size)
    wrap_triton(_logprobs_bwd_kernel)[(n_rows,)](
        grad_logits, grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs,
        logits, labels, lse, entropy if has_grad_entropy else lse,
        s0, s1, sv,
        g0, g1, gv,
        rows1, grad_rows1, vocab_size, inv_temperature, ignore_index,
        BLOCK_V=cfg.block_v, HAS_GRAD_ENTROPY=has_grad_entropy, ACC=_acc_dtype(logits),
        num_warps=cfg.num_warps,
    )


# ---------------------------------------------------------------------------------------------------
# Registration: the ops autograd and torch.compile see.  Each routes by backend; under torch.compile
# the Triton route is traced into the graph and the PyTorch route stays one opaque op.
# ---------------------------------------------------------------------------------------------------
@triton_op("rlhf_kernels::logprobs_fwd", mutates_args=())
def logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] or [0], lse [N]), all fp32, for logits [..., V] and labels [N]."""
    if _dispatch.backend_for(FAMILY, logits.device) == "triton":
        return _launch_fwd(logits, labels, inv_temperature, ignore_index, with_entropy)
    body = _dispatch.torch_path(_logprobs_fwd_torch)
    return body(logits, labels, inv_temperature, ignore_index, with_entropy)


@triton_op("rlhf_kernels::logprobs_bwd", mutates_args=())
def logprobs_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """The logits gradient (logits' dtype and shape); ``grad_entropy`` is empty when H has none."""
    args = (grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index)
    if _dispatch.backend_for(FAMILY, logits.device) == "triton":
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _launch_bwd(grad_logits, *args)
        return grad_logits
    return _dispatch.torch_path(_logprobs_bwd_torch)(*args)


@triton_op("rlhf_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def logprobs_bwd_inplace(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    """Writes the logits gradient over ``logits``."""
    args = (grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index)
    if _dispatch.backend_for(FAMILY, logits.device) == "triton":
        _launch_bwd(logits, *args)
    else:
        _dispatch.torch_path(_logprobs_bwd_inplace_torch)(*args)


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, inv_temperature, ignore_index, with_entropy, inplace_backward = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.inv_temperature = inv_temperature
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = inplace_backward
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = lse.new_empty(0)
    args = (
        grad_logprobs.contiguous(), grad_entropy.contiguous(), logits, labels, lse, entropy,
        ctx.inv_temperature, ctx.ignore_index,
    )
    if ctx.inplace_backward:
        logprobs_bwd_inplace(*args)
        grad_logits = logits
    else:
        grad_logits = logprobs_bwd(*args)
    return grad_logits, None, None, None, None, None


logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------
def _check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raises when a label is outside [0, V) and not ignore_index.  Syncs on CUDA (see
    ``RLHF_KERNELS_CHECK_INDICES``); skipped under torch.compile, where bad labels give NaN."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    if labels.device.type != "cpu" and not _dispatch.index_checks_enabled():
        return
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) (the vocabulary size, logits.shape[-1]) or equal "
            f"ignore_index={ignore_index}; got label {first}"
        )


def _prepare(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, float, int]:
    check_float_tensor("logits", logits, LOGIT_DTYPES)
    check_index_tensor("labels", labels)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension; got shape {tuple(logits.shape)}"
        )
    check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    _check_label_range(labels, logits.shape[-1], ignore_index)
    return labels.reshape(-1).contiguous(), 1.0 / temperature, ignore_index


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropy) of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: [..., V] float32, bfloat16 or float16 (float64 too: then computed and returned in
            float64), any strides.
        labels: [...] = ``logits.shape[:-1]``, int64 or int32, each in [0, V) or ``ignore_index``.
        temperature: > 0; the logits are divided by it.
        ignore_index: label value of positions that give 0 and receive zero gradient.
        return_entropy: also return H = −Σ p log p per position.
        inplace_backward: write the logits gradient over ``logits`` (saves one [N, V] buffer).
            The logits are destroyed by the backward pass: use it only when nothing else reads them.

    Returns:
        ``logprobs`` [...] float32 (float64 for float64 logits), or ``(logprobs, entropy)`` with
        ``return_entropy=True``.  Both are differentiable with respect to ``logits``; the gradient has
        the logits' dtype.

    The forward reads the logits once, the backward reads them once and writes the gradient once;
    all arithmetic is fp32.  Labels are range-checked before launch (a device sync on CUDA unless
    ``RLHF_KERNELS_CHECK_INDICES=0``); unchecked out-of-range labels give NaN, never a wild read.
    """
    flat_labels, inv_temperature, ignore_index = _prepare(logits, labels, temperature, ignore_index)
    if inplace_backward and len(_merged_row_dims(logits)) > 2:
        raise ValueError(
            "inplace_backward needs logits whose leading dimensions collapse into at most two strided "
            f"dimensions; got shape {tuple(logits.shape)} with strides {logits.stride()} "
            "(call .contiguous() first, or leave inplace_backward off)"
        )
    logprobs, entropy, _ = logprobs_fwd(
        logits, flat_labels, inv_temperature, ignore_index, bool(return_entropy), bool(inplace_backward)
    )
    logprobs = logprobs.view(labels.shape)
    if return_entropy:
        return logprobs, entropy.view(labels.shape)
    return logprobs


def entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """H = −Σ p log p of ``softmax(logits / temperature)`` over the last dimension, fp32, [...].

    Differentiable with respect to ``logits``; same kernel and numerics as
    :func:`logprobs_from_logits` with ``return_entropy=True``.
    """
    check_float_tensor("logits", logits, LOGIT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension; got shape {tuple(logits.shape)}"
        )
    inv_temperature = 1.0 / check_positive("temperature", temperature)
    # Label 0 always exists; its log-prob is computed and discarded (one extra load per row).
    labels = torch.zeros(logits.shape[:-1].numel(), dtype=torch.int64, device=logits.device)
    _, entropy, _ = logprobs_fwd(logits, labels, inv_temperature, -1, True, False)
    return entropy.view(logits.shape[:-1])
