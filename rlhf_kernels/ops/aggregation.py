"""The one aggregation of a [B, T] per-token loss into a scalar, shared by every loss over [B, T].

With L the per-token loss, m the mask (0/1; non-negative weights work the same way), T the padded row
length, n_b = Σ_t m the tokens of row b, N = Σ_b n_b the tokens of the batch and R the number of rows
with n_b > 0 (fully masked rows are left out of every sequence mean), the modes mean what verl 0.9.1's
``agg_loss`` means:

    "token-mean"               Σ_b Σ_t L·m / N
    "token-sum"                Σ_b Σ_t L·m
    "seq-mean-token-sum"       Σ_b Σ_t L·m / R
    "seq-mean-token-mean"      Σ_b [Σ_t L·m / n_b] / R          (an empty row contributes 0)
    "seq-mean-token-sum-norm"  Σ_b Σ_t L·m / (R·T)

Worked example, B = 3, T = 4, row sums of L·m = (2, 0, 6) with n_b = (2, 0, 3): N = 5, R = 2, so
token-mean 8/5, token-sum 8, seq-mean-token-sum 8/2, seq-mean-token-mean (2/2 + 6/3)/2, and
seq-mean-token-sum-norm 8/(2·4).

``normalizer`` replaces the whole denominator (N, 1, R, R or R·T): give every micro-batch the global
denominator and the micro-batch losses add up to the loss of the whole batch, gradients included
(docs/aggregation.md says what to pass per mode under gradient accumulation and data parallelism).

A batch without a valid token has loss 0 and gradient exactly 0: the default denominators are taken as
1 where they would be 0 (verl divides 0 by 0 there).  A normalizer of 0 (a 0-dim tensor, never read on
the host) gives 0/0 = NaN, as verl does, and still a gradient of exactly 0 at every masked position.
Masked positions (m = 0) contribute exactly 0 whatever L holds there (NaN or inf padding included) and
receive exactly zero gradient.

Every mode only needs per-row partial sums (Σ_t L·m and Σ_t m), so fused kernels produce those and call
:func:`agg_row_sums`; :func:`agg_loss` is the same thing for a materialised [B, T] loss.  Plain torch:
no host sync, traceable by ``torch.compile``.
"""

from __future__ import annotations

import numbers

import torch

from .._validation import check_float_tensor, check_mask_tensor, check_ndim, check_same_device, check_shape

TOKEN_MEAN = "token-mean"
TOKEN_SUM = "token-sum"
SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"
#: Accepted aggregation modes, in verl's order.
LOSS_AGG_MODES = (TOKEN_MEAN, TOKEN_SUM, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM_NORM)

Normalizer = float | int | torch.Tensor | None

#: Dtypes of per-token inputs: float64 is accepted too (gradcheck, oracles) and is then the compute
#: precision; everything else computes in fp32.
LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_loss_agg(mode: object, name: str = "loss_agg") -> str:
    """``mode`` if it is one of :data:`LOSS_AGG_MODES`, else a ``ValueError`` naming the argument
    ``name`` (``loss_agg`` for the losses, ``mode`` for :func:`agg_loss`) and the accepted modes."""
    if not isinstance(mode, str) or mode not in LOSS_AGG_MODES:
        raise ValueError(f"{name} must be one of {LOSS_AGG_MODES}; got {mode!r}")
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


def check_token_inputs(mask: object, **tensors: torch.Tensor) -> None:
    """[B, T] floating tensors of one dtype and a [B, T] mask, on one device, B, T >= 1: the checks of
    every fused loss over tokens (the first keyword names the reference shape and dtype)."""
    (first_name, first), *others = tensors.items()
    for name, tensor in tensors.items():
        check_float_tensor(name, tensor, LOSS_DTYPES)
    check_ndim(first_name, first, 2, "[B, T]")
    for name, tensor in others:
        check_shape(name, tensor, first.shape, f"{first_name}.shape")
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}); got {tensor.dtype}")
    check_mask_tensor("mask", mask)
    check_shape("mask", mask, first.shape, f"{first_name}.shape")
    check_same_device(**tensors, mask=mask)


