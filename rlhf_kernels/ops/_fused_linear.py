"""The shared driver of the fused "loss from hidden states" ops (linear_policy_loss, linear_preference_loss,
linear_distill_loss): lm_head + a loss whose gradient with respect to the logits is known as soon as a
chunk's logits are, so the backward is formed during the forward (Liger-style) and the [N, V] logits never
exist.

For each chunk c of rows of ``hidden`` [N, H] (``weight`` [V, H], ``bias`` [V], τ the temperature):

    1. z_c = (h_c Wᵀ + b) / τ                     [n_c, V], compute dtype        (matmul 1)
    2. chunk_fn(z_c, rows) -> outputs; overwrites z_c with G_c = ∂Loss/∂z_c (e.g. through the registered
       ``logprobs_bwd_inplace``, which writes the logits gradient over the logits)
    3. d_hidden[c] = (G_c / τ) W                  complete for these rows         (matmul 2)
       d_weight   += (G_c / τ)ᵀ h_c,  d_bias += Σ_rows G_c / τ                    (matmul 3)

Exactly three matmul-sized passes per chunk (one fewer each for ``grad_weight=False`` and
``grad_hidden=False``; one with ``need_grad=False``), no [N, V] buffer.  The op's backward then only scales
the saved gradients by the scalar upstream gradient.

``_logits`` and ``_mixed_precision_products`` are shared with linear_distill_loss (its teacher's logits).

Precision (the conventions of :mod:`rlhf_kernels.ops.linear_logprobs`):

* The chunk's logits are fp32 (fp64 for fp64 inputs), never rounded to the input dtype.  bf16/fp16 on
  CUDA: one tensor-core product with an fp32 output (``torch.mm(..., out_dtype=torch.float32)``, cuBLAS,
  fp32 accumulation).  Elsewhere (CPU, where that overload does not exist) the weight is read in the
  compute dtype: fp32/fp64 weights as they are, bf16/fp16 weights through one fp32 copy per call
  ([V, H] fp32: the price of fp32 logits from a CPU BLAS).
* d_hidden: bf16/fp16 on CUDA, G is rounded once to the input dtype (as the Triton path of
  linear_logprobs does) and the product runs on the tensor cores with fp32 accumulation, rounded once to
  hidden's dtype; elsewhere the product is in the compute dtype and rounded once.  Each row's d_hidden is
  one product (rows are never split across chunks), so nothing accumulates across chunks in a low dtype.
* d_weight / d_bias sum over chunks in an fp32 (fp64) accumulator, rounded once to the weight's dtype at
  the end.  On CUDA with bf16 the accumulation is cuBLAS's ``addmm(..., out_dtype=torch.float32)`` into
  the fp32 accumulator (beta = 1), so no [V, H] temporary per chunk.

Memory beyond the inputs and the returned gradients: the chunk's logits buffer (``plan_chunk_rows``'
budget: [n_c, V] in the compute dtype, plus its bf16/fp16 copy on CUDA), the fp32 d_weight accumulator
[V, H] when the weight is bf16/fp16 (4·V·H bytes: 2.5 GB for V = 151936, H = 4096; accumulating in bf16
instead would round once per chunk), the fp32 weight copy on CPU for bf16/fp16, and what ``chunk_fn``
keeps.

Device routing: the matmuls are torch (cuBLAS on CUDA, the CPU BLAS elsewhere); the row math inside a
``chunk_fn`` goes through the registered ops (Triton kernels on CUDA, their PyTorch paths elsewhere), so
there is no separate CPU file for this driver.  No host sync here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._validation import compute_dtype
from ._launch import cdiv, without_autocast

ChunkRows = Tensor | slice
ChunkFn = Callable[[Tensor, ChunkRows], tuple]

# Bytes of one chunk's logits buffer (compute dtype).  CUDA: 256 MiB is 431 rows of V = 151936 in fp32,
# each chunk three products of ~0.5 TFLOP at H = 4096 (large enough for cuBLAS to run near peak).
# CPU: 32 MiB is 262 rows at V = 32000; measured at N = 1024, H = 512, V = 32000 fp32 (loaded 2-core
# machine), forward+backward took 15.4 s with chunks of 65 rows (8 MiB), 9.9 s with 256, 8.4 s with 1024.
CHUNK_BYTES_CUDA = 256 << 20
CHUNK_BYTES_CPU = 32 << 20
# Rows per chunk on CUDA are a multiple of this when there are more (tensor-core tile height).
_ROW_ALIGN = 64


def plan_chunk_rows(
    n_rows: int,
    vocab_size: int,
    *,
    device: torch.device,
    budget_bytes: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Rows per chunk so that the [rows, V] logits buffer in ``dtype`` (the compute dtype) fits
    ``budget_bytes`` (default: CHUNK_BYTES_CUDA on CUDA, CHUNK_BYTES_CPU elsewhere); always >= 1.

    The rows are spread evenly over the chunks the budget needs (N = 1000 with room for 400 gives chunks
    of 334, not 400 + 400 + 200), and on CUDA rounded to a multiple of 64 (the tensor-core tile height)
    when there are that many: up if the budget allows, else down.
    """
    device = torch.device(device)
    if budget_bytes is None:
        budget_bytes = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU
    most = max(1, budget_bytes // max(1, vocab_size * dtype.itemsize))
    if n_rows <= most:
        return max(1, n_rows)
    rows = cdiv(n_rows, cdiv(n_rows, most))
    if device.type == "cuda" and rows >= _ROW_ALIGN:
        up = cdiv(rows, _ROW_ALIGN) * _ROW_ALIGN
        rows = up if up <= most else rows - rows % _ROW_ALIGN
    return rows


def row_chunks(n_rows: int, rows_per_chunk: int) -> list[slice]:
    """Consecutive slices of ``rows_per_chunk`` rows covering [0, n_rows) (none for 0 rows)."""
    return [slice(start, min(start + rows_per_chunk, n_rows)) for start in range(0, n_rows, rows_per_chunk)]


def _mixed_precision_products(hidden: Tensor) -> bool:
    """bf16/fp16 on CUDA: products of input-dtype operands with fp32 outputs (cuBLAS out_dtype)."""
    return hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16)


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, inv_temperature: float, mixed: bool) -> Tensor:
    """(h Wᵀ + b) / τ in the compute dtype: one product (the bias and 1/τ folded into it off CUDA-bf16)."""
    if not mixed:
        h = h.to(weight.dtype)
        if bias is not None:
            return torch.addmm(bias, h, weight.T, beta=inv_temperature, alpha=inv_temperature)
        z = torch.mm(h, weight.T)
    else:
        z = torch.mm(h, weight.T, out_dtype=torch.float32)
        if bias is not None:
            z.add_(bias)
    return z.mul_(inv_temperature) if inv_temperature != 1.0 else z


