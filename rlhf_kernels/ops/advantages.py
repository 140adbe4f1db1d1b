"""Advantages in one launch: GAE, KL reward shaping, masked whitening, group advantages.

GAE over [B, T], walking t from T−1 down to 0 (δ_t = r_t + γV_{t+1} − V_t, Â_t = δ_t + γλÂ_{t+1}):

    mask_mode="carry" (verl): carried next value nv and last advantage lg, both starting at 0;
        a = r_t + γ·nv − V_t + γλ·lg;  nv ← m_t·V_t + (1−m_t)·nv;  lg ← m_t·a + (1−m_t)·lg;  A_t = lg
    mask_mode="zero" (OpenRLHF, older TRL): V ← V·m, r ← r·m, then the plain recurrence with V_T = 0.
    returns = A + V (the masked V in zero mode).

Why a scan is exact.  Each step maps the state s = (nv, lg) affinely,

    s ← M_t s + b_t,   M_t = [[p, 0], [q, r]],   b_t = (c, d)
    carry, m ≠ 0:  p = 1−m, q = mγ, r = mγλ + 1−m, c = m·V_t, d = m·(r_t − V_t)
    carry, m = 0:  identity (p = r = 1, q = c = d = 0)
    zero:          p = 0,   q = γ,  r = γλ,         c = V'_t, d = r'_t − V'_t

(substitute: lg' = m·(r_t − V_t + γ·nv + γλ·lg) + (1−m)·lg = q·nv + r·lg + d).  Composition of affine maps
is associative, and lower-triangular 2×2 matrices stay lower-triangular under products, so the prefix
compositions F_j ∘ … ∘ F_0 (j counting positions from the end) form an associative scan whose
operator is :func:`_gae_combine`.  With the initial state (0, 0), A_t is the d-component of the prefix
ending at t; a chunked scan carries the state of the previous chunk and applies the in-chunk prefix to
it.  The carry-mode map at m = 0 is exactly the identity, so masked positions (left/right padding,
tool-output holes) leave the state untouched, as the sequential loop does.  Only the order in which
the same products are rounded differs from the loop (fp32 either way).

Masked positions (m = 0) never read r_t or V_t: garbage there (even inf or NaN) cannot leak into
valid positions.  NaN at a valid position makes that row's earlier advantages NaN, as the loop does.

Backends.  GAE: Triton (one program per tile of rows, parallel over T through ``tl.associative_scan``
over chunks of up to 1024 positions with the state carried between chunks), the csrc C++ CPU kernel
(the default for CPU tensors: rows in parallel, sequential fp32 recurrence), the csrc CUDA kernel (a
warp per row, shuffle scan), and a PyTorch Hillis–Steele scan.  Reward shaping and whitening: Triton
and PyTorch.  Group advantages are plain PyTorch over [B] (nothing to fuse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.library import triton_op, wrap_triton

from .. import _dispatch, _ext
from .._validation import (
    check_at_least,
    check_choice,
    check_float_tensor,
    check_in_range,
    check_int,
    check_mask_tensor,
    check_ndim,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
)
from .kl import check_estimator, estimator_code, kl_value_torch

try:
    import triton
    import triton.language as tl

    from .kl import _kl_value
except ImportError:  # pragma: no cover - platforms without Triton run the PyTorch path
    triton = None

GAE_FAMILY = "gae"
WHITEN_FAMILY = "whiten"
REWARDS_FAMILY = "token_rewards"
# On CUDA the Triton scan comes first; the CUDA extension is selectable (RLHF_KERNELS_BACKEND=cuda or
# use_backend("cuda")) and the benchmark compares both.
_dispatch.register_family(GAE_FAMILY, cuda=("triton", "cuda", "torch"), cpu=("cpp", "torch"))
_dispatch.register_family(WHITEN_FAMILY, cuda=("triton", "torch"), cpu=("torch",))
_dispatch.register_family(REWARDS_FAMILY, cuda=("triton", "torch"), cpu=("torch",))

MASK_MODES = ("carry", "zero")
GROUP_NORMS = ("std", "none")

# The longest chunk of T one Triton program scans at a time (tests lower it to exercise the carry).
GAE_MAX_BLOCK_T = 1024


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Rows are tiled BLOCK_B at a time; T is walked in chunks of BLOCK_T.  The GAE and
# reward kernels walk chunks from the end of the row, positions inside a chunk in reversed-time order.
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gae_combine(p1, q1, r1, c1, d1, p2, q2, r2, c2, d2):
        """(map 2) ∘ (map 1): map 1 comes first in the scan (later in time)."""
        return p2 * p1, q2 * p1 + r2 * q1, r2 * r1, p2 * c1 + c2, q2 * c1 + r2 * d1 + d2

    @triton.jit
    def _gae_fwd_kernel(
        rewards_ptr, values_ptr, mask_ptr, advantages_ptr, returns_ptr,
        stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt,
        B, T, gamma, lam,
        CARRY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        j = tl.arange(0, BLOCK_T)
        is_last = (j == BLOCK_T - 1)[None, :]
        gamma_lam = gamma * lam
        nv = tl.zeros([BLOCK_B], tl.float32)
        lg = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, T, BLOCK_T):
            t = (T - 1 - start - j).to(tl.int64)
            ok = row_ok[:, None] & (t >= 0)[None, :]
            r = tl.load(rewards_ptr + rows[:, None] * stride_rb + t[None, :] * stride_rt, mask=ok, other=0.0)
            v = tl.load(values_ptr + rows[:, None] * stride_vb + t[None, :] * stride_vt, mask=ok, other=0.0)
            m = tl.load(mask_ptr + rows[:, None] * stride_mb + t[None, :] * stride_mt, mask=ok, other=0)
            r = r.to(tl.float32)
            v = v.to(tl.float32)
            m = m.to(tl.float32)
            valid = m != 0.0
            if CARRY:
                p = tl.where(valid, 1.0 - m, 1.0)
                q = tl.where(valid, m * gamma, 0.0)
                rr = tl.where(valid, m * gamma_lam + (1.0 - m), 1.0)
                c = tl.where(valid, m * v, 0.0)
                d = tl.where(valid, m * (r - v), 0.0)
                v_returns = v
            else:
                r = tl.where(valid, m * r, 0.0)
                v = tl.where(valid, m * v, 0.0)
                p = tl.zeros([BLOCK_B, BLOCK_T], tl.float32)
                q = p + gamma
                rr = p + gamma_lam
                c = v
                d = r - v
                v_returns = v
            p, q, rr, c, d = tl.associative_scan((p, q, rr, c, d), axis=1, combine_fn=_gae_combine)
            adv = q * nv[:, None] + rr * lg[:, None] + d
            out = rows[:, None] * T + t[None, :]
            tl.store(advantages_ptr + out, adv, mask=ok)
            tl.store(returns_ptr + out, adv + v_returns, mask=ok)
            # State after the chunk: the full chunk map applied to the carried state.
            p_chunk = tl.sum(tl.where(is_last, p, 0.0), axis=1)
            c_chunk = tl.sum(tl.where(is_last, c, 0.0), axis=1)
            lg = tl.sum(tl.where(is_last, adv, 0.0), axis=1)
            nv = p_chunk * nv + c_chunk

    @triton.jit
    def _token_rewards_fwd_kernel(
        scores_ptr, logprobs_ptr, ref_ptr, mask_ptr, rewards_ptr, row_kl_ptr,
        stride_s, stride_lb, stride_lt, stride_rb, stride_rt, stride_mb, stride_mt,
        B, T, kl_coef, score_clip,
        ESTIMATOR: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        j = tl.arange(0, BLOCK_T)
        score = tl.load(scores_ptr + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_CLIP:
            score = tl.where(score < -score_clip, -score_clip, score)
            score = tl.where(score > score_clip, score_clip, score)
        last = tl.full([BLOCK_B], -1, tl.int64)  # last valid position, once found
        kl_sum = tl.zeros([BLOCK_B], tl.float32)
        count = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, T, BLOCK_T):
            t = (T - 1 - start - j).to(tl.int64)
            ok = row_ok[:, None] & (t >= 0)[None, :]
            row_offsets = rows[:, None]
            lp = tl.load(logprobs_ptr + row_offsets * stride_lb + t[None, :] * stride_lt, mask=ok, other=0.0)
            ref = tl.load(ref_ptr + row_offsets * stride_rb + t[None, :] * stride_rt, mask=ok, other=0.0)
            m = tl.load(mask_ptr + row_offsets * stride_mb + t[None, :] * stride_mt, mask=ok, other=0)
            m = m.to(tl.float32)
            valid = ok & (m != 0.0)
            kl = _kl_value(lp.to(tl.float32), ref.to(tl.float32), ESTIMATOR)
            kl_masked = tl.where(valid, kl * m, 0.0)
            kl_sum += tl.sum(kl_masked, axis=1)
            count += tl.sum(tl.where(valid, m, 0.0), axis=1)
            chunk_last = tl.max(tl.where(valid, t[None, :], -1), axis=1)
            last = tl.where(last < 0, chunk_last, last)
            reward = -kl_coef * kl_masked + tl.where(t[None, :] == last[:, None], score[:, None], 0.0)
            tl.store(rewards_ptr + rows[:, None] * T + t[None, :], reward, mask=ok)
        safe_count = tl.where(count > 0.0, count, 1.0)
        tl.store(row_kl_ptr + rows, tl.where(count > 0.0, kl_sum / safe_count, 0.0), mask=row_ok)

    @triton.jit
    def _whiten_stats_kernel(
        x_ptr, mask_ptr, count_ptr, mean_ptr, m2_ptr,
        stride_xb, stride_xt, stride_mb, stride_mt,
        R, C,
        BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Per row: n = Σm, μ = Σxm/n and M2 = Σ(x − μ)²m, chunk by chunk (Chan et al.'s combination of
        (n, μ, M2), so x is read once and no sum of squares cancels)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < R
        j = tl.arange(0, BLOCK_T)
        n = tl.zeros([BLOCK_B], tl.float32)
        mean = tl.zeros([BLOCK_B], tl.float32)
        m2 = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, C, BLOCK_T):
            cols = (start + j).to(tl.int64)
            ok = row_ok[:, None] & (cols < C)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xt, mask=ok, other=0.0)
            w = tl.load(mask_ptr + rows[:, None] * stride_mb + cols[None, :] * stride_mt, mask=ok, other=0)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            valid = w != 0.0
            n_c = tl.sum(tl.where(valid, w, 0.0), axis=1)
            safe_n_c = tl.where(n_c > 0.0, n_c, 1.0)
            mean_c = tl.sum(tl.where(valid, x * w, 0.0), axis=1) / safe_n_c
            dev = x - mean_c[:, None]
            m2_c = tl.sum(tl.where(valid, dev * dev * w, 0.0), axis=1)
            n_new = n + n_c
            safe_n_new = tl.where(n_new > 0.0, n_new, 1.0)
            delta = mean_c - mean
            take = n_c > 0.0
            mean = tl.where(take, mean + delta * (n_c / safe_n_new), mean)
            m2 = tl.where(take, m2 + m2_c + delta * delta * (n * n_c / safe_n_new), m2)
            n = n_new
        tl.store(count_ptr + rows, n, mask=row_ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(m2_ptr + rows, m2, mask=row_ok)

    @triton.jit
    def _whiten_apply_kernel(
        x_ptr, mask_ptr, mean_ptr, rstd_ptr, out_ptr,
        stride_xb, stride_xt, stride_mb, stride_mt,
        R, C,
        PER_ROW: tl.constexpr, SHIFT_MEAN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < R
        ok = row_ok[:, None] & (cols < C)[None, :]
        stat = rows if PER_ROW else rows * 0
        mean = tl.load(mean_ptr + stat, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + stat, mask=row_ok, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xt, mask=ok, other=0.0)
        w = tl.load(mask_ptr + rows[:, None] * stride_mb + cols[None, :] * stride_mt, mask=ok, other=0)
        out = tl.where(w.to(tl.float32) != 0.0, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        if not SHIFT_MEAN:
            out += mean[:, None]
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], out, mask=ok)


@dataclass(frozen=True)
class _TileConfig:
    block_b: int
    block_t: int
    num_warps: int


def _tile_config(rows: int, cols: int, max_block_t: int = 1024) -> _TileConfig:
    """Row tiles of about 2048 elements: one row per program once T ≥ 2048 (long rows stream through in
    chunks), several short rows per program otherwise so that small T still fills the warps.  At most
    16 fp32 values per thread per live tensor: the GAE scan keeps five of them."""
    block_t = max(16, min(triton.next_power_of_2(max(cols, 1)), max_block_t))
    block_b = max(1, min(triton.next_power_of_2(max(rows, 1)), 2048 // block_t))
    tile = block_b * block_t
    return _TileConfig(block_b=block_b, block_t=block_t, num_warps=4 if tile >= 1024 else 2)


def _as_loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool masks are read as bytes (a free view)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ---------------------------------------------------------------------------------------------------
# PyTorch paths (any device).
# ---------------------------------------------------------------------------------------------------
def _gae_maps_torch(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, ...]:
    """The per-position affine maps (p, q, r, c, d) in fp32, and the V used by the returns."""
    r = rewards.to(torch.float32)
    v = values.to(torch.float32)
    m = mask.to(torch.float32)
    valid = m != 0
    zero = torch.zeros_like(r)
    gamma_lam = gamma * lam
    if carry:
        p = torch.where(valid, 1.0 - m, 1.0)
        q = torch.where(valid, m * gamma, zero)
        rr = torch.where(valid, m * gamma_lam + (1.0 - m), 1.0)
        c = torch.where(valid, m * v, zero)
        d = torch.where(valid, m * (r - v), zero)
        return p, q, rr, c, d, v
    r = torch.where(valid, m * r, zero)
    v = torch.where(valid, m * v, zero)
    return zero, zero + gamma, zero + gamma_lam, v, r - v, v


def _gae_outputs_like(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    empty = rewards.new_empty(rewards.shape, dtype=torch.float32)
    return empty, torch.empty_like(empty)


def _gae_scan_torch(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hillis–Steele inclusive scan of the maps in reversed time: log2(T) rounds of whole-tensor ops,
    no loop over T (the same operator as the Triton kernel, in a genuinely tree-shaped order)."""
    p, q, rr, c, d, v_returns = _gae_maps_torch(rewards, values, mask, gamma, lam, carry)
    p, q, rr, c, d = (x.flip(-1) for x in (p, q, rr, c, d))
    T = rewards.shape[-1]
    shift = 1
    while shift < T:
        p1, q1, r1, c1, d1 = (x[:, :-shift] for x in (p, q, rr, c, d))  # earlier in the scan
        p2, q2, r2, c2, d2 = (x[:, shift:] for x in (p, q, rr, c, d))
        head = slice(0, shift)
        p, q, rr, c, d = (
            torch.cat([p[:, head], p2 * p1], dim=1),
            torch.cat([q[:, head], q2 * p1 + r2 * q1], dim=1),
            torch.cat([rr[:, head], r2 * r1], dim=1),
            torch.cat([c[:, head], p2 * c1 + c2], dim=1),
            torch.cat([d[:, head], q2 * c1 + r2 * d1 + d2], dim=1),
        )
        shift *= 2
    advantages = d.flip(-1).contiguous()  # the initial state is (0, 0): A_t is the d-component
    return advantages, advantages + v_returns


