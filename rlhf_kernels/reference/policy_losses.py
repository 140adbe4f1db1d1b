"""Float64 oracles of the policy losses of ``rlhf_kernels.ops.policy_losses``, straight from the formulas
(see docs/policy_losses.md), differentiated by autograd.  Same signatures as the public functions.

Masked positions are excluded with ``torch.where``; the metrics' masked means divide by max(Σm, 1).
clip_cov / kl_cov use the library's deterministic selection rules, written here with a sort and a loop
(``clip_cov_selection`` / ``kl_cov_selection``, also the oracles of the selections alone).
"""

from __future__ import annotations

import torch

from .aggregation import agg_loss
from .ppo_losses import _masked_mean
from .ppo_losses import ppo_policy_loss as _ppo_policy_loss


def _prepare(logprobs, old_logprobs, advantages, mask, is_weights):
    lp = logprobs.to(torch.float64)
    old = old_logprobs.detach().to(torch.float64)
    adv = advantages.detach().to(torch.float64)
    w = torch.ones_like(old) if is_weights is None else is_weights.detach().to(torch.float64)
    return lp, old, adv, w, mask.to(torch.float64) != 0


def _zeros_at_padding(x, valid):
    return torch.where(valid, x, torch.zeros_like(x))


def _clip(clip_low, clip_high):
    return clip_low, clip_low if clip_high is None else clip_high


def _metrics(mask, **values):
    with torch.no_grad():
        return {name: _masked_mean(v.double(), mask) for name, v in values.items()}


def vanilla_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=3.0, is_weights=None,
    loss_agg="token-mean", normalizer=None,
):
    """The PPO oracle, with the per-token loss multiplied by w."""
    if is_weights is None:
        return _ppo_policy_loss(
            logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, loss_agg=loss_agg, normalizer=normalizer,
        )
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    _, metrics = _ppo_policy_loss(
        lp.detach(), old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    high = clip_low if clip_high is None else clip_high
    r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    C = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - clip_low, 1 + high))
    L = C if dual_clip is None else torch.where(adv < 0, torch.minimum(C, -adv * dual_clip), C)
    return agg_loss(_zeros_at_padding(L * w, valid), mask, loss_agg, normalizer), metrics


def gpg_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, is_weights=None, loss_agg="token-mean", normalizer=None
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    return agg_loss(_zeros_at_padding(-adv * lp * w, valid), mask, loss_agg, normalizer), {}


def dro_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, beta, is_weights=None, loss_agg="token-mean", normalizer=None
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    L = -(adv * lp - 0.5 * beta * (lp - old) ** 2)
    metrics = _metrics(mask, approx_kl=old - lp)
    return agg_loss(_zeros_at_padding(L * w, valid), mask, loss_agg, normalizer), metrics


def cispo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, is_weights=None,
    loss_agg="token-mean", normalizer=None,
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    low, high = _clip(clip_low, clip_high)
    log_ratio = torch.clamp(lp.detach() - old, -20.0, 20.0)
    r = torch.exp(log_ratio)
    weight = torch.clamp(r, 1 - low, 1 + high)
    L = -weight * adv * lp
    metrics = _metrics(mask, clipfrac=(r != weight), approx_kl=-log_ratio)
    metrics["clipfrac_lower"] = torch.zeros((), dtype=torch.float64)
    return agg_loss(_zeros_at_padding(L * w, valid), mask, loss_agg, normalizer), metrics


def sapo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, tau_pos=1.0, tau_neg=1.05, is_weights=None,
    loss_agg="seq-mean-token-mean", normalizer=None,
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    log_ratio = torch.clamp(lp - old, -20.0, 20.0)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    L = -torch.sigmoid(tau * (torch.exp(log_ratio) - 1)) * 4 / tau * adv
    metrics = _metrics(mask, approx_kl=-log_ratio.detach())
    metrics["clipfrac"] = metrics["clipfrac_lower"] = torch.zeros((), dtype=torch.float64)
    return agg_loss(_zeros_at_padding(L * w, valid), mask, loss_agg, normalizer), metrics


def _dppo(
    binary_kl, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, truncation, is_weights,
    loss_agg, normalizer,
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    low, high = _clip(clip_low, clip_high)
    with torch.no_grad():
        log_ratio = torch.clamp(lp - old, -20.0, 20.0)
        r = torch.exp(log_ratio)
        p, p_old = torch.exp(lp), torch.exp(old)
        if binary_kl:
            kl = p_old * (old - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
            keep = torch.where(adv > 0, (kl <= high) | (p <= p_old), (kl <= low) | (p >= p_old))
        else:
            keep = torch.where(adv > 0, p - p_old <= high, p - p_old >= -low)
    L = -adv * torch.clamp(r, max=truncation) * lp * keep.double()
    metrics = _metrics(mask, clipfrac=~keep, approx_kl=-log_ratio, clipfrac_lower=(r > truncation) & keep)
    return agg_loss(_zeros_at_padding(L * w, valid), mask, loss_agg, normalizer), metrics


def dppo_tv_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, truncation=20.0,
    is_weights=None, loss_agg="token-mean", normalizer=None,
):
    return _dppo(
        False, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, truncation, is_weights,
        loss_agg, normalizer,
    )


def dppo_kl_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, truncation=20.0,
    is_weights=None, loss_agg="token-mean", normalizer=None,
):
    return _dppo(
        True, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, truncation, is_weights,
        loss_agg, normalizer,
    )


def _covariance(lp, adv, weights):
    """(A − Ā)(lp − l̄p) with means weighted by ``weights``."""
    n = weights.sum()
    return (adv - (adv * weights).sum() / n) * (lp - (lp * weights).sum() / n)


