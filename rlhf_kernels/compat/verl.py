"""verl's hot-path functions with verl's names, signatures, defaults and results, on rlhf-kernels' fused ops.

Follows verl-project/verl main (2026): ``verl.trainer.ppo.core_algos`` (``compute_gae_advantage_return``,
``compute_policy_loss``, ``compute_value_loss``, ``agg_loss``, ``kl_penalty``),
``verl.utils.torch_functional`` (``logprobs_from_logits``, ``entropy_from_logits``,
``entropy_from_logits_with_chunking``, ``masked_whiten``) and
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``.  Swap::

    from rlhf_kernels.compat import verl as core_algos   # core_algos.compute_policy_loss(...), ...
    from rlhf_kernels.compat import verl as verl_F       # verl_F.logprobs_from_logits(...), ...

What differs from verl, on purpose (each also said in the function's docstring):

* Results are fp32 (fp64 for fp64 inputs) computed in fp32, where verl returns its inputs' dtype
  (identical for fp32 inputs; more accurate for bf16 ones).  ``entropy_from_logits`` keeps verl's dtype.
* ``masked_whiten`` / ``compute_gae_advantage_return``: positions outside the mask hold 0 (verl leaves
  (x − μ)/σ there, a value no verl loss reads), and an all-masked or single-token mask gives zeros
  instead of verl's ``ValueError``: raising would need a device-to-host copy every call.
* Float masks whose row sums lie strictly between 0 and 1 divide by 1 where verl divides by the sum.

Everything else, including verl's NaN for an all-masked ``token-mean`` batch (0/0), is reproduced.
No function here synchronises the device, except the label range check of ``logprobs_from_logits`` and
``linear_cross_entropy`` on CUDA (``RLHF_KERNELS_CHECK_INDICES=0`` turns it off; unchecked out-of-range
labels give NaN, never a wild read) and ``compute_gae_advantage_return`` when ``gamma`` or ``lam`` is
passed as a tensor (it is read once on the host, as a Python float).
"""

from __future__ import annotations

import torch

from ..ops.advantages import compute_gae
from ..ops.advantages import masked_whiten as _masked_whiten
from ..ops.aggregation import SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, TOKEN_MEAN
from ..ops.aggregation import agg_loss as _agg_loss
from ..ops.kl import kl_penalty as _kl_penalty
from ..ops.linear_logprobs import linear_logprobs
from ..ops.logprobs import entropy_from_logits as _entropy
from ..ops.logprobs import logprobs_from_logits as _logprobs
from ..ops.ppo_losses import ppo_policy_loss, ppo_value_loss

__all__ = [
    "agg_loss",
    "compute_gae_advantage_return",
    "compute_policy_loss",
    "compute_value_loss",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "linear_cross_entropy",
    "logprobs_from_logits",
    "masked_whiten",
]

_HALF = (torch.float16, torch.bfloat16)

