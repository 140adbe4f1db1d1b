"""The Triton device functions of the token-level policy-loss variants (``ops/policy_losses.py``'s kernels
call them; the PyTorch path of the same math is ``ops/cpu/policy_losses.py``).

Each variant is a device function (lp, old, A, aux, p0, p1, p2) -> (L, ∂L/∂lp, kl, clip, clip_lower, r);
``_token_terms`` picks one by the constexpr VARIANT (its code is the index in ``TOKEN_VARIANTS``).  Clamps
are comparisons, so that NaN passes through; ``lp != lp`` is an all-False flag shaped like the tile (NaN
aside) for the statistics a variant does not have.  ``_load_tokens`` reads one tile of a row's inputs.
"""

from __future__ import annotations

from ._launch import tl, triton
from .cpu import policy_losses as cpu
from .cpu.ppo_losses import LOG_RATIO_CLAMP

if triton is not None:
    from .ppo_losses import _policy_token_terms

    _LOG_RATIO_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
    _GSPO_LOG_RATIO_MAX = tl.constexpr(cpu.GSPO_LOG_RATIO_MAX)
    _BINARY_KL_EPS = tl.constexpr(cpu.BINARY_KL_EPS)
    _SAPO_GATE_SCALE = tl.constexpr(cpu.SAPO_GATE_SCALE)

    @triton.jit
    def _clamp(x, low, high):
        return tl.where(x < low, low, tl.where(x > high, high, x))

    @triton.jit
    def _nan_or(x, value):
        return tl.where(x != x, x, value)

    @triton.jit
    def _sign(x):
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0 * x))

    @triton.jit
    def _clamped_ratio(raw):
        """(ℓ = clamp(raw, ±20), e^ℓ, raw inside the clamp or NaN)."""
        log_ratio = _clamp(raw, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        inside = ((raw >= -_LOG_RATIO_CLAMP) & (raw <= _LOG_RATIO_CLAMP)) | (raw != raw)
        return log_ratio, tl.exp(log_ratio), inside

    @triton.jit
    def _surrogate(adv, ratio, clip_low, clip_high):
        """(max(−A·r, −A·clamp(r, 1 − ε_low, 1 + ε_high)), clipped); ties take the unclipped side."""
        loss1 = -adv * ratio
        loss2 = -adv * _clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        clipped = loss2 > loss1
        return tl.where(clipped, loss2, loss1), clipped

    @triton.jit
    def _vanilla(lp, old, adv, aux, clip_low, clip_high, dual_clip):
        loss, d, log_ratio, ratio, clipped, lower = _policy_token_terms(
            lp, old, adv, clip_low, clip_high, dual_clip, True
        )
        return loss, d, -log_ratio, clipped, lower, ratio

    @triton.jit
    def _gpg(lp, old, adv, aux, p0, p1, p2):  # no statistics: old is not read (see _load_tokens)
        no = lp != lp
        return -lp * adv, _nan_or(lp, -adv), tl.zeros_like(lp), no, no, lp

    @triton.jit
    def _dro(lp, old, adv, aux, beta, p1, p2):
        raw = lp - old
        no = lp != lp
        return -(lp * adv - 0.5 * beta * raw * raw), -adv + beta * raw, -raw, no, no, lp

    @triton.jit
    def _cispo(lp, old, adv, aux, clip_low, clip_high, p2):
        log_ratio, ratio, _ = _clamped_ratio(lp - old)
        weight = _clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        return -weight * adv * lp, _nan_or(lp, -weight * adv), -log_ratio, ratio != weight, lp != lp, ratio

    @triton.jit
    def _sapo(lp, old, adv, aux, tau_pos, tau_neg, p2):
        log_ratio, ratio, inside = _clamped_ratio(lp - old)
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        z = tau * (ratio - 1.0)
        gate = tl.sigmoid(z)
        d = tl.where(inside, -adv * _SAPO_GATE_SCALE * gate * tl.sigmoid(-z) * ratio, 0.0)  # σ' = σ(z)σ(−z)
        no = lp != lp
        return -gate * (_SAPO_GATE_SCALE / tau) * adv, d, -log_ratio, no, no, ratio

    @triton.jit
    def _dppo(lp, old, adv, clip_low, clip_high, truncation, BINARY_KL: tl.constexpr):
        log_ratio, ratio, _ = _clamped_ratio(lp - old)
        truncated = tl.where(ratio > truncation, truncation, ratio)
        prob = tl.exp(lp)
        old_prob = tl.exp(old)
        if BINARY_KL:
            kl = old_prob * (old - lp) + (1.0 - old_prob) * tl.log(
                (1.0 - old_prob + _BINARY_KL_EPS) / (1.0 - prob + _BINARY_KL_EPS)
            )
            positive = (kl <= clip_high) | (prob <= old_prob)
            negative = (kl <= clip_low) | (prob >= old_prob)
        else:
            positive = (prob - old_prob) <= clip_high
            negative = (prob - old_prob) >= -clip_low
        valid = tl.where(adv > 0, positive, negative)
        coef = tl.where(valid, -adv * truncated, 0.0 * truncated)
        return coef * lp, _nan_or(lp, coef), -log_ratio, ~valid, (ratio > truncation) & valid, ratio

    @triton.jit
    def _clip_cov(lp, old, adv, selected, clip_low, clip_high, p2):
        raw = lp - old
        ratio = tl.exp(raw)
        loss, clipped = _surrogate(adv, ratio, clip_low, clip_high)
        keep = 1.0 - selected
        d = tl.where(clipped, 0.0, -adv * ratio) * keep
        return loss * keep, d, -raw, selected != 0, lp != lp, ratio

    @triton.jit
    def _kl_cov(lp, old, adv, selected, coef, p1, p2):
        raw = lp - old
        ratio = tl.exp(raw)
        no = lp != lp
        loss = -adv * ratio + selected * coef * tl.abs(raw)
        return loss, -adv * ratio + selected * coef * _sign(raw), tl.abs(raw), no, no, ratio

    @triton.jit
    def _gspo(lp, old, adv, seq_log_ratio, clip_low, clip_high, p2):
        ratio = tl.exp(tl.where(seq_log_ratio > _GSPO_LOG_RATIO_MAX, _GSPO_LOG_RATIO_MAX, seq_log_ratio))
        loss, clipped = _surrogate(adv, ratio, clip_low, clip_high)
        passes = (seq_log_ratio <= _GSPO_LOG_RATIO_MAX) | (seq_log_ratio != seq_log_ratio)
        d = tl.where(clipped | ~passes, 0.0, _nan_or(lp, -adv * ratio))
        return loss, d, old - lp, clipped, lp != lp, ratio

    @triton.jit
    def _geo_mean(lp, old, adv, aux, clip_low, clip_high, p2):
        raw = lp - old
        sign = _sign(adv)
        bounded = _clamp(raw, -clip_low, clip_high)
        raw_side = sign * raw <= sign * bounded
        chosen = sign * tl.where(raw_side | (raw != raw), sign * raw, sign * bounded)
        clipped = raw != bounded
        d = _nan_or(raw, tl.where(raw_side, sign * sign, 0.0))
        return chosen, d, -raw, clipped & (adv > 0), clipped & (adv < 0), raw

    @triton.jit
    def _token_terms(lp, old, adv, aux, p0, p1, p2, VARIANT: tl.constexpr):
        """The variant with code VARIANT (its index in TOKEN_VARIANTS)."""
        if VARIANT == 0:
            out = _vanilla(lp, old, adv, aux, p0, p1, p2)
        elif VARIANT == 1:
            out = _gpg(lp, old, adv, aux, p0, p1, p2)
        elif VARIANT == 2:
            out = _dro(lp, old, adv, aux, p0, p1, p2)
        elif VARIANT == 3:
            out = _cispo(lp, old, adv, aux, p0, p1, p2)
        elif VARIANT == 4:
            out = _sapo(lp, old, adv, aux, p0, p1, p2)
        elif VARIANT == 5:
            out = _dppo(lp, old, adv, p0, p1, p2, False)
        elif VARIANT == 6:
            out = _dppo(lp, old, adv, p0, p1, p2, True)
        elif VARIANT == 7:
            out = _clip_cov(lp, old, adv, aux, p0, p1, p2)
        elif VARIANT == 8:
            out = _kl_cov(lp, old, adv, aux, p0, p1, p2)
        elif VARIANT == 9:
            out = _gspo(lp, old, adv, aux, p0, p1, p2)
        else:
            out = _geo_mean(lp, old, adv, aux, p0, p1, p2)
        return out

    @triton.jit
    def _load(ptr, row, cols, in_row, stride0, stride1, ACC: tl.constexpr, other):
        return tl.load(ptr + row * stride0 + cols * stride1, mask=in_row, other=other).to(ACC)

    @triton.jit
    def _load_tokens(
        lp_ptr, old_ptr, adv_ptr, aux_ptr, w_ptr, mask_ptr, row, tile, T,
        s_lp0, s_lp1, s_old0, s_old1, s_adv0, s_adv1, s_aux0, s_aux1, s_w0, s_w1, s_m0, s_m1,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, HAS_AUX: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
        VARIANT: tl.constexpr,
    ):
        """(columns, in-row flags, lp, old, A, aux (0 without), w (1 without), m) of one tile of ``row``;
        GPG (variant 1) does not read old (lp stands in: its terms do not use it)."""
        cols = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        in_row = cols < T
        m = _load(mask_ptr, row, cols, in_row, s_m0, s_m1, ACC, 0)
        lp = _load(lp_ptr, row, cols, in_row, s_lp0, s_lp1, ACC, 0.0)
        if VARIANT == 1:
            old = lp
        else:
            old = _load(old_ptr, row, cols, in_row, s_old0, s_old1, ACC, 0.0)
        adv = _load(adv_ptr, row, cols, in_row, s_adv0, s_adv1, ACC, 0.0)
        if HAS_AUX:
            aux = _load(aux_ptr, row, cols, in_row, s_aux0, s_aux1, ACC, 0.0)
        else:
            aux = tl.zeros((BLOCK_T,), ACC)
        if HAS_WEIGHTS:
            w = _load(w_ptr, row, cols, in_row, s_w0, s_w1, ACC, 1.0)
        else:
            w = tl.full((BLOCK_T,), 1.0, ACC)
        return cols, in_row, lp, old, adv, aux, w, m
