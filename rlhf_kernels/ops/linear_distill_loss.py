"""Knowledge distillation straight from hidden states: the full-vocabulary divergence between a student's
and a teacher's next-token distributions, per token, without materialising either model's [N, V] logits.

With s = (h_S W_Sᵀ + b_S) / τ and t = (h_T W_Tᵀ + b_T) / τ the scaled logits of a token, p_S = softmax(s),
p_T = softmax(t), and M = (1 − β) p_S + β p_T:

    forward_kl  D = KL(p_T ‖ p_S) = Σ_j p_T,j (log p_T,j − log p_S,j)    ∂D/∂s_j = p_S,j − p_T,j
    reverse_kl  D = KL(p_S ‖ p_T) = Σ_j p_S,j d_j,  d = log p_S − log p_T  ∂D/∂s_j = p_S,j (d_j − D)
    jsd         D = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M)                   ∂D/∂s_j = (1 − β) p_S,j (d_j − K)
                with d = log p_S − log M, K = KL(p_S ‖ M) = Σ_j p_S,j d_j

and loss = Σ_tokens D / max(1, number of tokens whose label is not ``ignore_index``): TRL 1.16's
``GKDTrainer.generalized_jsd_loss`` (reduction "batchmean" with labels) and Liger's fused-linear JSD.  As
in both, ``divergence="jsd"`` with β = 0 is the forward KL and β = 1 the reverse KL (not the limits of the
formula, which are 0).  Terms with p = 0 (a ``-inf`` bias entry) are 0; an entry the teacher masks but the
student does not makes the reverse KL +inf (and its gradient NaN), as the mathematics says.

Gradients reach the student only (hidden, weight, bias); the teacher runs without a gradient.  The student's
backward is formed during the forward by the shared driver :mod:`rlhf_kernels.ops._fused_linear`: per chunk
of tokens, the student's logits (one product), the teacher's logits for the same tokens (one product, fp32
output), the row kernel below (divergence, and ∂D/∂s written over the student's logits), then d_hidden and
d_weight (two products).  Four matmul-sized passes in all (the teacher's is the extra one), two [rows, V]
fp32 buffers alive, never [N, V].

Vocabulary parallelism (``process_group``): each rank holds the same rows' logits over its slice of the
vocabulary; the row math then runs in PyTorch with three all-reduces of O(rows) values per chunk
(:func:`rlhf_kernels.ops.cpu.linear_distill_loss.linear_distill_rows_parallel`), and d_hidden is summed.

Elsewhere: the PyTorch row math in :mod:`rlhf_kernels.ops.cpu.linear_distill_loss`, the float64 oracle in
:mod:`rlhf_kernels.reference.linear_distill_loss`, docs/linear_distill_loss.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_choice,
    check_in_range,
    check_index_tensor,
    check_int,
    check_positive,
    check_same_device,
    check_shape,
    compute_dtype,
)
from . import _fused_linear
from ._launch import acc_dtype, pow2_between, scalar_parts, tl, triton, wrap_triton
from .cpu import linear_distill_loss as cpu
from .cpu.linear_distill_loss import DIVERGENCES

FAMILY = "linear_distill_loss"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))
_DIVERGENCE_CODE = {name: code for code, name in enumerate(DIVERGENCES)}


# ---------------------------------------------------------------------------------------------------
# Triton kernel.  One program per row; the vocabulary streams through in blocks, three times: the two
# log-sum-exps (online), the divergence, then (NEED_GRAD) the gradient, written over the student row.
# β, log β and log(1 − β) arrive as scalar_parts (exact in fp64).
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    from ._launch import scalar_arg

    @triton.jit
    def _online_lse_step(m, z, x):
        """(max, Σ e^{x − max}) after folding the block x in; stays finite while the row is all -inf."""
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(tl.where(z > 0, m - m_ref, 0.0))
        return m_new, z * alpha + tl.sum(tl.exp(x - m_ref), axis=0)

    @triton.jit
    def _divergence_terms(s, t, lse_s, lse_t, log_beta, log1m_beta, DIVERGENCE: tl.constexpr):
        """(p_S, p_T, d, p_T-side term) of a block; d as in the module docstring (0 where p_S = 0).  The
        guards test p == 0 (not p > 0) so that a NaN row stays NaN."""
        log_ps = s - lse_s
        log_pt = t - lse_t
        ps = tl.exp(log_ps)
        pt = tl.exp(log_pt)
        if DIVERGENCE == 0:
            d = tl.zeros_like(ps)
            teacher_term = tl.where(pt == 0, 0.0, pt * (log_pt - log_ps))
        elif DIVERGENCE == 1:
            d = tl.where(ps == 0, 0.0, log_ps - log_pt)
            teacher_term = tl.zeros_like(ps)
        else:
            a = log_ps + log1m_beta
            b = log_pt + log_beta
            hi = tl.maximum(a, b)
            log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))  # NaN only where both are -inf (p = 0)
            d = tl.where(ps == 0, 0.0, log_ps - log_m)
            teacher_term = tl.where(pt == 0, 0.0, pt * (log_pt - log_m))
        return ps, pt, d, teacher_term

    # Reads the two [n, V] rows twice (three times with NEED_GRAD), writes n floats and the n·V gradient.
    @triton.jit
    def _linear_distill_rows_kernel(
        student_ptr, teacher_ptr, labels_ptr, grad_scale_ptr, loss_ptr,
        stride_sn, stride_sv, stride_tn, stride_tv,
        V,
        beta_hi, beta_mid, beta_lo, lb_hi, lb_mid, lb_lo, l1mb_hi, l1mb_mid, l1mb_lo, ignore_index,
        BLOCK_V: tl.constexpr, DIVERGENCE: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_base = student_ptr + row * stride_sn
        t_base = teacher_ptr + row * stride_tn
        ignored = tl.load(labels_ptr + row) == ignore_index
        beta = scalar_arg(beta_hi, beta_mid, beta_lo, ACC)
        log_beta = scalar_arg(lb_hi, lb_mid, lb_lo, ACC)
        log1m_beta = scalar_arg(l1mb_hi, l1mb_mid, l1mb_lo, ACC)

        m_s = tl.full((), float("-inf"), ACC)
        z_s = tl.zeros((), ACC)
        m_t = tl.full((), float("-inf"), ACC)
        z_t = tl.zeros((), ACC)
        for start in range(0, V, BLOCK_V):
            offs = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
            s = tl.load(s_base + offs * stride_sv, mask=offs < V, other=float("-inf")).to(ACC)
            t = tl.load(t_base + offs * stride_tv, mask=offs < V, other=float("-inf")).to(ACC)
            m_s, z_s = _online_lse_step(m_s, z_s, s)
            m_t, z_t = _online_lse_step(m_t, z_t, t)
        lse_s = tl.where(m_s == float("-inf"), 0.0, m_s) + tl.log(z_s)
        lse_t = tl.where(m_t == float("-inf"), 0.0, m_t) + tl.log(z_t)

        teacher_sum = tl.zeros((), ACC)  # Σ of the p_T-side terms
        kl_student = tl.zeros((), ACC)  # Σ p_S d
        for start in range(0, V, BLOCK_V):
            offs = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
            s = tl.load(s_base + offs * stride_sv, mask=offs < V, other=float("-inf")).to(ACC)
            t = tl.load(t_base + offs * stride_tv, mask=offs < V, other=float("-inf")).to(ACC)
            ps, pt, d, teacher_term = _divergence_terms(s, t, lse_s, lse_t, log_beta, log1m_beta, DIVERGENCE)
            teacher_sum += tl.sum(teacher_term, axis=0)
            kl_student += tl.sum(tl.where(ps == 0, 0.0, ps * d), axis=0)
        if DIVERGENCE == 0:
            loss = teacher_sum
        elif DIVERGENCE == 1:
            loss = kl_student
        else:
            loss = beta * teacher_sum + (1.0 - beta) * kl_student
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

        if NEED_GRAD:
            scale = tl.load(grad_scale_ptr).to(ACC)
            if DIVERGENCE == 2:
                scale = scale * (1.0 - beta)
            for start in range(0, V, BLOCK_V):
                offs = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
                s = tl.load(s_base + offs * stride_sv, mask=offs < V, other=float("-inf")).to(ACC)
                t = tl.load(t_base + offs * stride_tv, mask=offs < V, other=float("-inf")).to(ACC)
                ps, pt, d, _ = _divergence_terms(s, t, lse_s, lse_t, log_beta, log1m_beta, DIVERGENCE)
                if DIVERGENCE == 0:
                    grad = ps - pt
                else:
                    grad = ps * (d - kl_student)
                grad = tl.where(ignored, 0.0, grad * scale)
                tl.store(s_base + offs * stride_sv, grad.to(student_ptr.dtype.element_ty), mask=offs < V)


# ---------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LaunchConfig:
    block_v: int
    num_warps: int


def _launch_config(vocab_size: int) -> _LaunchConfig:
    """One row per program, the vocabulary in blocks of at most 2048: two rows and about six derived
    block values live at once (half of logprobs' 4096-wide blocks, for the same registers per thread)."""
    block_v = pow2_between(vocab_size, 16, 2048)
    return _LaunchConfig(block_v=block_v, num_warps=4 if block_v <= 1024 else 8)


def _beta_parts(divergence: str, beta: float, dtype: torch.dtype) -> tuple[float, ...]:
    """β, log β, log(1 − β) as scalar_parts (the logs only mean something for the JSD, β in (0, 1))."""
    logs = (math.log(beta), math.log1p(-beta)) if divergence == "jsd" else (0.0, 0.0)
    return tuple(part for value in (beta, *logs) for part in scalar_parts(value, dtype))


# ---------------------------------------------------------------------------------------------------
# Launcher (writes into the caller's ``loss`` and, with need_grad, over ``student_logits``).
# ---------------------------------------------------------------------------------------------------
def _launch_rows(
    loss: Tensor, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, grad_scale: Tensor,
    divergence: str, beta: float, ignore_index: int, need_grad: bool,
) -> None:
    """Writes the per-row divergence into ``loss`` [n] (compute dtype, contiguous) for student and teacher
    logits [n, V] (any strides); with ``need_grad`` writes grad_scale[0] · ∂D/∂s over ``student_logits``."""
    n_rows, vocab_size = student_logits.shape
    if n_rows == 0:
        return
    dtype = compute_dtype(student_logits, teacher_logits)
    assert loss.is_contiguous() and loss.dtype == dtype and loss.shape == (n_rows,)
    cfg = _launch_config(vocab_size)
    wrap_triton(_linear_distill_rows_kernel)[(n_rows,)](
        student_logits, teacher_logits, labels, grad_scale, loss,
        student_logits.stride(0), student_logits.stride(1),
        teacher_logits.stride(0), teacher_logits.stride(1),
        vocab_size,
        *_beta_parts(divergence, beta, dtype), ignore_index,
        BLOCK_V=cfg.block_v, DIVERGENCE=_DIVERGENCE_CODE[divergence], NEED_GRAD=need_grad,
        ACC=acc_dtype(student_logits, teacher_logits), num_warps=cfg.num_warps,
    )


def _rows_triton(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, grad_scale: Tensor, divergence: str,
    beta: float, ignore_index: int, need_grad: bool,
) -> Tensor:
    dtype = compute_dtype(student_logits, teacher_logits)
    loss = student_logits.new_empty(student_logits.shape[0], dtype=dtype)
    _launch_rows(loss, student_logits, teacher_logits, labels, grad_scale, divergence, beta, ignore_index,
                 need_grad)
    return loss


# ---------------------------------------------------------------------------------------------------
# Registration: the routing op of the row math.
# ---------------------------------------------------------------------------------------------------
@kernel_op("linear_distill_rows", mutates_args=("student_logits",))
def linear_distill_rows(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, grad_scale: Tensor, divergence: str,
    beta: float, ignore_index: int, need_grad: bool,
) -> Tensor:
    """Per-row divergence [n] (compute dtype; 0 where labels == ignore_index) of student from teacher
    logits [n, V] (already divided by τ); with ``need_grad`` writes grad_scale[0] · ∂D/∂s over
    ``student_logits`` (0 at ignored rows).  ``divergence`` is one of :data:`DIVERGENCES`, "jsd" with
    β in (0, 1)."""
    implementation = _dispatch.route(
        FAMILY, student_logits.device, triton=_rows_triton, torch=cpu.linear_distill_rows_torch
    )
    return implementation(
        student_logits, teacher_logits, labels, grad_scale, divergence, beta, ignore_index, need_grad
    )


# ---------------------------------------------------------------------------------------------------
# The fused loss: the driver's chunk loop with the teacher's logits formed per chunk.
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Problem:
    """Everything but the student's differentiable tensors."""

    teacher_hidden: Tensor  # [N, H_T]
    teacher_weight: Tensor  # [V, H_T], in the dtype of the products
    teacher_bias: Tensor | None
    labels: Tensor  # [N]
    divergence: str  # effective: "jsd" only for β in (0, 1)
    beta: float
    inv_temperature: float
    ignore_index: int
    group: object = None  # vocabulary parallelism: the weights are this rank's rows
    grad_weight_accumulation: str = "float32"


def _distill(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, problem: _Problem, *, grads: tuple[bool, ...]
) -> _fused_linear.ComputeResult:
    """(loss, (), d_hidden, d_weight, d_bias) of the student (the compute of
    ``_fused_linear.fused_linear_apply``)."""
    grad_hidden, grad_weight, grad_bias = grads
    need_grad = grad_hidden or grad_weight or grad_bias
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden, weight, problem.teacher_hidden)
    count = (problem.labels != problem.ignore_index).sum().clamp(min=1).to(acc)
    grad_scale = count.reciprocal().reshape(1)
    on_cuda = hidden.device.type == "cuda"
    budget = _fused_linear.CHUNK_BYTES_CUDA if on_cuda else _fused_linear.CHUNK_BYTES_CPU
    # Two [rows, V] buffers are alive per chunk (student and teacher logits): half the budget each.
    rows_per_chunk = _fused_linear.plan_chunk_rows(
        n_rows, vocab_size, device=hidden.device, budget_bytes=budget // 2, dtype=acc
    )

    def chunk_fn(student_logits: Tensor, rows) -> tuple[Tensor]:
        teacher_logits = _fused_linear.logits_product(
            problem.teacher_hidden[rows], problem.teacher_weight, problem.teacher_bias,
            problem.inv_temperature,
        ).to(acc)
        args = (student_logits, teacher_logits, problem.labels[rows], grad_scale, problem.divergence,
                problem.beta, problem.ignore_index, need_grad)
        if problem.group is None:
            return (linear_distill_rows(*args).sum(),)
        return (cpu.linear_distill_rows_parallel(*args, problem.group).sum(),)

    outputs, d_hidden, d_weight, d_bias = _fused_linear.chunked_linear_loss(
        hidden, weight, bias, _fused_linear.row_chunks(n_rows, rows_per_chunk), chunk_fn,
        inv_temperature=problem.inv_temperature, need_grad=need_grad, grad_weight=grad_weight,
        grad_hidden=grad_hidden, grad_weight_accumulation=problem.grad_weight_accumulation,
        active_rows=problem.labels != problem.ignore_index,
    )
    if d_hidden is not None and problem.group is not None:  # hidden feeds every rank's vocabulary slice
        dist.all_reduce(d_hidden, group=problem.group)
    total = torch.stack([out[0] for out in outputs]).sum() if outputs else hidden.new_zeros((), dtype=acc)
    return total.to(acc) / count, (), d_hidden, d_weight, d_bias


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
def linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    process_group=None,
    grad_weight_accumulation: str = "float32",
) -> Tensor:
    """Mean per-token divergence between the teacher's and the student's next-token distributions, from
    hidden states, without materialising either model's [N, V] logits (math: the module docstring).

    Args:
        student_hidden: [..., H_S] float32, bfloat16, float16 or float64, any strides.
        student_weight: [V, H_S], student_hidden's dtype (the student's lm_head weight as stored).
        teacher_hidden: [..., H_T] with student_hidden's leading shape; any float dtype.
        teacher_weight: [V, H_T], teacher_hidden's dtype (same V as the student).
        labels: [...] = the leading shape, int64/int32, or None.  Only ``labels != ignore_index`` is read:
            those tokens count; None counts every token.
        divergence: "forward_kl" (KL(teacher ‖ student), TRL's β = 0), "reverse_kl" (KL(student ‖ teacher),
            TRL's β = 1) or "jsd" (generalised JSD with β; β = 0 and 1 are the two KLs, as in TRL).
        beta: β in [0, 1], read by "jsd" only.
        temperature: τ > 0; both models' logits are divided by it (no τ² factor, as in TRL).
        ignore_index: label of tokens that count for nothing (loss and gradient exactly 0 there).
        student_bias, teacher_bias: optional [V] in their hidden's dtype; ``-inf`` masks an entry.
        process_group: vocabulary (tensor) parallelism: each rank passes its contiguous slice of rows
            [rank·V, (rank+1)·V) of both models' weights (and biases) and the same hidden states and labels;
            the row math all-reduces O(rows) values three times per chunk (in PyTorch, on every device) and
            d_hidden is summed across ranks.  Every rank gets the same loss.
        grad_weight_accumulation: "float32" (default: the student's d_weight summed over the chunks in
            fp32, rounded once) or "weight_dtype" (added into a d_weight in the weight's dtype, one
            rounding per chunk, without the 4·V·H-byte fp32 accumulator): ``_fused_linear``.

    Returns:
        The 0-dim loss, fp32 (fp64 if any input is fp64): Σ_tokens D / max(1, counted tokens).
        Differentiable with respect to the student's hidden, weight and bias only (the teacher's tensors
        never receive a gradient), gradients in their dtypes.

    Example: 2 sequences × 5 tokens of a Qwen-sized head (V = 151936): student_hidden [2, 5, 896] bf16,
    teacher_hidden [2, 5, 3584] bf16, labels [2, 5] with −100 on the prompt → one scalar; peak extra
    memory two [rows, V] fp32 chunks (plus, for bf16 weights, the driver's fp32 d_weight accumulator
    unless ``grad_weight_accumulation="weight_dtype"``).
    """
    _fused_linear.check_head(student_hidden, student_weight, student_bias, prefix="student_")
    _fused_linear.check_head(teacher_hidden, teacher_weight, teacher_bias, prefix="teacher_")
    _fused_linear.check_grad_weight_accumulation(grad_weight_accumulation)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden must have student_hidden's leading shape "
                         f"{tuple(student_hidden.shape[:-1])}; got {tuple(teacher_hidden.shape[:-1])}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight must have the student's vocabulary size V = "
                         f"{student_weight.shape[0]} rows; got {teacher_weight.shape[0]}")
    ignore_index = check_int("ignore_index", ignore_index)
    if labels is not None:
        check_index_tensor("labels", labels)
        check_shape("labels", labels, student_hidden.shape[:-1], "student_hidden.shape[:-1]")
    divergence = check_choice("divergence", divergence, DIVERGENCES)
    beta = check_in_range("beta", beta, 0.0, 1.0)
    inv_temperature = 1.0 / check_positive("temperature", temperature)
    if process_group is not None:
        from ..parallel import vocab_range  # raises TypeError for anything but a ProcessGroup

        vocab_range(process_group, student_weight.shape[0])
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, labels=labels,
                      student_bias=student_bias, teacher_bias=teacher_bias)
    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL's and Liger's endpoints: the two KLs
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if labels is None:
        flat_labels = torch.zeros(s_hidden.shape[0], dtype=torch.int64, device=s_hidden.device)
        ignore_index = -1
    else:
        flat_labels = labels.reshape(-1)
    acc = compute_dtype(s_hidden, t_hidden)
    # The teacher's head as its products read it, made once: itself, or (bf16/fp16 off CUDA) an fp32 copy.
    t_weight, t_bias = _fused_linear.product_operands(
        t_hidden, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(), acc
    )
    problem = _Problem(t_hidden.detach(), t_weight, t_bias, flat_labels, divergence, beta, inv_temperature,
                       ignore_index, process_group, grad_weight_accumulation)
    (loss,) = _fused_linear.fused_linear_apply(_distill, s_hidden, student_weight, student_bias, problem)
    return loss
