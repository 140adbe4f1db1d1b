"""The PyTorch path of the token-level policy-loss core (any device), registered as
``policy_loss_token_fwd_torch`` / ``policy_loss_token_bwd_torch``, and the registered ops of its C++ kernel
(csrc/policy_losses.cpp, the "cpp" backend: the default on CPU).

The math of every variant is documented in ``rlhf_kernels/ops/policy_losses.py``; here each variant is a
pair of small functions of one chunk of tokens: its forward gives (L, {statistic row: per-token value})
and its derivative ∂L/∂lp, so that the forward computes no derivative and the backward no statistic.
The row-chunked forward/backward shapes (L2-sized chunks, one masked reduction per chunk) are those of
the PPO losses (``ops/cpu/ppo_losses.py``), reused.
"""

from __future__ import annotations

import torch

from ... import _ext
from ..._registration import torch_op
from ..._validation import compute_dtype
from . import _policy_selection as selection
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
    choose,
    nan_like,
    policy_derivative,
    policy_terms,
    unless,
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
    """(ℓ = clamp(raw, ±20), r = e^ℓ); torch.clamp propagates NaN."""
    log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio, log_ratio.exp()


def _outside(raw):
    """raw outside the ±20 clamp, where the clamped ratio has derivative 0 (NaN is not outside)."""
    return raw.abs() > LOG_RATIO_CLAMP


def _surrogate(adv, ratio, clip_low, clip_high):
    """(max(−A·r, −A·clamp(r, 1 − ε_low, 1 + ε_high)), clipped)."""
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(loss1, loss2), loss2 > loss1


def _stats(kl, clip=None, lower=None):
    """The statistic rows a variant has: Σ kl·m always, Σ clip·m and Σ clip_lower·m where given."""
    rows = {P_NEG_LOG_RATIO: kl}
    for index, flags in ((P_CLIP, clip), (P_CLIP_LOWER, lower)):
        if flags is not None:
            rows[index] = flags
    return rows


def _dual(dual_clip):
    """``dual_clip`` (∞ from the public functions when disabled) as policy_terms takes it."""
    return None if dual_clip == float("inf") else dual_clip


def _vanilla(lp, old, adv, aux, clip_low, clip_high, dual_clip):
    terms = policy_terms(lp, old, adv, clip_low, clip_high, _dual(dual_clip))
    loss, log_ratio, ratio, clipped, lower, _ = terms
    return loss, {**_stats(-log_ratio, clipped, lower), P_RATIO: ratio}


def _vanilla_d(lp, old, adv, aux, clip_low, clip_high, dual_clip):
    return policy_derivative(lp, old, adv, clip_low, clip_high, _dual(dual_clip))


def _gpg(lp, old, adv, aux, *params):  # no statistics (verl reports none): old is not read
    return (lp * adv).neg_(), _stats(torch.zeros_like(lp))


def _gpg_d(lp, old, adv, aux, *params):
    return nan_like(lp, -adv)


def _dro(lp, old, adv, aux, beta, *params):
    raw = lp - old
    return -(lp * adv - 0.5 * beta * raw * raw), _stats(-raw)


def _dro_d(lp, old, adv, aux, beta, *params):
    return -adv + beta * (lp - old)


def _cispo(lp, old, adv, aux, clip_low, clip_high, *params):
    log_ratio, ratio = _clamped_ratio(lp - old)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -clipped_ratio * adv * lp, _stats(-log_ratio, ratio != clipped_ratio)


def _cispo_d(lp, old, adv, aux, clip_low, clip_high, *params):
    ratio = _clamped_ratio(lp - old)[1]
    return nan_like(lp, -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)


def _sapo_gate(lp, old, adv, tau_pos, tau_neg):
    """(raw lp − old, ℓ, r, τ, z = τ(r − 1), σ(z))."""
    raw = lp - old
    log_ratio, ratio = _clamped_ratio(raw)
    positive = adv > 0
    tau = choose(positive, adv.new_full((), tau_pos), adv.new_full((), tau_neg))  # in the compute dtype
    z = tau * (ratio - 1.0)
    return raw, log_ratio, ratio, tau, z, torch.sigmoid(z)


def _sapo(lp, old, adv, aux, tau_pos, tau_neg, *params):
    _, log_ratio, _, tau, _, gate = _sapo_gate(lp, old, adv, tau_pos, tau_neg)
    return -gate * (SAPO_GATE_SCALE / tau) * adv, _stats(-log_ratio)