def _divide(numerator: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    if isinstance(denominator, torch.Tensor):
        # A 0-dim CPU tensor divides a CUDA tensor without a copy or a sync.
        return numerator / denominator.to(dtype=numerator.dtype)
    return numerator / denominator


def _one_if_zero(count: torch.Tensor) -> torch.Tensor:
    """``count`` where it is > 0, else 1: an empty batch or row divides 0 by 1."""
    return torch.where(count > 0, count, torch.ones_like(count))


def default_denominator(row_mask_sums: torch.Tensor, mode: str, seq_len: int) -> torch.Tensor | float:
    """The denominator of ``mode`` when no ``normalizer`` is given (see the module docstring), from the
    per-row token counts ``row_mask_sums`` [B]: N, 1, R, R or R·T, with 0 taken as 1."""
    if mode == TOKEN_MEAN:
        return _one_if_zero(row_mask_sums.sum())
    if mode == TOKEN_SUM:
        return 1.0
    rows = _one_if_zero((row_mask_sums > 0).to(row_mask_sums.dtype).sum())
    return rows * seq_len if mode == SEQ_MEAN_TOKEN_SUM_NORM else rows


def agg_row_sums(
    row_loss_sums: torch.Tensor,
    row_mask_sums: torch.Tensor,
    mode: str,
    seq_len: int,
    normalizer: Normalizer = None,
) -> torch.Tensor:
    """The aggregated loss (0-dim, the dtype of ``row_loss_sums``) from per-row sums.

    Args:
        row_loss_sums: [B] fp32 (fp64), Σ_t L·m of each row (differentiable); exactly 0 for an empty row.
        row_mask_sums: [B], Σ_t m of each row.
        mode: one of :data:`LOSS_AGG_MODES` (validated by the caller's public function).
        seq_len: T, the padded row length (the "seq-mean-token-sum-norm" denominator is R·T).
        normalizer: replaces the whole denominator (see the module docstring); None keeps it.
    """
    mode = check_loss_agg(mode, "mode")
    normalizer = check_normalizer(normalizer)
    if mode == SEQ_MEAN_TOKEN_MEAN:
        numerator = (row_loss_sums / _one_if_zero(row_mask_sums).to(row_loss_sums.dtype)).sum()
    else:
        numerator = row_loss_sums.sum()
    if normalizer is None:
        normalizer = default_denominator(row_mask_sums, mode, seq_len)
    return _divide(numerator, normalizer)


def masked_row_sums(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t L·m, Σ_t m) per row in fp32 (fp64 for fp64 input); positions with m = 0 contribute exactly 0
    and receive exactly zero gradient, whatever ``per_token`` holds there."""
    dtype = torch.promote_types(per_token.dtype, torch.float32)
    weights = mask.to(dtype)
    contributions = torch.where(weights != 0, per_token.to(dtype) * weights, 0.0)
    return contributions.sum(dim=-1), weights.sum(dim=-1)


def chunk_totals(partials: torch.Tensor) -> torch.Tensor:
    """[..., chunks] partial sums written by a kernel -> [...]; no launch when there is one chunk (the
    usual case: a row is split into several programs only when there are few rows)."""
    return partials.sum(dim=-1) if partials.shape[-1] > 1 else partials.squeeze(-1)


def agg_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = TOKEN_MEAN, normalizer: Normalizer = None
) -> torch.Tensor:
    """Aggregates a per-token loss [B, T] under ``mask`` [B, T] into a 0-dim fp32 loss (fp64 for fp64).

    ``mode`` is one of :data:`LOSS_AGG_MODES` (verl 0.9.1's meanings; see the module docstring), and
    ``normalizer`` replaces its denominator.  Differentiable with respect to ``per_token``; masked
    positions contribute 0 and receive zero gradient, whatever they hold; a batch without a valid token
    gives 0 (gradient 0).
    """
    check_float_tensor("per_token", per_token, LOSS_DTYPES)
    check_mask_tensor("mask", mask)
    check_ndim("per_token", per_token, 2, "[B, T]")
    check_shape("mask", mask, per_token.shape, "per_token.shape")
    check_same_device(per_token=per_token, mask=mask)
    check_loss_agg(mode, "mode")
    row_loss_sums, row_mask_sums = masked_row_sums(per_token, mask)
    return agg_row_sums(row_loss_sums, row_mask_sums, mode, per_token.shape[-1], normalizer)


__all__ = [
    "LOSS_AGG_MODES",
    "LOSS_DTYPES",
    "SEQ_MEAN_TOKEN_MEAN",
    "SEQ_MEAN_TOKEN_SUM",
    "SEQ_MEAN_TOKEN_SUM_NORM",
    "TOKEN_MEAN",
    "TOKEN_SUM",
    "agg_loss",
    "agg_row_sums",
    "check_loss_agg",
    "check_normalizer",
    "check_token_inputs",
    "chunk_totals",
    "default_denominator",
    "masked_row_sums",
]
