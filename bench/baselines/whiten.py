"""Eager whitening idioms: verl whitens over the response mask with Bessel's correction
(``verl_masked_whiten``, with the other masked reductions in ``masked.py``), OpenRLHF normalises over all
valid tokens of the batch with the biased variance.
"""

from __future__ import annotations

import torch

from .masked import verl_masked_whiten

__all__ = ["openrlhf_normalize", "verl_masked_whiten"]


def openrlhf_normalize(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's batch advantage normalisation: mean and biased variance over all valid tokens,
    (A − μ)·rsqrt(max(var, 1e-8))."""
    mask = action_mask.to(advantages.dtype)
    count = mask.sum()
    mean = (advantages * mask).sum() / count
    variance = ((advantages - mean).pow(2) * mask).sum() / count
    return (advantages - mean) * variance.clamp(min=1e-8).rsqrt()
