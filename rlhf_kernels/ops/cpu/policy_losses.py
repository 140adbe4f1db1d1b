"""The PyTorch path of the token-level policy-loss core (any device), registered as
``policy_loss_token_fwd_torch`` / ``policy_loss_token_bwd_torch``.

The math of every variant is documented in ``rlhf_kernels/ops/policy_losses.py``; here each variant is a
small function of one chunk of tokens returning ``(L, ∂L/∂lp, kl, clip, clip_lower, ratio)``, and the
row-chunked forward/backward shapes are those of the PPO losses (``ops/cpu/ppo_losses.py``), reused.
"""

from __future__ import annotations

import torch

from ..._registration import torch_op
from ..._validation import compute_dtype
from .ppo_losses import (
    LOG_RATIO_CLAMP,
    P_CLIP,
    P_CLIP_LOWER,
    P_NEG_LOG_RATIO,
    P_RATIO,
    P_RATIO_MAX,
    POLICY_STATS,
    _backward,
    _forward,
    _grad_fake,
    _partials_fake,
    _row_dot,
    policy_terms,
)

Tensor = torch.Tensor
GSPO_LOG_RATIO_MAX = 10.0  # verl clamps GSPO's sequence log-ratio above at 10
BINARY_KL_EPS = 1e-8  # verl's ε inside DPPO-KL's log((1 − p_old + ε) / (1 − p + ε))
SAPO_GATE_SCALE = 4.0  # SAPO's gate σ(τ(r − 1))·4/τ
GEO_MEAN_EPS = 1e-8  # verl's n + 1e-8 in masked means (geo_mean's rows, clip_cov's covariance)
IS_LOG_EPS = 1e-10  # verl's log(w + 1e-10) in geo_mean's geometric mean of the weights

#: Variants of the token-level core, in the order of their kernel codes.
TOKEN_VARIANTS = (
    "vanilla", "gpg", "dro", "cispo", "sapo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "gspo", "geo_mean"
)


def _clamped_ratio(raw):
    """(ℓ = clamp(raw, ±20), r = e^ℓ, whether raw is inside the clamp or NaN)."""
    log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    inside = ((raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP)) | raw.isnan()
    return log_ratio, log_ratio.exp(), inside


def _where_nan(x, value):
    """``value`` where x is a number, NaN where x is NaN (keeps NaN flowing into constant derivatives)."""
    return torch.where(x.isnan(), x, value)


def _surrogate(adv, ratio, clip_low, clip_high):
    """(max(−A·r, −A·clamp(r, 1 − ε_low, 1 + ε_high)), clipped)."""
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(loss1, loss2), loss2 > loss1


def _vanilla(lp, old, adv, aux, clip_low, clip_high, dual_clip):
    loss, log_ratio, ratio, clipped, lower, raw = policy_terms(lp, old, adv, clip_low, clip_high, dual_clip)
    unclipped = ~(clipped | lower)
    inside = ((raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP)) | raw.isnan()
    return loss, torch.where(unclipped & inside, -adv * ratio, 0.0), -log_ratio, clipped, lower, ratio


def _gpg(lp, old, adv, aux, *params):
    return -lp * adv, _where_nan(lp, -adv), old - lp, None, None, None


def _dro(lp, old, adv, aux, beta, *params):
    raw = lp - old
    return -(lp * adv - 0.5 * beta * raw * raw), -adv + beta * raw, -raw, None, None, None


def _cispo(lp, old, adv, aux, clip_low, clip_high, *params):
    log_ratio, ratio, _ = _clamped_ratio(lp - old)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    d = _where_nan(lp, -clipped_ratio * adv)
    return -clipped_ratio * adv * lp, d, -log_ratio, ratio != clipped_ratio, None, None


def _sapo(lp, old, adv, aux, tau_pos, tau_neg, *params):
    log_ratio, ratio, inside = _clamped_ratio(lp - old)
    tau = torch.where(adv > 0, adv.new_tensor(tau_pos), adv.new_tensor(tau_neg))  # in the compute dtype
    z = tau * (ratio - 1.0)
    gate = torch.sigmoid(z)
    loss = -gate * (SAPO_GATE_SCALE / tau) * adv
    # σ'(z) = σ(z)·σ(−z): no cancellation in 1 − σ(z) where σ(z) rounds to 1.
    d = torch.where(inside, -adv * SAPO_GATE_SCALE * gate * torch.sigmoid(-z) * ratio, 0.0)
    return loss, d, -log_ratio, None, None, None


