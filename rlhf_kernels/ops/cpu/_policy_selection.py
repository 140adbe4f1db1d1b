"""The policy losses' passes over [B, T] outside the token-level core, on CPU tensors in C++
(``csrc/policy_selection.cpp``), registered as ``clip_cov_selection_cpp``, ``kl_cov_selection_cpp``,
``gspo_log_ratio_cpp`` and ``geo_mean_row_sums_cpp``.

:func:`cpp_runs` says whether a call on ``device`` takes them: CPU tensors whose ``policy_losses``
backend is "cpp" (the family's first CPU choice when the extension builds).  Elsewhere the PyTorch code
runs: the selections' in ``ops/cpu/policy_losses.py``, the row passes' here (:func:`gspo_log_ratio`,
:func:`geo_mean_row_sums`, which route between the two).  Both paths compute in the compute dtype
(fp64 for fp64 inputs, else fp32) and never read masked positions into a sum.
"""

from __future__ import annotations

import torch

from ... import _dispatch, _ext
from ..._registration import torch_op
from ..._validation import compute_dtype

FAMILY = "policy_losses"  # ops/policy_losses.py's family: its backend choice decides here too
Tensor = torch.Tensor


def cpp_runs(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the C++ passes: Python-level state, a constant under tracing."""
    return device.type == "cpu" and _cpu_backend(_dispatch.get_backend()) == "cpp"


@torch.compiler.assume_constant_result
def _cpu_backend(choice: str) -> str:
    """The family's backend for CPU tensors when ``choice`` is the forced backend (torch.compile guards on
    it, and calls this once instead of tracing it: it may build the extension)."""
    return _dispatch.backend_for(FAMILY, "cpu")


def _clip_cov_selection(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
    clip_high: float, ratio: float, lower: float, upper: float,
) -> Tensor:
    return _ext.load("cpp").clip_cov_selection(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio, lower, upper
    )


def _kl_cov_selection(logprobs: Tensor, advantages: Tensor, mask: Tensor, ratio: float) -> Tensor:
    return _ext.load("cpp").kl_cov_selection(logprobs, advantages, mask, ratio)


def _gspo_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    return _ext.load("cpp").gspo_log_ratio(logprobs, old_logprobs, mask)


def _geo_mean_row_sums(advantages: Tensor, mask: Tensor, is_weights: Tensor | None, log_eps: float) -> Tensor:
    return _ext.load("cpp").geo_mean_row_sums(advantages, mask, is_weights, log_eps)


def _clip_cov_fake(logprobs, old_logprobs, advantages, mask, *scalars):
    return logprobs.new_empty(logprobs.shape, dtype=compute_dtype(logprobs, old_logprobs, advantages))


def _kl_cov_fake(logprobs, advantages, mask, ratio):
    return logprobs.new_empty(logprobs.shape, dtype=compute_dtype(logprobs, advantages))


def _gspo_fake(logprobs, old_logprobs, mask):
    return logprobs.new_empty(logprobs.shape[:1], dtype=compute_dtype(logprobs, old_logprobs))


def _row_sums_fake(advantages, mask, is_weights, log_eps):
    return advantages.new_empty((2, advantages.shape[0]), dtype=compute_dtype(advantages, is_weights))


clip_cov_selection_cpp = torch_op("clip_cov_selection_cpp", _clip_cov_selection, fake=_clip_cov_fake)
kl_cov_selection_cpp = torch_op("kl_cov_selection_cpp", _kl_cov_selection, fake=_kl_cov_fake)
gspo_log_ratio_cpp = torch_op("gspo_log_ratio_cpp", _gspo_log_ratio, fake=_gspo_fake)
geo_mean_row_sums_cpp = torch_op("geo_mean_row_sums_cpp", _geo_mean_row_sums, fake=_row_sums_fake)


@torch.no_grad()
def gspo_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """GSPO's row log-ratio ℓ̄_b = Σ_t (lp − old)·m / max(Σ_t m, 1) over m ≠ 0, in ``dtype`` (the compute
    dtype), as an expanded [B, T] view of a [B, 1] column."""
    logprobs = logprobs.detach()
    if cpp_runs(logprobs.device):
        return gspo_log_ratio_cpp(logprobs, old_logprobs.detach(), mask).unsqueeze(-1).expand(logprobs.shape)
    m = mask.to(dtype)
    raw = torch.where(m != 0, (logprobs.to(dtype) - old_logprobs.detach().to(dtype)) * m, 0.0)
    return (raw.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).expand(raw.shape)


@torch.no_grad()
def geo_mean_row_sums(
    advantages: Tensor, mask: Tensor, is_weights: Tensor | None, dtype: torch.dtype, log_eps: float
) -> tuple[Tensor, Tensor | None]:
    """geo_mean's row sums over m ≠ 0 in ``dtype``: (Σ_t A·m [B], Σ_t log(w + log_eps)·m [B], or None
    without ``is_weights``)."""
    advantages = advantages.detach()
    if cpp_runs(advantages.device):
        weights = None if is_weights is None else is_weights.detach()
        sums = geo_mean_row_sums_cpp(advantages, mask, weights, log_eps)
        return sums[0], None if is_weights is None else sums[1]
    m = mask.to(dtype)
    row_adv = torch.where(m != 0, advantages.to(dtype) * m, 0.0).sum(-1)
    if is_weights is None:
        return row_adv, None
    log_w = torch.where(m != 0, torch.log(is_weights.detach().to(dtype) + log_eps) * m, 0.0)
    return row_adv, log_w.sum(-1)
