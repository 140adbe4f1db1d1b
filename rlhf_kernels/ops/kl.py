"""Per-token KL estimators between the policy and the reference policy.

With δ = lp − ref (log-probabilities of the sampled token under the policy and the reference):

    k1  = δ
    abs = |δ|
    k2  = ½ δ²
    k3  = clamp(e^d − d − 1, −10, 10),   d = clamp(ref − lp, −20, 20)      (alias ``low_var_kl``)

k1 is the plain Monte-Carlo estimate of KL(π‖π_ref), k2 and k3 are Schulman's low-variance estimators
(http://joschu.net/blog/kl-approx.html); the clamps of k3 are verl's (they keep a single outlier token
from dominating the penalty).  Every estimator is a function of δ alone, so

    ∂k/∂lp = k'(δ),   ∂k/∂ref = −k'(δ)
    k1' = 1,  abs' = sign(δ),  k2' = δ,  k3' = −(e^d − 1)·1[−20 ≤ ref − lp ≤ 20]·1[e^d − d − 1 ≤ 10]

(a clamp passes the gradient on its closed interval, as ``torch.clamp`` does).  NaN in gives NaN out,
in the value and the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.library import triton_op, wrap_triton

from .. import _dispatch
from .._validation import FLOAT_DTYPES, check_float_tensor, check_same_device, check_shape, compute_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = None

FAMILY = "kl"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))

#: Accepted ``estimator`` names; ``low_var_kl`` is verl's name for ``k3``.
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl")
_ESTIMATOR_CODE = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
_ALIASES = {"low_var_kl": "k3"}

# k3's clamps (verl's low_var_kl).
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0

# float64 is accepted too (gradcheck, oracles); everything else computes in fp32.
_KL_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_estimator(estimator: object) -> str:
    """The canonical estimator name (``k1``, ``abs``, ``k2`` or ``k3``) for a name in
    :data:`KL_ESTIMATORS`; raises ``ValueError`` naming the accepted names otherwise."""
    if not isinstance(estimator, str) or estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}; got {estimator!r}")
    return _ALIASES.get(estimator, estimator)


def estimator_code(estimator: str) -> int:
    """The integer a kernel receives as its ``ESTIMATOR`` constexpr, for a canonical name."""
    return _ESTIMATOR_CODE[check_estimator(estimator)]


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  ``_kl_value`` / ``_kl_derivative`` are device functions, also used by the fused
# reward-shaping kernel of ``ops/advantages.py``.  Clamps are written with comparisons (not
# minimum/maximum) so that NaN passes through.
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _kl_value(lp, ref, ESTIMATOR: tl.constexpr):
        delta = lp - ref
        if ESTIMATOR == 0:
            kl = delta
        elif ESTIMATOR == 1:
            kl = tl.abs(delta)
        elif ESTIMATOR == 2:
            kl = 0.5 * delta * delta
        else:
            d = -delta
            d = tl.where(d < -20.0, -20.0, tl.where(d > 20.0, 20.0, d))
            kl = tl.exp(d) - d - 1.0
            kl = tl.where(kl < -10.0, -10.0, tl.where(kl > 10.0, 10.0, kl))
        return kl

    @triton.jit
    def _kl_derivative(lp, ref, ESTIMATOR: tl.constexpr):
        """∂k/∂lp."""
        delta = lp - ref
        if ESTIMATOR == 0:
            grad = tl.where(delta == delta, 1.0, delta)  # NaN stays NaN
        elif ESTIMATOR == 1:
            grad = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0 * delta))
        elif ESTIMATOR == 2:
            grad = delta
        else:
            d = -delta
            d_clipped = (d < -20.0) | (d > 20.0)
            d = tl.where(d < -20.0, -20.0, tl.where(d > 20.0, 20.0, d))
            e = tl.exp(d)
            kl = e - d - 1.0
            grad = tl.where(d_clipped | (kl > 10.0) | (kl < -10.0), 0.0, 1.0 - e)
        return grad

    @triton.jit
    def _kl_penalty_fwd_kernel(
        logprobs_ptr, ref_ptr, kl_ptr,
        N,
        ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < N
        compute_ty = kl_ptr.dtype.element_ty
        lp = tl.load(logprobs_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        ref = tl.load(ref_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        tl.store(kl_ptr + offs, _kl_value(lp, ref, ESTIMATOR), mask=in_range)

    @triton.jit
    def _kl_penalty_bwd_kernel(
        grad_logprobs_ptr, grad_ref_ptr, grad_kl_ptr, logprobs_ptr, ref_ptr,
        N,
        ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD_REF: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < N
        compute_ty = grad_kl_ptr.dtype.element_ty
        g = tl.load(grad_kl_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        lp = tl.load(logprobs_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        ref = tl.load(ref_ptr + offs, mask=in_range, other=0.0).to(compute_ty)
        grad = g * _kl_derivative(lp, ref, ESTIMATOR)
        tl.store(grad_logprobs_ptr + offs, grad.to(grad_logprobs_ptr.dtype.element_ty), mask=in_range)
        if HAS_GRAD_REF:
            tl.store(grad_ref_ptr + offs, (-grad).to(grad_ref_ptr.dtype.element_ty), mask=in_range)


@dataclass(frozen=True)
class _LaunchConfig:
    block: int
    num_warps: int


def _launch_config(n: int) -> _LaunchConfig:
    """Elementwise: 1024 elements per program over 4 warps (8 per thread, two 16-byte fp32 vectors);
    tiny inputs take one block sized to them."""
    block = min(1024, max(16, triton.next_power_of_2(n)))
    return _LaunchConfig(block=block, num_warps=4 if block >= 512 else 1)


# ---------------------------------------------------------------------------------------------------
# PyTorch path.
# ---------------------------------------------------------------------------------------------------
def kl_value_torch(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """The estimator in plain PyTorch, in fp32 (fp64 for fp64 inputs); ``estimator`` canonical."""
    dtype = compute_dtype(logprobs, ref_logprobs)
    delta = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        return delta
    if estimator == "abs":
        return delta.abs()
    if estimator == "k2":
        return 0.5 * delta.square()
    d = (-delta).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (d.exp() - d - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


def _kl_derivative_torch(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    dtype = compute_dtype(logprobs, ref_logprobs)
    delta = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        return torch.where(delta.isnan(), delta, torch.ones_like(delta))
    if estimator == "abs":
        return torch.where(delta.isnan(), delta, delta.sign())  # torch.sign(NaN) is 0
    if estimator == "k2":
        return delta
    d = -delta
    clipped = (d < -K3_LOG_RATIO_CLAMP) | (d > K3_LOG_RATIO_CLAMP)
    d = d.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    e = d.exp()
    kl = e - d - 1.0
    clipped |= (kl > K3_VALUE_CLAMP) | (kl < -K3_VALUE_CLAMP)
    return torch.where(clipped, torch.zeros_like(e), 1.0 - e)


@torch.library.custom_op("rlhf_kernels::kl_penalty_fwd_torch", mutates_args=())
def _kl_penalty_fwd_torch(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    return kl_value_torch(logprobs, ref_logprobs, estimator).contiguous()


@_kl_penalty_fwd_torch.register_fake
def _(logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape, dtype=compute_dtype(logprobs, ref_logprobs))


@torch.library.custom_op("rlhf_kernels::kl_penalty_bwd_torch", mutates_args=())
def _kl_penalty_bwd_torch(
    grad_kl: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    need_grad_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad_kl * _kl_derivative_torch(logprobs, ref_logprobs, estimator)
    grad_ref = (-grad).to(ref_logprobs.dtype) if need_grad_ref else ref_logprobs.new_empty(0)
    return grad.to(logprobs.dtype).contiguous(), grad_ref.contiguous()


@_kl_penalty_bwd_torch.register_fake
def _(grad_kl, logprobs, ref_logprobs, estimator, need_grad_ref):
    grad_ref = ref_logprobs.new_empty(ref_logprobs.shape if need_grad_ref else (0,))
    return logprobs.new_empty(logprobs.shape), grad_ref


# ---------------------------------------------------------------------------------------------------
# Triton launchers (flat, contiguous tensors).
# ---------------------------------------------------------------------------------------------------
def _launch_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    kl = torch.empty(logprobs.shape, dtype=compute_dtype(logprobs, ref_logprobs), device=logprobs.device)
    n = kl.numel()
    if n == 0:
        return kl
    cfg = _launch_config(n)
    wrap_triton(_kl_penalty_fwd_kernel)[(triton.cdiv(n, cfg.block),)](
        logprobs, ref_logprobs, kl,
        n,
        ESTIMATOR=_ESTIMATOR_CODE[estimator], BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return kl


def _launch_bwd(
    grad_kl: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    need_grad_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_logprobs = torch.empty_like(logprobs)
    grad_ref = torch.empty(ref_logprobs.shape if need_grad_ref else (0,), dtype=ref_logprobs.dtype,
                           device=ref_logprobs.device)
    n = logprobs.numel()
    if n == 0:
        return grad_logprobs, grad_ref
    cfg = _launch_config(n)
    wrap_triton(_kl_penalty_bwd_kernel)[(triton.cdiv(n, cfg.block),)](
        grad_logprobs, grad_ref if need_grad_ref else grad_logprobs, grad_kl, logprobs, ref_logprobs,
        n,
        ESTIMATOR=_ESTIMATOR_CODE[estimator], BLOCK=cfg.block, HAS_GRAD_REF=need_grad_ref,
        num_warps=cfg.num_warps,
    )
    return grad_logprobs, grad_ref


# ---------------------------------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------------------------------
@triton_op("rlhf_kernels::kl_penalty", mutates_args=())
def kl_penalty_op(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL estimate per element of contiguous, equally shaped ``logprobs`` and ``ref_logprobs``;
    ``estimator`` canonical (k1, abs, k2, k3)."""
    if _dispatch.backend_for(FAMILY, logprobs.device) == "triton":
        return _launch_fwd(logprobs, ref_logprobs, estimator)
    return _dispatch.torch_path(_kl_penalty_fwd_torch)(logprobs, ref_logprobs, estimator)


