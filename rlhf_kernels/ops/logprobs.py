"""Per-token log-probabilities and entropy from logits: Triton kernels, launchers, registration and the
public functions.  The PyTorch path is ``rlhf_kernels/ops/cpu/logprobs.py``; the float64 oracle
``rlhf_kernels/reference/logprobs.py``.

With x' = logits / τ (τ the temperature) over the vocabulary of size V:

    lse    = log Σ_j exp(x'_j)
    logp_y = x'_y − lse
    H      = −Σ_j p_j log p_j = log s − t / s,   s = Σ_j e^{x'_j − m},  t = Σ_j e^{x'_j − m}(x'_j − m)

where m is the running maximum.  Keeping t relative to m avoids the cancellation of lse − E[x'] when
logits are large (|x| ~ 1e4 gives lse ~ 1e4, so the naive difference loses every digit of a small H).

Gradients, for a row with upstream gradients g (of logp_y) and h (of H):

    ∂/∂x_j = (1/τ) · [ g·(1[j = y] − p_j) − h·p_j·(log p_j + H) ]

The row sums to 0: where p_y > 1/2 the label column is computed as minus the sum of the others, so that
its g·(1 − p_y) stays exact to fp32 rounding where p_y is within rounding of 1 (1 − exp(x_y − lse) is 0
there, and lse keeps no digit of 1 − p_y once it is below the ulp of |lse|).

Positions whose label equals ``ignore_index`` give 0 and receive exactly zero gradient, whatever their
logits hold.  ``-inf`` logits are masked vocabulary entries (probability 0); ``+inf`` or NaN logits give
NaN.  A label outside [0, V) (possible only with the range check off) gives NaN, never a wild read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    merged_row_dims,
    pow2_between,
    row_layout,
    scalar_parts,
    tl,
    triton,
    wrap_triton,
)
from .cpu import logprobs as cpu

FAMILY = "logprobs"
# fp64 is accepted too (computed in fp64, fp64 outputs): for gradcheck and debugging.
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  One program per row; rows are addressed through two row dimensions (r0, r1) so that
# slices such as logits[:, :-1] run without a copy.  The temperature arrives as 1/τ in three fp32 parts
# (``_launch.scalar_parts``), exact in fp64.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    from ._launch import scalar_arg

    # Reads the N·V logits once; writes 2 or 3 floats per row (logprob, lse, entropy).
    @triton.jit
    def _logprobs_fwd_kernel(
        logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
        stride_x0, stride_x1, stride_xv,
        rows1, V,
        inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
        BLOCK_V: tl.constexpr, HAS_ENTROPY: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + (row // rows1) * stride_x0 + (row % rows1) * stride_x1
        label = tl.load(labels_ptr + row).to(tl.int64)
        inv_temperature = scalar_arg(inv_t_hi, inv_t_mid, inv_t_lo, ACC)

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
                # select before multiplying: e·(x − m) at x = -inf would compute 0·(−inf) (NaN, discarded)
                masked_zero = e * tl.where(x == float("-inf"), 0.0, x - m_ref)
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
        logprob = tl.where(in_range, (x_label - m_ref) - log_s, float("nan"))  # exact if m + log s = m
        tl.store(logprobs_ptr + row, tl.where(ignored, 0.0, logprob))
        tl.store(lse_ptr + row, lse)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(ignored, 0.0, log_s - t / s))

    # Reads the N·V logits once and writes the N·V gradient once (over the logits when in place).
    @triton.jit
    def _logprobs_bwd_kernel(
        grad_logits_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        logits_ptr, labels_ptr, lse_ptr, entropy_ptr,
        stride_x0, stride_x1, stride_xv,
        stride_g0, stride_g1, stride_gv,
        rows1_x, rows1_g, V,
        inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
        BLOCK_V: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_base = logits_ptr + (row // rows1_x) * stride_x0 + (row % rows1_x) * stride_x1
        g_base = grad_logits_ptr + (row // rows1_g) * stride_g0 + (row % rows1_g) * stride_g1
        label = tl.load(labels_ptr + row).to(tl.int64)
        inv_temperature = scalar_arg(inv_t_hi, inv_t_mid, inv_t_lo, ACC)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        lse = tl.load(lse_ptr + row)
        # An out-of-range label produced a NaN log-prob; its gradient is NaN too, never a number.
        g_lp = tl.where(in_range, tl.load(grad_logprobs_ptr + row), float("nan"))
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        # Where p_y > 1/2 the label column is rewritten after the loop as minus the sum of the others (the
        # row sums to 0): g·(1 − p_y) read as g − g·exp(x_y − lse) is 0 once p_y is within fp32 rounding
        # of 1, and lse (rounded to ulps of |m|) keeps no digit of 1 − p_y then; Σ_{j≠y} keeps them all.
        # Below 1/2 the direct form is exact and the sum would carry the rounding of the row's largest terms.
        own = in_range & ~ignored  # the row has a label column (ignored rows are all 0, bad ones NaN)
        label_col = tl.where(own, label, -1)
        x_label = tl.load(x_base + tl.where(own, label, 0) * stride_xv).to(ACC) * inv_temperature
        rewrite = own & (tl.exp(x_label - lse) > 0.5)  # False for a NaN row
        rest = tl.zeros((), ACC)  # Σ_{j≠y} of the row's gradient before the 1/τ
        tl.debug_barrier()  # x_label is read before any thread writes the in-place gradient over it
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            x = tl.load(x_base + offs.to(tl.int64) * stride_xv, mask=in_vocab, other=float("-inf"))
            x = x.to(ACC) * inv_temperature
            logp = x - lse
            p = tl.exp(logp)
            grad = tl.where(offs == label, g_lp, 0.0) - g_lp * p
            if HAS_GRAD_ENTROPY:
                grad -= g_h * p * tl.where(x == float("-inf"), 0.0, logp + entropy)
            rest += tl.sum(tl.where(in_vocab & (offs != label_col), grad, 0.0), axis=0)
            grad = tl.where(ignored, 0.0, grad * inv_temperature)
            tl.store(
                g_base + offs.to(tl.int64) * stride_gv,
                grad.to(grad_logits_ptr.dtype.element_ty),
                mask=in_vocab,
            )
        # One element per row, rewritten after every thread's stores above (a store mask that skipped it
        # would cost the stores their vector width).
        tl.debug_barrier()
        tl.store(
            g_base + tl.where(own, label, 0) * stride_gv,
            (-rest * inv_temperature).to(grad_logits_ptr.dtype.element_ty),
            mask=rewrite,
        )


# ---------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------
# Register budget 64/thread at 8 warps (bench/static/budgets.py, checked by tests/test_static.py): one
# row per CTA streams 8 KiB blocks; >= 4 CTAs (32 warps) per SM keep ~25 KiB of loads in flight.
@dataclass(frozen=True)
class _LaunchConfig:
    block_v: int
    num_warps: int


def _launch_config(vocab_size: int) -> _LaunchConfig:
    """One row per program; the vocabulary streams through in blocks of at most 4096 elements.

    4096 fp32 values over 8 warps is 16 per thread: enough loads in flight to stream the row while the
    online reductions stay in registers.  Short rows take one block: their size rounded up to a power of
    two, at least 16.
    """
    block_v = pow2_between(vocab_size, 16, 4096)
    return _LaunchConfig(block_v=block_v, num_warps=4 if block_v <= 1024 else 8)


def forward_row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """``(tensor, rows1, stride0, stride1, stride_v)`` of ``_launch.row_layout`` for a forward kernel,
    with a lone row (N = 1) addressed as one row of a batch: rows1 = 2 and stride1 = its own row stride
    instead of 1 and 0.  Triton specialises integer arguments equal to 1 or divisible by 16, and the
    load layout follows: for V = 50257 in bf16 a lone row compiled to sizePerThread = 8 and a batch to
    1 (sm_90 TTGIR), a different order of the row sums, so the row's results would not be bitwise
    those it gets in a batch (batch invariance, issue 15; docs/logprobs.md)."""
    logits, _, rows1, s0, s1, sv = row_layout(logits)
    if rows1 == 1:  # row 0 only: (0 // 2)·s0 + (0 % 2)·s1 = 0 whatever the strides
        rows1, s1 = 2, (logits.stride(-2) if logits.dim() > 1 else logits.shape[-1] * sv)
    return logits, rows1, s0, s1, sv


# ---------------------------------------------------------------------------------------------------
# Launchers: they write into outputs the caller allocated.
# ---------------------------------------------------------------------------------------------------
def _launch_fwd(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
) -> None:
    """Writes ``logprobs`` [N], ``lse`` [N] and, unless it is empty ([0]), ``entropy`` [N] for
    ``logits`` [..., V] (any strides) and ``labels`` [N], N the rows of the logits.  The outputs are
    contiguous, in the arithmetic dtype (fp32, or fp64 for fp64 logits)."""
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    with_entropy = entropy.numel() > 0
    assert all(t.is_contiguous() and t.dtype == compute_dtype(logits) for t in (logprobs, entropy, lse))
    logits, rows1, s0, s1, sv = forward_row_layout(logits)
    cfg = _launch_config(vocab_size)
    wrap_triton(_logprobs_fwd_kernel)[(n_rows,)](
        logits, labels, logprobs, entropy if with_entropy else logprobs, lse,
        s0, s1, sv,
        rows1, vocab_size,
        *scalar_parts(inv_temperature, compute_dtype(logits)), ignore_index,
        BLOCK_V=cfg.block_v, HAS_ENTROPY=with_entropy, ACC=acc_dtype(logits), num_warps=cfg.num_warps,
    )


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
    """Writes the logits gradient into ``grad_logits`` (the logits' shape and dtype, addressable through
    two row dimensions: a fresh tensor, or ``logits`` itself for the in-place backward).
    ``grad_entropy`` is empty ([0]) when the entropy has no gradient."""
    n_rows, vocab_size = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    logits, _, rows1, s0, s1, sv = row_layout(logits)
    grad_view, _, grad_rows1, g0, g1, gv = row_layout(grad_logits)
    assert grad_view is grad_logits, "the gradient must not need a copy to be addressed by rows"
    has_grad_entropy = grad_entropy.numel() > 0
    cfg = _launch_config(vocab_size)
    wrap_triton(_logprobs_bwd_kernel)[(n_rows,)](
        grad_logits, grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs,
        logits, labels, lse, entropy if has_grad_entropy else lse,
        s0, s1, sv,
        g0, g1, gv,
        rows1, grad_rows1, vocab_size,
        *scalar_parts(inv_temperature, compute_dtype(logits)), ignore_index,
        BLOCK_V=cfg.block_v, HAS_GRAD_ENTROPY=has_grad_entropy, ACC=acc_dtype(logits),
        num_warps=cfg.num_warps,
    )


def _fwd_triton(
    logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outputs = cpu.empty_outputs(logits, labels.numel(), with_entropy)
    _launch_fwd(*outputs, logits, labels, inv_temperature, ignore_index)
    return outputs


def _bwd_triton(
    grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor, *rest
) -> torch.Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_bwd(grad_logits, grad_logprobs, grad_entropy, logits, *rest)
    return grad_logits


def _bwd_inplace_triton(
    grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor, *rest
) -> None:
    _launch_bwd(logits, grad_logprobs, grad_entropy, logits, *rest)


# ---------------------------------------------------------------------------------------------------
# Registration: the routing ops autograd and torch.compile see.
# ---------------------------------------------------------------------------------------------------
@kernel_op("logprobs_fwd")
def logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] or [0], lse [N]) for logits [..., V] and labels [N]; fp32 (fp64 for
    fp64 logits).  ``inplace_backward`` only selects the backward op."""
    return _dispatch.route(FAMILY, logits.device, triton=_fwd_triton, torch=cpu.logprobs_fwd_torch)(
        logits, labels, inv_temperature, ignore_index, with_entropy
    )