@torch.library.custom_op("rlhf_kernels::gae_torch", mutates_args=())
def _gae_torch(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gae_scan_torch(rewards, values, mask, gamma, lam, carry)


@_gae_torch.register_fake
def _(rewards, values, mask, gamma, lam, carry):
    return _gae_outputs_like(rewards)


@torch.library.custom_op("rlhf_kernels::gae_cpp", mutates_args=())
def _gae_cpp(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_ext.load("cpp").gae_forward(rewards, values, mask, gamma, lam, carry))


@_gae_cpp.register_fake
def _(rewards, values, mask, gamma, lam, carry):
    return _gae_outputs_like(rewards)


@torch.library.custom_op("rlhf_kernels::gae_cuda", mutates_args=())
def _gae_cuda(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_ext.load("cuda").gae_forward(rewards, values, mask, gamma, lam, carry))


@_gae_cuda.register_fake
def _(rewards, values, mask, gamma, lam, carry):
    return _gae_outputs_like(rewards)


def _valid_and_weights(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(m ≠ 0, fp32 weights), with no conversion at all for a bool mask (weights None: all 1)."""
    if mask.dtype == torch.bool:
        return mask, None
    weights = mask.to(torch.float32)
    return weights != 0, weights


def _token_rewards_plain_torch(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    score_clip: float,
    has_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if logprobs.shape[-1] == 0:
        return logprobs.new_empty(logprobs.shape, dtype=torch.float32), logprobs.new_zeros(
            logprobs.shape[:1], dtype=torch.float32
        )
    kl = kl_value_torch(logprobs, ref_logprobs, estimator).to(torch.float32)
    valid, weights = _valid_and_weights(mask)
    if weights is None:
        kl_masked = torch.where(valid, kl, 0.0)
        count = valid.sum(-1, dtype=torch.float32)
    else:
        kl_masked = torch.where(valid, kl * weights, 0.0)
        count = torch.where(valid, weights, 0.0).sum(-1)
    row_kl = torch.where(count > 0, kl_masked.sum(-1) / torch.where(count > 0, count, 1.0), 0.0)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(valid, positions, -1).amax(-1)
    score = scores.to(torch.float32)
    if has_clip:
        score = score.clamp(-score_clip, score_clip)
    rewards = -kl_coef * kl_masked
    rewards = rewards + torch.where(positions == last.unsqueeze(-1), score.unsqueeze(-1), 0.0)
    return rewards.contiguous(), row_kl


@torch.library.custom_op("rlhf_kernels::token_rewards_torch", mutates_args=())
def _token_rewards_torch(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    score_clip: float,
    has_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _token_rewards_plain_torch(
        scores, logprobs, ref_logprobs, mask, kl_coef, estimator, score_clip, has_clip
    )


@_token_rewards_torch.register_fake
def _(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, score_clip, has_clip):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float32), logprobs.new_empty(
        logprobs.shape[:1], dtype=torch.float32
    )


def _masked_whiten_plain_torch(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    """Two-pass statistics per row of [R, C] in fp32, then the output.  One ``where`` (it is ~30x slower
    than arithmetic on CPU) zeroes the masked positions, so garbage there is never read; everything else
    is multiplications by the fp32 weights (0 at masked positions)."""
    valid, weights = _valid_and_weights(mask)
    weights = valid.to(torch.float32) if weights is None else torch.where(valid, weights, 0.0)
    x0 = torch.where(valid, x.to(torch.float32), 0.0)
    n = weights.sum(-1)
    mean = (x0 * weights).sum(-1) / torch.where(n > 0, n, 1.0)
    dev = (x0 - mean.unsqueeze(-1)) * (weights != 0)  # x − μ where valid, exactly 0 elsewhere
    m2 = (dev * dev * weights).sum(-1)
    mean, rstd = _finish_stats(n, mean, m2, unbiased, eps, per_row)
    if per_row:
        out = dev * rstd.unsqueeze(-1)
    else:  # statistics of all rows together: recentre on the overall mean
        out = (x0 - mean) * rstd * (weights != 0)
    if not shift_mean:
        out = out + mean.unsqueeze(-1) if per_row else out + mean
    return out.contiguous()


@torch.library.custom_op("rlhf_kernels::masked_whiten_torch", mutates_args=())
def _masked_whiten_torch(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    return _masked_whiten_plain_torch(x, mask, shift_mean, unbiased, eps, per_row)


@_masked_whiten_torch.register_fake
def _(x, mask, shift_mean, unbiased, eps, per_row):
    return x.new_empty(x.shape, dtype=torch.float32)


def _finish_stats(
    n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, unbiased: bool, eps: float, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, rsqrt(var + eps)) per row, or for all rows together ([1]) when not ``per_row``.

    Rows are combined with Chan et al.'s formula: μ = Σn_bμ_b / N, M2 = ΣM2_b + Σn_b(μ_b − μ)².
    var = M2 / N, or M2 / (N − 1) when ``unbiased``; an empty selection has μ = 0 and var = 0, and a
    single valid element (unbiased, where N/(N−1) is undefined) has var = 0.
    """
    if not per_row:
        total = n.sum(0, keepdim=True)
        safe_total = torch.where(total > 0, total, 1.0)
        overall = (n * mean).sum(0, keepdim=True) / safe_total
        spread = torch.where(n > 0, n * (mean - overall) ** 2, 0.0).sum(0, keepdim=True)
        n, mean, m2 = total, overall, m2.sum(0, keepdim=True) + spread
    denom = n - 1.0 if unbiased else n
    var = torch.where(denom > 0, m2 / torch.where(denom > 0, denom, 1.0), 0.0)
    return mean, torch.rsqrt(var + eps)


# ---------------------------------------------------------------------------------------------------
# Triton launchers.
# ---------------------------------------------------------------------------------------------------
def _launch_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    advantages = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    if B == 0 or T == 0:
        return advantages, returns
    mask = _as_loadable_mask(mask)
    cfg = _tile_config(B, T, GAE_MAX_BLOCK_T)
    wrap_triton(_gae_fwd_kernel)[(triton.cdiv(B, cfg.block_b),)](
        rewards, values, mask, advantages, returns,
        rewards.stride(0), rewards.stride(1),
        values.stride(0), values.stride(1),
        mask.stride(0), mask.stride(1),
        B, T, gamma, lam,
        CARRY=carry, BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, num_warps=cfg.num_warps,
    )
    return advantages, returns


def _launch_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    score_clip: float,
    has_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = logprobs.shape
    rewards = torch.empty((B, T), dtype=torch.float32, device=logprobs.device)
    row_kl = torch.empty((B,), dtype=torch.float32, device=logprobs.device)
    if B == 0:
        return rewards, row_kl
    if T == 0:
        return rewards, row_kl.zero_()
    mask = _as_loadable_mask(mask)
    cfg = _tile_config(B, T)
    wrap_triton(_token_rewards_fwd_kernel)[(triton.cdiv(B, cfg.block_b),)](
        scores, logprobs, ref_logprobs, mask, rewards, row_kl,
        scores.stride(0),
        logprobs.stride(0), logprobs.stride(1),
        ref_logprobs.stride(0), ref_logprobs.stride(1),
        mask.stride(0), mask.stride(1),
        B, T, kl_coef, score_clip,
        ESTIMATOR=estimator_code(estimator), HAS_CLIP=has_clip, BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
    )
    return rewards, row_kl


def _launch_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    R, C = x.shape
    out = torch.empty((R, C), dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:
        return out
    mask = _as_loadable_mask(mask)
    n = torch.empty((R,), dtype=torch.float32, device=x.device)
    mean = torch.empty_like(n)
    m2 = torch.empty_like(n)
    cfg = _tile_config(R, C)
    wrap_triton(_whiten_stats_kernel)[(triton.cdiv(R, cfg.block_b),)](
        x, mask, n, mean, m2,
        x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        R, C,
        BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, num_warps=cfg.num_warps,
    )
    mean, rstd = _finish_stats(n, mean, m2, unbiased, eps, per_row)
    wrap_triton(_whiten_apply_kernel)[(triton.cdiv(R, cfg.block_b), triton.cdiv(C, cfg.block_t))](
        x, mask, mean, rstd, out,
        x.stride(0), x.stride(1), mask.stride(0), mask.stride(1),
        R, C,
        PER_ROW=per_row, SHIFT_MEAN=shift_mean, BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t,
        num_warps=cfg.num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# Registration.  No autograd: advantages, rewards and whitened values are targets, not outputs to
# differentiate (the public functions detach their inputs).
# ---------------------------------------------------------------------------------------------------
def _route_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool,
    traced: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _dispatch.backend_for(GAE_FAMILY, rewards.device)
    if backend == "triton":
        return _launch_gae(rewards, values, mask, gamma, lam, carry)
    if backend in ("cpp", "cuda"):
        if traced:
            return (_gae_cpp if backend == "cpp" else _gae_cuda)(rewards, values, mask, gamma, lam, carry)
        return tuple(_ext.load(backend).gae_forward(rewards, values, mask, gamma, lam, carry))
    if traced:
        return _gae_torch(rewards, values, mask, gamma, lam, carry)
    return _gae_scan_torch(rewards, values, mask, gamma, lam, carry)


def _route_token_rewards(*args, traced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _dispatch.backend_for(REWARDS_FAMILY, args[1].device) == "triton":
        return _launch_token_rewards(*args)
    return _token_rewards_torch(*args) if traced else _token_rewards_plain_torch(*args)


def _route_whiten(*args, traced: bool) -> torch.Tensor:
    if _dispatch.backend_for(WHITEN_FAMILY, args[0].device) == "triton":
        return _launch_whiten(*args)
    return _masked_whiten_torch(*args) if traced else _masked_whiten_plain_torch(*args)


@triton_op("rlhf_kernels::compute_gae", mutates_args=())
def gae_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), fp32 [B, T], for [B, T] rewards, values and mask."""
    return _route_gae(rewards, values, mask, gamma, lam, carry, traced=True)


@triton_op("rlhf_kernels::token_level_rewards", mutates_args=())
def token_rewards_op(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    score_clip: float,
    has_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T] fp32, per-row masked-mean KL [B] fp32)."""
    return _route_token_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef, estimator, score_clip, has_clip, traced=True
    )


@triton_op("rlhf_kernels::masked_whiten", mutates_args=())
def whiten_op(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, per_row: bool
) -> torch.Tensor:
    """Whitened x [R, C] fp32, statistics per row (``per_row``) or over all of x."""
    return _route_whiten(x, mask, shift_mean, unbiased, eps, per_row, traced=True)


# ---------------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------------
def _check_bt(name: str, tensor: torch.Tensor, shape: torch.Size | None, like: str) -> None:
    if shape is None:
        check_ndim(name, tensor, 2, "[B, T]")
    else:
        check_shape(name, tensor, shape, like)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    mask_mode: str = "carry",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [B, T] in one pass.

    δ_t = r_t + γ·V_{t+1} − V_t (V_T = 0),  Â_t = δ_t + γλ·Â_{t+1},  returns = Â + V.

    Args:
        rewards: [B, T] float32, bfloat16 or float16 token-level rewards.
        values: [B, T] float32, bfloat16 or float16 value estimates (its dtype may differ from rewards').
        mask: [B, T] bool, integer or floating 0/1 mask of the response tokens.
        gamma: discount in [0, 1].
        lam: GAE λ in [0, 1].
        mask_mode: ``"carry"`` (verl; right for left padding, right padding and holes such as tool
            outputs inside a response): walking t from T−1 down to 0 with carried nv and lg (both 0 at
            the start), a = r_t + γ·nv − V_t + γλ·lg, nv ← m·V_t + (1−m)·nv, lg ← m·a + (1−m)·lg,
            A_t = lg; a masked position keeps the carried values, so A there equals the advantage of
            the next valid position to its right (0 after the last one).
            ``"zero"`` (OpenRLHF, older TRL): V ← V·m, r ← r·m, then the plain recurrence, so masked
            positions act as steps with zero reward and zero value.

    Returns:
        ``(advantages, returns)``, both float32 [B, T], computed in fp32.  returns = A + V (V·m in
        zero mode).  No gradient flows: the inputs are detached (advantages are targets).

    Masked positions never read rewards or values (garbage, even NaN, there does not leak), except
    that carry-mode returns at a masked position add that position's V, as verl does.  NaN at a valid
    position makes the row's advantages at and before it NaN.  No host synchronisation.
    """
    check_float_tensor("rewards", rewards)
    check_float_tensor("values", values)
    check_mask_tensor("mask", mask)
    _check_bt("rewards", rewards, None, "")
    check_shape("values", values, rewards.shape, "rewards.shape")
    check_shape("mask", mask, rewards.shape, "rewards.shape")
    check_same_device(rewards=rewards, values=values, mask=mask)
    gamma = check_in_range("gamma", gamma, 0.0, 1.0)
    lam = check_in_range("lam", lam, 0.0, 1.0)
    mask_mode = check_choice("mask_mode", mask_mode, MASK_MODES)
    args = (rewards.detach(), values.detach(), mask.detach(), gamma, lam, mask_mode == "carry")
    if _dispatch.tracing():
        return gae_op(*args)
    return _route_gae(*args, traced=False)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    dim: int | None = None,
) -> torch.Tensor:
    """Whitening over the positions where ``mask`` is nonzero.

    μ = Σxm / Σm;  var = Σ(x − μ)²m / Σm, times n/(n−1) when ``unbiased`` (n = Σm);
    out = (x − μ)·rsqrt(var + eps), plus μ again when ``shift_mean=False``.

    Args:
        x: float32, bfloat16 or float16, any shape (``dim=-1``: at least 1-D, rows are all leading
            dimensions).
        mask: same shape; bool, integer or floating (its values weight the statistics).
        shift_mean: False adds μ back (keeps the location, rescales the spread).
        unbiased: Bessel's correction n/(n−1).
        eps: ≥ 0, added to the variance.
        dim: ``None`` whitens over the whole tensor (one μ and var), ``-1`` (or ``x.dim() − 1``) per row.

    Returns:
        float32, ``x``'s shape.  Masked positions hold 0 when ``shift_mean=True`` (μ when False).

    Degenerate selections, decided so that nothing syncs or raises: an all-masked tensor (or row, with
    ``dim=-1``) has μ = 0 and var = 0, so its output is all zeros; a single valid element with
    ``unbiased=True`` (n/(n−1) undefined) has var = 0, so it whitens to 0.  No host synchronisation;
    no gradient (the input is detached).
    """
    check_float_tensor("x", x)
    check_mask_tensor("mask", mask)
    check_shape("mask", mask, x.shape, "x.shape")
    check_same_device(x=x, mask=mask)
    eps = check_at_least("eps", eps, 0.0)
    if dim is not None:
        dim = check_int("dim", dim)
        if x.dim() == 0 or dim not in (-1, x.dim() - 1):
            raise ValueError(
                f"dim must be None or -1 (the last dimension of x, shape {tuple(x.shape)}); got {dim}"
            )
    per_row = dim is not None
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    # [rows, last dimension]; a copy only when the layout needs one.
    columns = x.shape[-1] if x.dim() else 1
    x2, m2 = x.reshape(-1, columns), mask.reshape(-1, columns)
    args = (x2.detach(), m2.detach(), bool(shift_mean), bool(unbiased), eps, per_row)
    out = whiten_op(*args) if _dispatch.tracing() else _route_whiten(*args, traced=False)
    return out.view(x.shape)


def token_level_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level rewards: the KL penalty on every valid token plus the sequence score on the last one.

    rewards_t = −kl_coef·KL_t·m_t, plus score (clamped to ±score_clip when given) at the last position
    where m ≠ 0; a row with no valid position gets no score.  KL_t is :func:`kl_penalty`'s estimator.

    Args:
        scores: [B] sequence scores (float32, bfloat16 or float16).
        logprobs, ref_logprobs: [B, T] log-probabilities under the policy and the reference (any of
            the same dtypes, independently).
        mask: [B, T] bool, integer or floating 0/1 response mask.
        kl_coef: the KL coefficient β (a Python float, e.g. ``controller.value``).
        estimator: ``"k1"``, ``"abs"``, ``"k2"``, ``"k3"`` / ``"low_var_kl"``.
        score_clip: > 0, or None for no clamp.

    Returns:
        ``(rewards, kl_mean)``: rewards float32 [B, T] (0 at masked positions, apart from nothing: the
        score goes to a valid position); kl_mean a float32 0-dim tensor, the mean over rows of each
        row's masked-mean KL (a row with no valid position counts as 0, as in verl).  No host sync, no
        gradient (inputs are detached).
    """
    check_float_tensor("scores", scores)
    check_float_tensor("logprobs", logprobs)
    check_float_tensor("ref_logprobs", ref_logprobs)
    check_mask_tensor("mask", mask)
    _check_bt("logprobs", logprobs, None, "")
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    check_shape("mask", mask, logprobs.shape, "logprobs.shape")
    check_shape("scores", scores, logprobs.shape[:1], "logprobs.shape[:1]")
    check_same_device(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    kl_coef = check_real("kl_coef", kl_coef)
    estimator = check_estimator(estimator)
    has_clip = score_clip is not None
    clip = check_positive("score_clip", score_clip) if has_clip else 0.0
    tensors = (scores.detach(), logprobs.detach(), ref_logprobs.detach(), mask.detach())
    args = (*tensors, kl_coef, estimator, clip, has_clip)
    if _dispatch.tracing():
        rewards, row_kl = token_rewards_op(*args)
    else:
        rewards, row_kl = _route_token_rewards(*args, traced=False)
    kl_mean = row_kl.mean() if row_kl.numel() else row_kl.sum()
    return rewards, kl_mean


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    norm: str = "std",
    eps: float = 1e-6,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """Group-relative advantages (GRPO, RLOO, Dr. GRPO) of sequence scores.

    ``scores`` [B] holds consecutive groups of ``group_size`` samples of one prompt.  With the group's
    mean μ_g and unbiased standard deviation σ_g:

        baseline_i = μ_g, or with ``leave_one_out`` the mean of the other members (G·μ_g − s_i)/(G − 1)
        A_i = (s_i − baseline_i) / (σ_g + eps)  (norm="std"),   A_i = s_i − baseline_i  (norm="none")

    GRPO is the default; RLOO is ``leave_one_out=True, norm="none"``; Dr. GRPO is ``norm="none"``.

    Returns float32 [B]; differentiable (plain PyTorch).  ``group_size`` must divide B, and must be at
    least 2 when σ_g or a leave-one-out baseline is needed (both are undefined for one sample).
    """
    check_float_tensor("scores", scores)
    check_ndim("scores", scores, 1, "[B]")
    group_size = check_int("group_size", group_size)
    norm = check_choice("norm", norm, GROUP_NORMS)
    eps = check_at_least("eps", eps, 0.0)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of scores (scores.shape[0] = {scores.shape[0]}); "
            f"got {group_size}"
        )
    if group_size < 2 and (norm == "std" or leave_one_out):
        raise ValueError(
            "group_size must be >= 2 with norm='std' or leave_one_out=True (a group of one sample has no "
            f"standard deviation and no other members); got {group_size}"
        )
    groups = scores.to(torch.float32).view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    if leave_one_out:
        baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    else:
        baseline = mean
    advantages = groups - baseline
    if norm == "std":
        advantages = advantages / (groups.std(-1, keepdim=True) + eps)
    return advantages.view(-1)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence values [B] onto tokens: out[b, t] = advantages[b]·m[b, t] where m ≠ 0, else 0.

    ``mask`` [B, T] bool, integer or floating.  Returns float32 [B, T]; differentiable; masked positions
    are exactly 0 even when the sequence value is NaN.
    """
    check_float_tensor("advantages", advantages)
    check_ndim("advantages", advantages, 1, "[B]")
    check_mask_tensor("mask", mask)
    check_ndim("mask", mask, 2, "[B, T]")
    check_shape("advantages", advantages, mask.shape[:1], "mask.shape[:1]")
    check_same_device(advantages=advantages, mask=mask)
    m = mask.to(torch.float32)
    return torch.where(m != 0, advantages.to(torch.float32).unsqueeze(-1) * m, 0.0)

