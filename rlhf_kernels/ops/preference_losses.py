"""Sequence-level preference losses: DPO and its variants (every ``loss_type`` of TRL 1.16's
``DPOTrainer``), SimPO, CPO, ORPO and KTO, on per-sequence (summed) response log-probabilities.

Notation: c = log π(y_w|x), r = log π(y_l|x) ([B] each, pair b at index b), c_ref, r_ref the reference
model's, n_c, n_r response lengths (clamped to ≥ 1 as TRL does), ρ_c = c − c_ref, ρ_r = r − r_ref,
Δ = ρ_c − ρ_r, sp(x) = −log σ(x); e.g. sigmoid sp(βΔ), hinge max(0, 1 − βΔ).  Each loss is the batch mean
of a per-pair term (a list of loss types: Σ_k w_k · mean_b ℓ_k).  Plain PyTorch, no kernel: O(B) terms
that ``torch.compile`` fuses.  Arithmetic in fp32 (fp64 when any input is fp64), hyperparameters
unrounded; no host sync; NaN propagates; an empty batch gives loss 0.  The formulas, metrics, precision and
why there is no kernel: docs/preference_losses.md.  The float64 oracle: ``reference/preference_losses.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import (
    check_choice,
    check_float_tensor,
    check_in_range,
    check_mask_tensor,
    check_ndim,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)

LOGP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: Where TRL 1.16 and OpenRLHF 0.11.2 disagree (``convention=``): "trl" ignores ``label_smoothing`` on
#: "sigmoid" and length-normalises "ipo"; "openrlhf" applies conservative-DPO smoothing to "sigmoid"
#: and uses IPO on summed log-ratios.
CONVENTIONS = ("trl", "openrlhf")

LOG_HALF = math.log(0.5)  # log1mexp's branch point: below it log1p(−eˣ) is accurate, above it log(−expm1(x))


# ---------------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------------
def _sp(x: Tensor) -> Tensor:
    """sp(x) = −log σ(x), stable for any x."""
    return -F.logsigmoid(x)


def _mean(x: Tensor) -> Tensor:
    """Mean over the batch, 0 for an empty batch (its gradient then has no elements)."""
    return x.sum() / max(x.numel(), 1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0 (Mächler's two branches).  Each branch sees only the inputs it is used
    for, so the unused one cannot put 0·inf = NaN into the gradient (at x → 0⁻ in fp32, eˣ rounds to
    1 and log1p(−eˣ) has an infinite derivative)."""
    low = x < LOG_HALF
    via_log1p = torch.log1p(-torch.exp(torch.where(low, x, LOG_HALF)))
    via_expm1 = torch.log(-torch.expm1(torch.where(low, LOG_HALF, x)))
    return torch.where(low, via_log1p, via_expm1)


def _check_logps(name: str, value: object) -> Tensor:
    check_float_tensor(name, value, LOGP_DTYPES)
    check_ndim(name, value, 1, "[B] (one summed log-probability per sequence)")
    return value


def _check_pair(chosen_name: str, chosen: object, rejected_name: str, rejected: object) -> None:
    _check_logps(chosen_name, chosen)
    _check_logps(rejected_name, rejected)
    if rejected.shape != chosen.shape:
        raise ValueError(
            f"{rejected_name} must have one entry per pair, like {chosen_name} ({chosen.shape[0]} pairs); "
            f"got {rejected.shape[0]}"
        )


def _check_like(name: str, value: object, like: Tensor, like_name: str) -> Tensor:
    _check_logps(name, value)
    check_shape(name, value, like.shape, f"{like_name}.shape")
    return value


def _check_lengths_and_device(like: Tensor, **tensors: Tensor | None) -> None:
    """Checks ``chosen_lengths`` / ``rejected_lengths`` among ``tensors`` (None, or token counts [B] like
    ``like``, the chosen log-probs, integer or floating), then that every tensor given is on one device."""
    for name in ("chosen_lengths", "rejected_lengths"):
        value = tensors.get(name)
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.dtype == torch.bool or value.dtype.is_complex:
            kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{name} must be an integer or floating tensor of token counts; got {kind}")
        check_shape(name, value, like.shape, "chosen_logps.shape")
    check_same_device(**tensors)