@kernel_op("logprobs_bwd")
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
    return _dispatch.route(FAMILY, logits.device, triton=_bwd_triton, torch=cpu.logprobs_bwd_torch)(
        grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index
    )


@kernel_op("logprobs_bwd_inplace", mutates_args=("logits",))
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
    _dispatch.route(
        FAMILY, logits.device, triton=_bwd_inplace_triton, torch=cpu.logprobs_bwd_inplace_torch
    )(grad_logprobs, grad_entropy, logits, labels, lse, entropy, inv_temperature, ignore_index)


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
def _check_logits(logits: object) -> torch.Tensor:
    logits = check_float_tensor("logits", logits, LOGIT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension; got shape {tuple(logits.shape)}"
        )
    return logits


def _may_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` may share memory.  With the dimensions of size > 1 sorted by
    stride, no two elements share memory when each stride exceeds the span of the smaller ones (the
    usual sufficient test: a stride 0 over a dimension of size > 1 always fails it)."""
    if x.numel() == 0:
        return False
    span = 0
    dims = sorted((stride, size) for size, stride in zip(x.shape, x.stride()) if size > 1)
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _check_inplace_layout(logits: torch.Tensor) -> None:
    """The in-place backward writes through the logits' own strides: refuse layouts where that is not
    safe (elements sharing memory) or not possible without a copy (more than two row dimensions)."""
    if _may_overlap(logits):
        problem = "logits whose elements may share memory (an expanded or stride-0 view, for example)"
    elif len(merged_row_dims(logits)) > 2:
        problem = (
            "logits whose leading dimensions do not collapse into at most two strided dimensions "
            "(writing the gradient would need a copy)"
        )
    else:
        return
    raise ValueError(
        f"inplace_backward=True writes the gradient over logits, but got {problem}: shape "
        f"{tuple(logits.shape)}, strides {logits.stride()}; pass logits.contiguous() (or .clone()), or "
        "leave inplace_backward off"
    )


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def label_vocab(logits: torch.Tensor, process_group: object) -> tuple[int, str]:
    """(V that labels index, where it comes from): the whole vocabulary with ``process_group``
    (TypeError for anything but a ProcessGroup)."""
    if process_group is None:
        return logits.shape[-1], "logits.shape[-1]"
    from ..parallel import vocab_range  # parallel.py imports the ops modules

    return vocab_range(process_group, logits.shape[-1])[1], "logits.shape[-1] × the group's size"


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    batch_invariant: bool = True,
    process_group=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropy) of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: [..., V] float32, bfloat16 or float16 (float64 too: then computed and returned in
            float64), any strides.  Leading dimensions may be 0 (empty results).
        labels: [...] = ``logits.shape[:-1]``, int64 or int32, each in [0, V) or ``ignore_index``.
        temperature: > 0; the logits are divided by it.
        ignore_index: label value of positions that give 0 and receive zero gradient.
        return_entropy: also return H = −Σ p log p per position.
        inplace_backward: write the logits gradient over ``logits`` (saves one [N, V] buffer).
            The logits are destroyed by the backward pass: use it only when nothing else reads them.
            Layouts where that is unsafe (elements sharing memory, e.g. an ``expand``ed tensor) or that
            would need a copy raise ``ValueError``.  Not with ``process_group``.
        batch_invariant: each row's log-prob, entropy and gradient are bitwise the same whatever the
            number of rows, the row's position and the other rows (for a given V, dtype, temperature
            and layout).  Always the case, at no cost (docs/logprobs.md, "Batch invariance"): the flag
            states the guarantee and changes nothing; False is accepted.
        process_group: vocabulary (tensor) parallelism: ``logits`` are this rank's columns
            [rank·V, (rank+1)·V) of a vocabulary of world·V, ``labels`` global ids in [0, world·V).
            Values and gradients are those of the unsharded op; two all_reduce of O(N) per forward
            (``rlhf_kernels/parallel.py``), none in the backward.  Every rank passes the same labels and
            backpropagates the same upstream gradients.

    Returns:
        ``logprobs`` [...] float32 (float64 for float64 logits), or ``(logprobs, entropy)`` with
        ``return_entropy=True``.  Both are differentiable with respect to ``logits``; the gradient has
        the logits' dtype.

    Example: logits [2, 3] = [[0, 0, ln 2], [1, 1, 1]], labels [2, -100] give
    logprobs = [ln(2/4), 0] = [-0.693, 0] and entropy = [1.040, 0] (the ignored row is 0).

    The forward reads the logits once, the backward reads them once and writes the gradient once;
    arithmetic is fp32 (fp64 for fp64 logits).  Labels are range-checked before launch (a device sync
    on CUDA); ``set_index_checks(False)`` or ``RLHF_KERNELS_CHECK_INDICES=0`` skips the check on every
    device, and unchecked out-of-range labels give NaN (log-prob and gradient row), never a wild read.
    With ``process_group`` the same switch covers a check that the ranks agree on V, the rows and the
    labels (one more all_reduce of 8 integers, read on the host).
    """
    logits = _check_logits(logits)
    check_index_tensor("labels", labels)
    check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    inv_temperature = 1.0 / check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    return_entropy, inplace_backward = bool(return_entropy), bool(inplace_backward)
    check_flag("batch_invariant", batch_invariant)
    if inplace_backward:
        if process_group is not None:
            raise ValueError("inplace_backward=True is not supported with process_group; leave it off")
        _check_inplace_layout(logits)
    vocab, vocab_from = label_vocab(logits, process_group)
    check_label_range(labels, vocab, ignore_index, vocab_from)
    flat_labels = labels.reshape(-1).contiguous()
    if process_group is None:
        logprobs, entropy, _ = logprobs_fwd(
            logits, flat_labels, inv_temperature, ignore_index, return_entropy, inplace_backward
        )
    else:
        from ..parallel import vocab_parallel_token_stats

        logprobs, entropy, _ = vocab_parallel_token_stats(
            logits, flat_labels, 1.0, 0.0, inv_temperature, ignore_index, return_entropy, False, process_group
        )
    logprobs = logprobs.view(labels.shape)
    if return_entropy:
        return logprobs, entropy.view(labels.shape)
    return logprobs


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, batch_invariant: bool = True, process_group=None
) -> torch.Tensor:
    """H = −Σ p log p of ``softmax(logits / temperature)`` over the last dimension: [...] float32
    (float64 for float64 logits) for logits [..., V].

    Differentiable with respect to ``logits``; same kernel and numerics as
    :func:`logprobs_from_logits` with ``return_entropy=True`` (NaN or +inf in a row gives NaN, -inf
    entries are masked), and the same ``batch_invariant`` guarantee and ``process_group`` sharding
    (this rank's columns [rank·V, (rank+1)·V) of the vocabulary).
    """
    logits = _check_logits(logits)
    inv_temperature = 1.0 / check_positive("temperature", temperature)
    check_flag("batch_invariant", batch_invariant)
    label_vocab(logits, process_group)  # TypeError for a non-group
    # Label 0 always exists; its log-prob is computed and discarded (one extra load per row).
    labels = torch.zeros(logits.shape[:-1].numel(), dtype=torch.int64, device=logits.device)
    if process_group is None:
        _, entropy, _ = logprobs_fwd(logits, labels, inv_temperature, -1, True, False)
    else:
        from ..parallel import vocab_parallel_token_stats

        _, entropy, _ = vocab_parallel_token_stats(
            logits, labels, 1.0, 0.0, inv_temperature, -1, True, False, process_group
        )
    return entropy.view(logits.shape[:-1])
