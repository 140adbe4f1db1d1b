"""Generalized advantage estimation in one launch, as a parallel scan over T.

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

Backends (``_dispatch`` family ``"gae"``): Triton here (one program per tile of rows, parallel over T
through ``tl.associative_scan`` over chunks of up to 1024 positions, the state carried between chunks);
``ops/cpu/gae.py``: the csrc C++ CPU kernel (the default for CPU tensors), the csrc CUDA kernel (a warp
per row, shuffle scan) and a PyTorch Hillis–Steele scan.

Layout: Triton kernels → launch config → launchers → registration → public function.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import (
    check_choice,
    check_float_tensor,
    check_in_range,
    check_mask_tensor,
    check_ndim,
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
from .cpu import gae as cpu

FAMILY = "gae"
# On CUDA the Triton scan comes first; the CUDA extension is selectable (RLHF_KERNELS_BACKEND=cuda or
# use_backend("cuda")) and the benchmark compares both.
_dispatch.register_family(FAMILY, cuda=("triton", "cuda", "torch"), cpu=("cpp", "torch"))

MASK_MODES = ("carry", "zero")

# The longest chunk of T one Triton program scans at a time (tests lower it to exercise the carry).
GAE_MAX_BLOCK_T = 1024


# ---------------------------------------------------------------------------------------------------
# Triton kernels.  Rows are tiled BLOCK_B at a time; T is walked in chunks of BLOCK_T from the end of
# the row, positions inside a chunk in reversed-time order.
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
        B, T, gamma_hi, gamma_mid, gamma_lo, lam_hi, lam_mid, lam_lo,
        CARRY: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Reads rewards, values and mask once, writes the fp32 advantages and returns once:
        B·T·(size(r) + size(V) + size(m) + 8) bytes."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        j = tl.arange(0, BLOCK_T)
        is_last = (j == BLOCK_T - 1)[None, :]
        gamma = scalar_arg(gamma_hi, gamma_mid, gamma_lo, ACC)
        gamma_lam = gamma * scalar_arg(lam_hi, lam_mid, lam_lo, ACC)
        nv = tl.zeros([BLOCK_B], ACC)
        lg = tl.zeros([BLOCK_B], ACC)
        for start in range(0, T, BLOCK_T):
            t = (T - 1 - start - j).to(tl.int64)
            ok = row_ok[:, None] & (t >= 0)[None, :]
            r = tl.load(rewards_ptr + rows[:, None] * stride_rb + t[None, :] * stride_rt, mask=ok, other=0.0)
            v = tl.load(values_ptr + rows[:, None] * stride_vb + t[None, :] * stride_vt, mask=ok, other=0.0)
            m = tl.load(mask_ptr + rows[:, None] * stride_mb + t[None, :] * stride_mt, mask=ok, other=0)
            r = r.to(ACC)
            v = v.to(ACC)
            m = m.to(ACC)
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
                p = tl.zeros([BLOCK_B, BLOCK_T], ACC)
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


# ---------------------------------------------------------------------------------------------------
# Launch configuration: row tiles (``_launch.row_tiles``) with chunks of at most GAE_MAX_BLOCK_T
# positions (the scan keeps five live tensors: at most 16 fp32 values per thread each).
# ---------------------------------------------------------------------------------------------------
# Register budget 168/thread (bench/static/budgets.py, checked by tests/test_static.py): 3 CTAs of 4
# warps per SM, so B = 1024 (512 programs) runs in 1.3 waves.
def _launch_config(B: int, T: int) -> RowTiles:
    return row_tiles(B, T, GAE_MAX_BLOCK_T)


# ---------------------------------------------------------------------------------------------------
# Launchers.  ``_launch_fwd_out`` writes into outputs the caller allocated.
# ---------------------------------------------------------------------------------------------------
def _launch_fwd_out(
    advantages: torch.Tensor,
    returns: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    carry: bool,
) -> None:
    """advantages, returns: contiguous fp32 [B, T] ← GAE of rewards, values, mask ([B, T], any strides)."""
    B, T = rewards.shape
    for out in (advantages, returns):
        assert out.shape == (B, T) and out.dtype == torch.float32 and out.is_contiguous()
    if B == 0 or T == 0:
        return
    mask = loadable_mask(mask)
    dtype, acc = compute_dtype(rewards, values), acc_dtype(rewards, values)
    cfg = _launch_config(B, T)
    wrap_triton(_gae_fwd_kernel)[(cfg.programs,)](
        rewards, values, mask, advantages, returns,
        rewards.stride(0), rewards.stride(1),
        values.stride(0), values.stride(1),
        mask.stride(0), mask.stride(1),
        B, T, *scalar_parts(gamma, dtype), *scalar_parts(lam, dtype),
        CARRY=carry, ACC=acc, BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, num_warps=cfg.num_warps,
    )


def _launch_fwd(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    _launch_fwd_out(advantages, returns, rewards, values, mask, gamma, lam, carry)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# Registration.  No autograd: advantages and returns are targets (the public function detaches).
# ---------------------------------------------------------------------------------------------------
@kernel_op("compute_gae")
def gae_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, carry: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), fp32 [B, T], for [B, T] rewards, values and mask."""
    return _dispatch.route(
        FAMILY, rewards.device, triton=_launch_fwd, cpp=cpu.gae_cpp, cuda=cpu.gae_cuda, torch=cpu.gae_torch
    )(rewards, values, mask, gamma, lam, carry)


# ---------------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------------
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

    Example: one row, rewards (0, 0, 1), values 0, γ = λ = 1, mask all 1 → advantages (1, 1, 1).

    Masked positions never read rewards or values (garbage, even NaN, there does not leak), except
    that carry-mode returns at a masked position add that position's V, as verl does.  NaN at a valid
    position makes the row's advantages at and before it NaN.  No host synchronisation.
    """
    check_float_tensor("rewards", rewards)
    check_float_tensor("values", values)
    check_mask_tensor("mask", mask)
    check_ndim("rewards", rewards, 2, "[B, T]")
    check_shape("values", values, rewards.shape, "rewards.shape")
    check_shape("mask", mask, rewards.shape, "rewards.shape")
    check_same_device(rewards=rewards, values=values, mask=mask)
    gamma = check_in_range("gamma", gamma, 0.0, 1.0)
    lam = check_in_range("lam", lam, 0.0, 1.0)
    mask_mode = check_choice("mask_mode", mask_mode, MASK_MODES)
    return gae_op(rewards.detach(), values.detach(), mask.detach(), gamma, lam, mask_mode == "carry")
