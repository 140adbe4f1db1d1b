"""The frameworks' masked reductions, shared by the idioms of every family.

verl (``verl.utils.torch_functional``): ``masked_sum`` replaces masked positions by 0 with ``torch.where``
(so NaN padding does not leak) and multiplies by the mask; ``masked_mean`` divides by Σm + 1e-8;
``masked_var`` is unbiased and raises (a host sync) on fewer than two valid elements; ``masked_whiten``
returns (x − μ)·rsqrt(var + 1e-8) at every position, masked ones included.
OpenRLHF (``openrlhf.models.utils``): ``masked_mean`` = Σ x·m / Σm, no epsilon (0/0 = NaN).
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------------
def verl_masked_sum(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis)


def verl_masked_mean(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    return verl_masked_sum(values, mask, axis) / (mask.sum(axis) + 1e-8)


def verl_masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = verl_masked_mean(values, mask)
    variance = verl_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if count == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        variance = variance * (count / (count - 1))
    return variance


def verl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − μ)·rsqrt(var + 1e-8) at every position, masked ones included (+ μ without shift_mean)."""
    mean, variance = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened + mean if not shift_mean else whitened


# ---------------------------------------------------------------------------------------------------
# OpenRLHF
# ---------------------------------------------------------------------------------------------------
def openrlhf_masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)