@triton_op("rlhf_kernels::kl_penalty_bwd", mutates_args=())
def kl_penalty_bwd(
    grad_kl: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    need_grad_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂logprobs in logprobs' dtype, ∂/∂ref_logprobs in its dtype or empty when not needed)."""
    if _dispatch.backend_for(FAMILY, logprobs.device) == "triton":
        return _launch_bwd(grad_kl, logprobs, ref_logprobs, estimator, need_grad_ref)
    body = _dispatch.torch_path(_kl_penalty_bwd_torch)
    return body(grad_kl, logprobs, ref_logprobs, estimator, need_grad_ref)


def _setup_context(ctx, inputs, output) -> None:
    logprobs, ref_logprobs, estimator = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator = estimator


def _backward(ctx, grad_kl):
    logprobs, ref_logprobs = ctx.saved_tensors
    need_grad_ref = bool(ctx.needs_input_grad[1])
    grad_logprobs, grad_ref = kl_penalty_bwd(
        grad_kl.contiguous(), logprobs, ref_logprobs, ctx.estimator, need_grad_ref
    )
    return grad_logprobs, (grad_ref if need_grad_ref else None), None


kl_penalty_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference policy.

    Args:
        logprobs: [...] log-probabilities of the sampled tokens under the policy; float32, bfloat16,
            float16 (or float64).
        ref_logprobs: same shape, under the reference policy; any of the same dtypes.
        estimator: ``"k1"`` (lp − ref), ``"abs"`` (|lp − ref|), ``"k2"`` (½(lp − ref)²) or ``"k3"``
            / ``"low_var_kl"`` (clamp(e^d − d − 1, −10, 10) with d = clamp(ref − lp, −20, 20)).

    Returns:
        [...] float32 (float64 when an input is float64), computed in that precision.  Differentiable
        with respect to both inputs (the gradient of ``ref_logprobs`` is computed only when it
        requires one); gradients have their input's dtype.  No masking is applied: multiply by a
        mask, or use :func:`rlhf_kernels.token_level_rewards`.  NaN in gives NaN out.
    """
    check_float_tensor("logprobs", logprobs, _KL_DTYPES)
    check_float_tensor("ref_logprobs", ref_logprobs, _KL_DTYPES)
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    estimator = check_estimator(estimator)
    shape = logprobs.shape
    kl = kl_penalty_op(logprobs.contiguous().view(-1), ref_logprobs.contiguous().view(-1), estimator)
    return kl.view(shape)
