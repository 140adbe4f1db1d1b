"""Token-level rewards (KL reward shaping) in one launch.

    rewards_t = −kl_coef·KL_t·m_t,  plus the sequence score (clamped to ±score_clip when given) at the
    last position where m ≠ 0;  row_kl = Σ_t KL_t·m_t / Σ_t m_t (0 for a row without valid positions)

KL_t is one of ``ops/kl.py``'s estimators (the kernel inlines its ``_kl_value``).  One program takes a
tile of rows and walks them from their end, chunk by chunk, so the last valid position is known when
its chunk is written; the row means are reduced on the way.

Backends (``_dispatch`` family ``"token_rewards"``): Triton here, PyTorch in ``ops/cpu/token_rewards.py``.

Layout: Triton kernel → launch config → launchers → registration → public function.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_float_tensor,
    check_mask_tensor,
    check_ndim,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    compute_dtype,
)
from ._launch import (
    RowTiles,
    acc_dtype,
    loadable_mask,
    row_tiles,
    scalar_arg,
    scalar_parts,
    tl,
    triton,
    wrap_triton,
)
from .cpu import token_rewards as cpu
from .kl import check_estimator, estimator_code

if triton is not None:
    from .kl import _kl_value

FAMILY = "token_rewards"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("torch",))


# ---------------------------------------------------------------------------------------------------
# Triton kernel.  Rows are tiled BLOCK_B at a time; T is walked in chunks of BLOCK_T from the end of
# the row, positions inside a chunk in reversed-time order.
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _token_rewards_fwd_kernel(
        scores_ptr, logprobs_ptr, ref_ptr, mask_ptr, rewards_ptr, row_kl_ptr,
        stride_s, stride_lb, stride_lt, stride_rb, stride_rt, stride_mb, stride_mt,
        B, T, kl_coef_hi, kl_coef_mid, kl_coef_lo, clip_hi, clip_mid, clip_lo,
        ESTIMATOR: tl.constexpr, HAS_CLIP: tl.constexpr, ACC: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Reads both log-prob tensors and the mask once, writes fp32 rewards and row means:
        B·T·(size(lp) + size(ref) + size(m) + 4) + 8·B bytes."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        j = tl.arange(0, BLOCK_T)
        kl_coef = scalar_arg(kl_coef_hi, kl_coef_mid, kl_coef_lo, ACC)
        score = tl.load(scores_ptr + rows * stride_s, mask=row_ok, other=0.0).to(ACC)
        if HAS_CLIP:
            clip = scalar_arg(clip_hi, clip_mid, clip_lo, ACC)
            score = tl.where(score < -clip, -clip, score)
            score = tl.where(score > clip, clip, score)
        last = tl.full([BLOCK_B], -1, tl.int64)  # last valid position, once found
        kl_sum = tl.zeros([BLOCK_B], ACC)
        count = tl.zeros([BLOCK_B], ACC)
        for start in range(0, T, BLOCK_T):
            t = (T - 1 - start - j).to(tl.int64)
            ok = row_ok[:, None] & (t >= 0)[None, :]
            row_offsets = rows[:, None]
            lp = tl.load(logprobs_ptr + row_offsets * stride_lb + t[None, :] * stride_lt, mask=ok, other=0.0)
            ref = tl.load(ref_ptr + row_offsets * stride_rb + t[None, :] * stride_rt, mask=ok, other=0.0)
            m = tl.load(mask_ptr + row_offsets * stride_mb + t[None, :] * stride_mt, mask=ok, other=0)
            m = m.to(ACC)
            valid = ok & (m != 0.0)
            kl = _kl_value(lp.to(ACC), ref.to(ACC), ESTIMATOR)
            kl_masked = tl.where(valid, kl * m, 0.0)
            kl_sum += tl.sum(kl_masked, axis=1)
            count += tl.sum(tl.where(valid, m, 0.0), axis=1)
            chunk_last = tl.max(tl.where(valid, t[None, :], -1), axis=1)
            last = tl.where(last < 0, chunk_last, last)
            reward = -kl_coef * kl_masked + tl.where(t[None, :] == last[:, None], score[:, None], 0.0)
            tl.store(rewards_ptr + rows[:, None] * T + t[None, :], reward, mask=ok)
        safe_count = tl.where(count > 0.0, count, 1.0)
        tl.store(row_kl_ptr + rows, tl.where(count > 0.0, kl_sum / safe_count, 0.0), mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# Launch configuration: row tiles (``_launch.row_tiles``), chunks of at most 1024 positions.
# ---------------------------------------------------------------------------------------------------
# Register budget 128/thread (bench/static/budgets.py, checked by tests/test_static.py): >= 16 resident
# warps per SM keep ~25 KiB of 16-byte loads in flight.
def _launch_config(B: int, T: int) -> RowTiles:
    return row_tiles(B, T)


# ---------------------------------------------------------------------------------------------------
# Launchers.  ``_launch_fwd_out`` writes into outputs the caller allocated.
# ---------------------------------------------------------------------------------------------------
def _launch_fwd_out(
    rewards: torch.Tensor,
    row_kl: torch.Tensor,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    score_clip: float,
    has_clip: bool,
) -> None:
    """rewards: contiguous fp32 [B, T], row_kl: contiguous fp32 [B] ← the shaped rewards and per-row
    masked-mean KL of scores [B], logprobs, ref_logprobs, mask [B, T] (any strides)."""
    B, T = logprobs.shape
    assert rewards.shape == (B, T) and rewards.dtype == torch.float32 and rewards.is_contiguous()
    assert row_kl.shape == (B,) and row_kl.dtype == torch.float32 and row_kl.is_contiguous()
    if B == 0:
        return
    if T == 0:
        row_kl.zero_()
        return
    mask = loadable_mask(mask)
    dtype, acc = compute_dtype(logprobs, ref_logprobs), acc_dtype(logprobs, ref_logprobs)
    cfg = _launch_config(B, T)
    wrap_triton(_token_rewards_fwd_kernel)[(cfg.programs,)](
        scores, logprobs, ref_logprobs, mask, rewards, row_kl,
        scores.stride(0),
        logprobs.stride(0), logprobs.stride(1),
        ref_logprobs.stride(0), ref_logprobs.stride(1),
        mask.stride(0), mask.stride(1),
        B, T, *scalar_parts(kl_coef, dtype), *scalar_parts(score_clip, dtype),
        ESTIMATOR=estimator_code(estimator), HAS_CLIP=has_clip, ACC=acc, BLOCK_B=cfg.block_b,
        BLOCK_T=cfg.block_t, num_warps=cfg.num_warps,
    )


def _launch_fwd(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str,
    score_clip: float,
    has_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    row_kl = torch.empty(logprobs.shape[:1], dtype=torch.float32, device=logprobs.device)
    _launch_fwd_out(rewards, row_kl, scores, logprobs, ref_logprobs, mask, kl_coef, estimator, score_clip,
                    has_clip)
    return rewards, row_kl


# ---------------------------------------------------------------------------------------------------
# Registration.  No autograd: rewards are targets (the public function detaches).
# ---------------------------------------------------------------------------------------------------
@kernel_op("token_level_rewards")
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
    """(rewards [B, T] fp32, per-row masked-mean KL [B] fp32); ``estimator`` canonical."""
    return _dispatch.route(FAMILY, logprobs.device, triton=_launch_fwd, torch=cpu.token_rewards_torch)(
        scores, logprobs, ref_logprobs, mask, kl_coef, estimator, score_clip, has_clip
    )


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
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
        ``(rewards, kl_mean)``: rewards float32 [B, T], −kl_coef·KL·m plus the score at each row's last
        valid position (0 at masked positions); kl_mean a float32 0-dim tensor, the mean over rows of
        each row's masked-mean KL (a row with no valid position counts as 0, as in verl).  No host
        sync, no gradient (inputs are detached).

    Example: mask (1, 1, 0), score 2, logprobs = ref_logprobs → rewards (0, 2, 0), kl_mean 0.
    """
    check_float_tensor("scores", scores)
    check_float_tensor("logprobs", logprobs)
    check_float_tensor("ref_logprobs", ref_logprobs)
    check_mask_tensor("mask", mask)
    check_ndim("logprobs", logprobs, 2, "[B, T]")
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    check_shape("mask", mask, logprobs.shape, "logprobs.shape")
    check_shape("scores", scores, logprobs.shape[:1], "logprobs.shape[:1]")
    check_same_device(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    kl_coef = check_real("kl_coef", kl_coef)
    estimator = check_estimator(estimator)
    has_clip = score_clip is not None
    clip = check_positive("score_clip", score_clip) if has_clip else 0.0
    rewards, row_kl = token_rewards_op(
        scores.detach(), logprobs.detach(), ref_logprobs.detach(), mask.detach(), kl_coef, estimator, clip,
        has_clip,
    )
    kl_mean = row_kl.mean() if row_kl.numel() else row_kl.sum()
    return rewards, kl_mean
