"""ppo_policy_loss / ppo_value_loss / kl_loss and the shared aggregation, against the float64 oracle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, assert_close, assert_grad_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/

from bench.baselines import losses as peers  # noqa: E402
from rlhf_kernels import _dispatch  # noqa: E402
from rlhf_kernels.ops import aggregation, ppo_losses  # noqa: E402
from rlhf_kernels.ops.aggregation import LOSS_AGG_MODES, agg_loss  # noqa: E402
from rlhf_kernels.ops.ppo_losses import kl_loss, ppo_policy_loss, ppo_value_loss  # noqa: E402
from rlhf_kernels.reference import losses as ref  # noqa: E402

# Inputs are exact in every dtype (the oracle sees the same rounded values), so forward errors come from
# fp32 arithmetic alone; gradients are additionally rounded to the input dtype.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}
METRICS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")
SHAPES = [(1, 1), (3, 17), (4, 1030)]


def _mask(shape, device, empty_rows=True, dtype=torch.bool):
    mask = torch.rand(shape) < 0.7
    if empty_rows and shape[0] > 1:
        mask[1] = False
    return mask.to(dtype).to(device)


def _policy_inputs(shape, dtype, device, spread=0.4):
    lp = -torch.rand(shape) * 3
    old = lp + torch.randn(shape) * spread
    adv = torch.randn(shape)
    return tuple(t.to(dtype).to(device) for t in (lp, old, adv))


def _check_policy(lp, old, adv, mask, **kwargs):
    """Loss, metrics and ∂loss/∂lp against the oracle; returns the oracle's metrics."""
    dtype = lp.dtype
    x = lp.detach().clone().requires_grad_()
    loss, metrics = ppo_policy_loss(x, old, adv, mask, **kwargs)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    x_ref = lp.detach().cpu().double().requires_grad_()
    want, want_metrics = ref.ppo_policy_loss(x_ref, old.cpu(), adv.cpu(), mask.cpu(), **kwargs)
    want.backward()
    assert_close(loss, want, FWD_TOL[dtype], "loss")
    for name in METRICS:
        assert metrics[name].dim() == 0 and metrics[name].dtype == torch.float32, name
        assert not metrics[name].requires_grad, name
        assert_close(metrics[name], want_metrics[name], max(FWD_TOL[dtype], 1e-6), name)
    assert x.grad.dtype == dtype and x.grad.shape == lp.shape
    assert_grad_close(x.grad, x_ref.grad, GRAD_TOL[dtype], "grad")
    return want_metrics


# --------------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_policy_matches_oracle(backend, device, dtype, shape, mode):
    lp, old, adv = _policy_inputs(shape, dtype, device)
    mask = _mask(shape, device)
    _check_policy(lp, old, adv, mask, loss_agg=mode)
    _check_policy(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg=mode)


def test_policy_dual_and_asymmetric_clip(backend, device):
    shape = (6, 53)
    lp, old, adv = _policy_inputs(shape, torch.float32, device, spread=1.5)
    mask = _mask(shape, device)
    for clip_low, clip_high in ((0.2, 0.2), (0.1, 0.4), (0.3, 0.05)):
        plain = _check_policy(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high)
        dual = _check_policy(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=2.0)
        assert plain["clipfrac"] > 0 and plain["clipfrac_lower"] == 0
        assert dual["clipfrac_lower"] > 0  # the data exercise the dual clip