@torch.no_grad()
def clip_cov_selection(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio, lower, upper):
    """1.0 (float64 [B, T]) at the first max(⌊ratio·Σm⌋, 1) tokens in row-major order with m > 0, not clipped
    and lower < (A − Ā)(lp − l̄p) < upper (means weighted by m over m ≠ 0)."""
    lp, old, adv, _, valid = _prepare(logprobs.detach(), old_logprobs, advantages, mask, None)
    m = torch.where(valid, mask.double(), torch.zeros_like(old))
    r = torch.exp(lp - old)
    clipped = -adv * torch.clamp(r, 1 - clip_low, 1 + clip_high) > -adv * r
    cov = _covariance(_zeros_at_padding(lp, valid), _zeros_at_padding(adv, valid), m)
    eligible = (mask.double() > 0) & ~clipped & (cov > lower) & (cov < upper)
    budget = max(int(ratio * float(mask.double().sum())), 1)
    selected = torch.zeros_like(old).flatten()
    for index in torch.nonzero(eligible.flatten()).flatten()[:budget]:  # the first ones, row-major
        selected[index] = 1.0
    return selected.view_as(old)


@torch.no_grad()
def kl_cov_selection(logprobs, advantages, mask, ratio):
    """1.0 (float64 [B, T]) at the max(⌊n·ratio⌋, 1) (none when n = 0) tokens with m > 0 of largest
    (A − Ā)(lp − l̄p), means over those n tokens; NaN ranks above every number, equal values by lower
    flat index (a stable sort)."""
    lp, adv = logprobs.detach().double(), advantages.detach().double()
    positive = mask.double() > 0
    selected = torch.zeros_like(lp)
    n = int(positive.sum())
    if n:
        cov = _covariance(lp[positive], adv[positive], torch.ones(n, dtype=torch.float64))
        top = torch.argsort(cov, descending=True, stable=True)[: max(1, int(n * ratio))]
        selected[positive] = torch.zeros(n, dtype=torch.float64).index_fill_(0, top, 1.0)
    return selected


def clip_cov_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_cov_ratio=0.0002,
    clip_cov_lb=1.0, clip_cov_ub=5.0, is_weights=None, loss_agg="token-mean", normalizer=None,
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    low, high = _clip(clip_low, clip_high)
    r = torch.exp(lp - old)
    L1, L2 = -adv * r, -adv * torch.clamp(r, 1 - low, 1 + high)
    selected = clip_cov_selection(lp, old, adv, mask, low, high, clip_cov_ratio, clip_cov_lb, clip_cov_ub)
    L = torch.maximum(L1, L2) * (1 - selected)
    metrics = _metrics(mask, clipfrac=selected, approx_kl=old - lp.detach())
    return agg_loss(_zeros_at_padding(L * w, valid), mask, loss_agg, normalizer), metrics


def kl_cov_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, kl_cov_ratio=0.0002, ppo_kl_coef=0.1, is_weights=None,
    loss_agg="token-mean", normalizer=None,
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    raw = lp - old
    selected = kl_cov_selection(lp, adv, mask, kl_cov_ratio)
    L = -adv * torch.exp(raw) + selected * ppo_kl_coef * raw.abs()
    metrics = _metrics(mask, approx_kl=raw.detach().abs())
    return agg_loss(_zeros_at_padding(L * w, valid), mask, loss_agg, normalizer), metrics


def gspo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, is_weights=None,
    loss_agg="seq-mean-token-mean", normalizer=None,
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    low, high = _clip(clip_low, clip_high)
    m = torch.where(valid, mask.double(), torch.zeros_like(old))
    seq = (_zeros_at_padding(lp.detach() - old, valid) * m).sum(-1, keepdim=True)
    seq = seq / m.sum(-1, keepdim=True).clamp(min=1)
    rho = torch.exp(torch.clamp(lp - lp.detach() + seq, max=10.0))
    L1, L2 = -adv * rho, -adv * torch.clamp(rho, 1 - low, 1 + high)
    metrics = _metrics(mask, clipfrac=L2 > L1, approx_kl=old - lp.detach())
    metrics["clipfrac_lower"] = torch.zeros((), dtype=torch.float64)
    return agg_loss(_zeros_at_padding(torch.maximum(L1, L2) * w, valid), mask, loss_agg, normalizer), metrics


def geo_mean_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, is_weights=None, loss_agg=None,
    normalizer=None,
):
    lp, old, adv, w, valid = _prepare(logprobs, old_logprobs, advantages, mask, is_weights)
    low, high = _clip(clip_low, clip_high)
    m = torch.where(valid, mask.double(), torch.zeros_like(old))
    raw = _zeros_at_padding(lp - old, valid)
    s = torch.sign(adv)
    bounded = torch.clamp(raw, -low, high)
    chosen = s * torch.minimum(s * raw, s * bounded)
    n = m.sum(-1) + 1e-8
    row_loss = -((_zeros_at_padding(adv, valid) * m).sum(-1) / n) * torch.exp((chosen * m).sum(-1) / n)
    if is_weights is not None:
        row_loss = row_loss * torch.exp((_zeros_at_padding(torch.log(w + 1e-10), valid) * m).sum(-1) / n)
    count = row_loss.shape[0] if normalizer is None else torch.as_tensor(normalizer).double()
    loss = row_loss.sum() / count
    clipped = (raw != bounded).detach()
    adv_sign = {"clipfrac": clipped & (adv > 0), "clipfrac_lower": clipped & (adv < 0)}
    return loss, _metrics(mask, approx_kl=-raw.detach(), **adv_sign)


#: verl's registry name -> oracle (the ``<name>_policy_loss`` functions above).
POLICY_LOSSES = {
    name: globals()[f"{name}_policy_loss"]
    for name in (
        "vanilla", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro", "cispo", "dppo_tv",
        "dppo_kl",
    )
}
