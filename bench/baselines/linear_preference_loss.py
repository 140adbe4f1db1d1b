"""Eager preference-loss-from-hidden-states idioms: TRL's ``concatenated_forward`` (the [S, T, V] logits
materialised, fp32 log-softmax, label gather, masked sums per sequence) followed by TRL's DPO sigmoid line,
and Liger's fused linear DPO when it is installed (CUDA only)."""

from __future__ import annotations

import torch

from .linear_logprobs import eager_linear_logprobs
from .preference_losses import BETA, trl_dpo_sigmoid


def eager_sequence_logps(hidden, weight, labels, ignore_index: int = -100):
    """[S] Σ_t log p(y_t) over the counted tokens, through materialised logits (autograd keeps them)."""
    counted = labels != ignore_index
    logprobs = eager_linear_logprobs(hidden, weight, torch.where(counted, labels, 0))
    return (logprobs * counted).sum(dim=-1)


def eager_dpo_sigmoid(hidden, weight, labels, ref_logps):
    """TRL's DPO (sigmoid, β = BETA) on eager sequence sums: chosen rows first, then rejected rows."""
    logps = eager_sequence_logps(hidden, weight, labels)
    b = logps.shape[0] // 2
    return trl_dpo_sigmoid(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:])


def liger_fused_linear_dpo():
    """Liger's fused linear DPO as (hidden, weight, labels, ref_logps) -> loss, or None when liger-kernel is
    not installed (it needs CUDA).  A timing peer only: Liger takes a reference model's hidden states, not
    sums, so it runs without one (``use_ref_model=False``: reference log-probs 0) and ``ref_logps`` is
    unused.  Not run on this machine (liger-kernel absent), so unverified here."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    loss = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)
    return lambda hidden, weight, labels, ref_logps: loss(weight, hidden, labels)[0]
