"""Float64 oracles of the preference losses, straight from the formulas (see docs/preference_losses.md).

Same signatures as the public functions of ``ops/preference_losses.py``; every input is moved to float64
first, each loss type is written out on its own, and scalars enter the float64 arithmetic unrounded.
Metrics are float64 here (the public functions return them in fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _f64(x):
    return None if x is None else x.to(torch.float64)


def _logsig(x):
    return F.logsigmoid(x)  # log σ(x), stable in float64 for any x


def _mean(x):
    return x.sum() / max(x.numel(), 1)


def _paired_metrics(chosen_rewards, rejected_rewards, chosen, rejected):
    with torch.no_grad():
        return {
            "rewards/chosen": _mean(chosen_rewards),
            "rewards/rejected": _mean(rejected_rewards),
            "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).double()),
            "rewards/margins": _mean(chosen_rewards - rejected_rewards),
            "logps/chosen": _mean(chosen),
            "logps/rejected": _mean(rejected),
        }


def _dpo_term(name, c, r, rc, rr, nc, nr, beta, eps, tau, convention):
    if name == "sft":  # token-mean NLL over every chosen token
        return (-c.sum() / nc.sum().clamp(min=1)).expand(c.shape)
    if nc is not None:  # length normalisation divides by max(n, 1)
        nc = nc.clamp(min=1)
    if nr is not None:
        nr = nr.clamp(min=1)
    rho_c, rho_r = c - rc, r - rr
    delta = rho_c - rho_r
    if name == "sigmoid":
        if convention == "openrlhf":
            return -(1 - eps) * _logsig(beta * delta) - eps * _logsig(-beta * delta)
        return -_logsig(beta * delta)
    if name == "hinge":
        return torch.clamp(1 - beta * delta, min=0)
    if name == "ipo":
        d = delta if convention == "openrlhf" else rho_c / nc - rho_r / nr
        return (d - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        x = beta * delta
        return torch.sigmoid(x) * (_logsig(x) - math.log(1 - eps)) + torch.sigmoid(-x) * (
            _logsig(-x) - math.log(eps)
        )
    if name == "nca_pair":
        return -_logsig(beta * rho_c) - 0.5 * _logsig(-beta * rho_c) - 0.5 * _logsig(-beta * rho_r)
    if name == "robust":
        return (-(1 - eps) * _logsig(beta * delta) + eps * _logsig(-beta * delta)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -_logsig(beta * rho_c) - _logsig(-beta * rho_r)
    if name == "sppo_hard":
        return (rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            d = torch.sort(c - r).values - torch.sort(rc - rr).values
        else:
            d = torch.sort(rho_c).values - torch.sort(rho_r).values
        return -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
    if name == "apo_zero":
        return (1 - torch.sigmoid(beta * rho_c)) + torch.sigmoid(beta * rho_r)
    if name == "apo_down":
        return torch.sigmoid(beta * rho_c) + (1 - torch.sigmoid(beta * delta))
    if name == "discopop":
        x = beta * delta
        m = torch.sigmoid(x / tau)
        return -_logsig(x) * (1 - m) + torch.exp(-x) * m
    if name == "sigmoid_norm":
        return -_logsig(beta * (rho_c / nc - rho_r / nr))
    raise ValueError(name)


def dpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta=0.1,
    loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, discopop_tau=0.05,
    chosen_lengths=None, rejected_lengths=None, convention="trl",
):
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    c, r, rc, rr = map(_f64, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    nc = None if chosen_lengths is None else _f64(chosen_lengths)
    nr = None if rejected_lengths is None else _f64(rejected_lengths)
    loss = torch.zeros((), dtype=torch.float64)
    for name, weight in zip(names, weights):
        term = _dpo_term(name, c, r, rc, rr, nc, nr, beta, label_smoothing, discopop_tau, convention)
        loss = loss + weight * _mean(term)
    if rc is None:
        return loss, _paired_metrics(beta * c, beta * r, c, r)
    return loss, _paired_metrics(beta * (c - rc), beta * (r - rr), c, r)


def cpo_loss(
    chosen_logps, rejected_logps, chosen_lengths=None, rejected_lengths=None, *, beta=0.1,
    loss_type="sigmoid", label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0,
):
    c, r = _f64(chosen_logps), _f64(rejected_logps)
    if loss_type in ("ipo", "simpo"):
        s_c = c / _f64(chosen_lengths).clamp(min=1)
        s_r = r / _f64(rejected_lengths).clamp(min=1)
    else:
        s_c, s_r = c, r
    if alpha != 0:
        u_c = (1 - torch.exp(s_c).pow(-alpha)) / alpha
        u_r = (1 - torch.exp(s_r).pow(-alpha)) / alpha
    else:
        u_c, u_r = s_c, s_r
    x = u_c - u_r
    eps = label_smoothing
    if loss_type == "hinge":
        per_pair = torch.clamp(1 - beta * x, min=0)
    elif loss_type == "ipo":
        per_pair = (x - 1 / (2 * beta)) ** 2
    else:
        if loss_type == "simpo":
            x = x - simpo_gamma / beta
        per_pair = -(1 - eps) * _logsig(beta * x) - eps * _logsig(-beta * x)
    nll = (
        -c.sum() / _f64(chosen_lengths).sum().clamp(min=1)
        if cpo_alpha != 0
        else torch.zeros((), dtype=torch.float64)
    )
    metrics = _paired_metrics(beta * u_c, beta * u_r, s_c, s_r)
    metrics["nll_loss"] = nll.detach()
    return _mean(per_pair) + cpo_alpha * nll, metrics


def simpo_loss(
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=2.0, gamma=0.5,
    label_smoothing=0.0, sft_weight=0.0,
):
    c, r = _f64(chosen_logps), _f64(rejected_logps)
    nc, nr = _f64(chosen_lengths).clamp(min=1), _f64(rejected_lengths).clamp(min=1)
    x = beta * c / nc - beta * r / nr - gamma
    eps = label_smoothing
    loss = _mean(-(1 - eps) * _logsig(x) - eps * _logsig(-x))
    nll = -c.sum() / _f64(chosen_lengths).sum().clamp(min=1)
    metrics = _paired_metrics(beta * c / nc, beta * r / nr, c / nc, r / nr)
    metrics["nll_loss"] = (nll if sft_weight != 0 else torch.zeros((), dtype=torch.float64)).detach()
    return loss + (sft_weight * nll if sft_weight != 0 else 0.0), metrics


def orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta=0.1, nll_loss=None):
    c, r = _f64(chosen_logps), _f64(rejected_logps)
    a_c = c / _f64(chosen_lengths).clamp(min=1)
    a_r = r / _f64(rejected_lengths).clamp(min=1)
    # log odds(p) = log p − log(1 − p), with p = e^a; log(1 − e^a) = log(−expm1(a)) is exact in fp64
    log_odds = (a_c - torch.log(-torch.expm1(a_c))) - (a_r - torch.log(-torch.expm1(a_r)))
    ratio = _logsig(log_odds)
    nll = -c.sum() / _f64(chosen_lengths).sum().clamp(min=1) if nll_loss is None else _f64(nll_loss)
    metrics = _paired_metrics(beta * a_c, beta * a_r, a_c, a_r)
    with torch.no_grad():
        metrics.update(log_odds_ratio=_mean(ratio), log_odds_chosen=_mean(log_odds), nll_loss=nll.clone())
    return nll - beta * _mean(ratio), metrics


def kto_loss(
    policy_logps, ref_logps, desirable, kl_logps=None, ref_kl_logps=None, *, beta=0.1,
    desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
):
    rho = _f64(policy_logps) - _f64(ref_logps)
    good = desirable.bool()
    if loss_type == "kto":
        z = _mean(_f64(kl_logps).detach() - _f64(ref_kl_logps).detach()).clamp(min=0)
        chosen_terms = 1 - torch.sigmoid(beta * (rho[good] - z))
        rejected_terms = 1 - torch.sigmoid(beta * (z - rho[~good]))
    else:
        z = torch.zeros((), dtype=torch.float64)
        chosen_terms = 1 - torch.sigmoid(beta * rho[good])
        rejected_terms = torch.sigmoid(beta * rho[~good])
    terms = torch.cat([desirable_weight * chosen_terms, undesirable_weight * rejected_terms])
    with torch.no_grad():
        logps = _f64(policy_logps)
        metrics = {
            "kl": z,
            "rewards/chosen": _mean(beta * rho[good]),
            "rewards/rejected": _mean(beta * rho[~good]),
            "logps/chosen": _mean(logps[good]),
            "logps/rejected": _mean(logps[~good]),
        }
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return _mean(terms), metrics