# verl's kl_penalty names -> the library's estimators ("full" is not implemented in verl either).
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _as_float(name: str, value: float | torch.Tensor) -> float:
    """verl annotates gamma / lam as tensors; a one-element tensor is read once on the host."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor; got shape {tuple(value.shape)}"
            )
        return float(value.item())  # host read of a hyperparameter (documented)
    return value


def _no_double(tensor: torch.Tensor) -> torch.Tensor:
    """The advantage kernels compute in fp32; fp64 inputs (which verl's loop accepts) are rounded once."""
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def _common_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The fused losses take one floating dtype; verl mixes them freely (promotion)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _row_count(loss_mask: torch.Tensor) -> torch.Tensor:
    """Rows with at least one valid token, a 0-dim tensor (read by no one on the host)."""
    return (loss_mask.sum(dim=-1) > 0).sum()


def _aggregation(
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int,
    batch_num_tokens,
    global_batch_size,
    loss_scale_factor,
) -> tuple[str, float | torch.Tensor]:
    """verl's agg_loss as (library mode, normalizer): every mode divides a masked sum by one number.

    token-mean                Σ L·m / N · dp,  N = batch_num_tokens or Σm (0/0 = NaN for an empty mask)
    token-sum                 Σ L·m · dp
    seq-mean-token-sum        Σ_b Σ_t L·m / G · dp,  G = global_batch_size or the number of non-empty rows
    seq-mean-token-mean       Σ_b [Σ_t L·m / n_b] / G · dp  (empty rows contribute 0)
    seq-mean-token-sum-norm   seq-mean-token-sum / S,  S = loss_scale_factor or T
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return TOKEN_MEAN, loss_mask.sum()
        return TOKEN_MEAN, batch_num_tokens / dp_size
    if loss_agg_mode == "token-sum":
        return SEQ_MEAN_TOKEN_SUM, 1.0 / dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            rows = _row_count(loss_mask)
        else:
            rows = global_batch_size
        normalizer = rows / dp_size
        if loss_agg_mode == "seq-mean-token-mean":
            return SEQ_MEAN_TOKEN_MEAN, normalizer
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
            normalizer = normalizer * scale
        return SEQ_MEAN_TOKEN_SUM, normalizer
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


# ---------------------------------------------------------------------------------------------------
# verl.utils.torch_functional
# ---------------------------------------------------------------------------------------------------
def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits)``, [...] fp32 (fp64 for fp64 logits).

    As verl's flash-attn path (the one verl takes on GPUs): fp32 output whatever the logits' dtype,
    label −100 gives 0, and ``inplace_backward=True`` writes the logits gradient over ``logits`` (so
    nothing else may read them after the backward; verl turns it off when it also needs the entropy).
    The in-place backward is used for contiguous logits; flash-attn's reshape copies other layouts, so
    for those the gradient goes to a new buffer, with the same result.
    """
    inplace = bool(inplace_backward) and logits.is_contiguous()
    return _logprobs(logits, labels, temperature=1.0, ignore_index=-100, inplace_backward=inplace)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(x) − Σ softmax(x)·x over the last dimension, in the logits' dtype (as verl),
    computed in fp32 with the fused kernel (one read of the logits)."""
    entropy = _entropy(logits, temperature=1.0)
    return entropy.to(logits.dtype) if logits.dtype in _HALF else entropy


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's chunked entropy: fp32 on CPU; on CUDA verl routes to its kernel and returns the logits'
    dtype for fp16/bf16, which is kept.  ``chunk_size`` is accepted and unused: the fused kernel never
    holds more than one block of a row."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    entropy = _entropy(logits, temperature=1.0)
    if logits.is_cuda and logits.dtype in _HALF:
        return entropy.to(logits.dtype)
    return entropy.float()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − μ)·rsqrt(var + 1e-8) with μ and the unbiased var over ``mask``, fp32.

    Differs from verl where nothing reads the result: positions outside ``mask`` hold 0 (μ when
    ``shift_mean=False``) instead of (x − μ)/σ, and fewer than two valid elements give zeros instead of
    verl's ``ValueError`` (which costs a device sync per call).
    """
    return _masked_whiten(_no_double(values), mask, shift_mean=shift_mean, unbiased=True, eps=1e-8)


# ---------------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos
# ---------------------------------------------------------------------------------------------------
def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with verl's carried next value and last advantage across masked positions, then the
    advantages whitened over ``response_mask``; returns are computed before whitening.

    One fused pass instead of verl's reverse Python loop (T launches).  Both outputs fp32 [B, T]; no
    gradient; fp64 inputs are computed in fp32.  Whitened advantages at masked positions are 0 (see
    :func:`masked_whiten`); returns match verl everywhere.
    """
    gamma = _as_float("gamma", gamma)
    lam = _as_float("lam", lam)
    advantages, returns = compute_gae(
        _no_double(token_level_rewards), _no_double(values), response_mask, gamma, lam, mask_mode="carry"
    )
    return masked_whiten(advantages, response_mask), returns


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """verl's aggregation of a [B, T] loss (modes token-mean, token-sum, seq-mean-token-sum,
    seq-mean-token-mean, seq-mean-token-sum-norm, with verl's global-batch arguments), 0-dim fp32.

    Fully masked rows are left out of the sequence means, as verl does; an all-masked token-mean is NaN
    (0/0), as in verl.  Differentiable with respect to ``loss_mat``; masked positions get zero gradient.
    """
    mode, normalizer = _aggregation(
        loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    return _agg_loss(loss_mat, loss_mask, mode, normalizer)


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's vanilla PPO policy loss: (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), all 0-dim.

    ℓ = clamp(lp − old, −20, 20), r = e^ℓ, C = max(−A·r, −A·clamp(r, 1 − ε_low, 1 + ε_high)); where
    A < 0 the dual clip min(C, −A·c) applies (always on, c = ``clip_ratio_c`` = 3 by default).  One
    fused forward and backward; metrics carry no gradient and need no host sync.
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise TypeError("compute_policy_loss needs cliprange (or both cliprange_low and cliprange_high)")
    if not clip_ratio_c > 1.0:
        raise ValueError(
            "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, "
            f"but get the value: {clip_ratio_c}."
        )
    mode, normalizer = _aggregation(response_mask, loss_agg_mode, 1, None, None, None)
    log_prob, old_log_prob, advantages = _common_dtype(log_prob, old_log_prob, advantages)
    loss, metrics = ppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask,
        clip_low=low, clip_high=high, dual_clip=clip_ratio_c, loss_agg=mode, normalizer=normalizer,
    )
    return loss, metrics["clipfrac"], metrics["approx_kl"], metrics["clipfrac_lower"]


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's clipped value loss ½·agg(max((v − R)², (clip(v, v_old ± ε) − R)²)) and its clipfrac.

    Note verl's argument order: predictions, returns, then the old values.  ``cliprange_value=None``
    (not accepted by verl) gives the unclipped loss.
    """
    mode, normalizer = _aggregation(
        response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    vpreds, values, returns = _common_dtype(vpreds, values, returns)
    loss, metrics = ppo_value_loss(
        vpreds, values, returns, response_mask, clip=cliprange_value, loss_agg=mode, normalizer=normalizer
    )
    return loss, metrics["clipfrac"]


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token KL estimate: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (k3 clamped as verl).

    A "+" suffix (e.g. "k3+") keeps the estimator's value and takes the gradient of k2 (verl's
    straight-through trick, for an unbiased KL gradient).  "full" and unknown names raise
    ``NotImplementedError``, as in verl.  fp32 output.
    """
    if not isinstance(kl_penalty, str):
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not implemented")
    straight_through = kl_penalty.endswith("+")
    base = kl_penalty[:-1] if straight_through else kl_penalty
    if base not in _KL_NAMES:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not implemented")
    forward = _kl_penalty(logprob, ref_logprob, _KL_NAMES[base])
    if not straight_through or _KL_NAMES[base] == "k2":
        return forward
    backward = _kl_penalty(logprob, ref_logprob, "k2")
    return backward - backward.detach() + forward.detach()


# ---------------------------------------------------------------------------------------------------
# verl.utils.kernel.linear_cross_entropy
# ---------------------------------------------------------------------------------------------------
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | None = 1.0,
    reduction: str | None = "none",
    dist_process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy) of ``labels`` under softmax(hidden @ weightᵀ / τ), without the logits.

    As verl's fused kernel: ``hidden`` [..., H] is flattened to [N, H] and ``labels`` to [N]; entropy is
    [N] fp32; logprobs is [N] fp32 for ``reduction="none"``, their sum or mean (over all N) for "sum" /
    "mean".  ``dist_process_group`` shards ``weight`` by vocabulary rows across ranks.  Label −100 gives
    0 with no gradient (an extension: verl's kernel has no ignore index).
    """
    temperature = 1.0 if temperature is None else float(temperature)
    reduction = "none" if reduction is None else reduction
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be one of ('none', 'sum', 'mean'); got {reduction!r}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() != 2 else hidden
    labels1d = labels.reshape(-1) if labels.dim() != 1 else labels
    logprobs, entropy = linear_logprobs(
        hidden2d, weight, labels1d, temperature=temperature, return_entropy=True,
        process_group=dist_process_group,
    )
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy
