"""Eager KL estimators of verl (``core_algos.kl_penalty``, as in verl 0.9.1) and OpenRLHF
(``models.utils.compute_approx_kl``), versions in ``bench/baselines/__init__.py``."""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------------
def _verl_kl_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, name: str) -> torch.Tensor:
    if name in ("kl", "k1"):
        return logprob - ref_logprob
    if name == "abs":
        return (logprob - ref_logprob).abs()
    if name in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if name in ("low_var_kl", "k3"):
        d = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    raise NotImplementedError


def verl_kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """The estimator named ``kl_penalty``; a "+" suffix keeps its value but takes k2's gradient
    (straight-through), except for k2 itself.  Unknown names raise NotImplementedError."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    forward = _verl_kl_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


# ---------------------------------------------------------------------------------------------------
# OpenRLHF
# ---------------------------------------------------------------------------------------------------
def openrlhf_compute_approx_kl(
    log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1"
) -> torch.Tensor:
    """k1, k2 or k3 of the fp32 log-ratio, clamped to [−10, 10]."""
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio.clamp(min=-10, max=10)