def test_policy_clip_high_changes_only_the_upper_side(device, backend):
    shape = (4, 40)
    lp, old, adv = _policy_inputs(shape, torch.float32, device, spread=1.0)
    mask = _mask(shape, device, empty_rows=False)
    base, _ = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2)
    wider, _ = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.5)
    assert not torch.equal(base, wider)
    # Positions whose ratio is below 1 do not depend on clip_high.
    below = mask & ((lp - old) < 0)
    a, _ = ppo_policy_loss(lp, old, adv, below, clip_low=0.2, loss_agg="seq-mean-token-sum")
    b, _ = ppo_policy_loss(lp, old, adv, below, clip_low=0.2, clip_high=0.5, loss_agg="seq-mean-token-sum")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_extreme_log_ratios(backend, device, dtype):
    shape = (3, 41)
    lp, old, adv = _policy_inputs(shape, torch.float32, device)
    sign = torch.where(torch.rand(shape, device=device) < 0.5, -1.0, 1.0)
    extreme = torch.rand(shape, device=device) < 0.3
    old = torch.where(extreme, lp + 50.0 * sign, old)
    lp, old, adv = lp.to(dtype), old.to(dtype), adv.to(dtype)
    mask = _mask(shape, device)
    for dual_clip in (None, 3.0):
        metrics = _check_policy(lp, old, adv, mask, dual_clip=dual_clip)
        assert metrics["ratio_max"] > 1e8  # e^20: the clamp of the log-ratio is exercised
        loss, _ = ppo_policy_loss(lp, old, adv, mask, dual_clip=dual_clip)
        assert torch.isfinite(loss)


def test_policy_masked_positions_ignored(backend, device):
    shape = (4, 29)
    lp, old, adv = _policy_inputs(shape, torch.float32, device)
    mask = _mask(shape, device)
    poison = ~mask
    lp_p = torch.where(poison, float("nan"), lp)
    old_p = torch.where(poison, float("inf"), old)
    adv_p = torch.where(poison, float("-inf"), adv)
    x = lp_p.clone().requires_grad_()
    loss, metrics = ppo_policy_loss(x, old_p, adv_p, mask, dual_clip=3.0, loss_agg="seq-mean-token-mean")
    loss.backward()
    want, _ = ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, loss_agg="seq-mean-token-mean")
    torch.testing.assert_close(loss, want)
    assert all(bool(torch.isfinite(v)) for v in metrics.values())
    assert bool((x.grad[poison] == 0).all())
    assert bool((x.grad[mask] != 0).any())


def test_policy_nan_at_valid_position_gives_nan(backend, device):
    shape = (2, 9)
    lp, old, adv = _policy_inputs(shape, torch.float32, device)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    lp[0, 3] = float("nan")
    x = lp.clone().requires_grad_()
    loss, metrics = ppo_policy_loss(x, old, adv, mask)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(metrics["ratio_max"]) and torch.isnan(metrics["ratio_mean"])
    assert torch.isnan(x.grad[0, 3])
    adv[1, 2] = float("nan")
    loss, _ = ppo_policy_loss(lp.nan_to_num(), old, adv, mask)
    assert torch.isnan(loss)


def test_policy_float_and_int_masks_and_strided_inputs(backend, device):
    B, T = 5, 33
    base = -torch.rand(B, T + 3, device=device) * 2
    lp = base[:, 2:-1]  # non-contiguous rows
    old = (lp + torch.randn(B, T, device=device) * 0.4).t().contiguous().t()  # column-major
    adv = torch.randn(B, 1, device=device).expand(B, T)  # stride 0 along T
    mask_bool = _mask((B, T), device)
    want = _check_policy(lp, old, adv, mask_bool, dual_clip=3.0, loss_agg="seq-mean-token-mean")
    for mask in (mask_bool.float(), mask_bool.to(torch.int32), mask_bool.to(torch.bfloat16)):
        got = _check_policy(lp, old, adv, mask, dual_clip=3.0, loss_agg="seq-mean-token-mean")
        assert got["clipfrac"] == want["clipfrac"]