def _lengths(name: str, value: Tensor | None, needed_by: str, dtype: torch.dtype) -> Tensor:
    """Checked lengths in ``dtype``; ``needed_by`` says why they are required."""
    if value is None:
        raise ValueError(f"{needed_by} needs {name} (response token counts [B]); got None")
    return value.to(dtype)


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-normalised log-probs, lengths clamped to ≥ 1 (TRL's ``clamp(min=1)``)."""
    return logps / lengths.clamp(min=1.0)


def _chosen_nll(chosen: Tensor, chosen_lengths: Tensor) -> Tensor:
    """The chosen responses' token-mean NLL from their summed log-probs, −Σ c / Σ n_c (TRL's mean over
    every chosen token; 0 for an empty batch)."""
    return -chosen.sum() / chosen_lengths.sum().clamp(min=1.0)


def _metric(x: Tensor) -> Tensor:
    return _mean(x.detach()).to(torch.float32)


def _reward_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    """TRL's paired metrics: mean rewards, accuracy (mean 1[chosen > rejected], ties wrong), margin."""
    return {
        "rewards/chosen": _metric(chosen_rewards),
        "rewards/rejected": _metric(rejected_rewards),
        "rewards/accuracies": _metric((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)),
        "rewards/margins": _metric(chosen_rewards - rejected_rewards),
        "logps/chosen": _metric(chosen_logps),
        "logps/rejected": _metric(rejected_logps),
    }


def _smoothed(x: Tensor, eps: float) -> Tensor:
    """(1 − ε)·sp(x) + ε·sp(−x): conservative DPO (cDPO), AOT."""
    return (1.0 - eps) * _sp(x) + eps * _sp(-x)


# ---------------------------------------------------------------------------------------------------
# DPO: one per-pair term per loss type.
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pairs:
    """Everything a DPO per-pair term reads, in the compute dtype (lengths None when not given)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    discopop_tau: float
    convention: str

    @property
    def chosen_logratio(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> Tensor:
        return self.rejected - self.ref_rejected

    @property
    def delta(self) -> Tensor:
        return self.chosen_logratio - self.rejected_logratio

    @property
    def normalized_delta(self) -> Tensor:
        return _per_token(self.chosen_logratio, self.chosen_lengths) - _per_token(
            self.rejected_logratio, self.rejected_lengths
        )


def _sigmoid(p: _Pairs) -> Tensor:
    if p.convention == "openrlhf":
        return _smoothed(p.beta * p.delta, p.label_smoothing)
    return _sp(p.beta * p.delta)


def _hinge(p: _Pairs) -> Tensor:
    return torch.relu(1.0 - p.beta * p.delta)


def _ipo(p: _Pairs) -> Tensor:
    delta = p.delta if p.convention == "openrlhf" else p.normalized_delta
    return (delta - 1.0 / (2.0 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> Tensor:
    # EXO (arXiv 2402.00856, Eq. 16): KL(softmax over {w, l} of βΔ ‖ (1 − ε, ε)).
    x = p.beta * p.delta
    eps = p.label_smoothing
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )


def _nca_pair(p: _Pairs) -> Tensor:
    chosen, rejected = p.beta * p.chosen_logratio, p.beta * p.rejected_logratio
    return _sp(chosen) + 0.5 * _sp(-chosen) + 0.5 * _sp(-rejected)


def _robust(p: _Pairs) -> Tensor:
    # rDPO (arXiv 2403.00409): ε is the probability that a label is flipped.
    x, eps = p.beta * p.delta, p.label_smoothing
    return ((1.0 - eps) * _sp(x) - eps * _sp(-x)) / (1.0 - 2.0 * eps)


def _bco_pair(p: _Pairs) -> Tensor:
    return _sp(p.beta * p.chosen_logratio) + _sp(-p.beta * p.rejected_logratio)


def _sppo_hard(p: _Pairs) -> Tensor:
    half_over_beta = 0.5 / p.beta
    return (p.chosen_logratio - half_over_beta) ** 2 + (p.rejected_logratio + half_over_beta) ** 2


def _aot(p: _Pairs) -> Tensor:
    # AOT (arXiv 2406.05882): the sorted policy log-ratios against the sorted reference ones.
    policy = torch.sort(p.chosen - p.rejected).values
    reference = torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed(p.beta * (policy - reference), p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> Tensor:
    delta = torch.sort(p.chosen_logratio).values - torch.sort(p.rejected_logratio).values
    return _smoothed(p.beta * delta, p.label_smoothing)


def _apo_zero(p: _Pairs) -> Tensor:
    # APO (arXiv 2408.06266, Eq. 7): raise chosen, lower rejected likelihood.
    return 1.0 - torch.sigmoid(p.beta * p.chosen_logratio) + torch.sigmoid(p.beta * p.rejected_logratio)


def _apo_down(p: _Pairs) -> Tensor:
    # APO Eq. 8: lower chosen, and rejected more.
    return torch.sigmoid(p.beta * p.chosen_logratio) + 1.0 - torch.sigmoid(p.beta * p.delta)


def _discopop(p: _Pairs) -> Tensor:
    # DiscoPOP (arXiv 2406.08414, Eq. 5): (1 − m)·sp(x) + m·e^{−x}, m = σ(x/τ).  m·e^{−x} is taken as
    # exp(log σ(x/τ) − x): TRL's product gives 0·inf = NaN once e^{−x} overflows (x < −88 in fp32).
    x = p.beta * p.delta
    modulation = torch.sigmoid(x / p.discopop_tau)
    return _sp(x) * (1.0 - modulation) + torch.exp(F.logsigmoid(x / p.discopop_tau) - x)


def _sft(p: _Pairs) -> Tensor:
    # The chosen responses' token-mean NLL, as a constant per pair.
    return _chosen_nll(p.chosen, p.chosen_lengths).expand(p.chosen.shape)


def _sigmoid_norm(p: _Pairs) -> Tensor:
    return _sp(p.beta * p.normalized_delta)


_DPO_TERMS: dict[str, Callable[[_Pairs], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}
#: Every loss type of TRL 1.16's ``DPOTrainer``, in TRL's order.
DPO_LOSS_TYPES = tuple(_DPO_TERMS)
#: Loss types that need no reference log-probs.
REFERENCE_FREE_LOSS_TYPES = ("sft",)


def _needs_lengths(loss_type: str, convention: str) -> tuple[bool, bool]:
    """(needs chosen lengths, needs rejected lengths)."""
    if loss_type == "sigmoid_norm" or (loss_type == "ipo" and convention == "trl"):
        return True, True
    return loss_type == "sft", False


def _check_label_smoothing(value: object, loss_types: Sequence[str]) -> float:
    eps = check_in_range("label_smoothing", value, 0.0, 1.0)
    if "exo_pair" in loss_types and not 0.0 < eps < 1.0:
        raise ValueError(
            f"label_smoothing must be in (0, 1) for loss_type 'exo_pair' (EXO's ε, e.g. 1e-3); got {eps}"
        )
    if "robust" in loss_types and not eps < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) for loss_type 'robust' (a flip probability); got {eps}"
        )
    return eps


def _loss_types_and_weights(
    loss_type: object, loss_weights: object
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    loss_types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(loss_types, Sequence) or len(loss_types) == 0:
        raise ValueError(
            f"loss_type must be one of {DPO_LOSS_TYPES} or a non-empty list of them; got {loss_type!r}"
        )
    for name in loss_types:
        check_choice("loss_type", name, DPO_LOSS_TYPES)
    if loss_weights is None:
        return tuple(loss_types), (1.0,) * len(loss_types)
    if not isinstance(loss_weights, Sequence) or len(loss_weights) != len(loss_types):
        raise ValueError(
            f"loss_weights must be a list of one weight per loss type ({len(loss_types)}: "
            f"{list(loss_types)}); got {loss_weights!r}"
        )
    return tuple(loss_types), tuple(check_real("loss_weights", w) for w in loss_weights)


def dpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None, *, beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0, discopop_tau: float = 0.05, chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None, convention: str = "trl",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimization and its variants, as TRL 1.16's ``DPOTrainer`` computes them:
    loss = Σ_k w_k · mean_b ℓ_k(pair b), one per-pair term ℓ per ``loss_type`` (:data:`DPO_LOSS_TYPES`, or a
    list of them with ``loss_weights``, default 1 each); the table of terms is in docs/preference_losses.md.

    Shapes: chosen_logps, rejected_logps [B] summed response log-probs of the policy (float32, bfloat16,
    float16 or float64); ref_chosen_logps, ref_rejected_logps [B], or None for "sft"; chosen_lengths,
    rejected_lengths [B] token counts (needed by "sigmoid_norm", TRL's "ipo", chosen by "sft").  β > 0 (IPO's
    τ); ``label_smoothing`` ε is read by "robust" ([0, 0.5)), "exo_pair" ((0, 1)), "aot", "aot_unpaired" and
    OpenRLHF's "sigmoid"; ``discopop_tau`` τ > 0; ``convention`` one of :data:`CONVENTIONS`.  No token mask:
    every entry is one sequence.  Returns (0-dim fp32 loss (fp64 for fp64), TRL's metrics: rewards/chosen,
    rewards/rejected = means of β·ρ (β·c, β·r without references), rewards/accuracies, rewards/margins,
    logps/chosen, logps/rejected).

    Example: c = [−5], r = [−7], c_ref = r_ref = [−6], β = 0.1: Δ = 2, sigmoid loss sp(0.2) = 0.5981,
    rewards/chosen 0.1, rewards/rejected −0.1, accuracy 1, margin 0.2.
    """
    loss_types, weights = _loss_types_and_weights(loss_type, loss_weights)
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    beta = check_positive("beta", beta)
    eps = _check_label_smoothing(label_smoothing, loss_types)
    discopop_tau = check_positive("discopop_tau", discopop_tau)
    convention = check_choice("convention", convention, CONVENTIONS)

    has_reference = ref_chosen_logps is not None or ref_rejected_logps is not None
    needing_reference = [t for t in loss_types if t not in REFERENCE_FREE_LOSS_TYPES]
    if needing_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
        raise ValueError(f"loss_type {needing_reference[0]!r} needs reference log-probs; {missing} is None")
    if has_reference:
        _check_like("ref_chosen_logps", ref_chosen_logps, chosen_logps, "chosen_logps")
        _check_like("ref_rejected_logps", ref_rejected_logps, chosen_logps, "chosen_logps")
    _check_lengths_and_device(
        chosen_logps, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )

    dtype = compute_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    lengths = []
    for side, name in enumerate(("chosen_lengths", "rejected_lengths")):
        value = (chosen_lengths, rejected_lengths)[side]
        needed_by = [t for t in loss_types if _needs_lengths(t, convention)[side]]
        why = f"loss_type {needed_by[0]!r}" if needed_by else ""
        lengths.append(_lengths(name, value, why, dtype) if value is not None or needed_by else None)

    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    ref_chosen = ref_chosen_logps.to(dtype) if has_reference else None
    ref_rejected = ref_rejected_logps.to(dtype) if has_reference else None
    pairs = _Pairs(chosen, rejected, ref_chosen, ref_rejected, *lengths, beta, eps, discopop_tau, convention)
    loss = sum(weight * _mean(_DPO_TERMS[name](pairs)) for name, weight in zip(loss_types, weights))

    chosen_rewards = beta * (pairs.chosen_logratio if has_reference else chosen)
    rejected_rewards = beta * (pairs.rejected_logratio if has_reference else rejected)
    return loss, _reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


# ---------------------------------------------------------------------------------------------------
# Reference-free pairwise losses: CPO (and SimPO, its "simpo" loss type) and ORPO.
# ---------------------------------------------------------------------------------------------------
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
_AVERAGED_CPO_LOSS_TYPES = ("ipo", "simpo")  # TRL's CPO averages the log-probs over the response for these


def cpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None, *, beta: float = 0.1, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, cpo_alpha: float = 1.0, simpo_gamma: float = 0.5, alpha: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Contrastive Preference Optimization (arXiv 2401.08417), as TRL 1.16's ``CPOTrainer``: with scores
    s = c, r (c/n_c, r/n_r for "ipo", "simpo"), AlphaPO rewards (1 − e^{−α·s})/α when α ≠ 0 and x = s_c − s_r,
    loss = mean_b ℓ(x) + cpo_alpha · NLL, ℓ of :data:`CPO_LOSS_TYPES` (sigmoid (1 − ε)·sp(βx) + ε·sp(−βx),
    hinge, ipo; simpo: sigmoid at x − γ/β), NLL = −Σ c / Σ n_c.  Shapes: chosen_logps, rejected_logps [B]
    policy log-probs (no reference); chosen_lengths, rejected_lengths [B] token counts (both needed by "ipo"
    and "simpo", chosen by cpo_alpha ≠ 0).  Returns (loss, :func:`dpo_loss`'s metrics with rewards β·s and
    "logps/*" the means of s before AlphaPO, plus "nll_loss").  Details: docs/preference_losses.md.
    """
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    beta = check_positive("beta", beta)
    loss_type = check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    eps = check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    cpo_alpha = check_real("cpo_alpha", cpo_alpha)
    simpo_gamma = check_real("simpo_gamma", simpo_gamma)
    alpha = check_real("alpha", alpha)
    _check_lengths_and_device(
        chosen_logps, chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    dtype = compute_dtype(chosen_logps, rejected_logps)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    averaged = loss_type in _AVERAGED_CPO_LOSS_TYPES
    if averaged or cpo_alpha != 0.0:
        why = f"loss_type {loss_type!r}" if averaged else f"the NLL term (cpo_alpha={cpo_alpha})"
        n_chosen = _lengths("chosen_lengths", chosen_lengths, why, dtype)
    if averaged:
        n_rejected = _lengths("rejected_lengths", rejected_lengths, f"loss_type {loss_type!r}", dtype)
        score_chosen, score_rejected = _per_token(chosen, n_chosen), _per_token(rejected, n_rejected)
    else:
        score_chosen, score_rejected = chosen, rejected
    if alpha != 0.0:  # AlphaPO (arXiv 2501.03884): r = (1 − p^{−α})/α, p^{−α} = e^{−α·s}
        reward_chosen = -torch.expm1(-alpha * score_chosen) / alpha
        reward_rejected = -torch.expm1(-alpha * score_rejected) / alpha
    else:
        reward_chosen, reward_rejected = score_chosen, score_rejected

    x = reward_chosen - reward_rejected
    if loss_type == "hinge":
        per_pair = torch.relu(1.0 - beta * x)
    elif loss_type == "ipo":
        per_pair = (x - 1.0 / (2.0 * beta)) ** 2
    else:
        shift = simpo_gamma / beta if loss_type == "simpo" else 0.0
        per_pair = _smoothed(beta * (x - shift), eps)
    nll = _chosen_nll(chosen, n_chosen) if cpo_alpha != 0.0 else x.new_zeros(())
    loss = _mean(per_pair) + cpo_alpha * nll

    metrics = _reward_metrics(beta * reward_chosen, beta * reward_rejected, score_chosen, score_rejected)
    metrics["nll_loss"] = nll.detach().to(torch.float32)
    return loss, metrics


def simpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
    beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0, sft_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (arXiv 2405.14734): mean_b sp(β·c/n_c − β·r/n_r − γ) (+ ``sft_weight`` · NLL) on [B] policy
    log-probs and [B] token counts; :func:`cpo_loss` with ``loss_type="simpo"``, ``simpo_gamma=gamma``,
    ``cpo_alpha=sft_weight``, which is how TRL runs SimPO (returns and docs as there).
    """
    return cpo_loss(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=beta, loss_type="simpo",
        label_smoothing=label_smoothing, cpo_alpha=sft_weight, simpo_gamma=gamma,
    )


def orpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
    beta: float = 0.1, nll_loss: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Odds Ratio Preference Optimization (arXiv 2403.07691), as TRL 1.16's ``ORPOTrainer``: with a = c/n_c,
    r/n_r and log odds = a − log(1 − eᵃ), loss = NLL − β · mean_b log σ(log odds_c − log odds_r).  Shapes:
    chosen_logps, rejected_logps [B] policy log-probs (every a < 0), chosen_lengths, rejected_lengths [B]
    token counts; ``nll_loss`` a 0-dim SFT term, or None for −Σ c / Σ n_c (TRL's also counts the prompt:
    pass it to match TRL exactly).  Returns (loss, :func:`dpo_loss`'s metrics with rewards β·a, plus
    "log_odds_ratio", "log_odds_chosen", "nll_loss").  Details: docs/preference_losses.md.
    """
    _check_pair("chosen_logps", chosen_logps, "rejected_logps", rejected_logps)
    beta = check_positive("beta", beta)
    if nll_loss is not None:
        check_float_tensor("nll_loss", nll_loss, LOGP_DTYPES)
        check_ndim("nll_loss", nll_loss, 0, "(a 0-dim loss)")
    _check_lengths_and_device(
        chosen_logps, chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, nll_loss=nll_loss,
    )
    dtype = compute_dtype(chosen_logps, rejected_logps, nll_loss)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    n_chosen = _lengths("chosen_lengths", chosen_lengths, "orpo_loss", dtype)
    n_rejected = _lengths("rejected_lengths", rejected_lengths, "orpo_loss", dtype)
    avg_chosen, avg_rejected = _per_token(chosen, n_chosen), _per_token(rejected, n_rejected)
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    nll = _chosen_nll(chosen, n_chosen) if nll_loss is None else nll_loss.to(dtype)
    loss = nll - beta * _mean(log_sigmoid_odds)

    metrics = _reward_metrics(beta * avg_chosen, beta * avg_rejected, avg_chosen, avg_rejected)
    metrics["log_odds_ratio"] = _metric(log_sigmoid_odds)
    metrics["log_odds_chosen"] = _metric(log_odds)
    metrics["nll_loss"] = nll.detach().to(torch.float32)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# KTO: unpaired desirable / undesirable responses.
# ---------------------------------------------------------------------------------------------------
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(
    policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None, *, beta: float = 0.1, desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0, loss_type: str = "kto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Kahneman-Tversky Optimization (arXiv 2402.01306), as TRL 1.16's ``KTOTrainer``: with ρ = log π −
    log π_ref and the detached reference point z = max(0, mean(kl_logps − ref_kl_logps)), loss = mean over
    the N responses of w_d·(1 − σ(β(ρ − z))) (desirable) or w_u·(1 − σ(β(z − ρ))) (undesirable);
    "apo_zero_unpaired": w_d·(1 − σ(βρ)), w_u·σ(βρ), no z.  Shapes: policy_logps, ref_logps [N], desirable
    [N] bool or 0/1, kl_logps, ref_kl_logps [M] (the mismatched KL completions, required by "kto", never
    differentiated).  Returns (loss, metrics "kl" = z, "rewards/chosen" / "rewards/rejected" (mean β·ρ per
    group, 0 for an empty group), "rewards/margins", "logps/chosen", "logps/rejected").  Details:
    docs/preference_losses.md.
    """
    _check_logps("policy_logps", policy_logps)
    _check_like("ref_logps", ref_logps, policy_logps, "policy_logps")
    check_mask_tensor("desirable", desirable)
    check_shape("desirable", desirable, policy_logps.shape, "policy_logps.shape")
    beta = check_positive("beta", beta)
    desirable_weight = check_in_range("desirable_weight", desirable_weight, 0.0, math.inf)
    undesirable_weight = check_in_range("undesirable_weight", undesirable_weight, 0.0, math.inf)
    loss_type = check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    uses_kl = loss_type == "kto"
    if uses_kl:
        if kl_logps is None or ref_kl_logps is None:
            missing = "kl_logps" if kl_logps is None else "ref_kl_logps"
            raise ValueError(f"loss_type 'kto' needs the KL completions' log-probs; {missing} is None")
        _check_logps("kl_logps", kl_logps)
        _check_like("ref_kl_logps", ref_kl_logps, kl_logps, "kl_logps")
    check_same_device(
        policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable,
        kl_logps=kl_logps if uses_kl else None, ref_kl_logps=ref_kl_logps if uses_kl else None,
    )
    dtype = compute_dtype(policy_logps, ref_logps, *((kl_logps, ref_kl_logps) if uses_kl else ()))
    policy = policy_logps.to(dtype)
    logratio = policy - ref_logps.to(dtype)
    good = desirable != 0
    if uses_kl:
        kl = _mean(kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)).clamp(min=0.0)
        desirable_term = 1.0 - torch.sigmoid(beta * (logratio - kl))
        undesirable_term = 1.0 - torch.sigmoid(beta * (kl - logratio))
    else:
        kl = logratio.new_zeros(())
        desirable_term = 1.0 - torch.sigmoid(beta * logratio)
        undesirable_term = torch.sigmoid(beta * logratio)
    per_response = torch.where(good, desirable_weight * desirable_term, undesirable_weight * undesirable_term)
    loss = _mean(per_response)

    with torch.no_grad():
        rewards = beta * logratio
        n_good = good.sum().clamp(min=1).to(dtype)
        n_bad = (~good).sum().clamp(min=1).to(dtype)
        chosen_reward = torch.where(good, rewards, 0.0).sum() / n_good
        rejected_reward = torch.where(good, 0.0, rewards).sum() / n_bad
        metrics = {
            "kl": kl.to(torch.float32),
            "rewards/chosen": chosen_reward.to(torch.float32),
            "rewards/rejected": rejected_reward.to(torch.float32),
            "rewards/margins": (chosen_reward - rejected_reward).to(torch.float32),
            "logps/chosen": (torch.where(good, policy, 0.0).sum() / n_good).to(torch.float32),
            "logps/rejected": (torch.where(good, 0.0, policy).sum() / n_bad).to(torch.float32),
        }
    return loss, metrics


__all__ = [
    "CONVENTIONS",
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "REFERENCE_FREE_LOSS_TYPES",
    "cpo_loss",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
]