@without_autocast
def chunked_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunks: Sequence[ChunkRows],
    chunk_fn: ChunkFn,
    *,
    inv_temperature: float = 1.0,
    need_grad: bool = True,
    grad_weight: bool = True,
    grad_hidden: bool = True,
) -> tuple[list[tuple], Tensor | None, Tensor | None, Tensor | None]:
    """Runs ``chunk_fn`` on the logits of each chunk of rows and forms the three gradients on the way.

    Args:
        hidden: [N, H] float32, bfloat16, float16 or float64, 2-D, any strides.
        weight: [V, H] in hidden's dtype.
        bias: [V] in hidden's dtype, or None.  ``-inf`` entries mask vocabulary entries.
        chunks: disjoint row sets of ``hidden``, each a ``slice`` or an int64 index tensor; rows in no
            chunk get a zero d_hidden.  :func:`plan_chunk_rows` + :func:`row_chunks` give the usual ones.
        chunk_fn: ``chunk_fn(logits, rows) -> tuple``.  ``logits`` is [n_c, V] in the compute dtype (fp32;
            fp64 for fp64 inputs), already divided by the temperature, and owned by the driver: with
            ``need_grad`` the function overwrites it in place with ∂Loss/∂(logits/τ) (the driver applies
            the 1/τ of the chain rule); without, it may leave it as it is.  Its outputs are collected in
            chunk order (device tensors; no host sync).
        inv_temperature: 1/τ (> 0).
        need_grad: False runs the forward only (one product per chunk); the gradients are None.
        grad_weight: False skips the d_weight product (frozen head): d_weight is None, d_bias still formed.
        grad_hidden: False skips the d_hidden product (only the head trains): d_hidden is None.

    Returns:
        (outputs of each chunk in order, d_hidden [N, H] in hidden's dtype, d_weight [V, H] in weight's
        dtype, d_bias [V] in bias' dtype or None).  Gradients are of the loss whose per-chunk logits
        gradients ``chunk_fn`` wrote; precision and memory as in the module docstring.

    Example: N = 1000, V = 151936 fp32 on CUDA: 256 MiB holds 431 rows of 607 KiB, so three chunks;
    ``plan_chunk_rows`` gives 384 rows (334 spread evenly, rounded up to a multiple of 64): chunks of
    384 + 384 + 232 rows, 9 products.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    acc = compute_dtype(hidden, weight)
    mixed = _mixed_precision_products(hidden)
    # The weight in the dtype of the products: itself, or (CPU bf16/fp16) one fp32 copy per call.
    w = weight if (mixed or weight.dtype == acc) else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    d_hidden = d_weight_acc = d_bias_acc = None
    if need_grad:
        if grad_hidden:
            d_hidden = hidden.new_zeros(hidden.shape)
        if grad_weight:
            d_weight_acc = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        if bias is not None:
            d_bias_acc = torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
    outputs = []
    for rows in chunks:
        h = hidden[rows]
        logits = _logits(h, w, b, inv_temperature, mixed)
        outputs.append(chunk_fn(logits, rows))
        if not need_grad:
            continue
        grad = logits.mul_(inv_temperature) if inv_temperature != 1.0 else logits
        if mixed:
            grad = grad.to(hidden.dtype)  # the tensor-core operand; rounded once
        if d_hidden is not None:
            d_rows = torch.mm(grad, weight if mixed else w)
            if isinstance(rows, slice):
                d_hidden[rows] = d_rows
            else:
                d_hidden.index_copy_(0, rows, d_rows.to(hidden.dtype))
            del d_rows
        if d_weight_acc is not None:
            if mixed:
                torch.addmm(d_weight_acc, grad.T, h, out_dtype=torch.float32, out=d_weight_acc)
            else:
                d_weight_acc.addmm_(grad.T, h.to(acc))
        if d_bias_acc is not None:
            d_bias_acc += grad.sum(dim=0, dtype=acc)
        del logits, grad  # before the next chunk's are allocated
    d_weight = None if d_weight_acc is None else d_weight_acc.to(weight.dtype)
    d_bias = None if d_bias_acc is None else d_bias_acc.to(bias.dtype)
    return outputs, d_hidden, d_weight, d_bias
