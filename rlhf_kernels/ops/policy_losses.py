"""The policy losses of verl 0.9.1's registry (``POLICY_LOSSES``), fused: one token-level kernel core and
one small device function of the per-token terms per variant, selected at compile time.  Each public
function's docstring gives its math; docs/policy_losses.md has all of it, the defaults and the metrics.

The kernel reads each input once and writes per (row, chunk of columns) Σ L·w·m and the statistics Σm,
Σ clip·m, Σ clip_lower·m, Σ kl·m (and, for "vanilla", Σ r·m and max r: ``ppo_policy_loss``'s layout); the
backward writes g·m·w·∂L/∂lp.  The loss of every token-level variant is agg(L·w, m) (``ops/aggregation.py``).
GSPO reads its row log-ratio as an expanded [B, 1] auxiliary input, clip_cov / kl_cov their selected tokens
(chosen on the device by ``ops/cpu/policy_losses.py``; on CPU these passes run in C++,
``ops/cpu/_policy_selection.py``); geo_mean's kernel gives the row sums Σ ℓ*·m and its row-level
exponential is plain torch.  Masked positions contribute exactly 0 and get exactly zero gradient.

Layout: Triton kernels (the variants' device functions in ``ops/_policy_variants.py``) → launch config
(``ppo_losses._row_tiling``) → launchers → registration/autograd → public functions; the PyTorch path is
``ops/cpu/policy_losses.py``.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._registration import kernel_op
from .._validation import check_greater, check_real, compute_dtype
from ._launch import acc_dtype, loadable_mask, scalar_arg, scalar_parts, tl, triton, wrap_triton
from .aggregation import (
    SEQ_MEAN_TOKEN_MEAN,
    TOKEN_MEAN,
    Normalizer,
    agg_row_sums,
    check_loss_agg,
    check_normalizer,
    check_token_inputs,
    chunk_totals,
)
from .cpu import _policy_selection as selection
from .cpu import policy_losses as cpu
from .cpu.ppo_losses import P_CLIP, P_CLIP_LOWER, P_MASK, P_NEG_LOG_RATIO, POLICY_STATS
from .ppo_losses import _row_tiling, ppo_policy_loss

if triton is not None:
    from ._policy_variants import _load_tokens, _token_terms

FAMILY = "policy_losses"
_dispatch.register_family(FAMILY, cuda=("triton", "torch"), cpu=("cpp", "torch"))

_VARIANT_CODE = {name: code for code, name in enumerate(cpu.TOKEN_VARIANTS)}
Tensor = torch.Tensor
PolicyLoss = tuple[torch.Tensor, dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------------
# Triton kernels: the variants' device functions and the tile loads are in ``ops/_policy_variants.py``.
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    # Reads lp, old, A (aux, w) and m once: 13 bytes per token in fp32 with a bool mask (+4 per optional
    # input); writes 7 floats per program.
    @triton.jit
    def _policy_loss_token_fwd_kernel(
        lp_ptr, old_ptr, adv_ptr, aux_ptr, w_ptr, mask_ptr, partials_ptr, stats_ptr,
        s_lp0, s_lp1, s_old0, s_old1, s_adv0, s_adv1, s_aux0, s_aux1, s_w0, s_w1, s_m0, s_m1,
        s_p0, s_p1, s_s0, s_s1, s_s2,
        T, tiles_per_program, p0_hi, p0_mid, p0_lo, p1_hi, p1_mid, p1_lo, p2_hi, p2_mid, p2_lo,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, VARIANT: tl.constexpr, HAS_AUX: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr, TRACK_RATIO: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        p0 = scalar_arg(p0_hi, p0_mid, p0_lo, ACC)
        p1 = scalar_arg(p1_hi, p1_mid, p1_lo, ACC)
        p2 = scalar_arg(p2_hi, p2_mid, p2_lo, ACC)
        acc_loss = tl.zeros((BLOCK_T,), ACC)
        acc_mask = tl.zeros((BLOCK_T,), ACC)
        acc_kl = tl.zeros((BLOCK_T,), ACC)
        acc_clip = tl.zeros((BLOCK_T,), ACC)
        acc_lower = tl.zeros((BLOCK_T,), ACC)
        acc_ratio = tl.zeros((BLOCK_T,), ACC)
        ratio_max = tl.zeros((BLOCK_T,), ACC)  # ratios are > 0: 0 is "no valid token"
        for k in range(0, tiles_per_program):
            _, _, lp, old, adv, aux, w, m = _load_tokens(
                lp_ptr, old_ptr, adv_ptr, aux_ptr, w_ptr, mask_ptr, row, chunk * tiles_per_program + k, T,
                s_lp0, s_lp1, s_old0, s_old1, s_adv0, s_adv1, s_aux0, s_aux1, s_w0, s_w1, s_m0, s_m1,
                BLOCK_T, ACC, HAS_AUX, HAS_WEIGHTS, VARIANT,
            )
            loss, _, kl, clip, lower, ratio = _token_terms(lp, old, adv, aux, p0, p1, p2, VARIANT)
            valid = m != 0
            acc_loss += tl.where(valid, loss * w * m, 0.0)
            acc_mask += m
            acc_kl += tl.where(valid, kl * m, 0.0)
            acc_clip += tl.where(valid & clip, m, 0.0)
            acc_lower += tl.where(valid & lower, m, 0.0)
            if TRACK_RATIO:
                acc_ratio += tl.where(valid, ratio * m, 0.0)
                ratio_max = tl.where(valid & (ratio > ratio_max), ratio, ratio_max)
        tl.store(partials_ptr + row * s_p0 + chunk * s_p1, tl.sum(acc_loss, axis=0))
        stats = stats_ptr + row * s_s1 + chunk * s_s2
        tl.store(stats + 0 * s_s0, tl.sum(acc_mask, axis=0))
        tl.store(stats + 1 * s_s0, tl.sum(acc_clip, axis=0))
        tl.store(stats + 2 * s_s0, tl.sum(acc_lower, axis=0))
        tl.store(stats + 3 * s_s0, tl.sum(acc_kl, axis=0))
        tl.store(stats + 4 * s_s0, tl.sum(acc_ratio, axis=0))
        tl.store(stats + 5 * s_s0, tl.max(ratio_max, axis=0))

    # Reads the same inputs again and writes ∂/∂lp (+4 bytes per token in fp32).
    @triton.jit
    def _policy_loss_token_bwd_kernel(
        grad_ptr, grad_partials_ptr, lp_ptr, old_ptr, adv_ptr, aux_ptr, w_ptr, mask_ptr,
        s_lp0, s_lp1, s_old0, s_old1, s_adv0, s_adv1, s_aux0, s_aux1, s_w0, s_w1, s_m0, s_m1,
        s_g0, s_g1, s_gp0, s_gp1,
        T, tiles_per_program, p0_hi, p0_mid, p0_lo, p1_hi, p1_mid, p1_lo, p2_hi, p2_mid, p2_lo,
        BLOCK_T: tl.constexpr, ACC: tl.constexpr, VARIANT: tl.constexpr, HAS_AUX: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        p0 = scalar_arg(p0_hi, p0_mid, p0_lo, ACC)
        p1 = scalar_arg(p1_hi, p1_mid, p1_lo, ACC)
        p2 = scalar_arg(p2_hi, p2_mid, p2_lo, ACC)
        g = tl.load(grad_partials_ptr + row * s_gp0 + chunk * s_gp1).to(ACC)
        for k in range(0, tiles_per_program):
            cols, in_row, lp, old, adv, aux, w, m = _load_tokens(
                lp_ptr, old_ptr, adv_ptr, aux_ptr, w_ptr, mask_ptr, row, chunk * tiles_per_program + k, T,
                s_lp0, s_lp1, s_old0, s_old1, s_adv0, s_adv1, s_aux0, s_aux1, s_w0, s_w1, s_m0, s_m1,
                BLOCK_T, ACC, HAS_AUX, HAS_WEIGHTS, VARIANT,
            )
            _, d, _, _, _, _ = _token_terms(lp, old, adv, aux, p0, p1, p2, VARIANT)
            grad = tl.where(m != 0, g * m * w * d, 0.0)
            tl.store(grad_ptr + row * s_g0 + cols * s_g1, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------------------
# Launchers.  The launch configuration is the PPO losses' ``_row_tiling`` (same grid, same tiles).
# ``*_out`` write into outputs the caller allocated (any strides); ``_launch_fwd`` / ``_launch_bwd``
# allocate.  ``params`` holds up to three scalars (missing ones are 0), each passed as scalar_parts.
# ---------------------------------------------------------------------------------------------------
def _launch_args(
    inputs: tuple[Tensor, Tensor, Tensor], mask: Tensor, aux: Tensor | None, is_weights: Tensor | None,
    variant: str, params: list[float],
) -> tuple[list[Tensor], list[int], list[float], dict]:
    """(tensors, their strides, scalar parts, constexpr flags) shared by the forward and the backward;
    a missing aux / weight tensor is replaced by logprobs, which the kernel then does not read."""
    lp = inputs[0]
    tensors = [*inputs, lp if aux is None else aux, lp if is_weights is None else is_weights]
    tensors.append(loadable_mask(mask))
    dtype = compute_dtype(*inputs)
    parts = [p for v in (list(params) + [0.0] * 3)[:3] for p in scalar_parts(v, dtype)]
    flags = {
        "ACC": acc_dtype(*inputs), "VARIANT": _VARIANT_CODE[variant],
        "HAS_AUX": aux is not None, "HAS_WEIGHTS": is_weights is not None,
    }
    return tensors, [s for t in tensors for s in t.stride()], parts, flags


def _launch_fwd_out(
    loss_partials: Tensor, stats: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
    mask: Tensor, aux: Tensor | None, is_weights: Tensor | None, variant: str, params: list[float],
) -> None:
    rows, cols = logprobs.shape
    cfg = _row_tiling(rows, cols)
    assert tuple(loss_partials.shape) == (rows, cfg.chunks)
    assert tuple(stats.shape) == (POLICY_STATS, rows, cfg.chunks)
    tensors, strides, parts, flags = _launch_args(
        (logprobs, old_logprobs, advantages), mask, aux, is_weights, variant, params
    )
    wrap_triton(_policy_loss_token_fwd_kernel)[(rows, cfg.chunks)](
        *tensors, loss_partials, stats, *strides, *loss_partials.stride(), *stats.stride(),
        cols, cfg.tiles_per_program, *parts,
        BLOCK_T=cfg.block_t, TRACK_RATIO=variant == "vanilla", num_warps=cfg.num_warps, **flags,
    )


def _launch_bwd_out(
    grad: Tensor, grad_partials: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
    mask: Tensor, aux: Tensor | None, is_weights: Tensor | None, variant: str, params: list[float],
) -> None:
    rows, cols = logprobs.shape
    cfg = _row_tiling(rows, cols)
    assert tuple(grad_partials.shape) == (rows, cfg.chunks), "gradient of the forward's partial sums"
    assert tuple(grad.shape) == (rows, cols)
    tensors, strides, parts, flags = _launch_args(
        (logprobs, old_logprobs, advantages), mask, aux, is_weights, variant, params
    )
    wrap_triton(_policy_loss_token_bwd_kernel)[(rows, cfg.chunks)](
        grad, grad_partials, *tensors, *strides, *grad.stride(), *grad_partials.stride(),
        cols, cfg.tiles_per_program, *parts,
        BLOCK_T=cfg.block_t, num_warps=cfg.num_warps, **flags,
    )


def _launch_fwd(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, aux: Tensor | None,
    is_weights: Tensor | None, variant: str, params: list[float],
) -> tuple[Tensor, Tensor]:
    rows, cols = logprobs.shape
    chunks = _row_tiling(rows, cols).chunks
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    loss_partials = torch.empty(rows, chunks, dtype=dtype, device=logprobs.device)
    stats = torch.empty(POLICY_STATS, rows, chunks, dtype=dtype, device=logprobs.device)
    _launch_fwd_out(
        loss_partials, stats, logprobs, old_logprobs, advantages, mask, aux, is_weights, variant, params
    )
    return loss_partials, stats


def _launch_bwd(
    grad_partials: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    aux: Tensor | None, is_weights: Tensor | None, variant: str, params: list[float],
) -> Tensor:
    grad = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    _launch_bwd_out(
        grad, grad_partials, logprobs, old_logprobs, advantages, mask, aux, is_weights, variant, params
    )
    return grad


# ---------------------------------------------------------------------------------------------------
# Registration: (loss partial sums [B, chunks], statistics [6, B, chunks]); the partial sums are
# differentiable in ``logprobs`` only.
# ---------------------------------------------------------------------------------------------------
@kernel_op("policy_loss_token_fwd")
def policy_loss_token_fwd(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    aux: torch.Tensor | None, is_weights: torch.Tensor | None, variant: str, params: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ L·w·m [B, chunks], [Σm, Σ clip·m, Σ clip_lower·m, Σ kl·m, Σ r·m, max r] [6, B, chunks]) of the
    token-level variant ``variant`` (a name in TOKEN_VARIANTS) with its scalars ``params``."""
    return _dispatch.route(
        FAMILY, logprobs.device, triton=_launch_fwd, cpp=cpu.policy_loss_token_fwd_cpp,
        torch=cpu.policy_loss_token_fwd_torch,
    )(logprobs, old_logprobs, advantages, mask, aux, is_weights, variant, params)