def test_policy_several_tiles_per_program(backend, device, monkeypatch):
    # Force few programs so that each covers several 1024-column tiles, the last one past T.
    monkeypatch.setattr(ppo_losses, "_TARGET_PROGRAMS", 2)
    cfg = ppo_losses._row_tiling(1, 5000) if backend == "triton" else None
    if cfg is not None:
        assert cfg.tiles_per_program > 1 and cfg.chunks > 1
    lp, old, adv = _policy_inputs((1, 5000), torch.float32, device)
    mask = _mask((1, 5000), device)
    _check_policy(lp, old, adv, mask, dual_clip=3.0)
    v, v_old, ret = _policy_inputs((1, 5000), torch.float32, device)
    _check_value(v, v_old, ret, mask, clip=0.2)


def test_policy_matches_verl_and_openrlhf(backend, device):
    shape = (6, 45)
    lp, old, adv = _policy_inputs(shape, torch.float32, device, spread=1.0)
    mask = _mask(shape, device, empty_rows=False)
    for mode in LOSS_AGG_MODES:
        loss, metrics = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0,
                                        loss_agg=mode)
        pg_loss, clipfrac, ppo_kl, clipfrac_lower = peers.verl_compute_policy_loss(
            old, lp, adv, mask.float(), cliprange_low=0.2, cliprange_high=0.3, clip_ratio_c=3.0,
            loss_agg_mode=mode,
        )
        if mode == "seq-mean-token-sum-norm":
            # verl (since its global-batch agg_loss) divides this mode by (non-empty rows)·T, the library
            # by T (docs/losses.md): on this mask without empty rows, a factor of B exactly.
            pg_loss = pg_loss * shape[0]
        torch.testing.assert_close(loss, pg_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["clipfrac"], clipfrac)
        torch.testing.assert_close(metrics["approx_kl"], ppo_kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["clipfrac_lower"], clipfrac_lower)
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    want, clip_ratio, ppo_kl, _ = peers.OpenRLHFPolicyLoss(0.2, 0.3)(lp, old, adv, mask.float())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["clipfrac"], clip_ratio)
    torch.testing.assert_close(metrics["approx_kl"], ppo_kl, rtol=1e-5, atol=1e-6)  # |lp − old| < 20 here