def _dppo_valid(lp, old, adv, clip_low, clip_high, binary_kl: bool):
    prob, old_prob = lp.exp(), old.exp()
    if binary_kl:
        kl = old_prob * (old - lp) + (1.0 - old_prob) * torch.log(
            (1.0 - old_prob + BINARY_KL_EPS) / (1.0 - prob + BINARY_KL_EPS)
        )
        positive = (kl <= clip_high) | (prob <= old_prob)
        negative = (kl <= clip_low) | (prob >= old_prob)
    else:
        positive = (prob - old_prob) <= clip_high
        negative = (prob - old_prob) >= -clip_low
    return torch.where(adv > 0, positive, negative)


def _dppo(binary_kl: bool):
    def terms(lp, old, adv, aux, clip_low, clip_high, truncation):
        log_ratio, ratio, _ = _clamped_ratio(lp - old)
        truncated = torch.where(ratio > truncation, truncation, ratio)
        valid = _dppo_valid(lp, old, adv, clip_low, clip_high, binary_kl).to(lp.dtype)
        coef = -adv * truncated * valid
        lower = (ratio > truncation) & (valid != 0)
        return coef * lp, _where_nan(lp, coef), -log_ratio, valid == 0, lower, None

    return terms


def _clip_cov(lp, old, adv, selected, clip_low, clip_high, *params):
    raw = lp - old
    ratio = raw.exp()
    loss, clipped = _surrogate(adv, ratio, clip_low, clip_high)
    keep = 1.0 - selected
    d = torch.where(clipped, 0.0, -adv * ratio) * keep
    return loss * keep, d, -raw, selected, None, None


def _kl_cov(lp, old, adv, selected, coef, *params):
    raw = lp - old
    ratio = raw.exp()
    loss = -adv * ratio + selected * coef * raw.abs()
    return loss, -adv * ratio + selected * coef * _where_nan(raw, raw.sign()), raw.abs(), None, None, None


def _gspo(lp, old, adv, seq_log_ratio, clip_low, clip_high, *params):
    log_ratio = seq_log_ratio.clamp(max=GSPO_LOG_RATIO_MAX)
    ratio = log_ratio.exp()
    loss, clipped = _surrogate(adv, ratio, clip_low, clip_high)
    passes = (seq_log_ratio <= GSPO_LOG_RATIO_MAX) | seq_log_ratio.isnan()
    d = torch.where(~clipped & passes, _where_nan(lp, -adv * ratio), 0.0)
    return loss, d, old - lp, clipped, None, None


def _geo_mean(lp, old, adv, aux, clip_low, clip_high, *params):
    raw = lp - old
    sign = adv.sign()
    bounded = raw.clamp(-clip_low, clip_high)
    chosen = sign * torch.minimum(sign * raw, sign * bounded)
    # torch.min splits the gradient at ties, where bounded = raw has derivative 1: the raw side always wins.
    d = torch.where(sign * raw <= sign * bounded, sign * sign, 0.0)
    clipped = raw != bounded
    return chosen, _where_nan(raw, d), -raw, clipped & (adv > 0), clipped & (adv < 0), None


TERMS = {
    "vanilla": _vanilla,
    "gpg": _gpg,
    "dro": _dro,
    "cispo": _cispo,
    "sapo": _sapo,
    "dppo_tv": _dppo(binary_kl=False),
    "dppo_kl": _dppo(binary_kl=True),
    "clip_cov": _clip_cov,
    "kl_cov": _kl_cov,
    "gspo": _gspo,
    "geo_mean": _geo_mean,
}


def _inputs(logprobs, old_logprobs, advantages, aux, is_weights):
    """The chunked inputs: (lp, old, A, aux, w), with zeros for a missing aux and ones for missing weights."""
    aux = torch.zeros_like(logprobs) if aux is None else aux
    weights = torch.ones_like(logprobs) if is_weights is None else is_weights
    return logprobs, old_logprobs, advantages, aux, weights