@kernel_op("policy_loss_token_bwd")
def policy_loss_token_bwd(
    grad_partials: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
    advantages: torch.Tensor, mask: torch.Tensor, aux: torch.Tensor | None, is_weights: torch.Tensor | None,
    variant: str, params: list[float],
) -> torch.Tensor:
    """∂/∂logprobs [B, T] (logprobs' dtype) given the gradient of the forward's loss partial sums."""
    return _dispatch.route(
        FAMILY, logprobs.device, triton=_launch_bwd, cpp=cpu.policy_loss_token_bwd_cpp,
        torch=cpu.policy_loss_token_bwd_torch,
    )(grad_partials, logprobs, old_logprobs, advantages, mask, aux, is_weights, variant, params)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:6])
    ctx.variant, ctx.params = inputs[6:]


def _backward(ctx, grad_partials, grad_stats):
    grad = policy_loss_token_bwd(grad_partials, *ctx.saved_tensors, ctx.variant, ctx.params)
    return (grad,) + (None,) * 7


policy_loss_token_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Shared steps of the public functions.  ``args`` is (logprobs, old_logprobs, advantages, mask).
# ---------------------------------------------------------------------------------------------------
def _check(args: tuple, is_weights: Tensor | None, loss_agg: str | None, normalizer: Normalizer, **positive):
    """Validates the common arguments and the named scalars (each must be > 0); returns (the weights,
    detached, in the compute dtype, or None; the normalizer; the scalars as floats, in order)."""
    logprobs, old_logprobs, advantages, mask = args
    check_token_inputs(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    if is_weights is not None:
        check_token_inputs(mask, is_weights=is_weights)
        is_weights = is_weights.detach().to(compute_dtype(logprobs, old_logprobs, advantages))
    if loss_agg is not None:
        check_loss_agg(loss_agg)
    normalizer = check_normalizer(normalizer)
    return is_weights, normalizer, [check_greater(name, value, 0.0) for name, value in positive.items()]


def _clip_range(clip_low: float, clip_high: float | None) -> tuple[float, float]:
    clip_low = check_greater("clip_low", clip_low, 0.0)
    return clip_low, clip_low if clip_high is None else check_greater("clip_high", clip_high, 0.0)


def saves_derivative(logprobs: Tensor) -> bool:
    """Whether the forward keeps D = w·∂L/∂lp for a one-pass backward: on the C++ CPU path, when a gradient
    will flow (docs/policy_losses.md: one [B, T] buffer in the compute dtype, until the backward)."""
    # selection.cpp_runs: the backend choice as a constant under torch.compile (tracing backend_for would
    # enter the extension loader's lock the first time)
    return logprobs.requires_grad and torch.is_grad_enabled() and selection.cpp_runs(logprobs.device)


def core_forward(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, aux: Tensor | None,
    is_weights: Tensor | None, variant: str, params,
) -> tuple[Tensor, Tensor]:
    """(loss partial sums, statistics) of the token-level core, differentiable in logprobs only."""
    op_args = (logprobs, old_logprobs, advantages, mask, aux, is_weights, variant, [float(p) for p in params])
    if saves_derivative(logprobs):
        partials, stats, _ = cpu.policy_loss_token_fwd_saving_cpp(*op_args)
        return partials, stats
    return policy_loss_token_fwd(*op_args)


def _forward(variant: str, args: tuple, aux: Tensor | None, is_weights: Tensor | None, params) -> tuple:
    """(loss partial sums, detached statistics) of the token-level core; differentiable in logprobs only."""
    logprobs, old_logprobs, advantages, mask = args
    partials, stats = core_forward(
        logprobs, old_logprobs.detach(), advantages.detach(), mask, aux, is_weights, variant, params
    )
    return partials, stats.detach()


def _token_loss(
    variant: str, args: tuple, params, aux: Tensor | None, is_weights: Tensor | None, loss_agg: str,
    normalizer: Normalizer, metrics: tuple[str, ...], zeros: tuple[str, ...] = (),
) -> PolicyLoss:
    """(agg(L·w, m), the ``metrics`` among clipfrac / clipfrac_lower / approx_kl, and ``zeros`` as 0)."""
    partials, stats = _forward(variant, args, aux, is_weights, params)
    seq_len = args[0].shape[1]
    loss = agg_row_sums(chunk_totals(partials), chunk_totals(stats[P_MASK]), loss_agg, seq_len, normalizer)
    return loss, _metric_means(stats, metrics, zeros)


def _metric_means(stats: Tensor, names: tuple[str, ...], zeros: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Σ x·m / max(Σm, 1) of the clip, clip_lower and kl statistics, 0-dim fp32, for ``names``; 0 for
    ``zeros`` (metrics verl reports that a variant does not have)."""
    totals = stats[: P_NEG_LOG_RATIO + 1].sum(dim=(1, 2))
    means = (totals[1:] / totals[:1].clamp(min=1.0)).to(torch.float32)
    rows = {"clipfrac": P_CLIP, "clipfrac_lower": P_CLIP_LOWER, "approx_kl": P_NEG_LOG_RATIO}
    out = {name: means[rows[name] - 1] for name in names}
    out.update({name: torch.zeros_like(means[0]) for name in zeros})
    return out


# ---------------------------------------------------------------------------------------------------
# Public functions.  Common arguments: logprobs [B, T] (float32, bfloat16, float16 or float64, any
# strides; the only differentiable input), old_logprobs and advantages [B, T] of the same dtype, mask [B, T]
# bool/integer/floating 0-1, is_weights [B, T] optional rollout importance weights (no gradient), loss_agg
# one of LOSS_AGG_MODES and normalizer (docs/aggregation.md).  Returns (loss 0-dim fp32 (fp64 for fp64
# inputs), metrics: 0-dim fp32 tensors named clipfrac / clipfrac_lower / approx_kl for verl's
# pg_clipfrac / pg_clipfrac_lower / ppo_kl; masked means divide by max(Σm, 1)).  Masked positions
# contribute 0 and get exactly zero gradient; a fully masked batch gives loss 0 and gradient 0.  No host
# sync.  The math of each variant is in the module docstring and docs/policy_losses.md.
# ---------------------------------------------------------------------------------------------------
def vanilla_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
    clip_high: float | None = None, dual_clip: float | None = 3.0, is_weights: Tensor | None = None,
    loss_agg: str = TOKEN_MEAN, normalizer: Normalizer = None,
) -> PolicyLoss:
    """verl's "vanilla": :func:`rlhf_kernels.ppo_policy_loss` with verl's default dual clip c = 3."""
    return ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        loss_agg=loss_agg, normalizer=normalizer, is_weights=is_weights,
    )


def weighted_vanilla_fwd(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, is_weights: Tensor | None,
    clip_low: float, clip_high: float, dual_clip: float | None,
) -> tuple[Tensor, Tensor]:
    """``ppo_policy_loss``'s forward on this core ("vanilla", with rollout weights or none): (Σ L·w·m
    partials, its 6 statistics rows)."""
    if is_weights is not None:
        check_token_inputs(mask, is_weights=is_weights)
        is_weights = is_weights.detach().to(compute_dtype(logprobs, old_logprobs, advantages))
    params = [clip_low, clip_high, float("inf") if dual_clip is None else dual_clip]
    return core_forward(logprobs, old_logprobs, advantages, mask, None, is_weights, "vanilla", params)


def gpg_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    is_weights: Tensor | None = None, loss_agg: str = TOKEN_MEAN, normalizer: Normalizer = None,
) -> PolicyLoss:
    """GPG: L = −A·lp (``old_logprobs`` unused but checked); no metrics (verl returns none)."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, _ = _check(args, is_weights, loss_agg, normalizer)
    return _token_loss("gpg", args, (), None, is_weights, loss_agg, normalizer, ())


def dro_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, beta: float,
    is_weights: Tensor | None = None, loss_agg: str = TOKEN_MEAN, normalizer: Normalizer = None,
) -> PolicyLoss:
    """DRO: L = −(A·lp − ½β·(lp − old)²), β > 0 required; metric ``approx_kl`` = mean of old − lp."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, params = _check(args, is_weights, loss_agg, normalizer, beta=beta)
    return _token_loss("dro", args, params, None, is_weights, loss_agg, normalizer, ("approx_kl",))


def cispo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
    clip_high: float | None = None, is_weights: Tensor | None = None, loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> PolicyLoss:
    """CISPO: L = −sg(clamp(r, 1 − ε_low, 1 + ε_high))·A·lp, r = e^{clamp(lp − old, ±20)}; metrics clipfrac
    (r ≠ its clamp), clipfrac_lower (0), approx_kl."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, _ = _check(args, is_weights, loss_agg, normalizer)
    return _token_loss(
        "cispo", args, _clip_range(clip_low, clip_high), None, is_weights, loss_agg, normalizer,
        ("clipfrac", "approx_kl"), zeros=("clipfrac_lower",),
    )


