"""OpenRLHF's hot-path functions and losses with OpenRLHF's names, signatures, defaults and results,
on rlhf-kernels' fused ops.

Follows OpenRLHF/OpenRLHF main (July 2026): ``openrlhf.models.utils`` (``log_probs_from_logits``,
``compute_approx_kl``, ``compute_entropy``), ``openrlhf.models.loss`` (``PolicyLoss``, ``ValueLoss``,
``PairWiseLoss``, ``LogExpLoss``) and the experience maker's ``get_advantages_and_returns``.  Swap::

    from rlhf_kernels.compat.openrlhf import PolicyLoss, ValueLoss, log_probs_from_logits

What differs from OpenRLHF, on purpose (each also said in the docstring concerned):

* Losses are fp32 (fp64 for fp64 inputs), computed in fp32, where OpenRLHF returns the inputs' dtype.
* ``PolicyLoss``'s ``ppo_kl`` metric uses the log-ratio clamped to ±20 (the one the loss uses);
  OpenRLHF averages the unclamped one.  They differ only for tokens with |lp − old| > 20.
* ``LogExpLoss`` is finite where OpenRLHF's literal log(1 + exp(r − c)) overflows (r − c > 88 in fp32).
* ``PolicyLoss`` implements ``policy_loss_type="ppo"`` without vLLM importance-sampling correction;
  the other modes raise ``NotImplementedError`` at construction.

No function here synchronises the device, except the label range check of ``log_probs_from_logits`` on
CUDA (``RLHF_KERNELS_CHECK_INDICES=0`` turns it off).

Reproduced on purpose because a drop-in must not change results: NaN for an all-masked batch (OpenRLHF's
masked mean has no epsilon), ``log_probs_from_logits`` dividing the logits in place by the temperature
(OpenRLHF then computes the entropy from those same, divided, logits), and the ±10 clamp of every KL
estimator in ``compute_approx_kl``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.advantages import compute_gae
from ..ops.aggregation import SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN
from ..ops.kl import kl_penalty as _kl_penalty
from ..ops.logprobs import entropy_from_logits as _entropy
from ..ops.logprobs import logprobs_from_logits as _logprobs
from ..ops.ppo_losses import ppo_policy_loss, ppo_value_loss
from ..ops.reward_losses import pairwise_reward_loss

__all__ = [
    "LogExpLoss",
    "PairWiseLoss",
    "PolicyLoss",
    "ValueLoss",
    "compute_approx_kl",
    "compute_entropy",
    "get_advantages_and_returns",
    "log_probs_from_logits",
]

_KL_ESTIMATORS = ("k1", "k2", "k3")


def _in_dtype_of(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return result if result.dtype == like.dtype else result.to(like.dtype)


def _common_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _mask_or_ones(action_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if action_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return action_mask


def _aggregation(
    mask: torch.Tensor, token_level_loss: bool, dp_size: int, batch_num_tokens, global_batch_size
) -> tuple[str, torch.Tensor | float]:
    """OpenRLHF's aggregate_loss as (library mode, normalizer).

    token level:   Σ L·m / Σm (no epsilon: an all-masked batch is NaN), or Σ L·m / batch_num_tokens · dp
    sample level:  Σ_b [Σ_t L·m / n_b] over non-empty rows / their number, or / global_batch_size · dp
    """
    if token_level_loss:
        if batch_num_tokens is None:
            return TOKEN_MEAN, mask.sum()
        return TOKEN_MEAN, batch_num_tokens / dp_size
    if global_batch_size is None:
        return SEQ_MEAN_TOKEN_MEAN, (mask.sum(dim=-1) > 0).sum()
    return SEQ_MEAN_TOKEN_MEAN, global_batch_size / dp_size


def _nan_if_empty(metric: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's masked_mean is Σ/Σm: 0/0 = NaN for an all-masked batch (the library's metrics say 0)."""
    return torch.where(tokens == 0, torch.full_like(metric, float("nan")), metric)