def _fwd(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, aux: Tensor | None,
    is_weights: Tensor | None, variant: str, params: list[float],
) -> tuple[Tensor, Tensor]:
    terms = TERMS[variant]

    def chunk_terms(valid, m, lp, old, adv, aux_, w):
        loss, _, kl, clip, clip_lower, ratio = terms(lp, old, adv, aux_, *params)
        row_stats = {P_NEG_LOG_RATIO: _row_dot(kl, m)}
        for index, flags in ((P_CLIP, clip), (P_CLIP_LOWER, clip_lower)):
            if flags is not None:
                row_stats[index] = _row_dot(flags, m)
        if ratio is not None:  # tracked for "vanilla" only (ppo_policy_loss's ratio metrics)
            row_stats[P_RATIO] = _row_dot(ratio, m)
            row_stats[P_RATIO_MAX] = torch.where(valid & (ratio > 0), ratio, 0.0).amax(-1)
        return loss * w, row_stats

    inputs = _inputs(logprobs, old_logprobs, advantages, aux, is_weights)
    return _forward(inputs, mask, POLICY_STATS, chunk_terms)


def _bwd(
    grad_partials: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    aux: Tensor | None, is_weights: Tensor | None, variant: str, params: list[float],
) -> Tensor:
    terms = TERMS[variant]

    def derivative(lp, old, adv, aux_, w):
        return terms(lp, old, adv, aux_, *params)[1] * w

    inputs = _inputs(logprobs, old_logprobs, advantages, aux, is_weights)
    return _backward(grad_partials, inputs, mask, derivative)


# ---------------------------------------------------------------------------------------------------
# clip_cov / kl_cov token selection: plain torch on the tensors' device, no host sync.
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def _masked_means(mask: torch.Tensor, dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """verl's masked_mean Σ x·m / (Σm + 1e-8) of each tensor, positions with m = 0 excluded exactly."""
    m = mask.to(dtype)
    n = m.sum() + GEO_MEAN_EPS
    return [torch.where(m != 0, t.to(dtype) * m, 0.0).sum() / n for t in tensors]


@torch.no_grad()
def clip_cov_selection(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio, lower, upper):
    """1.0 at the tokens clip_cov detaches: the first ⌊ratio·N⌋ (at least 1) in row-major order among the
    valid, unclipped tokens with lower < (A − Ā)(lp − l̄p) < upper (verl draws a random subset of them
    instead)."""
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    lp, old, adv = (t.detach().to(dtype) for t in (logprobs, old_logprobs, advantages))
    mean_adv, mean_lp = _masked_means(mask, dtype, adv, lp)
    cov = (adv - mean_adv) * (lp - mean_lp)
    _, clipped = _surrogate(adv, (lp - old).exp(), clip_low, clip_high)
    eligible = (mask > 0) & ~clipped & (cov > lower) & (cov < upper)
    budget = (ratio * mask.sum(dtype=torch.float64)).floor().clamp(min=1.0)
    rank = eligible.flatten().cumsum(0, dtype=torch.int64).view_as(eligible)
    return (eligible & (rank <= budget)).to(dtype)


@torch.no_grad()
def kl_cov_selection(logprobs, advantages, mask, ratio):
    """1.0 at the ⌊ratio·N⌋ (at least 1; none when N = 0) valid tokens of largest (A − Ā)(lp − l̄p), means over
    the valid tokens; one static-size top-k (k ≤ ⌊ratio·B·T⌋), no host sync."""
    dtype = compute_dtype(logprobs, advantages)
    lp, adv = logprobs.detach().to(dtype), advantages.detach().to(dtype)
    valid = mask > 0
    n = valid.sum()
    denominator = n.clamp(min=1).to(dtype)
    mean_adv = torch.where(valid, adv, 0.0).sum() / denominator
    mean_lp = torch.where(valid, lp, 0.0).sum() / denominator
    cov = torch.where(valid, (adv - mean_adv) * (lp - mean_lp), -torch.inf).flatten()
    k_max = max(1, int(cov.numel() * ratio))
    count = torch.where(n > 0, (n.to(torch.float64) * ratio).floor().clamp(min=1.0), 0.0)
    top = torch.topk(cov, k_max, largest=True, sorted=True).indices
    chosen = (torch.arange(k_max, device=cov.device) < count).to(dtype)
    return torch.zeros_like(cov).scatter_(0, top, chosen).view_as(lp)


policy_loss_token_fwd_torch = torch_op("policy_loss_token_fwd_torch", _fwd, fake=_partials_fake(POLICY_STATS))
policy_loss_token_bwd_torch = torch_op("policy_loss_token_bwd_torch", _bwd, fake=_grad_fake)
