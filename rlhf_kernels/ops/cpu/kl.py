"""The PyTorch path of the KL estimators (any device): ``kl_penalty_fwd_torch`` / ``kl_penalty_bwd_torch``.

The math and the estimator names are documented in ``rlhf_kernels/ops/kl.py``.  This module also holds
the clamps of k3 as plain numbers: the Triton kernels read the same numbers as constexprs.
"""

from __future__ import annotations

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype

# k3's clamps (verl's low_var_kl): d = clamp(ref − lp, ±K3_LOG_RATIO_CLAMP), value clamped to ±K3_VALUE_CLAMP.
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def _delta(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(logprobs, ref_logprobs)
    return logprobs.to(dtype) - ref_logprobs.to(dtype)


def kl_value_torch(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """The estimator in plain PyTorch, in fp32 (fp64 for fp64 inputs); ``estimator`` canonical (a
    straight-through name ``k3+`` computes the value of ``k3``)."""
    estimator = estimator.rstrip("+")
    delta = _delta(logprobs, ref_logprobs)
    if estimator == "k1":
        return delta
    if estimator == "abs":
        return delta.abs()
    if estimator == "k2":
        return 0.5 * delta.square()
    d = (-delta).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # torch.clamp propagates NaN
    return (d.exp() - d - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


def kl_derivative_torch(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """∂k/∂lp (= −∂k/∂ref); a clamp passes the gradient on its closed interval; NaN stays NaN.  A
    straight-through name (``k3+``) differentiates k2."""
    estimator = "k2" if estimator.endswith("+") else estimator
    delta = _delta(logprobs, ref_logprobs)
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


def _fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    return kl_value_torch(logprobs, ref_logprobs, estimator).contiguous()


def _fwd_fake(logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape, dtype=compute_dtype(logprobs, ref_logprobs))


def _bwd(
    grad_kl: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    need_grad_ref: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad_kl * kl_derivative_torch(logprobs, ref_logprobs, estimator)
    grad_ref = (-grad).to(ref_logprobs.dtype) if need_grad_ref else ref_logprobs.new_empty(0)
    return grad.to(logprobs.dtype).contiguous(), grad_ref.contiguous()


def _bwd_fake(grad_kl, logprobs, ref_logprobs, estimator, need_grad_ref):
    grad_ref = ref_logprobs.new_empty(ref_logprobs.shape if need_grad_ref else (0,))
    return logprobs.new_empty(logprobs.shape), grad_ref


kl_penalty_fwd_torch = torch_op("kl_penalty_fwd_torch", _fwd, fake=_fwd_fake)
kl_penalty_bwd_torch = torch_op("kl_penalty_bwd_torch", _bwd, fake=_bwd_fake)