def _sapo_d(lp, old, adv, aux, tau_pos, tau_neg, *params):
    raw, _, ratio, _, z, gate = _sapo_gate(lp, old, adv, tau_pos, tau_neg)
    # σ'(z) = σ(z)·σ(−z): no cancellation in 1 − σ(z) where σ(z) rounds to 1.
    return unless(-adv * SAPO_GATE_SCALE * gate * torch.sigmoid(-z) * ratio, _outside(raw))


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
    above = adv > 0
    return (above & positive) | (~above & negative)


def _dppo(binary_kl: bool):
    def coefficient(lp, old, adv, clip_low, clip_high, truncation):
        """(ℓ, r, the valid flags v (0/1), −A·min(r, c)·v)."""
        log_ratio, ratio = _clamped_ratio(lp - old)
        truncated = ratio.clamp(max=truncation)  # min(r, c); NaN stays NaN
        valid = _dppo_valid(lp, old, adv, clip_low, clip_high, binary_kl).to(lp.dtype)
        return log_ratio, ratio, valid, -adv * truncated * valid

    def forward(lp, old, adv, aux, clip_low, clip_high, truncation):
        log_ratio, ratio, valid, coef = coefficient(lp, old, adv, clip_low, clip_high, truncation)
        lower = (ratio > truncation) & (valid != 0)
        return coef * lp, _stats(-log_ratio, valid == 0, lower)

    def derivative(lp, old, adv, aux, clip_low, clip_high, truncation):
        return nan_like(lp, coefficient(lp, old, adv, clip_low, clip_high, truncation)[3])

    return forward, derivative


def _clip_cov(lp, old, adv, selected, clip_low, clip_high, *params):
    raw = lp - old
    loss, _ = _surrogate(adv, raw.exp(), clip_low, clip_high)
    return loss * (1.0 - selected), _stats(-raw, selected)


def _clip_cov_d(lp, old, adv, selected, clip_low, clip_high, *params):
    ratio = (lp - old).exp()
    _, clipped = _surrogate(adv, ratio, clip_low, clip_high)
    return unless(-adv * ratio, clipped) * (1.0 - selected)


def _kl_cov(lp, old, adv, selected, coef, *params):
    raw = lp - old
    return -adv * raw.exp() + selected * coef * raw.abs(), _stats(raw.abs())


def _kl_cov_d(lp, old, adv, selected, coef, *params):
    raw = lp - old
    return -adv * raw.exp() + selected * coef * nan_like(raw, raw.sign())


def _gspo_ratio(seq_log_ratio):
    return seq_log_ratio.clamp(max=GSPO_LOG_RATIO_MAX).exp()


def _gspo(lp, old, adv, seq_log_ratio, clip_low, clip_high, *params):
    loss, clipped = _surrogate(adv, _gspo_ratio(seq_log_ratio), clip_low, clip_high)
    return loss, _stats(old - lp, clipped)


def _gspo_d(lp, old, adv, seq_log_ratio, clip_low, clip_high, *params):
    ratio = _gspo_ratio(seq_log_ratio)
    _, clipped = _surrogate(adv, ratio, clip_low, clip_high)
    flat = clipped | (seq_log_ratio > GSPO_LOG_RATIO_MAX)  # a NaN log-ratio is not above the clamp
    return unless(nan_like(lp, -adv * ratio), flat)


def _geo_mean_terms(lp, old, adv, clip_low, clip_high):
    """(raw lp − old, sign(A), clamp(raw, −ε_low, ε_high), whether the raw side is the min)."""
    raw = lp - old
    sign = adv.sign()
    bounded = raw.clamp(-clip_low, clip_high)
    return raw, sign, bounded, sign * raw <= sign * bounded


def _geo_mean(lp, old, adv, aux, clip_low, clip_high, *params):
    raw, sign, bounded, _ = _geo_mean_terms(lp, old, adv, clip_low, clip_high)
    chosen = sign * torch.minimum(sign * raw, sign * bounded)
    clipped = raw != bounded
    return chosen, _stats(-raw, clipped & (adv > 0), clipped & (adv < 0))


