"""Tensor helpers shared by the framework shims (plain torch; no host sync)."""

from __future__ import annotations

import torch


def common_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The fused losses take one floating dtype; the frameworks mix them freely (promotion)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def in_dtype_of(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return result if result.dtype == like.dtype else result.to(like.dtype)


def no_double(tensor: torch.Tensor) -> torch.Tensor:
    """The advantage kernels compute in fp32; fp64 inputs (which the frameworks' loops accept) are
    rounded once."""
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def nan_if_empty(metric: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The frameworks' masked means are Σ/Σm: 0/0 = NaN for an all-masked batch (the library's say 0)."""
    return torch.where(mask.sum() == 0, torch.full_like(metric, float("nan")), metric)


def weighted_aggregation(
    mode: str, normalizer: float | torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> tuple[str, torch.Tensor, float | torch.Tensor]:
    """agg(L·w) under ``mask`` as (mode, per-token weights, normalizer) of an unweighted aggregation.

    The fused losses aggregate Σ L·m / normalizer; a per-token weight w (an importance-sampling
    correction) multiplies m, and the mask's own counts stay the denominators: the row means of
    "seq-mean-token-mean" divide the weights by each row's token count up front.  ``normalizer`` must be
    explicit (the frameworks' denominators, computed from ``mask``).
    """
    mask = mask.to(torch.promote_types(weights.dtype, torch.float32))
    token_weights = mask * weights.detach()
    if mode == "seq-mean-token-mean":
        token_weights = token_weights / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
        mode = "seq-mean-token-sum"
    return mode, token_weights, normalizer