def sapo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, tau_pos: float = 1.0,
    tau_neg: float = 1.05, is_weights: Tensor | None = None, loss_agg: str = SEQ_MEAN_TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> PolicyLoss:
    """SAPO: L = −σ(τ(r − 1))·(4/τ)·A with τ = τ_pos where A > 0 else τ_neg.  verl always aggregates SAPO
    with "seq-mean-token-mean" (this function's default; another ``loss_agg`` is honoured).  Metrics
    clipfrac and clipfrac_lower (0), approx_kl."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, params = _check(
        args, is_weights, loss_agg, normalizer, tau_pos=tau_pos, tau_neg=tau_neg
    )
    return _token_loss(
        "sapo", args, params, None, is_weights, loss_agg, normalizer, ("approx_kl",),
        zeros=("clipfrac", "clipfrac_lower"),
    )


def _dppo_loss(
    variant: str, args: tuple, clip_low: float, clip_high: float | None, truncation: float,
    is_weights: Tensor | None, loss_agg: str, normalizer: Normalizer,
) -> PolicyLoss:
    is_weights, normalizer, (truncation,) = _check(
        args, is_weights, loss_agg, normalizer, truncation=truncation
    )
    params = (*_clip_range(clip_low, clip_high), truncation)
    metrics = ("clipfrac", "approx_kl", "clipfrac_lower")
    return _token_loss(variant, args, params, None, is_weights, loss_agg, normalizer, metrics)


def dppo_tv_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
    clip_high: float | None = None, truncation: float = 20.0, is_weights: Tensor | None = None,
    loss_agg: str = TOKEN_MEAN, normalizer: Normalizer = None,
) -> PolicyLoss:
    """DPPO-Binary-TV: L = −A·sg(min(r, c))·lp·v with v = [e^lp − e^old ≤ ε_high] where A > 0, else
    [e^lp − e^old ≥ −ε_low]; c = ``truncation`` (verl's clip_ratio_c: 20 in the function, 3 from an
    ActorConfig).  Metrics clipfrac (mean of 1 − v), clipfrac_lower (mean of [r > c]·v), approx_kl."""
    args = (logprobs, old_logprobs, advantages, mask)
    return _dppo_loss("dppo_tv", args, clip_low, clip_high, truncation, is_weights, loss_agg, normalizer)


def dppo_kl_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
    clip_high: float | None = None, truncation: float = 20.0, is_weights: Tensor | None = None,
    loss_agg: str = TOKEN_MEAN, normalizer: Normalizer = None,
) -> PolicyLoss:
    """DPPO-Binary-KL: as :func:`dppo_tv_policy_loss` with v = [KL_bin ≤ ε_high or p ≤ p_old] where A > 0,
    else [KL_bin ≤ ε_low or p ≥ p_old], KL_bin = p_old·(old − lp) + (1 − p_old)·log((1 − p_old + 1e-8)/(1 − p
    + 1e-8))."""
    args = (logprobs, old_logprobs, advantages, mask)
    return _dppo_loss("dppo_kl", args, clip_low, clip_high, truncation, is_weights, loss_agg, normalizer)


def clip_cov_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
    clip_high: float | None = None, clip_cov_ratio: float = 0.0002, clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0, is_weights: Tensor | None = None, loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> PolicyLoss:
    """Clip-Cov: the PPO clipped loss on r = e^{lp − old} (no log-ratio clamp), with the loss (and gradient)
    of up to max(⌊ratio·N⌋, 1) selected tokens zeroed: valid, not clipped, lb < (A − Ā)(lp − l̄p) < ub (masked
    means).  verl draws them at random among the eligible; here the first in row-major order (deterministic,
    on the device).  Metrics clipfrac (fraction selected), approx_kl."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, (ratio,) = _check(
        args, is_weights, loss_agg, normalizer, clip_cov_ratio=clip_cov_ratio
    )
    lower, upper = check_real("clip_cov_lb", clip_cov_lb), check_real("clip_cov_ub", clip_cov_ub)
    if not lower < upper:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub; got {lower} and {upper}")
    params = _clip_range(clip_low, clip_high)
    selected = cpu.clip_cov_selection(*args, *params, ratio, lower, upper)
    metrics = ("clipfrac", "approx_kl")
    return _token_loss("clip_cov", args, params, selected, is_weights, loss_agg, normalizer, metrics)


