"""TRL's hot-path functions with TRL's names, signatures, defaults and results, on rlhf-kernels' fused ops.

Follows huggingface/trl main: ``trl.trainer.utils.selective_log_softmax`` (index of shape (...) or
(..., K)), ``trl.trainer.utils.entropy_from_logits`` and the loss of ``RewardTrainer.compute_loss``
(Bradley-Terry with an optional margin and ``center_rewards_coefficient``).  Swap::

    from rlhf_kernels.compat.trl import selective_log_softmax, entropy_from_logits

or patch a trainer module (``trl.trainer.grpo_trainer.selective_log_softmax = selective_log_softmax``).

What differs from TRL, on purpose: the log-softmax is computed in fp32 by one fused kernel and rounded
to the logits' dtype at the end (TRL's bf16 path also rounds intermediate values); an index of −100 in
the (...)-shaped form gives 0 with no gradient where TRL's gather raises; and the reward loss squeezes
a trailing reward dimension of 1 (see :func:`reward_trainer_loss`).  Nothing here synchronises the
device except the label range check of ``selective_log_softmax`` on CUDA (``RLHF_KERNELS_CHECK_INDICES=0``
turns it off; unchecked out-of-range indices give NaN, never a wild read).
"""

from __future__ import annotations

import torch

from ..ops.logprobs import entropy_from_logits as _entropy
from ..ops.logprobs import logprobs_from_logits as _logprobs
from ..ops.reward_losses import pairwise_reward_loss

__all__ = ["entropy_from_logits", "reward_trainer_loss", "selective_log_softmax"]


def _in_dtype_of(result: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return result if result.dtype == logits.dtype else result.to(logits.dtype)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gather(log_softmax(logits), -1, index)``, without materialising the log-softmax.

    Args:
        logits: [..., V] in any floating dtype.
        index: [...] (one token per position) or [..., K] (K tokens per position, e.g. top-K), int64.

    Returns:
        Log-probabilities of ``index``'s shape in the logits' dtype, as TRL.  Differentiable with respect
        to ``logits``.  For [..., K] the log-sum-exp comes from one fused pass (for the first of the K
        indices) and the K log-probs are x_k − x_first + logp_first, so the cost does not grow with K.
    """
    if index.dim() == logits.dim() - 1:
        return _in_dtype_of(_logprobs(logits, index, temperature=1.0, ignore_index=-100), logits)
    first = _logprobs(logits, index[..., 0].contiguous(), temperature=1.0, ignore_index=-100)
    selected = logits.gather(-1, index).to(first.dtype)
    return _in_dtype_of(selected - selected[..., :1] + first.unsqueeze(-1), logits)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension, ``logits.shape[:-1]``, in the logits' dtype.

    ``chunk_size`` is accepted for compatibility and unused: the fused kernel streams each row once and
    never holds a [chunk, V] softmax, so memory is O(rows) whatever it is.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    return _in_dtype_of(_entropy(logits, temperature=1.0), logits)


def _as_rewards(rewards: torch.Tensor) -> torch.Tensor:
    # A reward head's logits are [N, 1]; TRL squeezes them (older versions did not, and then broadcast
    # an [N] margin against [N, 1] into an [N, N] loss).
    return rewards.squeeze(-1) if rewards.dim() == 2 and rewards.shape[-1] == 1 else rewards


def reward_trainer_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
    *,
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of TRL's ``RewardTrainer.compute_loss``, fused:

        loss = mean(−log σ(c − r − margin)) + center_rewards_coefficient · mean((c + r)²)

    Args:
        rewards_chosen, rewards_rejected: [N] or [N, 1] reward-model outputs (same shape and dtype).
        margin: None, a number, or a tensor with N elements (``inputs["margin"]``); receives no gradient.
        center_rewards_coefficient: ``RewardConfig.center_rewards_coefficient`` (None: no centring term).
        return_metrics: also return TRL's logged metrics ``accuracy`` = mean(c > r) and
            ``margin`` = mean(c − r), 0-dim fp32 tensors (no host sync).

    Returns:
        The 0-dim loss (fp32; fp64 for fp64 rewards), differentiable with respect to both rewards; stable
        for any reward gap (−log σ is evaluated as a softplus, never as log of an underflowed σ).
    """
    chosen = _as_rewards(rewards_chosen)
    rejected = _as_rewards(rewards_rejected)
    if isinstance(margin, torch.Tensor):
        if margin.numel() != chosen.numel():
            raise ValueError(
                f"margin must have one element per pair ({chosen.numel()}); got shape {tuple(margin.shape)}"
            )
        margin = margin.reshape(chosen.shape)
    loss, metrics = pairwise_reward_loss(
        chosen, rejected, margin=margin, center_coef=center_rewards_coefficient
    )
    if return_metrics:
        return loss, {"accuracy": metrics["accuracy"], "margin": metrics["margin_mean"]}
    return loss
