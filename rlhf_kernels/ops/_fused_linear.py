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

Shared by the three losses besides the loop: :func:`logits_product` (+ :func:`product_operands`), the
one logits product (linear_distill_loss forms its teacher's logits with it); :class:`PrecomputedGradients`
with :func:`fused_linear_apply`, the one autograd wiring (the forward runs the loss's compute, which runs
this driver, and saves d_hidden / d_weight / d_bias; the backward scales them in place by the scalar
upstream gradient, so a second backward is refused); :func:`check_head`, the one lm_head argument check.

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
* d_weight, ``grad_weight_accumulation="float32"`` (the default): summed over chunks in an fp32 (fp64)
  accumulator, rounded once to the weight's dtype at the end (on CUDA with bf16, cuBLAS's
  ``addmm(..., out_dtype=torch.float32)`` into the accumulator, beta = 1: no [V, H] temporary per chunk).
  ``"weight_dtype"``: each chunk's product is added straight into a d_weight in the weight's dtype
  (``addmm_`` with beta = 1, fp32 accumulation inside the product, the sum rounded to bf16 once per
  chunk, as Liger does; off CUDA G is rounded to bf16 first, as on CUDA).  Measured on CPU (bf16, N =
  2048, H = 1024, V = 32000; docs/linear_policy_loss.md): "float32" gives exactly the error of the fp64
  d_weight rounded once to bf16, "weight_dtype" about 1.5x it.  fp32/fp64 weights: the two are one.
  d_bias always sums in fp32 (fp64): [V], negligible.

Memory beyond the inputs and the returned gradients: the chunk's logits buffer (``plan_chunk_rows``'
budget: [n_c, V] in the compute dtype, plus its bf16/fp16 copy on CUDA), with "float32" the fp32
d_weight accumulator [V, H] when the weight is bf16/fp16 (4·V·H bytes: 2.4 GiB for V = 151936, H = 4096,
which "weight_dtype" saves), the fp32 weight copy on CPU for bf16/fp16, and what ``chunk_fn`` keeps.

Device routing: the matmuls are torch (cuBLAS on CUDA, the CPU BLAS elsewhere); the row math inside a
``chunk_fn`` goes through the registered ops (Triton kernels on CUDA, their PyTorch paths elsewhere), so
there is no separate CPU file for this driver.  No host sync here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._validation import (
    check_choice,
    check_float_tensor,
    check_ndim,
    check_same_device,
    check_shape,
    compute_dtype,
)
from ._launch import cdiv, without_autocast

ChunkRows = Tensor | slice
ChunkFn = Callable[[Tensor, ChunkRows], tuple]
#: The lm_head dtypes the fused linear losses take.
HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: d_weight accumulation modes of :func:`chunked_linear_loss` (and the public losses' keyword).
GRAD_WEIGHT_ACCUMULATIONS = ("float32", "weight_dtype")

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


def product_operands(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor | None]:
    """The lm_head as :func:`logits_product` reads it for inputs like ``hidden``: as it is for bf16/fp16
    on CUDA (tensor-core products with fp32 outputs) and for weights already in ``dtype`` (default: the
    compute dtype, fp32 or fp64); otherwise one copy in ``dtype`` ([V, H] fp32 for a bf16 weight on CPU:
    the price of fp32 logits from a CPU BLAS).  Made once per call, read by every chunk."""
    dtype = dtype or compute_dtype(hidden, weight)
    if _mixed_precision_products(hidden) or weight.dtype == dtype:
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)