def kl_cov_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, kl_cov_ratio: float = 0.0002,
    ppo_kl_coef: float = 0.1, is_weights: Tensor | None = None, loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> PolicyLoss:
    """KL-Cov: L = −A·e^{lp − old}, plus k·|lp − old| on the max(⌊ratio·N⌋, 1) valid tokens of largest
    (A − Ā)(lp − l̄p) (means over valid tokens; top-k on the device).  Metric approx_kl = mean |lp − old|."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, (ratio,) = _check(
        args, is_weights, loss_agg, normalizer, kl_cov_ratio=kl_cov_ratio
    )
    coef = check_real("ppo_kl_coef", ppo_kl_coef)
    selected = cpu.kl_cov_selection(logprobs, advantages, mask, ratio)
    return _token_loss("kl_cov", args, (coef,), selected, is_weights, loss_agg, normalizer, ("approx_kl",))


def gspo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
    clip_high: float | None = None, is_weights: Tensor | None = None, loss_agg: str = SEQ_MEAN_TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> PolicyLoss:
    """GSPO: the PPO clipped loss on the sequence ratio ρ_b = e^{min(ℓ̄_b, 10)}, ℓ̄_b = Σ_t (lp − old)·m /
    max(n_b, 1), with ∂ρ_b/∂lp_t = ρ_b (token-level gradient).  Metrics clipfrac, clipfrac_lower (0),
    approx_kl (token mean of old − lp)."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, _ = _check(args, is_weights, loss_agg, normalizer)
    params = _clip_range(clip_low, clip_high)
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    seq_log_ratio = selection.gspo_log_ratio(logprobs, old_logprobs, mask, dtype)  # [B, 1] expanded
    return _token_loss(
        "gspo", args, params, seq_log_ratio, is_weights, loss_agg, normalizer, ("clipfrac", "approx_kl"),
        zeros=("clipfrac_lower",),
    )


