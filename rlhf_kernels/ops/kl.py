"""Per-token KL estimators between the policy and the reference policy, and the KL loss.

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
in the value and the gradient.  ``kl_loss`` = agg(k(lp, ref), mask) with ``ops/aggregation.py``.

Tokens sampled from an older policy (``old_logprobs``) take one of two corrections (``KL_CORRECTIONS``):
OpenRLHF's ``unbiased_gradient`` (value k, gradient w·δ with w = min(e^{lp − old}, 10) detached) and TRL
1.16's ``use_bias_correction_kl`` (value k·e^{lp − old}, the ratio differentiable; per token, or per
sequence in ``kl_loss``): one elementwise product in PyTorch after the kernel.

Layout: Triton kernels → launch config → launchers → registration/autograd → public functions; the
PyTorch path is ``ops/cpu/kl.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    FLOAT_DTYPES,
    check_choice,
    check_float_tensor,
    check_same_device,
    check_shape,
    compute_dtype,
)
from ._launch import cdiv, pow2_between, tl, triton, wrap_triton
from .aggregation import (
    TOKEN_MEAN,
    Normalizer,
    agg_loss,
    check_loss_agg,
    check_normalizer,
    check_token_inputs,
)
from .cpu import kl as cpu
from .cpu.kl import K3_LOG_RATIO_CLAMP, K3_VALUE_CLAMP, kl_value_torch

FAMILY = "kl"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))

#: Accepted ``estimator`` names; ``low_var_kl`` is verl's name for ``k3``.  A trailing ``+`` (verl 0.9.1's
#: straight-through names) keeps the named estimator's value and takes the gradient of k2 (δ), which is the
#: unbiased gradient of KL(π‖π_ref) on samples of π; ``k2+`` is ``k2``.
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k1+", "abs+", "k2+", "k3+", "low_var_kl+")
_ESTIMATOR_CODE = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
_ALIASES = {"low_var_kl": "k3", "low_var_kl+": "k3+", "k2+": "k2"}
#: OpenRLHF's bound on the importance weight e^{lp − old} of the unbiased KL gradient (KL_IS_WEIGHT_CLIP).
KL_IS_WEIGHT_CLIP = 10.0
#: How ``old_logprobs`` corrects the KL for off-policy samples: OpenRLHF's ``unbiased_gradient`` (value
#: unchanged, gradient weighted by a clipped, detached ratio) or TRL's ``use_bias_correction_kl`` (the value
#: times the differentiable ratio e^{lp − old}).
KL_CORRECTIONS = ("unbiased_gradient", "bias_correction")
IS_LEVELS = ("token", "sequence")

# float64 is accepted too (gradcheck, oracles); everything else computes in fp32.
_KL_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_estimator(estimator: object) -> str:
    """The canonical estimator name (``k1``, ``abs``, ``k2``, ``k3``, ``k1+``, ``abs+`` or ``k3+``) for a name
    in :data:`KL_ESTIMATORS`; raises ``ValueError`` naming the accepted names otherwise."""
    if not isinstance(estimator, str) or estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}; got {estimator!r}")
    return _ALIASES.get(estimator, estimator)


def estimator_code(estimator: str) -> int:
    """The integer a kernel receives as its ``ESTIMATOR`` constexpr (that of the value: ``k3+`` is k3)."""
    return _ESTIMATOR_CODE[value_estimator(check_estimator(estimator))]


def value_estimator(estimator: str) -> str:
    """The estimator whose value a canonical name computes (``k3+`` -> ``k3``)."""
    return estimator.rstrip("+")


def gradient_estimator(estimator: str) -> str:
    """The estimator whose derivative a canonical name backpropagates (``k3+`` -> ``k2``)."""
    return "k2" if estimator.endswith("+") else estimator


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  ``_kl_value`` / ``_kl_derivative`` are device functions, also used by the fused
# reward-shaping kernel (token rewards).  Clamps are written with comparisons (not minimum/maximum) so
# that NaN passes through; their bounds are the PyTorch path's numbers, as constexprs.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    _D_CLAMP = tl.constexpr(K3_LOG_RATIO_CLAMP)
    _KL_CLAMP = tl.constexpr(K3_VALUE_CLAMP)

    @triton.jit
    def _k3_log_ratio(delta):
        """(d = clamp(−δ, ±20), whether the clamp was active)."""
        d = -delta
        clipped = (d < -_D_CLAMP) | (d > _D_CLAMP)
        return tl.where(d < -_D_CLAMP, -_D_CLAMP, tl.where(d > _D_CLAMP, _D_CLAMP, d)), clipped

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
            d, _ = _k3_log_ratio(delta)
            kl = tl.exp(d) - d - 1.0
            kl = tl.where(kl < -_KL_CLAMP, -_KL_CLAMP, tl.where(kl > _KL_CLAMP, _KL_CLAMP, kl))
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
            d, d_clipped = _k3_log_ratio(delta)
            e = tl.exp(d)
            kl = e - d - 1.0
            grad = tl.where(d_clipped | (kl > _KL_CLAMP) | (kl < -_KL_CLAMP), 0.0, 1.0 - e)
        return grad

    # Reads 2 inputs and writes 1 output per element: (2·input bytes + 4) per element in fp32.
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

    # Reads the upstream gradient and both inputs, writes ∂/∂lp (and ∂/∂ref when HAS_GRAD_REF).
    @triton.jit
    def _store_rounded(ptrs, x, mask):
        """Stores x in the pointers' dtype; 16-bit outputs via fp32, since triton 3.9's interpreter
        casts fp64 straight to bf16 wrongly (1.0 -> 9.2e-41)."""
        out_ty = ptrs.dtype.element_ty
        if out_ty.primitive_bitwidth < 32:
            tl.store(ptrs, x.to(tl.float32).to(out_ty), mask=mask)
        else:
            tl.store(ptrs, x.to(out_ty), mask=mask)

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
        _store_rounded(grad_logprobs_ptr + offs, grad, in_range)
        if HAS_GRAD_REF:
            _store_rounded(grad_ref_ptr + offs, -grad, in_range)


# ---------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------
# Register budget 128/thread (bench/static/budgets.py, checked by tests/test_static.py): >= 16 resident
# warps per SM keep ~25 KiB of 16-byte loads in flight.
@dataclass(frozen=True)
class _LaunchConfig:
    block: int
    num_warps: int
    programs: int


def _launch_config(n: int) -> _LaunchConfig:
    """Elementwise: 1024 elements per program over 4 warps (8 per thread, two 16-byte fp32 vectors);
    tiny inputs take one block sized to them."""
    block = pow2_between(n, 16, 1024)
    return _LaunchConfig(block=block, num_warps=4 if block >= 512 else 1, programs=cdiv(n, block))


# ---------------------------------------------------------------------------------------------------
# Launchers (flat, contiguous tensors): ``*_out`` write into outputs the caller allocated.
# ---------------------------------------------------------------------------------------------------
def _launch_fwd_out(
    kl: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str
) -> torch.Tensor:
    """kl [N] (fp32, fp64 for fp64 inputs) ← k(logprobs [N], ref_logprobs [N]); ``estimator`` canonical."""
    assert kl.is_contiguous() and kl.dtype == compute_dtype(logprobs, ref_logprobs)
    n = kl.numel()
    if n:
        cfg = _launch_config(n)
        wrap_triton(_kl_penalty_fwd_kernel)[(cfg.programs,)](
            logprobs, ref_logprobs, kl,
            n,
            ESTIMATOR=_ESTIMATOR_CODE[value_estimator(estimator)], BLOCK=cfg.block, num_warps=cfg.num_warps,
        )
    return kl


def _launch_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    kl = torch.empty(logprobs.shape, dtype=compute_dtype(logprobs, ref_logprobs), device=logprobs.device)
    return _launch_fwd_out(kl, logprobs, ref_logprobs, estimator)


def _launch_bwd_out(
    grad_logprobs: torch.Tensor,
    grad_ref: torch.Tensor | None,
    grad_kl: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
) -> None:
    """grad_logprobs [N] ← grad_kl·k'(δ) and, unless ``grad_ref`` is None, grad_ref [N] ← −grad_kl·k'(δ)."""
    assert grad_logprobs.is_contiguous() and (grad_ref is None or grad_ref.is_contiguous())
    n = grad_logprobs.numel()
    if n:
        cfg = _launch_config(n)
        wrap_triton(_kl_penalty_bwd_kernel)[(cfg.programs,)](
            grad_logprobs, grad_logprobs if grad_ref is None else grad_ref, grad_kl, logprobs, ref_logprobs,
            n,
            ESTIMATOR=_ESTIMATOR_CODE[gradient_estimator(estimator)], BLOCK=cfg.block,
            HAS_GRAD_REF=grad_ref is not None,
            num_warps=cfg.num_warps,
        )


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
    _launch_bwd_out(grad_logprobs, grad_ref if need_grad_ref else None, grad_kl, logprobs, ref_logprobs,
                    estimator)
    return grad_logprobs, grad_ref


# ---------------------------------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------------------------------
@kernel_op("kl_penalty")
def kl_penalty_op(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL estimate per element of contiguous, equally shaped ``logprobs`` and ``ref_logprobs``;
    ``estimator`` canonical (k1, abs, k2, k3, or k1+, abs+, k3+: value of the named one, gradient of k2)."""
    return _dispatch.route(FAMILY, logprobs.device, triton=_launch_fwd, torch=cpu.kl_penalty_fwd_torch)(
        logprobs, ref_logprobs, estimator
    )


