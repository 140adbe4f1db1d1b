"""Sequence-level advantages: group-relative advantages (GRPO, RLOO, Dr. GRPO) and their broadcast to
tokens.  Plain PyTorch over [B] (nothing to fuse), differentiable, no kernels and no dispatch family.

This module also re-exports the token-level families it used to hold, so that
``from rlhf_kernels.ops.advantages import compute_gae`` keeps working: GAE is ``ops/gae.py``, masked
whitening ``ops/whiten.py``, KL reward shaping ``ops/token_rewards.py``.  They are imported on first
use (PEP 562), so ``rlhf_kernels.group_advantages`` does not import the Triton kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from .._validation import (
    check_at_least,
    check_choice,
    check_float_tensor,
    check_int,
    check_mask_tensor,
    check_ndim,
    check_same_device,
    check_shape,
)

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports them on first use
    from .gae import compute_gae
    from .token_rewards import token_level_rewards
    from .whiten import masked_whiten

__all__ = ["broadcast_to_tokens", "compute_gae", "group_advantages", "masked_whiten", "token_level_rewards"]

# Names that moved to their family's module: name -> module (relative to rlhf_kernels.ops).
_MOVED = {"compute_gae": ".gae", "masked_whiten": ".whiten", "token_level_rewards": ".token_rewards"}

GROUP_NORMS = ("std", "none")


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    norm: str = "std",
    eps: float = 1e-6,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """Group-relative advantages (GRPO, RLOO, Dr. GRPO) of sequence scores.

    ``scores`` [B] holds consecutive groups of ``group_size`` samples of one prompt.  With the group's
    mean μ_g and unbiased standard deviation σ_g:

        baseline_i = μ_g, or with ``leave_one_out`` the mean of the other members (G·μ_g − s_i)/(G − 1)
        A_i = (s_i − baseline_i) / (σ_g + eps)  (norm="std"),   A_i = s_i − baseline_i  (norm="none")

    GRPO is the default; RLOO is ``leave_one_out=True, norm="none"``; Dr. GRPO is ``norm="none"``.

    Example: scores (0, 1, 2), group_size 3 → σ = 1, A = (−1, 0, 1)/(1 + 1e-6).

    Returns float32 [B]; differentiable (plain PyTorch).  ``group_size`` must divide B, and must be at
    least 2 when σ_g or a leave-one-out baseline is needed (both are undefined for one sample).  An
    empty ``scores`` gives an empty result (and no warning).
    """
    check_float_tensor("scores", scores)
    check_ndim("scores", scores, 1, "[B]")
    group_size = check_int("group_size", group_size)
    norm = check_choice("norm", norm, GROUP_NORMS)
    eps = check_at_least("eps", eps, 0.0)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of scores (scores.shape[0] = {scores.shape[0]}); "
            f"got {group_size}"
        )
    if group_size < 2 and (norm == "std" or leave_one_out):
        raise ValueError(
            "group_size must be >= 2 with norm='std' or leave_one_out=True (a group of one sample has no "
            f"standard deviation and no other members); got {group_size}"
        )
    groups = scores.to(torch.float32).view(-1, group_size)
    if leave_one_out:
        baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    else:
        baseline = groups.mean(-1, keepdim=True)
    advantages = groups - baseline
    # No groups, nothing to divide (torch.std of a [0, G] tensor warns about its degrees of freedom).
    if norm == "std" and groups.shape[0] > 0:
        advantages = advantages / (groups.std(-1, keepdim=True) + eps)
    return advantages.view(-1)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence values [B] onto tokens: out[b, t] = advantages[b]·m[b, t] where m ≠ 0, else 0.

    ``mask`` [B, T] bool, integer or floating.  Returns float32 [B, T]; differentiable; masked positions
    are exactly 0 even when the sequence value is NaN.
    """
    check_float_tensor("advantages", advantages)
    check_ndim("advantages", advantages, 1, "[B]")
    check_mask_tensor("mask", mask)
    check_ndim("mask", mask, 2, "[B, T]")
    check_shape("advantages", advantages, mask.shape[:1], "mask.shape[:1]")
    check_same_device(advantages=advantages, mask=mask)
    m = mask.to(torch.float32)
    return torch.where(m != 0, advantages.to(torch.float32).unsqueeze(-1) * m, 0.0)


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