def geo_mean_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
    clip_high: float | None = None, is_weights: Tensor | None = None, loss_agg: str | None = None,
    normalizer: Normalizer = None,
) -> PolicyLoss:
    """GMPO: mean over the B rows of −Ā_b·exp(Σ_t ℓ*·m / (n_b + 1e-8))·w̄_b (module docstring); ``loss_agg``
    is ignored, as in verl, and ``normalizer`` replaces B.  w̄_b = exp(Σ_t log(w + 1e-10)·m / (n_b + 1e-8)).
    Metrics clipfrac (raw ≠ clamp(raw) where A > 0), clipfrac_lower (where A < 0), approx_kl."""
    args = (logprobs, old_logprobs, advantages, mask)
    is_weights, normalizer, _ = _check(args, is_weights, loss_agg, normalizer)
    partials, stats = _forward("geo_mean", args, None, None, _clip_range(clip_low, clip_high))
    row_tokens = chunk_totals(stats[P_MASK]) + cpu.GEO_MEAN_EPS
    row_adv, row_log_w = selection.geo_mean_row_sums(
        advantages, mask, is_weights, partials.dtype, cpu.IS_LOG_EPS
    )
    row_loss = -(row_adv / row_tokens) * torch.exp(chunk_totals(partials) / row_tokens)
    if row_log_w is not None:
        row_loss = row_loss * torch.exp(row_log_w / row_tokens)
    loss = row_loss.sum() / (row_loss.shape[0] if normalizer is None else normalizer)
    return loss, _metric_means(stats, ("clipfrac", "approx_kl", "clipfrac_lower"))