def _geo_mean_d(lp, old, adv, aux, clip_low, clip_high, *params):
    raw, sign, _, raw_side = _geo_mean_terms(lp, old, adv, clip_low, clip_high)
    # torch.min splits the gradient at ties, where bounded = raw has derivative 1: the raw side always wins.
    return nan_like(raw, unless(sign * sign, ~raw_side))


#: variant → (forward(lp, old, A, aux, *params) -> (L, {statistic row: value}), derivative -> ∂L/∂lp).
TERMS = {
    "vanilla": (_vanilla, _vanilla_d),
    "gpg": (_gpg, _gpg_d),
    "dro": (_dro, _dro_d),
    "cispo": (_cispo, _cispo_d),
    "sapo": (_sapo, _sapo_d),
    "dppo_tv": _dppo(binary_kl=False),
    "dppo_kl": _dppo(binary_kl=True),
    "clip_cov": (_clip_cov, _clip_cov_d),
    "kl_cov": (_kl_cov, _kl_cov_d),
    "gspo": (_gspo, _gspo_d),
    "geo_mean": (_geo_mean, _geo_mean_d),
}


def _fwd(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, aux: Tensor | None,
    is_weights: Tensor | None, variant: str, params: list[float],
) -> tuple[Tensor, Tensor]:
    forward = TERMS[variant][0]

    def chunk_terms(lp, old, adv, aux_, w):
        loss, row_terms = forward(lp, old, adv, aux_, *params)
        return (loss if w is None else loss.mul_(w)), row_terms  # every variant's L is a new tensor

    # The ratio and its max are tracked for "vanilla" only (ppo_policy_loss's ratio metrics).
    max_of = (P_RATIO_MAX, P_RATIO) if variant == "vanilla" else None
    inputs = (logprobs, old_logprobs, advantages, aux, is_weights)
    return _forward(inputs, mask, POLICY_STATS, chunk_terms, max_of)


def _bwd(
    grad_partials: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    aux: Tensor | None, is_weights: Tensor | None, variant: str, params: list[float],
) -> Tensor:
    derivative = TERMS[variant][1]

    def weighted(lp, old, adv, aux_, w):
        d = derivative(lp, old, adv, aux_, *params)
        return d if w is None else d * w

    return _backward(grad_partials, (logprobs, old_logprobs, advantages, aux, is_weights), mask, weighted)


