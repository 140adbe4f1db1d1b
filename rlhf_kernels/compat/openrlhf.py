"""OpenRLHF 0.11.2's hot-path functions and losses, with OpenRLHF's names, signatures and results, on
rlhf-kernels' fused ops.

Enable them in every process that builds OpenRLHF's losses (the driver and each Ray actor; see
docs/compat-openrlhf.md)::

    import rlhf_kernels.compat.openrlhf
    rlhf_kernels.compat.openrlhf.patch()     # checks openrlhf == 0.11.2; unpatch() undoes it

``patch()`` replaces, in ``openrlhf.models.loss`` / ``openrlhf.models`` (and wherever a loaded OpenRLHF
module imported them by name): ``PolicyLoss``, ``ValueLoss``, ``PairWiseLoss``, ``LogExpLoss``,
``aggregate_loss``; in ``openrlhf.models.utils``: ``compute_approx_kl``, ``compute_reward``,
``masked_mean``, ``masked_normalize``, ``log_probs_from_logits``, ``compute_entropy``; and the methods
``RemoteExperienceMaker.get_advantages_and_returns`` / ``get_cumulative_returns``.  Everything can also
be used directly, without ``patch()``.

What differs from OpenRLHF, on purpose (docs/compat-openrlhf.md lists each with its measured size):

* Losses are fp32 (fp64 for fp64 inputs), computed in fp32, where OpenRLHF returns the inputs' dtype.
* ``LogExpLoss`` is finite where OpenRLHF's literal log(1 + exp(r − c)) overflows (r − c > 88 in fp32).
* GSPO's sequence ratio is computed from a log-ratio clamped to ±20 (OpenRLHF: unclamped).
* ``masked_normalize`` divides by sqrt(var + eps) (OpenRLHF: sqrt(max(var, eps))) and has no gradient.
* ``compute_reward`` writes 0 at masked positions and gives an all-masked row no score (OpenRLHF keeps
  −kl_coef·kl there, which its actor has already zeroed, and puts the score of an empty row in its last
  column, which every consumer masks out again).
* NaN or inf at masked positions never leaks into a masked mean (OpenRLHF multiplies by the mask).

Reproduced on purpose because a drop-in must not change results: NaN for an all-masked batch (OpenRLHF's
masked mean has no epsilon), ``log_probs_from_logits`` dividing the logits in place by the temperature,
and the ±10 clamp of every KL estimator.  No function here synchronises the device, except the label
range check of ``log_probs_from_logits`` on CUDA (``RLHF_KERNELS_CHECK_INDICES=0`` turns it off).
"""

from __future__ import annotations

import torch
from torch import nn

import rlhf_kernels as rk

from ..ops.rollout_correction import is_correction
from ._patching import Patcher, import_modules
from ._shared import common_dtype, in_dtype_of, nan_if_empty, no_double, weighted_aggregation

__all__ = [
    "SUPPORTED_VERSIONS",
    "LogExpLoss",
    "PairWiseLoss",
    "PolicyLoss",
    "ValueLoss",
    "aggregate_loss",
    "compute_approx_kl",
    "compute_entropy",
    "compute_reward",
    "get_advantages_and_returns",
    "get_cumulative_returns",
    "log_probs_from_logits",
    "masked_mean",
    "masked_normalize",
    "patch",
    "unpatch",
]

SUPPORTED_VERSIONS = ("0.11.2",)

_KL_ESTIMATORS = ("k1", "k2", "k3")
KL_IS_WEIGHT_CLIP = 10.0  # OpenRLHF's clamp of the importance weight of the unbiased KL gradient


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
            return "token-mean", mask.sum()
        return "token-mean", batch_num_tokens / dp_size
    if global_batch_size is None:
        return "seq-mean-token-mean", (mask.sum(dim=-1) > 0).sum()
    return "seq-mean-token-mean", global_batch_size / dp_size


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
    return in_dtype_of(rk.logprobs_from_logits(logits, labels, temperature=1.0, ignore_index=-100), logits)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp(x) − Σ softmax(x)·x over the last dimension, in the logits' dtype (fused, fp32 math)."""
    return in_dtype_of(rk.entropy_from_logits(logits, temperature=1.0), logits)


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: torch.Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """Schulman's KL estimators of the fp32 log-probabilities, clamped to [−10, 10] (all three, as
    OpenRLHF): k1 = δ, k2 = δ²/2, k3 = e^{−δ} − 1 + δ, δ = log_probs − log_probs_base.

    ``unbiased_gradient=True`` keeps the value and takes the gradient of w·δ²/2 instead (straight
    through), w = min(e^{log_probs − log_probs_old}, 10) detached (1 without ``log_probs_old``): the
    importance-weighted reverse-KL gradient, as OpenRLHF.  An unknown estimator raises ``ValueError``.
    """
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    log_probs, log_probs_base = log_probs.float(), log_probs_base.float()
    value = rk.kl_penalty(log_probs, log_probs_base, kl_estimator).clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    surrogate = rk.kl_penalty(log_probs, log_probs_base, "k2")
    if log_probs_old is not None:
        weight = (log_probs.detach() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP)
        surrogate = weight * surrogate
    return value.detach() + surrogate - surrogate.detach()


