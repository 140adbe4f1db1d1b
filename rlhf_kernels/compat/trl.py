"""TRL 1.16's log-prob path, with TRL's names, signatures and results, on rlhf-kernels' fused ops.

TRL 1.16's GRPO, RLOO, DPO, KTO and SFT trainers score tokens through a fused LM head
(``add_fused_lm_head``: ``model(..., labels=..., fused_lm_head=True)``), which calls
``trl.trainer.utils._ChunkedLogProbFunction`` at each forward.  Enable the fused kernels for them::

    import rlhf_kernels.compat.trl
    rlhf_kernels.compat.trl.patch()     # checks trl == 1.16.0; unpatch() undoes it

``patch()`` replaces ``_ChunkedLogProbFunction`` (so every trainer's fused LM head runs
:func:`rlhf_kernels.linear_logprobs`: the logits are never materialised, forward or backward) and
``selective_log_softmax``, ``selective_log_softmax_and_entropy`` and ``entropy_from_logits`` in
``trl.trainer.utils`` and wherever a loaded TRL module imported them by name.  It can be called before or
after the trainer is built: the fused head looks the function up at every call.

What differs from TRL, on purpose (docs/compat-trl.md lists each with its measured size): log-softmaxes
are computed in fp32 in one pass and rounded once to the logits' dtype (TRL's half-precision fallback
rounds intermediate values too); the extra fused-head outputs ``log_sum_sq_probs``, ``mean_logits`` and
``is_top1`` (no gradient; DPO's metrics) are computed by a second, chunked no-grad pass over the logits
in plain torch, only when a trainer asks for them.  Not implemented (``NotImplementedError`` naming the
option): ``final_logit_softcapping`` and ``logit_scale <= 0`` in the fused head, and an index of shape
(..., K) in ``selective_log_softmax_and_entropy``.
"""

from __future__ import annotations

import torch

import rlhf_kernels as rk

from ._patching import Patcher, import_modules
from ._shared import in_dtype_of

__all__ = [
    "SUPPORTED_VERSIONS",
    "ChunkedLogProbFunction",
    "entropy_from_logits",
    "patch",
    "reward_trainer_loss",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]

SUPPORTED_VERSIONS = ("1.16.0",)

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STATS_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the no-grad statistics pass (64 MiB in fp32)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")