# ---------------------------------------------------------------------------------------------------
# clip_cov / kl_cov token selection: on CPU tensors the C++ passes of ``_policy_selection`` (when the
# family's backend is "cpp"), elsewhere plain torch on the tensors' device; no host sync either way.
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
    lp, old, adv = (t.detach() for t in (logprobs, old_logprobs, advantages))
    if selection.cpp_runs(lp.device):
        return selection.clip_cov_selection_cpp(lp, old, adv, mask, clip_low, clip_high, ratio, lower, upper)
    dtype = compute_dtype(lp, old, adv)
    lp, old, adv = (t.to(dtype) for t in (lp, old, adv))
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
    the valid tokens.  Order: NaN above every number, equal values by lower flat index (b·T + t) first.
    The PyTorch path: one static-size top-k (k ≤ ⌊ratio·B·T⌋) for the value of the last selected rank,
    then every valid token above it and the first tied ones in flat order; no host sync."""
    lp, adv = logprobs.detach(), advantages.detach()
    if selection.cpp_runs(lp.device):
        return selection.kl_cov_selection_cpp(lp, adv, mask, ratio)
    dtype = compute_dtype(lp, adv)
    lp, adv = lp.to(dtype), adv.to(dtype)
    valid = mask > 0
    n = valid.sum()
    denominator = n.clamp(min=1).to(dtype)
    mean_adv = torch.where(valid, adv, 0.0).sum() / denominator
    mean_lp = torch.where(valid, lp, 0.0).sum() / denominator
    cov = torch.where(valid, (adv - mean_adv) * (lp - mean_lp), -torch.inf).flatten()
    valid = valid.flatten()
    count = torch.where(n > 0, (n.to(torch.float64) * ratio).floor().clamp(min=1.0), 0.0).to(torch.int64)
    top = torch.topk(cov, max(1, int(cov.numel() * ratio)), largest=True, sorted=True).values  # NaN first
    last = top.gather(0, (count - 1).clamp(min=0).view(1)).view(())  # the count-th largest value
    last_nan = last.isnan()
    above = ~(cov <= last) & ~last_nan  # larger, or NaN above a number (masked: −∞, never above)
    tied = valid & ((cov == last) | (cov.isnan() & last_nan))
    chosen = above | (tied & (tied.cumsum(0) <= count - above.sum()))
    return chosen.to(dtype).view_as(lp)


policy_loss_token_fwd_torch = torch_op("policy_loss_token_fwd_torch", _fwd, fake=_partials_fake(POLICY_STATS))
policy_loss_token_bwd_torch = torch_op("policy_loss_token_bwd_torch", _bwd, fake=_grad_fake)


# ---------------------------------------------------------------------------------------------------
# The C++ CPU kernel of the same core (csrc/policy_losses.cpp): every variant's per-token math in one pass
# per direction, registered as ``policy_loss_token_fwd_cpp`` / ``policy_loss_token_bwd_cpp``.
# ---------------------------------------------------------------------------------------------------
def _cpp_fwd(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, aux: Tensor | None,
    is_weights: Tensor | None, variant: str, params: list[float],
) -> tuple[Tensor, Tensor]:
    code = TOKEN_VARIANTS.index(variant)
    partials, stats, _ = _ext.load("cpp").policy_loss_token_fwd(
        logprobs, old_logprobs, advantages, mask, aux, is_weights, code, params
    )
    return partials, stats


def _cpp_bwd(
    grad_partials: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    aux: Tensor | None, is_weights: Tensor | None, variant: str, params: list[float],
) -> Tensor:
    code = TOKEN_VARIANTS.index(variant)
    return _ext.load("cpp").policy_loss_token_bwd(
        grad_partials, logprobs, old_logprobs, advantages, mask, aux, is_weights, code, params
    )


def _cpp_fwd_saving(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, aux: Tensor | None,
    is_weights: Tensor | None, variant: str, params: list[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """``_cpp_fwd`` that also returns D = w·∂L/∂lp [B, T] (compute dtype, 0 at masked positions), kept by
    autograd for :func:`_cpp_saved_bwd`: the backward then reads D and the mask (5 bytes per token) instead
    of recomputing the variant's exponentials and logarithms."""
    code = TOKEN_VARIANTS.index(variant)
    return tuple(_ext.load("cpp").policy_loss_token_fwd(
        logprobs, old_logprobs, advantages, mask, aux, is_weights, code, params, True
    ))


def _cpp_saved_bwd(
    grad_partials: Tensor, derivative: Tensor, mask: Tensor, grad_dtype: torch.dtype
) -> Tensor:
    """g_b·m·D at valid positions, exactly 0 elsewhere, in ``grad_dtype``: the numbers of ``_cpp_bwd``."""
    return _ext.load("cpp").policy_loss_token_saved_bwd(grad_partials, derivative, mask, grad_dtype)


def _saving_fake(x, old, adv, *args):
    partials, stats = _partials_fake(POLICY_STATS)(x, old, adv, *args)
    return partials, stats, x.new_empty(x.shape, dtype=partials.dtype)


def _saved_bwd_fake(grad_partials, derivative, mask, grad_dtype):
    return derivative.new_empty(derivative.shape, dtype=grad_dtype)


policy_loss_token_fwd_cpp = torch_op("policy_loss_token_fwd_cpp", _cpp_fwd, fake=_partials_fake(POLICY_STATS))
policy_loss_token_bwd_cpp = torch_op("policy_loss_token_bwd_cpp", _cpp_bwd, fake=_grad_fake)
policy_loss_token_fwd_saving_cpp = torch_op(
    "policy_loss_token_fwd_saving_cpp", _cpp_fwd_saving, fake=_saving_fake
)
policy_loss_token_saved_bwd_cpp = torch_op(
    "policy_loss_token_saved_bwd_cpp", _cpp_saved_bwd, fake=_saved_bwd_fake
)


def _saving_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[2], inputs[3])  # D, the mask
    ctx.grad_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(output[1], output[2])


def _saving_backward(ctx, grad_partials, grad_stats, grad_derivative):
    derivative, mask = ctx.saved_tensors
    return (policy_loss_token_saved_bwd_cpp(grad_partials, derivative, mask, ctx.grad_dtype),) + (None,) * 7


policy_loss_token_fwd_saving_cpp.register_autograd(_saving_backward, setup_context=_saving_setup_context)
