"""The one aggregation of a [B, T] per-token loss into a scalar, shared by every loss over [B, T].

With L the per-token loss, m the mask (0/1; any non-negative weights work the same way), B rows and
T columns:

    "token-mean"               Σ_b Σ_t L·m / max(Σ_b Σ_t m, 1)
    "seq-mean-token-sum"       Σ_b Σ_t L·m / B
    "seq-mean-token-mean"      Σ_b [Σ_t L·m / max(Σ_t m, 1)] / B
    "seq-mean-token-sum-norm"  Σ_b Σ_t L·m / T

``normalizer`` replaces the denominator (the token count, B, B, or T respectively), so that the losses of
micro-batches, each divided by the global count, add up to the loss of the whole batch under gradient
accumulation or data parallelism.

Masked positions (m = 0) contribute exactly 0 whatever L holds there (NaN or inf padding included) and
receive exactly zero gradient.  An empty row contributes 0 (its token mean is 0, not 0/0).

Every mode only needs per-row partial sums (Σ_t L·m and Σ_t m), so fused kernels produce those and call
:func:`agg_row_sums`; :func:`agg_loss` is the same thing for a materialised [B, T] loss.  Plain torch:
no host sync, traceable by ``torch.compile``.
"""

from __future__ import annotations

import numbers

import torch

from .._validation import check_float_tensor, check_mask_tensor, check_ndim, check_same_device, check_shape

TOKEN_MEAN = "token-mean"
SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"
LOSS_AGG_MODES = (TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM_NORM)

Normalizer = float | int | torch.Tensor | None


def check_loss_agg(mode: object) -> str:
    """``mode`` if it is one of :data:`LOSS_AGG_MODES`, else a ``ValueError`` naming them."""
    if not isinstance(mode, str) or mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}; got {mode!r}")
    return mode


def check_normalizer(normalizer: object) -> Normalizer:
    """None, a finite number > 0, or a 0-dim floating/integer tensor (not read: that would sync)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise ValueError(
                "normalizer must be a number > 0 or a 0-dim real tensor; got a tensor of shape "
                f"{tuple(normalizer.shape)} and dtype {normalizer.dtype}"
            )
        return normalizer
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number > 0 or a 0-dim tensor; got {type(normalizer).__name__}")
    value = float(normalizer)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"normalizer must be a finite number > 0; got {normalizer}")
    return value


def _divide(numerator: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    if isinstance(denominator, torch.Tensor):
        # A 0-dim CPU tensor divides a CUDA tensor without a copy or a sync.
        return numerator / denominator.to(dtype=numerator.dtype)
    return numerator / denominator


def agg_row_sums(
    row_loss_sums: torch.Tensor,
    row_mask_sums: torch.Tensor,
    mode: str,
    seq_len: int,
    normalizer: Normalizer = None,
) -> torch.Tensor:
    """The aggregated loss (0-dim fp32) from per-row sums.

    Args:
        row_loss_sums: [B] fp32, Σ_t L·m of each row (differentiable).
        row_mask_sums: [B] fp32, Σ_t m of each row.
        mode: one of :data:`LOSS_AGG_MODES`.
        seq_len: T, the padded row length (the "seq-mean-token-sum-norm" denominator).
        normalizer: replaces the denominator (see the module docstring); None keeps it.
    """
    mode = check_loss_agg(mode)
    normalizer = check_normalizer(normalizer)
    if mode == TOKEN_MEAN:
        denominator = row_mask_sums.sum().clamp(min=1.0) if normalizer is None else normalizer
        return _divide(row_loss_sums.sum(), denominator)
    if mode == SEQ_MEAN_TOKEN_SUM:
        return _divide(row_loss_sums.sum(), row_loss_sums.shape[0] if normalizer is None else normalizer)
    if mode == SEQ_MEAN_TOKEN_MEAN:
        per_row = row_loss_sums / row_mask_sums.clamp(min=1.0)
        return _divide(per_row.sum(), row_loss_sums.shape[0] if normalizer is None else normalizer)
    return _divide(row_loss_sums.sum(), seq_len if normalizer is None else normalizer)


def masked_row_sums(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t L·m, Σ_t m) per row in fp32 (fp64 for fp64 input); positions with m = 0 contribute exactly 0."""
    dtype = torch.promote_types(per_token.dtype, torch.float32)
    weights = mask.to(dtype)
    contributions = torch.where(weights != 0, per_token.to(dtype) * weights, 0.0)
    return contributions.sum(dim=-1), weights.sum(dim=-1)


def agg_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = TOKEN_MEAN, normalizer: Normalizer = None
) -> torch.Tensor:
    """Aggregates a per-token loss [B, T] under ``mask`` [B, T] into a 0-dim fp32 loss (fp64 for fp64).

    See the module docstring for the modes and ``normalizer``.  Differentiable with respect to
    ``per_token``; masked positions contribute 0 and receive zero gradient, whatever they hold.
    """
    check_float_tensor("per_token", per_token, (torch.float64, torch.float32, torch.bfloat16, torch.float16))
    check_mask_tensor("mask", mask)
    check_ndim("per_token", per_token, 2, "[B, T]")
    check_shape("mask", mask, per_token.shape, "per_token.shape")
    check_same_device(per_token=per_token, mask=mask)
    check_loss_agg(mode)
    row_loss_sums, row_mask_sums = masked_row_sums(per_token, mask)
    return agg_row_sums(row_loss_sums, row_mask_sums, mode, per_token.shape[-1], normalizer)


__all__ = [
    "LOSS_AGG_MODES",
    "SEQ_MEAN_TOKEN_MEAN",
    "SEQ_MEAN_TOKEN_SUM",
    "SEQ_MEAN_TOKEN_SUM_NORM",
    "TOKEN_MEAN",
    "agg_loss",
    "agg_row_sums",
    "check_loss_agg",
    "check_normalizer",
    "masked_row_sums",
]