def bypass_mode_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, loss_type: str = "ppo_clip",
    level: str | None = None, threshold: float | tuple[float, float] = 2.0, rejection: dict | None = None,
    batch_normalize: bool = False, clip_low: float = 0.2, clip_high: float | None = None,
    dual_clip: float | None = 3.0, is_weights: Tensor | None = None, loss_agg: str = TOKEN_MEAN,
    normalizer: Normalizer = None,
) -> PolicyLoss:
    """verl's "bypass_mode" (``old_logprobs`` are the rollout engine's): ``rollout_correction(logprobs,
    old_logprobs, mask, level=, threshold=, rejection=, batch_normalize=)`` gives (w, keep_mask, metrics);
    then ``loss_type="ppo_clip"``: :func:`vanilla_policy_loss` on keep_mask without weights (the ratio is
    already π/π_rollout), or ``"reinforce"``: L = −A·lp·w (:func:`gpg_policy_loss` with ``is_weights=w``;
    plain REINFORCE when ``level`` is None) on keep_mask, with approx_kl = mean of old − lp over keep_mask.
    The weights are computed here: passing ``is_weights`` is an error (verl silently ignores it).  Metrics:
    the loss's, plus rollout_correction's (as fp32)."""
    from .rollout_correction import rollout_correction  # rollout_correction is its own family

    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"loss_type must be one of ('ppo_clip', 'reinforce'); got {loss_type!r}")
    if is_weights is not None:
        raise ValueError("bypass_mode computes its importance weights from old_logprobs; got is_weights")
    weights, keep, corr_metrics = rollout_correction(
        logprobs, old_logprobs, mask, level=level, threshold=threshold, rejection=rejection,
        batch_normalize=batch_normalize,
    )
    if loss_type == "ppo_clip":
        loss, metrics = vanilla_policy_loss(
            logprobs, old_logprobs, advantages, keep, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, loss_agg=loss_agg, normalizer=normalizer,
        )
    else:
        loss, metrics = gpg_policy_loss(
            logprobs, old_logprobs, advantages, keep, is_weights=weights, loss_agg=loss_agg,
            normalizer=normalizer,
        )
        with torch.no_grad():
            dtype = compute_dtype(logprobs, old_logprobs)
            m = keep.to(dtype)
            diff = torch.where(m != 0, (old_logprobs.to(dtype) - logprobs.detach().to(dtype)) * m, 0.0)
            metrics = dict(metrics, approx_kl=(diff.sum() / m.sum().clamp(min=1.0)).float())
    return loss, {**metrics, **{key: value.float() for key, value in corr_metrics.items()}}