# ---------------------------------------------------------------------------------------------------
# openrlhf.models.utils
# ---------------------------------------------------------------------------------------------------
def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of ``labels`` under softmax(logits / temperature), in the logits' dtype.

    As OpenRLHF, ``logits`` is divided in place by ``temperature`` when it is not 1 (OpenRLHF's actor
    then computes the entropy from the same, divided, logits; keeping that side effect keeps those
    entropies unchanged).  That division is one extra pass over the logits; callers that do not rely on
    it should call ``rlhf_kernels.logprobs_from_logits(logits, labels, temperature=t)``, which applies
    the temperature inside the fused kernel for free.  Label −100 gives 0 (flash-attn's ignore index).
    """
    if temperature != 1.0:
        logits.div_(temperature)
    return _in_dtype_of(_logprobs(logits, labels, temperature=1.0, ignore_index=-100), logits)


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    kl_estimator: str = "k1",
    *,
    action_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Schulman's KL estimators between the policy and the base policy, clamped to [−10, 10] (all three,
    as OpenRLHF), fp32:  k1 = δ,  k2 = δ²/2,  k3 = e^{−δ} − 1 + δ,  δ = log_probs − log_probs_base.

    ``action_mask`` (keyword, from older OpenRLHF versions) multiplies the result.  An unknown estimator
    raises ``ValueError`` (OpenRLHF fails with an ``UnboundLocalError``).
    """
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {_KL_ESTIMATORS}; got {kl_estimator!r}")
    kl = _kl_penalty(log_probs, log_probs_base, kl_estimator).clamp(min=-10, max=10).float()
    return kl if action_mask is None else kl * action_mask


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp(x) − Σ softmax(x)·x over the last dimension, in the logits' dtype (fused, fp32 math)."""
    return _in_dtype_of(_entropy(logits, temperature=1.0), logits)


# ---------------------------------------------------------------------------------------------------
# openrlhf.models.loss
# ---------------------------------------------------------------------------------------------------
class PolicyLoss(nn.Module):
    """PPO clipped surrogate (optionally dual-clipped), fused forward and backward.

    forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None) -> (loss, clip_ratio, ppo_kl, vllm_kl)

    ℓ = clamp(lp − old, −20, 20), r = e^ℓ, L = −min(r·A, clamp(r, 1 − ε_low, 1 + ε_high)·A), and with
    ``dual_clip`` c: L = −max(min(...), c·A) where A < 0.  Aggregated per token (``token_level_loss``) or
    per sequence (empty sequences excluded), with OpenRLHF's global-batch arguments.  ``vllm_kl`` is None
    (no vLLM importance-sampling correction).  ``ppo_kl`` averages −ℓ with ℓ clamped (see the module
    docstring).
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        enable_vllm_is_correction: bool = False,
        vllm_is_truncated_threshold: list | None = None,
        vllm_is_correction_type: str = "tis",
    ) -> None:
        super().__init__()
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if vllm_is_correction_type not in ("tis", "icepop", "seq-mask-tis"):
            raise ValueError(
                f"Invalid vllm_is_correction_type: {vllm_is_correction_type}, "
                "must be one of tis/icepop/seq-mask-tis"
            )
        if policy_loss_type != "ppo" or enable_vllm_is_correction:
            raise NotImplementedError(
                "rlhf_kernels.compat.openrlhf.PolicyLoss fuses policy_loss_type='ppo' without vLLM "
                f"importance-sampling correction; got policy_loss_type={policy_loss_type!r}, "
                f"enable_vllm_is_correction={enable_vllm_is_correction} (use OpenRLHF's PolicyLoss for those)"
            )
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss
        self.policy_loss_type = policy_loss_type
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self.vllm_is_correction_type = vllm_is_correction_type

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        mask = _mask_or_ones(action_mask, log_probs)
        mode, normalizer = _aggregation(
            mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
        )
        log_probs, old_log_probs, advantages = _common_dtype(log_probs, old_log_probs, advantages)
        loss, metrics = ppo_policy_loss(
            log_probs, old_log_probs, advantages, mask,
            clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip,
            loss_agg=mode, normalizer=normalizer,
        )
        tokens = normalizer if self.token_level_loss and batch_num_tokens is None else mask.sum()
        clip_ratio = _nan_if_empty(metrics["clipfrac"], tokens)
        ppo_kl = _nan_if_empty(metrics["approx_kl"], tokens)
        return loss, clip_ratio, ppo_kl, None


class ValueLoss(nn.Module):
    """½ · aggregate(max((v_clip − R)², (v − R)²)), v_clip = v_old + clamp(v − v_old, ±clip_eps); without
    ``clip_eps``, ½ · aggregate((v − R)²).  Fused forward and backward; gradient to ``values`` only.

    forward(values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
    global_batch_size=None) -> loss
    """

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = _mask_or_ones(action_mask, values)
        mode, normalizer = _aggregation(
            mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
        )
        values, old_values, returns = _common_dtype(values, old_values, returns)
        loss, _ = ppo_value_loss(
            values, old_values, returns, mask, clip=self.clip_eps, loss_agg=mode, normalizer=normalizer
        )
        return loss


def _margin_like(margin: torch.Tensor | float | None, chosen: torch.Tensor):
    if isinstance(margin, torch.Tensor):
        if margin.numel() != chosen.numel():
            margin = margin.expand(chosen.shape)  # raises for shapes that do not broadcast to the rewards
        return margin.reshape(chosen.shape)
    return margin


class PairWiseLoss(nn.Module):
    """Bradley-Terry reward-model loss mean(−log σ(c − r − margin)), fused and stable for any gap."""

    def forward(
        self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        margin = _margin_like(margin, chosen_reward)
        loss, _ = pairwise_reward_loss(chosen_reward, reject_reward, margin=margin)
        return loss


class LogExpLoss(nn.Module):
    """mean(log(1 + e^{r − c})) (Anthropic's form, https://arxiv.org/abs/2204.05862); ``margin`` is
    ignored, as in OpenRLHF.  Equal to :class:`PairWiseLoss` without margin, evaluated stably: finite
    where OpenRLHF's literal formula overflows to inf (r − c beyond ~88 in fp32)."""

    def forward(
        self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        loss, _ = pairwise_reward_loss(chosen_reward, reject_reward)
        return loss


# ---------------------------------------------------------------------------------------------------
# openrlhf.trainer.ppo_utils.experience_maker
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def get_advantages_and_returns(
    values: torch.Tensor | list[torch.Tensor],
    rewards: torch.Tensor | list[torch.Tensor],
    action_mask: torch.Tensor | None,
    gamma: float,
    lambd: float,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """GAE with OpenRLHF's masking: values and rewards are zeroed where ``action_mask`` is 0, then the
    plain recurrence with V_T = 0; returns = A + V·m.  One fused pass instead of a reverse Python loop.

    A free function of the experience maker's method (no ``self``); to patch it in::

        ExperienceMaker.get_advantages_and_returns = staticmethod(get_advantages_and_returns)

    Lists (packed samples: one 1-D tensor per sample) are handled sample by sample, as OpenRLHF does;
    ``action_mask`` must then be None.  Outputs are fp32 (fp64 inputs are computed in fp32).
    """
    if isinstance(values, list):
        if action_mask is not None:
            raise ValueError("action_mask must be None when values and rewards are lists of packed samples")
        pairs = [get_advantages_and_returns(v.unsqueeze(0), r.unsqueeze(0), None, gamma, lambd)
                 for v, r in zip(values, rewards)]
        return [a.squeeze(0) for a, _ in pairs], [r.squeeze(0) for _, r in pairs]
    mask = _mask_or_ones(action_mask, values)
    # The advantage kernels compute in fp32; fp64 inputs (which OpenRLHF's loop accepts) are rounded once.
    values = values.float() if values.dtype == torch.float64 else values
    rewards = rewards.float() if rewards.dtype == torch.float64 else rewards
    return compute_gae(rewards, values, mask, gamma, lambd, mask_mode="zero")
