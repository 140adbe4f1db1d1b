"""Unfused "policy loss from hidden states" idioms: the logits materialised (verl's / OpenRLHF's eager
path: lm_head, fp32 cast, log_softmax, gather), then verl's policy-loss math or rlhf_kernels' fused
policy loss; and Liger's fused linear GRPO loss when liger-kernel is installed (Triton: CUDA only)."""

from __future__ import annotations

from .linear_logprobs import eager_linear_logprobs
from .losses import verl_compute_policy_loss


def eager_verl_policy_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, clip_low=0.2):
    """verl's actor without fusion: logits [B, T, V] → fp32 log-probs → ``compute_policy_loss`` (vanilla,
    dual clip 3, token-mean)."""
    logprobs = eager_linear_logprobs(hidden, weight, labels)
    return verl_compute_policy_loss(old_logprobs, logprobs, advantages, mask, cliprange=clip_low)[0]


def eager_logits_fused_policy_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, clip_low=0.2):
    """The logits materialised, then rlhf_kernels' fused ``vanilla_policy_loss`` on the log-probs."""
    from rlhf_kernels.ops.policy_losses import vanilla_policy_loss

    logprobs = eager_linear_logprobs(hidden, weight, labels)
    return vanilla_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low)[0]


def liger_fused_linear_grpo_loss(clip_low=0.2):
    """Liger's ``LigerFusedLinearGRPOLoss`` (loss_type "bnpo": token mean; no reference model, no dual
    clip; advantages per sequence) as fn(hidden, weight, labels, old, advantages [B, T], mask), or None
    when liger-kernel is not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    loss = LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, loss_type="bnpo", epsilon_low=clip_low, epsilon_high=clip_low
    )

    def fn(hidden, weight, labels, old_logprobs, advantages, mask):
        return loss(hidden, weight, labels, mask, advantages[:, 0], old_per_token_logps=old_logprobs)[0]

    return fn