def compute_reward(
    r: torch.Tensor | float,
    kl_coef: float,
    kl: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    reward_clip_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Token rewards −kl_coef·kl on the valid tokens plus the (clamped) score r on each row's last one.

    One fused pass (:func:`rlhf_kernels.token_level_rewards` with ``kl`` as its k1 log-ratio).  A
    non-positive ``kl_coef`` is 0 and ``reward_clip_range`` = (low, high) clamps ``r``, as OpenRLHF.
    fp32 [B, T]; 0 at masked positions, and a row without valid tokens gets no score (see the module
    docstring).  ``action_mask=None`` counts every token.
    """
    kl_coef = max(float(kl_coef), 0.0)
    if not isinstance(r, torch.Tensor):
        r = torch.full(kl.shape[:1], float(r), dtype=torch.float32, device=kl.device)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    mask = _mask_or_ones(action_mask, kl)
    kl = no_double(kl)
    rewards, _ = rk.token_level_rewards(
        no_double(r.to(kl.dtype)), kl, torch.zeros_like(kl), mask, kl_coef=kl_coef, estimator="k1"
    )
    return rewards


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Σ x·m / Σm over ``dim`` (all dimensions for None), without epsilon (0/0 = NaN), as OpenRLHF;
    positions with m = 0 contribute 0 whatever they hold."""
    if mask is None:
        return tensor.mean(dim=dim)
    return torch.where(mask != 0, tensor * mask, 0).sum(dim=dim) / mask.sum(dim=dim)


def masked_normalize(
    tensor: torch.Tensor, mask: torch.Tensor, dim: int = 1, eps: float = 1e-8
) -> torch.Tensor:
    """Per-row whitening (x − μ)·m / sqrt(var + eps), biased var over ``mask``, along the last dimension
    (OpenRLHF's default dim=1 of a [B, T] tensor); fused, fp32, no gradient.  Other ``dim`` values raise
    ``NotImplementedError``."""
    if dim not in (-1, tensor.dim() - 1):
        raise NotImplementedError(
            f"masked_normalize(dim={dim}) of a {tensor.dim()}-D tensor: only the last dimension is fused"
        )
    return rk.masked_whiten(no_double(tensor), mask, shift_mean=True, unbiased=False, eps=eps, dim=-1)


# ---------------------------------------------------------------------------------------------------
# openrlhf.models.loss
# ---------------------------------------------------------------------------------------------------
def aggregate_loss(
    loss: torch.Tensor,
    loss_mask: torch.Tensor | None,
    token_level_loss: bool = True,
    dp_size: int = 1,
    batch_num_tokens: float | torch.Tensor | None = None,
    global_batch_size: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """OpenRLHF's reduction of a [B, T] loss: per token (Σ L·m / Σm, or / batch_num_tokens · dp) or per
    sample (mean over non-empty rows of their token means, or their sum / global_batch_size · dp).
    0-dim fp32; NaN for an all-masked batch without global counts, as OpenRLHF."""
    mask = _mask_or_ones(loss_mask, loss)
    mode, normalizer = _aggregation(mask, token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    return rk.agg_loss(loss, mask, mode, normalizer)


class PolicyLoss(nn.Module):
    """OpenRLHF 0.11.2's PPO policy loss, fused forward and backward.

    forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None) -> (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)

    ℓ = clamp(lp − old, −20, 20), r = e^ℓ, L = −min(r·A, clamp(r, 1 − ε_low, 1 + ε_high)·A), and with
    ``dual_clip`` c: L = −max(min(...), c·A) where A < 0.  ``policy_loss_type="gspo"`` uses one ratio per
    sequence, e^{mean_t(lp − old)}, and the per-sample aggregation.  The train/rollout correction
    (``is_correction_level`` "token" or "seq", ``is_correction_mode`` "mask" or "clip",
    ``is_correction_gating`` "ratio", "binary_kl" or "tv", ``is_correction_threshold`` (low, high)) weights
    each token's loss by OpenRLHF's coefficient of old/rollout log-probabilities (no gradient); it then
    returns ``vllm_kl`` and ``is_filter_ratio``, else None for both.  Aggregated per token
    (``token_level_loss``) or per sample, with OpenRLHF's global-batch arguments.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: tuple[float, float] | list[float] = (0.5, 5.0),
    ) -> None:
        super().__init__()
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError(
                "is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio"
            )
        if (
            is_correction_gating != "ratio"
            and is_correction_level != "off"
            and is_correction_threshold[0] > 0
        ):
            raise ValueError(
                f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)"
            )
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss if policy_loss_type == "ppo" else False  # GSPO: per sample
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def _correction(
        self, old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token coefficient, vllm_kl, is_filter_ratio) of OpenRLHF's train/rollout correction: the
        core :func:`rlhf_kernels.ops.rollout_correction.is_correction`, with OpenRLHF's NaN for an
        all-masked batch (a token-level masked mean without epsilon)."""
        level = "sequence" if self.is_correction_level == "seq" else "token"
        coefficient, metrics = is_correction(
            old_log_probs, rollout_log_probs, mask, level=level, mode=self.is_correction_mode,
            gating=self.is_correction_gating, threshold=tuple(self.is_correction_threshold),
        )
        filter_ratio = metrics["is_filter_ratio"]
        if level == "token":
            filter_ratio = nan_if_empty(filter_ratio, mask)
        return coefficient, nan_if_empty(metrics["vllm_kl"], mask), filter_ratio

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        mask = _mask_or_ones(action_mask, log_probs)
        log_probs, old_log_probs, advantages = common_dtype(log_probs, old_log_probs, advantages)
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
        # ppo_kl is OpenRLHF's masked mean of the unclamped −(lp − old); no gradient.
        ppo_kl = -masked_mean((log_probs - old_log_probs).detach().float(), mask)
        if self.policy_loss_type == "gspo":
            # One ratio per sequence: the fused loss sees the sequence's mean log-ratio at each token.
            reference = rollout_log_probs if correcting else old_log_probs
            token_log_ratio = torch.where(mask != 0, log_probs - reference.to(log_probs.dtype), 0)
            lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)
            log_probs = (token_log_ratio.sum(dim=-1, keepdim=True) / lengths).expand(mask.shape)
            old_log_probs = torch.zeros_like(log_probs)
        mode, normalizer = _aggregation(
            mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
        )
        clips = {"clip_low": self.clip_eps_low, "clip_high": self.clip_eps_high, "dual_clip": self.dual_clip}
        vllm_kl = filter_ratio = None
        if correcting and self.policy_loss_type == "ppo":
            coefficient, vllm_kl, filter_ratio = self._correction(old_log_probs, rollout_log_probs, mask)
            weighted_mode, weights, weighted_normalizer = weighted_aggregation(
                mode, normalizer, mask, coefficient
            )
            loss, _ = rk.ppo_policy_loss(
                log_probs,
                old_log_probs,
                advantages,
                weights,
                loss_agg=weighted_mode,
                normalizer=weighted_normalizer,
                **clips,
            )
            _, metrics = rk.ppo_policy_loss(log_probs.detach(), old_log_probs, advantages, mask, **clips)
        else:
            loss, metrics = rk.ppo_policy_loss(
                log_probs, old_log_probs, advantages, mask, loss_agg=mode, normalizer=normalizer, **clips
            )
        clip_ratio = nan_if_empty(metrics["clipfrac"], mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, filter_ratio


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
        values, old_values, returns = common_dtype(values, old_values, returns)
        loss, _ = rk.ppo_value_loss(
            values, old_values, returns, mask, clip=self.clip_eps, loss_agg=mode, normalizer=normalizer
        )
        return loss


def _broadcast_pair(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None):
    """OpenRLHF's elementwise broadcasting of c − r − margin (an [N, 1] reward against an [N] margin
    pairs every reward with every margin: [N, N]), materialised for the fused loss."""
    tensors = [chosen, rejected] + ([margin] if isinstance(margin, torch.Tensor) else [])
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    expanded = [t.expand(shape).contiguous() if t.shape != shape else t for t in tensors]
    chosen, rejected = common_dtype(*expanded[:2])
    return chosen, rejected, (expanded[2] if len(expanded) == 3 else margin)


class PairWiseLoss(nn.Module):
    """Bradley-Terry reward-model loss mean(−log σ(c − r − margin)), fused and stable for any gap, with
    OpenRLHF's broadcasting of the three operands."""

    def forward(
        self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        chosen, rejected, margin = _broadcast_pair(chosen_reward, reject_reward, margin)
        loss, _ = rk.pairwise_reward_loss(chosen, rejected, margin=margin)
        return loss


class LogExpLoss(nn.Module):
    """mean(log(1 + e^{r − c})) (Anthropic's form, https://arxiv.org/abs/2204.05862); ``margin`` is
    ignored, as in OpenRLHF.  Equal to :class:`PairWiseLoss` without margin, evaluated stably: finite
    where OpenRLHF's literal formula overflows to inf (r − c beyond ~88 in fp32)."""

    def forward(
        self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        chosen, rejected, _ = _broadcast_pair(chosen_reward, reject_reward, None)
        loss, _ = rk.pairwise_reward_loss(chosen, rejected)
        return loss


# ---------------------------------------------------------------------------------------------------
# openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker
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

    The free function of ``RemoteExperienceMaker.get_advantages_and_returns`` (``patch()`` installs it as
    the method).  Lists (packed samples: one 1-D tensor per sample) are handled sample by sample;
    ``action_mask`` must then be None.  Outputs are fp32 (fp64 inputs are computed in fp32).
    """
    if isinstance(values, list):
        if action_mask is not None:
            raise ValueError("action_mask must be None when values and rewards are lists of packed samples")
        pairs = [
            get_advantages_and_returns(v.unsqueeze(0), r.unsqueeze(0), None, gamma, lambd)
            for v, r in zip(values, rewards)
        ]
        return [a.squeeze(0) for a, _ in pairs], [r.squeeze(0) for _, r in pairs]
    mask = _mask_or_ones(action_mask, values)
    return rk.compute_gae(no_double(rewards), no_double(values), mask, gamma, lambd, mask_mode="zero")


@torch.no_grad()
def get_cumulative_returns(
    rewards: torch.Tensor, action_mask: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    """REINFORCE returns G_t = r_t·m_t + γ·G_{t+1} (rewards zeroed where ``action_mask`` is 0), fp32:
    the fused GAE scan with zero values and λ = 1.  The free function of
    ``RemoteExperienceMaker.get_cumulative_returns``."""
    rewards = no_double(rewards)
    advantages, _ = rk.compute_gae(
        rewards, torch.zeros_like(rewards), _mask_or_ones(action_mask, rewards), gamma, 1.0, mask_mode="zero"
    )
    return advantages


def _advantages_method(self, values, rewards, action_mask, gamma, lambd):
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


def _cumulative_returns_method(self, rewards, action_mask, gamma):
    return get_cumulative_returns(rewards, action_mask, gamma)


_advantages_method.__name__ = _advantages_method.__qualname__ = "get_advantages_and_returns"
_cumulative_returns_method.__name__ = _cumulative_returns_method.__qualname__ = "get_cumulative_returns"


# ---------------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------------
_LOSSES = (PolicyLoss, ValueLoss, PairWiseLoss, LogExpLoss, aggregate_loss)
_UTILS = (
    compute_approx_kl,
    compute_reward,
    masked_mean,
    masked_normalize,
    log_probs_from_logits,
    compute_entropy,
)


def _plan():
    loss, utils, models, experience_maker = import_modules(
        "openrlhf.models.loss",
        "openrlhf.models.utils",
        "openrlhf.models",
        "openrlhf.trainer.ppo_utils.experience_maker",
    )
    plan = [(loss, item.__name__, item) for item in _LOSSES]
    plan += [(models, item.__name__, item) for item in _LOSSES]
    plan += [(utils, item.__name__, item) for item in _UTILS]
    maker = experience_maker.RemoteExperienceMaker
    plan += [(maker, "get_advantages_and_returns", _advantages_method)]
    plan += [(maker, "get_cumulative_returns", _cumulative_returns_method)]
    return plan


_PATCHER = Patcher("OpenRLHF", "openrlhf", SUPPORTED_VERSIONS, "openrlhf", _plan)


def patch() -> list[str]:
    """Installs the fused losses and functions into OpenRLHF 0.11.2 (see the module docstring); returns
    what it replaced.  Raises ``UnsupportedVersionError`` for another version, before changing
    anything; a second call does nothing."""
    return _PATCHER.patch()


def unpatch() -> None:
    """Puts OpenRLHF's own classes and functions back."""
    _PATCHER.unpatch()