@without_autocast
def logits_product(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, inv_temperature: float = 1.0
) -> Tensor:
    """(h Wᵀ + b) / τ for rows ``hidden`` [n, H], weight [V, H], bias [V] or None: [n, V] in the compute
    dtype (fp32; fp64 when either operand is fp64), never rounded to bf16.  One product: bf16/fp16 on
    CUDA, ``mm(..., out_dtype=torch.float32)`` (+ bias, × 1/τ); elsewhere ``addmm`` with the bias and 1/τ
    folded in, the operands in the weight's dtype (pass :func:`product_operands`' weight so that a bf16
    head is not copied to fp32 per call)."""
    if _mixed_precision_products(hidden) and weight.dtype == hidden.dtype:
        z = torch.mm(hidden, weight.T, out_dtype=torch.float32)
        if bias is not None:
            z.add_(bias)
        return z.mul_(inv_temperature) if inv_temperature != 1.0 else z
    weight, bias = product_operands(hidden, weight, bias)
    h = hidden.to(weight.dtype)
    if bias is not None:
        return torch.addmm(bias.to(weight.dtype), h, weight.T, beta=inv_temperature, alpha=inv_temperature)
    z = torch.mm(h, weight.T)
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
    grad_weight_accumulation: str = "float32",
    active_rows: Tensor | None = None,
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
        grad_weight_accumulation: one of :data:`GRAD_WEIGHT_ACCUMULATIONS`.  "float32": d_weight sums over
            the chunks in an fp32 (fp64) [V, H] accumulator, rounded once to the weight's dtype at the end.
            "weight_dtype": each chunk's product is added straight into a d_weight in the weight's dtype
            (``addmm`` with β = 1, fp32 accumulation inside the product: one rounding per chunk, Liger's
            way), saving the 4·V·H-byte accumulator for bf16/fp16 weights.  The same for fp32/fp64 weights.
        active_rows: optional [N] bool: rows that count (e.g. labels ≠ ignore_index).  ``chunk_fn`` must
            give the others a zero logits gradient; the d_weight product reads their hidden states as 0,
            so a NaN or inf there (padding) never reaches d_weight (0 · NaN would).

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
    check_grad_weight_accumulation(grad_weight_accumulation)
    acc = compute_dtype(hidden, weight)
    mixed = _mixed_precision_products(hidden)
    w, b = product_operands(hidden, weight, bias, acc)
    d_hidden = d_weight = d_bias_acc = None
    in_weight_dtype = grad_weight_accumulation == "weight_dtype"
    if need_grad:
        if grad_hidden:
            d_hidden = hidden.new_zeros(hidden.shape)
        if grad_weight:
            d_weight = torch.zeros(
                weight.shape, dtype=weight.dtype if in_weight_dtype else acc, device=weight.device
            )
        if bias is not None:
            d_bias_acc = torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
    outputs = []
    for rows in chunks:
        h = hidden[rows]
        logits = logits_product(h, w, b, inv_temperature)
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
        if d_weight is not None:
            if active_rows is not None:
                h = torch.where(active_rows[rows].unsqueeze(-1), h, 0.0)
            if mixed and d_weight.dtype == acc:  # bf16/fp16 operands into the fp32 accumulator (cuBLAS)
                torch.addmm(d_weight, grad.T, h, out_dtype=acc, out=d_weight)
            elif d_weight.dtype != acc:  # straight into the weight's dtype; off CUDA, G rounded as on CUDA
                d_weight.addmm_(grad.T.to(weight.dtype), h)
            else:
                d_weight.addmm_(grad.T, h.to(acc))
        if d_bias_acc is not None:
            d_bias_acc += grad.sum(dim=0, dtype=acc)
        del logits, grad  # before the next chunk's are allocated
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    d_bias = None if d_bias_acc is None else d_bias_acc.to(bias.dtype)
    return outputs, d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------------
# The autograd wiring every fused linear loss shares.
# ---------------------------------------------------------------------------------------------------
#: What the ``Compute`` of :func:`fused_linear_apply` returns: (loss, extra outputs without a gradient,
#: d_hidden, d_weight, d_bias), each gradient None where it was not asked for.
ComputeResult = tuple[Tensor, tuple[Tensor, ...], Tensor | None, Tensor | None, Tensor | None]
Compute = Callable[..., ComputeResult]