@kernel_op("kl_penalty_bwd")
def kl_penalty_bwd(
    grad_kl: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    need_grad_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂logprobs in logprobs' dtype, ∂/∂ref_logprobs in its dtype or empty when not needed)."""
    return _dispatch.route(FAMILY, logprobs.device, triton=_launch_bwd, torch=cpu.kl_penalty_bwd_torch)(
        grad_kl, logprobs, ref_logprobs, estimator, need_grad_ref
    )


def _setup_context(ctx, inputs, output) -> None:
    logprobs, ref_logprobs, estimator = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator = gradient_estimator(estimator)  # straight-through names differentiate k2


def _backward(ctx, grad_kl):
    logprobs, ref_logprobs = ctx.saved_tensors
    need_grad_ref = bool(ctx.needs_input_grad[1])
    grad_logprobs, grad_ref = kl_penalty_bwd(
        grad_kl.contiguous(), logprobs, ref_logprobs, ctx.estimator, need_grad_ref
    )
    return grad_logprobs, (grad_ref if need_grad_ref else None), None


kl_penalty_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------
def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    *,
    old_logprobs: torch.Tensor | None = None,
    kl_correction: str = "unbiased_gradient",
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference policy.

    Args:
        logprobs: [...] log-probabilities of the sampled tokens under the policy; float32, bfloat16,
            float16 (or float64).
        ref_logprobs: same shape, under the reference policy; any of the same dtypes.
        estimator: ``"k1"`` (lp − ref), ``"abs"`` (|lp − ref|), ``"k2"`` (½(lp − ref)²) or ``"k3"``
            / ``"low_var_kl"`` (clamp(e^d − d − 1, −10, 10) with d = clamp(ref − lp, −20, 20));
            with a trailing ``+`` (``"k3+"``, verl's straight-through names): the value of the named
            estimator, the gradient of k2 (∂/∂lp = lp − ref).
        old_logprobs: optional, same shape: the log-probabilities of the policy that sampled the tokens.
            When given, the importance-weighted unbiased KL gradient (OpenRLHF's ``unbiased_gradient``):
            the value of ``estimator``, the gradient w·(lp − ref) with w = min(e^{lp − old}, 10), detached
            (the reverse-KL gradient E_old[w·k1·∇lp]); ``ref_logprobs`` then gets −w·(lp − ref).
        kl_correction: with ``old_logprobs``: ``"unbiased_gradient"`` (OpenRLHF, above) or
            ``"bias_correction"`` (TRL 1.16's ``use_bias_correction_kl``, DeepSeek-V3.2): the value
            k(lp, ref)·e^{lp − old}, the ratio not detached and not clipped, so that the gradient is
            e^{lp − old}·(k' + k) (it differs from k' even on-policy, where the ratio is 1).

    Returns:
        [...] float32 (float64 when an input is float64), computed in that precision.  Differentiable
        with respect to both inputs (the gradient of ``ref_logprobs`` is computed only when it
        requires one); gradients have their input's dtype.  No masking is applied: multiply by a
        mask, or use :func:`kl_loss` or :func:`rlhf_kernels.token_level_rewards`.  NaN in gives NaN out.

    Example: ``kl_penalty(torch.tensor([0.3]), torch.tensor([0.1]), "k2")`` is ``[0.02]`` (½·0.2²).
    """
    check_float_tensor("logprobs", logprobs, _KL_DTYPES)
    check_float_tensor("ref_logprobs", ref_logprobs, _KL_DTYPES)
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    estimator = check_estimator(estimator)
    check_choice("kl_correction", kl_correction, KL_CORRECTIONS)
    if old_logprobs is not None:
        check_float_tensor("old_logprobs", old_logprobs, _KL_DTYPES)
        check_shape("old_logprobs", old_logprobs, logprobs.shape, "logprobs.shape")
        check_same_device(logprobs=logprobs, old_logprobs=old_logprobs)
        if kl_correction == "unbiased_gradient":
            estimator = value_estimator(estimator) + "+"
    shape = logprobs.shape
    flat = (logprobs.contiguous().view(-1), ref_logprobs.contiguous().view(-1))
    kl = kl_penalty_op(*flat, estimator).view(shape)
    if old_logprobs is None:
        return kl
    if kl_correction == "bias_correction":
        return kl * (logprobs.to(kl.dtype) - old_logprobs.to(kl.dtype)).exp()
    # Straight-through: value kl, gradient w·∂kl(k2) = w·δ (the "+" op already differentiates k2).
    with torch.no_grad():
        weight = (logprobs.to(kl.dtype) - old_logprobs.to(kl.dtype)).exp().clamp(max=KL_IS_WEIGHT_CLIP)
    return _ScaleGradient.apply(kl, weight)


class _ScaleGradient(torch.autograd.Function):
    """Value ``x``, gradient ``grad · weight`` (``weight`` constant).  Written as a Function rather than
    ``x + (x − x.detach())·(w − 1)``, which is NaN wherever the value is ±inf (inf − inf)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str = "k3",
    loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
    old_logprobs: torch.Tensor | None = None,
    kl_correction: str = "unbiased_gradient",
    importance_sampling_level: str = "token",
) -> torch.Tensor:
    """agg(k(lp, ref), mask): the KL penalty as a loss, 0-dim fp32 (fp64 for fp64 inputs).

    Args:
        logprobs: [B, T] policy log-probabilities (float32, bfloat16, float16 or float64).
        ref_logprobs: [B, T] reference log-probabilities (same dtype).
        mask: [B, T] bool, integer or floating 0/1 mask of the tokens that count.
        estimator: a name of :data:`KL_ESTIMATORS` (``"k3+"``: value of k3, gradient of k2), as
            :func:`kl_penalty`.
        old_logprobs: optional [B, T] rollout-policy log-probabilities: the importance-weighted unbiased
            gradient of :func:`kl_penalty` (OpenRLHF ``unbiased_gradient``), or with
            ``kl_correction="bias_correction"`` TRL's k·e^{lp − old} (see :func:`kl_penalty`).
        kl_correction: ``"unbiased_gradient"`` or ``"bias_correction"``, as :func:`kl_penalty`.
        importance_sampling_level: for ``"bias_correction"``: ``"token"`` (the ratio e^{lp − old} of each
            token) or ``"sequence"`` (TRL's ``importance_sampling_level="sequence"``: every token of row b
            weighted by e^{s_b}, s_b = Σ_t (lp − old)·m / max(Σ_t m, 1)).
        loss_agg: one of :data:`rlhf_kernels.ops.aggregation.LOSS_AGG_MODES`.
        normalizer: replaces the aggregation's denominator (see docs/aggregation.md).

    Differentiable with respect to ``logprobs`` (and ``ref_logprobs`` if it requires grad).  Masked
    positions contribute 0 and receive exactly zero gradient, whatever they hold; a batch without a
    valid token gives 0 and a zero gradient.  No device sync.
    """
    check_token_inputs(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    estimator = check_estimator(estimator)
    check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)
    # Padding may hold NaN/inf: zero it first, so that masked positions get an exact 0 gradient (the
    # aggregation alone would multiply their zero upstream gradient by a NaN derivative).
    valid = mask != 0
    logprobs = torch.where(valid, logprobs, 0.0)
    ref_logprobs = torch.where(valid, ref_logprobs, 0.0)
    check_choice("kl_correction", kl_correction, KL_CORRECTIONS)
    check_choice("importance_sampling_level", importance_sampling_level, IS_LEVELS)
    sequence = importance_sampling_level == "sequence"
    if sequence and (old_logprobs is None or kl_correction != "bias_correction"):
        raise ValueError(
            "importance_sampling_level='sequence' weights the KL with kl_correction='bias_correction' and "
            f"needs old_logprobs; got kl_correction={kl_correction!r}, old_logprobs "
            f"{'given' if old_logprobs is not None else 'None'}"
        )
    if old_logprobs is not None:
        check_token_inputs(mask, logprobs=logprobs, old_logprobs=old_logprobs)
        old_logprobs = torch.where(valid, old_logprobs, 0.0)
    if sequence:
        per_token = kl_penalty(logprobs, ref_logprobs, estimator)
        weight = torch.where(valid, mask.to(per_token.dtype), 0.0)
        log_ratio = (logprobs.to(per_token.dtype) - old_logprobs.to(per_token.dtype)) * weight
        seq_log_ratio = log_ratio.sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp(min=1.0)
        per_token = per_token * seq_log_ratio.exp()
    else:
        per_token = kl_penalty(logprobs, ref_logprobs, estimator, old_logprobs=old_logprobs,
                               kl_correction=kl_correction)
    return agg_loss(per_token, mask, loss_agg, normalizer)


__all__ = [
    "KL_CORRECTIONS",
    "KL_ESTIMATORS",
    "KL_IS_WEIGHT_CLIP",
    "K3_LOG_RATIO_CLAMP",
    "K3_VALUE_CLAMP",
    "check_estimator",
    "estimator_code",
    "kl_loss",
    "kl_penalty",
    "kl_value_torch",
]