# --------------------------------------------------------------------------------------------------
# Aggregation and the normalizer
# --------------------------------------------------------------------------------------------------
def _shared_normalizer(mode, mask):
    if mode == "token-mean":
        return float(mask.sum())
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return mask.shape[0]
    return mask.shape[1]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_with_shared_normalizer_add_up(backend, device, mode):
    shape = (7, 23)
    lp, old, adv = _policy_inputs(shape, torch.float32, device)
    mask = _mask(shape, device)
    v, v_old, ret = _policy_inputs(shape, torch.float32, device)
    normalizer = _shared_normalizer(mode, mask)
    full_x = lp.clone().requires_grad_()
    full, _ = ppo_policy_loss(full_x, old, adv, mask, dual_clip=3.0, loss_agg=mode)
    full.backward()
    # The oracle with the normalizer is the full-batch loss too.
    with_norm, _ = ref.ppo_policy_loss(
        lp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), dual_clip=3.0, loss_agg=mode, normalizer=normalizer
    )
    assert_close(full, with_norm, 2e-5, "full vs normalized oracle")

    split_x = lp.clone().requires_grad_()
    total = 0
    for rows in (slice(0, 3), slice(3, 7)):
        part, _ = ppo_policy_loss(
            split_x[rows], old[rows], adv[rows], mask[rows],
            dual_clip=3.0, loss_agg=mode, normalizer=normalizer,
        )
        total = total + part
    total.backward()
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split_x.grad, full_x.grad, rtol=1e-5, atol=1e-7)

    full_v, _ = ppo_value_loss(v, v_old, ret, mask, clip=0.2, loss_agg=mode)
    parts_v = sum(
        ppo_value_loss(v[r], v_old[r], ret[r], mask[r], clip=0.2, loss_agg=mode, normalizer=normalizer)[0]
        for r in (slice(0, 4), slice(4, 7))
    )
    torch.testing.assert_close(parts_v, full_v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_normalizer_matches_oracle(backend, device, mode):
    shape = (5, 19)
    lp, old, adv = _policy_inputs(shape, torch.float32, device)
    mask = _mask(shape, device)
    for normalizer in (3, 1000.0, torch.tensor(7.5, device=device)):
        _check_policy(lp, old, adv, mask, loss_agg=mode, normalizer=normalizer)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_matches_oracle(mode):
    shape = (6, 13)
    per_token = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = _mask(shape, "cpu")
    mask[3] = False
    for normalizer in (None, 4, torch.tensor(2.5)):
        got = agg_loss(per_token, mask, mode, normalizer)
        want = ref.agg_loss(per_token, mask, mode, normalizer)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Masked positions get exactly zero gradient even when they hold NaN.
    poisoned = torch.where(mask, per_token.detach(), float("nan")).requires_grad_()
    loss = agg_loss(poisoned, mask, mode)
    loss.backward()
    assert torch.isfinite(loss) and bool((poisoned.grad[~mask] == 0).all())
    assert torch.autograd.gradcheck(lambda x: agg_loss(x, mask, mode), (per_token,))


def test_agg_loss_bf16_is_fp32_and_all_empty_is_zero():
    per_token = torch.randn(3, 5).to(torch.bfloat16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for mode in LOSS_AGG_MODES:
        loss = agg_loss(per_token, mask, mode)
        assert loss.dtype == torch.float32 and loss.item() == 0.0


def test_agg_loss_bad_arguments():
    x = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        agg_loss(x, mask, "seq-mean")
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        agg_loss(x, mask, "token-mean", 0)
    with pytest.raises(ValueError, match="normalizer"):
        agg_loss(x, mask, "token-mean", torch.ones(2))
    with pytest.raises(TypeError, match="normalizer"):
        agg_loss(x, mask, "token-mean", "10")
    with pytest.raises(ValueError, match="mask must have shape"):
        agg_loss(x, mask[:, :3], "token-mean")
    with pytest.raises(ValueError, match="per_token must be 2-D"):
        agg_loss(x.view(-1), mask.view(-1), "token-mean")
    assert aggregation.LOSS_AGG_MODES == LOSS_AGG_MODES


# --------------------------------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------------------------------
def _check_value(v, v_old, ret, mask, **kwargs):
    dtype = v.dtype
    x = v.detach().clone().requires_grad_()
    loss, metrics = ppo_value_loss(x, v_old, ret, mask, **kwargs)
    loss.backward()
    x_ref = v.detach().cpu().double().requires_grad_()
    want, want_metrics = ref.ppo_value_loss(x_ref, v_old.cpu(), ret.cpu(), mask.cpu(), **kwargs)
    want.backward()
    assert_close(loss, want, FWD_TOL[dtype], "value loss")
    assert metrics["clipfrac"].dtype == torch.float32 and not metrics["clipfrac"].requires_grad
    assert_close(metrics["clipfrac"], want_metrics["clipfrac"], 1e-6, "value clipfrac")
    assert x.grad.dtype == dtype
    assert_grad_close(x.grad, x_ref.grad, GRAD_TOL[dtype], "value grad")
    return want_metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_matches_oracle(backend, device, dtype, shape, mode):
    v, v_old, ret = _policy_inputs(shape, dtype, device, spread=0.5)
    mask = _mask(shape, device)
    for clip in (0.2, None):
        metrics = _check_value(v, v_old, ret, mask, clip=clip, loss_agg=mode)
        if clip is None:
            assert metrics["clipfrac"] == 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_float64_inputs_are_computed_in_float64(backend, device, mode):
    """fp64 inputs: every backend at fp64 accuracy, clip values that fp32 cannot represent included
    (Triton passes Python floats as fp32; the kernels rebuild them exactly from three fp32 parts)."""
    shape = (5, 19)
    lp, old, adv = _policy_inputs(shape, torch.float64, device, spread=0.5)
    mask = _mask(shape, device)
    metrics = _check_policy(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.1, loss_agg=mode)
    assert metrics["clipfrac"] > 0 and metrics["clipfrac_lower"] > 0  # both clips decide some tokens
    v, v_old, ret = _policy_inputs(shape, torch.float64, device, spread=0.5)
    assert _check_value(v, v_old, ret, mask, clip=0.3, loss_agg=mode)["clipfrac"] > 0


def test_value_clipping_is_exercised_and_matches_peers(backend, device):
    shape = (6, 37)
    v, v_old, ret = _policy_inputs(shape, torch.float32, device, spread=1.0)
    mask = _mask(shape, device, empty_rows=False)
    metrics = _check_value(v, v_old, ret, mask, clip=0.3)
    assert 0 < metrics["clipfrac"] < 1
    loss, ours = ppo_value_loss(v, v_old, ret, mask, clip=0.3, loss_agg="seq-mean-token-mean")
    want, clipfrac = peers.verl_compute_value_loss(v, ret, v_old, mask.float(), 0.3, "seq-mean-token-mean")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["clipfrac"], clipfrac)
    loss, _ = ppo_value_loss(v, v_old, ret, mask, clip=0.3)
    want = peers.OpenRLHFValueLoss(0.3)(v, v_old, ret, mask.float())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_value_masked_positions_and_nan(backend, device):
    shape = (3, 21)
    v, v_old, ret = _policy_inputs(shape, torch.float32, device)
    mask = _mask(shape, device)
    x = torch.where(mask, v, float("nan")).requires_grad_()
    loss, _ = ppo_value_loss(x, torch.where(mask, v_old, float("inf")), ret, mask)
    loss.backward()
    torch.testing.assert_close(loss, ppo_value_loss(v, v_old, ret, mask)[0])
    assert bool((x.grad[~mask] == 0).all())
    ret[0, 0] = float("nan")
    loss, _ = ppo_value_loss(v, v_old, ret, torch.ones_like(mask))
    assert torch.isnan(loss)


# --------------------------------------------------------------------------------------------------
# KL loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_kl_loss_matches_oracle(backend, device, estimator, mode):
    shape = (5, 27)
    lp, ref_lp, _ = _policy_inputs(shape, torch.float32, device, spread=1.0)
    ref_lp[0, :3] = lp[0, :3] + 30.0  # k3's clamps
    mask = _mask(shape, device)
    x = lp.clone().requires_grad_()
    loss = kl_loss(x, ref_lp, mask, estimator=estimator, loss_agg=mode, normalizer=None)
    loss.backward()
    x_ref = lp.cpu().double().requires_grad_()
    want = ref.kl_loss(x_ref, ref_lp.cpu(), mask.cpu(), estimator=estimator, loss_agg=mode)
    want.backward()
    assert_close(loss, want, 2e-5, "kl loss")
    assert_grad_close(x.grad, x_ref.grad, 2e-5, "kl grad")
    assert bool((x.grad[~mask] == 0).all())
    # NaN / inf padding at masked positions changes nothing, gradient included.
    x_pad = torch.where(mask, lp, float("nan")).requires_grad_()
    padded = kl_loss(x_pad, torch.where(mask, ref_lp, float("inf")), mask, estimator=estimator, loss_agg=mode)
    padded.backward()
    torch.testing.assert_close(padded, loss)
    assert bool((x_pad.grad[~mask] == 0).all())
    torch.testing.assert_close(x_pad.grad[mask], x.grad[mask])
    got = kl_loss(lp, ref_lp, mask, estimator=estimator, loss_agg=mode, normalizer=11)
    assert_close(got, ref.kl_loss(lp.cpu(), ref_lp.cpu(), mask.cpu(), estimator=estimator, loss_agg=mode,
                                   normalizer=11), 2e-5, "kl loss normalizer")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_bad_inputs():
    lp, old, adv = _policy_inputs((3, 5), torch.float32, "cpu")
    mask = torch.ones(3, 5, dtype=torch.bool)
    cases = [
        (ValueError, "old_logprobs must have shape", dict(old=old[:, :4])),
        (ValueError, "mask must have shape", dict(mask=mask[:2])),
        (TypeError, "advantages must have the dtype of logprobs", dict(adv=adv.double())),
        (TypeError, "logprobs must be a floating tensor", dict(lp=lp.to(torch.int32))),
        (TypeError, "mask must be a torch.Tensor", dict(mask=[[1] * 5] * 3)),
        (ValueError, "logprobs must be 2-D", dict(lp=lp[0], old=old[0], adv=adv[0], mask=mask[0])),
        (ValueError, "must be non-empty", dict(lp=lp[:0], old=old[:0], adv=adv[:0], mask=mask[:0])),
        (ValueError, "clip_low must be > 0", dict(clip_low=0.0)),
        (ValueError, "clip_low must be > 0", dict(clip_low=-0.1)),
        (ValueError, "clip_high must be > 0", dict(clip_high=0.0)),
        (ValueError, "dual_clip must be > 1", dict(dual_clip=1.0)),
        (ValueError, "dual_clip must be > 1", dict(dual_clip=0.5)),
        (ValueError, "loss_agg must be one of", dict(loss_agg="sum")),
        (ValueError, "normalizer must be a finite number > 0", dict(normalizer=-2)),
        (TypeError, "clip_low must be a Python float", dict(clip_low=torch.tensor(0.2))),
    ]
    for error, match, override in cases:
        args = dict(lp=lp, old=old, adv=adv, mask=mask)
        kwargs = {k: v for k, v in override.items() if k not in args}
        args.update({k: v for k, v in override.items() if k in args})
        with pytest.raises(error, match=match):
            ppo_policy_loss(args["lp"], args["old"], args["adv"], args["mask"], **kwargs)
    with pytest.raises(ValueError, match="clip must be > 0"):
        ppo_value_loss(lp, old, adv, mask, clip=0.0)
    with pytest.raises(ValueError, match="returns must have shape"):
        ppo_value_loss(lp, old, adv[:, :2], mask)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        ppo_value_loss(lp, old, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_loss(lp, old, mask, estimator="k4")
    with pytest.raises(TypeError, match="ref_logprobs must have the dtype"):
        kl_loss(lp, old.half(), mask)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        kl_loss(lp, old, mask, loss_agg="token_mean")


# --------------------------------------------------------------------------------------------------
# Autograd, registration and compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gradcheck_float64(backend_name):
    device = "cuda" if (backend_name == "triton" and HAS_CUDA) else "cpu"
    shape = (3, 11) if device == "cuda" or backend_name == "torch" else (2, 6)  # the interpreter is slow
    lp, old, adv = _policy_inputs(shape, torch.float64, device, spread=0.3)
    mask = _mask(shape, device)
    v, v_old, ret = _policy_inputs(shape, torch.float64, device, spread=0.3)
    lp = lp.requires_grad_()
    v = v.requires_grad_()
    with _dispatch.use_backend(backend_name):
        for mode in LOSS_AGG_MODES:

            def policy(x, mode=mode):
                return ppo_policy_loss(x, old, adv, mask, clip_high=0.3, dual_clip=2.0, loss_agg=mode)[0]

            def value(x, mode=mode):
                return ppo_value_loss(x, v_old, ret, mask, loss_agg=mode)[0]

            assert torch.autograd.gradcheck(policy, (lp,))
            assert torch.autograd.gradcheck(value, (v,))
        assert torch.autograd.gradcheck(lambda x: kl_loss(x, old, mask, estimator="k3"), (lp,))


def test_opcheck_torch_path():
    lp, old, adv = _policy_inputs((4, 9), torch.float32, "cpu")
    mask = _mask((4, 9), "cpu")
    lp = lp.requires_grad_()
    ops = torch.ops.rlhf_kernels
    with _dispatch.use_backend("torch"):
        for dual_clip in (None, 3.0):
            args = (lp, old, adv, mask, 0.2, 0.28, dual_clip)
            torch.library.opcheck(ops.ppo_policy_loss_fwd.default, args)
            torch.library.opcheck(ops.ppo_policy_loss_fwd_torch.default, (lp.detach(),) + args[1:])
            bwd_args = (torch.randn(4, 1), lp.detach(), old, adv, mask, 0.2, 0.28, dual_clip)
            torch.library.opcheck(ops.ppo_policy_loss_bwd.default, bwd_args)
            torch.library.opcheck(ops.ppo_policy_loss_bwd_torch.default, bwd_args)
        for clip in (None, 0.2):
            args = (lp, old, adv, mask, clip)
            torch.library.opcheck(ops.ppo_value_loss_fwd.default, args)
            torch.library.opcheck(ops.ppo_value_loss_fwd_torch.default, (lp.detach(),) + args[1:])
            bwd_args = (torch.randn(4, 1), lp.detach(), old, adv, mask, clip)
            torch.library.opcheck(ops.ppo_value_loss_bwd.default, bwd_args)
            torch.library.opcheck(ops.ppo_value_loss_bwd_torch.default, bwd_args)


def test_compile_fullgraph_dynamic_torch_path():
    def step(lp, old, adv, mask, v, v_old, ret, ref_lp):
        policy, metrics = ppo_policy_loss(lp, old, adv, mask, clip_high=0.28, dual_clip=3.0,
                                          loss_agg="seq-mean-token-mean", normalizer=4)
        value, _ = ppo_value_loss(v, v_old, ret, mask, clip=0.2)
        kl = kl_loss(lp, ref_lp, mask, estimator="low_var_kl")
        return policy + value + 0.1 * kl, metrics["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for shape in ((3, 17), (5, 22)):
            lp, old, adv = _policy_inputs(shape, torch.float32, "cpu")
            v, v_old, ret = _policy_inputs(shape, torch.float32, "cpu")
            ref_lp = old + 0.1
            mask = _mask(shape, "cpu")
            inputs_eager = [lp.clone().requires_grad_(), v.clone().requires_grad_()]
            inputs_comp = [lp.clone().requires_grad_(), v.clone().requires_grad_()]
            want, want_frac = step(inputs_eager[0], old, adv, mask, inputs_eager[1], v_old, ret, ref_lp)
            got, got_frac = compiled(inputs_comp[0], old, adv, mask, inputs_comp[1], v_old, ret, ref_lp)
            want.backward()
            got.backward()
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(got_frac, want_frac)
            for a, b in zip(inputs_comp, inputs_eager, strict=True):
                torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.skipif(
    not HAS_CUDA, reason="torch.compile of Triton kernels needs CUDA (interpreter reads FakeTensor data)"
)
def test_compile_fullgraph_dynamic_triton_path():
    def step(lp, old, adv, mask, v, v_old, ret):
        policy, _ = ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0)
        value, _ = ppo_value_loss(v, v_old, ret, mask)
        return policy + value

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    shape = (64, 1000)
    lp, old, adv = _policy_inputs(shape, torch.bfloat16, "cuda")
    v, v_old, ret = _policy_inputs(shape, torch.float32, "cuda")
    mask = _mask(shape, "cuda")
    eager = [lp.clone().requires_grad_(), v.clone().requires_grad_()]
    comp = [lp.clone().requires_grad_(), v.clone().requires_grad_()]
    step(eager[0], old, adv, mask, eager[1], v_old, ret).backward()
    compiled(comp[0], old, adv, mask, comp[1], v_old, ret).backward()
    for a, b in zip(comp, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