class PrecomputedGradients(torch.autograd.Function):
    """A scalar loss whose gradients with respect to (hidden, weight, bias) were formed by its forward.

    ``forward(ctx, compute, hidden, weight, bias, *args)`` calls ``compute(hidden, weight, bias, *args,
    grads=(grad_hidden, grad_weight, grad_bias))`` (the flags from ``needs_input_grad``) and saves the
    gradients it returns; ``backward`` scales them by the scalar upstream gradient IN PLACE (no second
    [V, H] buffer).  A second backward through a retained graph would see the scaled values, so autograd's
    version check on the saved tensors refuses it ("modified by an inplace operation").  No double
    backward.  Outputs: (loss, *extras), the extras marked non-differentiable.
    """

    @staticmethod
    def forward(ctx, compute, hidden, weight, bias, *args):
        grad_hidden, grad_weight = ctx.needs_input_grad[1:3]
        grad_bias = bias is not None and ctx.needs_input_grad[3]
        loss, extras, d_hidden, d_weight, d_bias = compute(
            hidden, weight, bias, *args, grads=(grad_hidden, grad_weight, grad_bias)
        )
        ctx.save_for_backward(d_hidden, d_weight, d_bias if grad_bias else None)
        ctx.mark_non_differentiable(*extras)
        ctx.n_args = len(args)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        scaled = [None if d is None else d.mul_(grad_loss.to(d.dtype)) for d in ctx.saved_tensors]
        return (None, *scaled, *[None] * ctx.n_args)


def fused_linear_apply(
    compute: Compute, hidden: Tensor, weight: Tensor, bias: Tensor | None, *args
) -> tuple[Tensor, ...]:
    """(loss, *extras) of ``compute`` (see :class:`PrecomputedGradients`), differentiable with respect to
    hidden, weight and bias when the grad mode is on and one of them requires a gradient; otherwise
    ``compute`` runs its forward only (``grads=(False, False, False)``), outside autograd."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return PrecomputedGradients.apply(compute, hidden, weight, bias, *args)
    loss, extras, *_ = compute(hidden, weight, bias, *args, grads=(False, False, False))
    return (loss, *extras)


# ---------------------------------------------------------------------------------------------------
# Argument checks every fused linear loss shares.
# ---------------------------------------------------------------------------------------------------
def check_grad_weight_accumulation(value: object) -> str:
    return check_choice("grad_weight_accumulation", value, GRAD_WEIGHT_ACCUMULATIONS)


def check_head(
    hidden: object,
    weight: object,
    bias: object,
    *,
    prefix: str = "",
    ndim: int | None = None,
    layout: str = "[..., H]",
) -> None:
    """An lm_head's inputs: ``{prefix}hidden`` [..., H] (``ndim``-D ``layout`` when given) float32,
    bfloat16, float16 or float64; ``{prefix}weight`` a non-empty [V, H] and ``{prefix}bias`` [V] or None,
    both in hidden's dtype; all on one device.  ``ValueError`` / ``TypeError`` naming the argument."""
    names = [f"{prefix}{name}" for name in ("hidden", "weight", "bias")]
    check_float_tensor(names[0], hidden, HEAD_DTYPES)
    if ndim is not None:
        check_ndim(names[0], hidden, ndim, layout)
    check_float_tensor(names[1], weight, HEAD_DTYPES)
    if weight.dim() != 2 or 0 in weight.shape or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{names[1]} must be [V, H] with V, H >= 1 and {names[0]} must have shape {layout} with the "
            f"same H; got {names[0]} {tuple(hidden.shape)} and {names[1]} {tuple(weight.shape)}"
        )
    if bias is not None:
        check_float_tensor(names[2], bias, HEAD_DTYPES)
        check_shape(names[2], bias, (weight.shape[0],), f"({names[1]}.shape[0],)")
    for name, tensor in zip(names[1:], (weight, bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of {names[0]} ({hidden.dtype}); got {tensor.dtype}")
    check_same_device(**dict(zip(names, (hidden, weight, bias))))
