"""Float64 oracle of ``rlhf_kernels.ops.linear_policy_loss``: the logits materialised in float64, log-softmax,
the per-token losses of each token-level variant written from their formulas (docs/policy_losses.md),
then the aggregation oracle; gradients by autograd.  Same signature as the public function.

    loss = agg(L·w, m) − entropy_coef·agg(H, m) + kl_coef·agg(k(lp, ref), m)

Positions with mask 0 or label ``ignore_index`` are masked (excluded with ``torch.where``).
"""

from __future__ import annotations

import torch

from .aggregation import agg_loss
from .kl import kl_penalty
from .linear_logprobs import linear_logprobs

_LOG_RATIO_CLAMP = 20.0
_SAPO_GATE_SCALE = 4.0
_BINARY_KL_EPS = 1e-8


def _masked_mean(x, m):
    x = torch.where(m != 0, x.double() * m, torch.zeros_like(m))
    return (x.sum() / m.sum().clamp(min=1.0)).float()


def _clamped_ratio(lp, old):
    log_ratio = torch.clamp(lp - old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return log_ratio, torch.exp(log_ratio)


def _vanilla(lp, old, adv, clip_low=0.2, clip_high=None, dual_clip=3.0):
    high = clip_low if clip_high is None else clip_high
    log_ratio, r = _clamped_ratio(lp, old)
    unclipped = -adv * r
    clipped = -adv * torch.clamp(r, 1 - clip_low, 1 + high)
    is_clipped = clipped > unclipped
    C = torch.where(is_clipped, clipped, unclipped)  # ties: the unclipped side
    if dual_clip is None:
        return C, {"clipfrac": is_clipped, "clipfrac_lower": torch.zeros_like(r), "approx_kl": -log_ratio}
    lower = (adv < 0) & (C > -adv * dual_clip)
    L = torch.where(lower, -adv * dual_clip, C)
    return L, {"clipfrac": is_clipped, "clipfrac_lower": lower, "approx_kl": -log_ratio}


def _gpg(lp, old, adv):
    return -adv * lp, {}


def _dro(lp, old, adv, beta):
    return -(adv * lp - 0.5 * beta * (lp - old) ** 2), {"approx_kl": old - lp}


def _cispo(lp, old, adv, clip_low=0.2, clip_high=None):
    high = clip_low if clip_high is None else clip_high
    log_ratio, r = _clamped_ratio(lp, old)
    weight = torch.clamp(r, 1 - clip_low, 1 + high).detach()
    zero = torch.zeros_like(r)
    return -weight * adv * lp, {"clipfrac": r != weight, "clipfrac_lower": zero, "approx_kl": -log_ratio}


def _sapo(lp, old, adv, tau_pos=1.0, tau_neg=1.05):
    log_ratio, r = _clamped_ratio(lp, old)
    tau = torch.where(adv > 0, tau_pos, tau_neg)
    L = -torch.sigmoid(tau * (r - 1)) * (_SAPO_GATE_SCALE / tau) * adv
    zero = torch.zeros_like(r)
    return L, {"clipfrac": zero, "clipfrac_lower": zero, "approx_kl": -log_ratio}


def _dppo(lp, old, adv, clip_low=0.2, clip_high=None, truncation=20.0, *, binary_kl):
    high = clip_low if clip_high is None else clip_high
    log_ratio, r = _clamped_ratio(lp, old)
    p, p_old = torch.exp(lp.detach()), torch.exp(old)
    if binary_kl:
        kl = p_old * (old - lp.detach()) + (1 - p_old) * torch.log(
            (1 - p_old + _BINARY_KL_EPS) / (1 - p + _BINARY_KL_EPS)
        )
        positive, negative = (kl <= high) | (p <= p_old), (kl <= clip_low) | (p >= p_old)
    else:
        positive, negative = (p - p_old) <= high, (p - p_old) >= -clip_low
    valid = torch.where(adv > 0, positive, negative)
    truncated = torch.clamp(r, max=truncation).detach()
    L = torch.where(valid, -adv * truncated * lp, torch.zeros_like(lp))
    metrics = {"clipfrac": ~valid, "clipfrac_lower": (r > truncation) & valid, "approx_kl": -log_ratio}
    return L, metrics


_VARIANTS = {
    "vanilla": _vanilla,
    "gpg": _gpg,
    "dro": _dro,
    "cispo": _cispo,
    "sapo": _sapo,
    "dppo_tv": lambda *a, **k: _dppo(*a, **k, binary_kl=False),
    "dppo_kl": lambda *a, **k: _dppo(*a, **k, binary_kl=True),
}


def linear_policy_loss(
    hidden, weight, labels, old_logprobs, advantages, mask, *, loss="vanilla", loss_params=None, bias=None,
    is_weights=None, entropy_coef=0.0, ref_logprobs=None, kl_coef=0.0, kl_estimator="low_var_kl",
    temperature=1.0, ignore_index=-100, loss_agg="token-mean", normalizer=None, chunk_rows=None,
    return_logprobs=False,
):
    """(loss, metrics[, logprobs]) in float64; differentiable with respect to hidden, weight and bias."""
    valid = (mask != 0) & (labels != ignore_index)
    m = torch.where(valid, mask.double(), torch.zeros((), dtype=torch.float64))
    labels = torch.where(valid, labels, ignore_index)
    lp, entropy = linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        return_entropy=True,
    )
    old, adv = old_logprobs.double(), advantages.double()
    old, adv = torch.where(valid, old, 0.0), torch.where(valid, adv, 0.0)
    per_token, raw_metrics = _VARIANTS[loss](lp, old, adv, **dict(loss_params or {}))
    if is_weights is not None:
        per_token = per_token * is_weights.double()
    pg_loss = agg_loss(per_token, m, loss_agg, normalizer)
    total = pg_loss
    metrics = {"pg_loss": pg_loss.detach().float()}
    metrics.update({name: _masked_mean(v.detach().double(), m) for name, v in raw_metrics.items()})
    if entropy_coef != 0:
        entropy_loss = agg_loss(entropy, m, loss_agg, normalizer)
        total = total - entropy_coef * entropy_loss
        metrics["entropy"] = entropy_loss.detach().float()
    if ref_logprobs is not None:
        ref = torch.where(valid, ref_logprobs.double(), 0.0)
        kl = agg_loss(kl_penalty(lp, ref, kl_estimator), m, loss_agg, normalizer)
        total = total + kl_coef * kl
        metrics["kl_loss"] = kl.detach().float()
    if return_logprobs:
        return total, metrics, lp.detach()
    return total, metrics