#: Name (verl's registry name) → policy-loss function; every function takes (logprobs, old_logprobs,
#: advantages, mask) and keyword arguments, and returns (loss, metrics).
POLICY_LOSSES = {
    "vanilla": vanilla_policy_loss,
    "gspo": gspo_policy_loss,
    "sapo": sapo_policy_loss,
    "gpg": gpg_policy_loss,
    "clip_cov": clip_cov_policy_loss,
    "kl_cov": kl_cov_policy_loss,
    "geo_mean": geo_mean_policy_loss,
    "dro": dro_policy_loss,
    "cispo": cispo_policy_loss,
    "dppo_tv": dppo_tv_policy_loss,
    "dppo_kl": dppo_kl_policy_loss,
    # old_logprobs are the rollout engine's; its weights come from them (no is_weights argument)
    "bypass_mode": bypass_mode_policy_loss,
}


#: The names whose functions take rollout weights ``is_weights`` (every one but bypass_mode, which computes
#: its weights from ``old_logprobs``).
WEIGHTED_POLICY_LOSSES = tuple(name for name in POLICY_LOSSES if name != "bypass_mode")


def get_policy_loss(name: str):
    """The function of ``POLICY_LOSSES[name]``; a ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in POLICY_LOSSES:
        raise ValueError(f"policy loss must be one of {sorted(POLICY_LOSSES)}; got {name!r}")
    return POLICY_LOSSES[name]