def _skip_rows(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Rows where ``row_mask`` is 0 get label −100: the fused kernel returns 0 there, with no gradient."""
    return index if row_mask is None else index.masked_fill(row_mask == 0, -100)


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gather(log_softmax(logits / temperature), -1, index)``, without materialising the log-softmax.

    Args:
        logits: [..., V] in any floating dtype.
        index: [...] (one token per position) or [..., K] (K tokens per position, e.g. top-K), int64.
        temperature: > 0, applied inside the fused kernel (no divided copy of the logits).
        row_mask: index's shape; where it is 0 the result is 0 with no gradient (and, for [...] indices,
            the kernel skips the row's label).

    Returns:
        Log-probabilities of ``index``'s shape in the logits' dtype, as TRL.  For [..., K] the
        log-sum-exp comes from one fused pass (for the first of the K indices) and the K log-probs are
        (x_k − x_first)/τ + logp_first, so the cost does not grow with K.
    """
    _check_temperature(temperature)
    if index.dim() == logits.dim() - 1:
        logprobs = rk.logprobs_from_logits(
            logits, _skip_rows(index, row_mask), temperature=temperature, ignore_index=-100
        )
        return in_dtype_of(logprobs, logits)
    first = rk.logprobs_from_logits(logits, index[..., 0].contiguous(), temperature=temperature)
    selected = logits.gather(-1, index).to(first.dtype) / temperature
    logprobs = selected - selected[..., :1] + first.unsqueeze(-1)
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
    return in_dtype_of(logprobs, logits)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of ``index`` [...], entropies [...]) of softmax(logits / temperature) in one
    fused pass, in the logits' dtype; rows where ``row_mask`` is 0 give 0 for both, with no gradient.
    ``entropy_requires_grad=False`` detaches the entropy."""
    _check_temperature(temperature)
    if index.dim() != logits.dim() - 1:
        raise NotImplementedError(
            "selective_log_softmax_and_entropy with an index of shape (..., K): pass one index per row "
            f"(logits {tuple(logits.shape)}, index {tuple(index.shape)})"
        )
    logprobs, entropy = rk.logprobs_from_logits(
        logits, _skip_rows(index, row_mask), temperature=temperature, ignore_index=-100, return_entropy=True
    )
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return in_dtype_of(logprobs, logits), in_dtype_of(entropy, logits)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension, ``logits.shape[:-1]``, in the logits' dtype.

    ``chunk_size`` is accepted for compatibility and unused: the fused kernel streams each row once and
    never holds a [chunk, V] softmax, so memory is O(rows) whatever it is.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    return in_dtype_of(rk.entropy_from_logits(logits, temperature=1.0), logits)


@torch.no_grad()
def _logit_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scale: float,
    outputs: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """log Σ p², the mean logit and whether the target is the (first) argmax, for the fused head's
    extra outputs: plain torch over chunks of tokens (the library has no fused kernel for them)."""
    rows = max(1, _STATS_CHUNK_ELEMENTS // max(weight.shape[0], 1))
    wanted = {name: [] for name in ("log_sum_sq_probs", "mean_logits", "is_top1") if name in outputs}
    for start in range(0, hidden.shape[0], rows):
        z = torch.nn.functional.linear(hidden[start : start + rows], weight, bias).float() * scale
        if "log_sum_sq_probs" in wanted:
            wanted["log_sum_sq_probs"].append(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
        if "mean_logits" in wanted:
            wanted["mean_logits"].append(z.mean(-1))
        if "is_top1" in wanted:
            wanted["is_top1"].append(z.argmax(-1) == targets[start : start + rows])
    empty = {"is_top1": torch.bool}
    return {
        name: torch.cat(parts) if parts else hidden.new_empty(0, dtype=empty.get(name, torch.float32))
        for name, parts in wanted.items()
    }


class ChunkedLogProbFunction:
    """TRL's fused LM head function (``trl.kernels.ChunkedLogProbFunction``), on
    :func:`rlhf_kernels.linear_logprobs`.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)`` returns
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` of the logits
    ``(hidden @ weightᵀ + bias)·logit_scale / temperature``, fp32 [N] (``is_top1`` bool), None for the
    fields not in ``outputs``.  ``log_probs`` and ``entropy`` are differentiable with respect to
    ``hidden``, ``weight`` and ``bias``; the others carry no gradient.  Under autocast the projection
    runs in the autocast dtype, as TRL's.  ``chunk_size`` is unused (the kernel tiles the vocabulary
    itself).
    """

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ) -> tuple[torch.Tensor | None, ...]:
        if final_logit_softcapping is not None:
            raise NotImplementedError(
                f"final_logit_softcapping={final_logit_softcapping} (tanh soft-capping of the logits) in "
                "the fused LM head: rlhf_kernels.compat.trl does not implement it; unpatch() for this model"
            )
        if not logit_scale > 0:
            raise NotImplementedError(
                f"logit_scale={logit_scale} in the fused LM head: only a positive scale is implemented"
            )
        _check_temperature(temperature)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            if "entropy" in outputs:
                log_probs, entropy = rk.linear_logprobs(
                    hidden,
                    weight,
                    targets,
                    bias=bias,
                    temperature=temperature / logit_scale,
                    return_entropy=True,
                )
            else:
                log_probs = rk.linear_logprobs(
                    hidden, weight, targets, bias=bias, temperature=temperature / logit_scale
                )
                entropy = None
            extra = _logit_statistics(
                hidden.detach(),
                weight.detach(),
                None if bias is None else bias.detach(),
                targets,
                logit_scale / temperature,
                outputs,
            )
        return (
            log_probs,
            entropy,
            extra.get("log_sum_sq_probs"),
            extra.get("mean_logits"),
            extra.get("is_top1"),
        )


def _as_rewards(rewards: torch.Tensor) -> torch.Tensor:
    # A reward head's logits are [N, 1]; TRL squeezes them.
    return rewards.squeeze(-1) if rewards.dim() == 2 and rewards.shape[-1] == 1 else rewards


def reward_trainer_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
    *,
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of TRL's ``RewardTrainer.compute_loss``, fused (for a ``compute_loss`` override):

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
    loss, metrics = rk.pairwise_reward_loss(
        chosen, rejected, margin=margin, center_coef=center_rewards_coefficient
    )
    if return_metrics:
        return loss, {"accuracy": metrics["accuracy"], "margin": metrics["margin_mean"]}
    return loss


# ---------------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------------
def _plan():
    (utils,) = import_modules("trl.trainer.utils")
    plan = [(utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)]
    plan += [
        (utils, fn.__name__, fn)
        for fn in (selective_log_softmax, selective_log_softmax_and_entropy, entropy_from_logits)
    ]
    return plan


_PATCHER = Patcher("TRL", "trl", SUPPORTED_VERSIONS, "trl", _plan)


def patch() -> list[str]:
    """Routes TRL 1.16.0's fused LM head and log-softmax helpers to the fused kernels (see the module
    docstring); returns what it replaced.  Raises ``UnsupportedVersionError`` for another TRL version,
    before changing anything; a second call does nothing."""
    return _PATCHER.patch()


def unpatch() -> None:
    """Puts TRL's own functions back."""
    _PATCHER.unpatch()
