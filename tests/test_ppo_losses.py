"""ppo_policy_loss / ppo_value_loss against the float64 oracle, the peers, and their launchers."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, assert_close, assert_compiles_for_sm90, assert_grad_close

from bench.baselines import losses as peers
from rlhf_kernels import _dispatch
from rlhf_kernels.ops import ppo_losses
from rlhf_kernels.ops.aggregation import LOSS_AGG_MODES, chunk_totals
from rlhf_kernels.ops.cpu import ppo_losses as cpu
from rlhf_kernels.ops.kl import kl_loss
from rlhf_kernels.ops.ppo_losses import ppo_policy_loss, ppo_value_loss
from rlhf_kernels.reference import ppo_losses as ref

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None


@pytest.fixture(params=["torch", "cpp", "triton"])
def backend(request):
    """Every test once per backend: the PyTorch path, the C++ kernel (csrc/policy_losses.cpp, the default on
    CPU) and the Triton kernels (interpreted on CPU)."""
    with _dispatch.use_backend(request.param):
        yield request.param


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
    """Every mode means what verl 0.9.1 means, empty rows included (no rescaling of any mode)."""
    shape = (6, 45)
    lp, old, adv = _policy_inputs(shape, torch.float32, device, spread=1.0)
    mask = _mask(shape, device)  # row 1 is empty
    for mode in LOSS_AGG_MODES:
        loss, metrics = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0,
                                        loss_agg=mode)
        pg_loss, clipfrac, ppo_kl, clipfrac_lower = peers.verl_compute_policy_loss(
            old, lp, adv, mask.float(), cliprange_low=0.2, cliprange_high=0.3, clip_ratio_c=3.0,
            loss_agg_mode=mode,
        )
        torch.testing.assert_close(loss, pg_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["clipfrac"], clipfrac)
        torch.testing.assert_close(metrics["approx_kl"], ppo_kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["clipfrac_lower"], clipfrac_lower)
    loss, metrics = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    want, clip_ratio, ppo_kl, _ = peers.OpenRLHFPolicyLoss(0.2, 0.3)(lp, old, adv, mask.float())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["clipfrac"], clip_ratio)
    torch.testing.assert_close(metrics["approx_kl"], ppo_kl, rtol=1e-5, atol=1e-6)  # |lp − old| < 20 here
    loss, _ = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3, loss_agg="seq-mean-token-mean")
    want = peers.OpenRLHFPolicyLoss(0.2, 0.3, token_level_loss=False)(lp, old, adv, mask.float())[0]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The normalizer and fully masked batches
# --------------------------------------------------------------------------------------------------
def _shared_normalizer(mode, mask):
    """The whole batch's denominator (docs/aggregation.md), given to every micro-batch."""
    rows = float((mask.sum(-1) > 0).sum())
    return {
        "token-mean": float(mask.sum()),
        "token-sum": None,
        "seq-mean-token-sum": rows,
        "seq-mean-token-mean": rows,
        "seq-mean-token-sum-norm": rows * mask.shape[1],
    }[mode]


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
    for rows in (slice(0, 3), slice(3, 7)):  # row 1, the empty one, is in the first micro-batch
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
def test_fully_masked_batch_has_exactly_zero_gradient(backend, device, mode):
    """Issue 12: a fully masked (micro-)batch, with the default denominator (loss 0), a global one
    (loss 0) or a global one of 0 (loss 0/0 = NaN, as verl): the gradient is exactly 0, NaN padding
    included, for both losses."""
    shape = (3, 21)
    lp, old, adv = _policy_inputs(shape, torch.float32, device)
    v, v_old, ret = _policy_inputs(shape, torch.float32, device)
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    padding = torch.rand(shape, device=device) < 0.3
    for normalizer in (None, 17.0, torch.tensor(0.0)):
        x = torch.where(padding, float("nan"), lp).requires_grad_()
        y = torch.where(padding, float("inf"), v).requires_grad_()
        policy, metrics = ppo_policy_loss(
            x, old, adv, mask, dual_clip=3.0, loss_agg=mode, normalizer=normalizer
        )
        value, _ = ppo_value_loss(y, v_old, ret, mask, clip=0.2, loss_agg=mode, normalizer=normalizer)
        (policy + value).backward()
        assert torch.equal(x.grad, torch.zeros_like(x)), (mode, normalizer)
        assert torch.equal(y.grad, torch.zeros_like(y)), (mode, normalizer)
        if isinstance(normalizer, torch.Tensor):
            assert torch.isnan(policy) and torch.isnan(value)
        else:
            assert policy.item() == 0.0 and value.item() == 0.0
        assert all(m.item() == 0.0 for m in metrics.values())


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
    """fp64 inputs: every backend at fp64 accuracy (1e-12 against the float64 oracle), with clip values
    that fp32 cannot represent (Triton passes Python floats as fp32; the kernels rebuild them exactly from
    three fp32 parts: ops/_launch.scalar_parts)."""
    shape = (5, 19)
    lp, old, adv = _policy_inputs(shape, torch.float64, device, spread=0.5)
    mask = _mask(shape, device)
    metrics = _check_policy(lp, old, adv, mask, clip_low=1 / 3, clip_high=0.28, dual_clip=3.1, loss_agg=mode)
    assert metrics["clipfrac"] > 0 and metrics["clipfrac_lower"] > 0  # both clips decide some tokens
    v, v_old, ret = _policy_inputs(shape, torch.float64, device, spread=0.5)
    assert _check_value(v, v_old, ret, mask, clip=1 / 3, loss_agg=mode)["clipfrac"] > 0


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
        (ValueError, "clip_low must be > 0", dict(clip_low=0.0)),
        (ValueError, "clip_low must be > 0", dict(clip_low=-0.1)),
        (ValueError, "clip_high must be > 0", dict(clip_high=0.0)),
        (ValueError, "dual_clip must be > 1", dict(dual_clip=1.0)),
        (ValueError, "dual_clip must be > 1", dict(dual_clip=0.5)),
        (ValueError, "^loss_agg must be one of", dict(loss_agg="sum")),
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
    with pytest.raises(ValueError, match="^loss_agg must be one of"):
        ppo_value_loss(lp, old, adv, mask, loss_agg="mean")


# --------------------------------------------------------------------------------------------------
# Launchers: outputs allocated by the caller (any strides), every element written
# --------------------------------------------------------------------------------------------------
triton_launchers = pytest.mark.skipif(triton is None, reason="needs triton")
LAUNCH_SHAPE = (2, 2100)  # with 8 target programs: 3 chunks of one 1024-column tile per row, the last partial


def _poisoned(*shape, order):
    """A NaN-filled tensor of ``shape`` whose memory is laid out in dimension order ``order``."""
    storage = torch.full([shape[d] for d in order], float("nan"), device=TRITON_DEVICE)
    return storage.permute([order.index(d) for d in range(len(shape))])


def _chunk_of_column(cfg, cols):
    return torch.arange(cols, device=TRITON_DEVICE) // (cfg.tiles_per_program * cfg.block_t)


def _check_launchers(monkeypatch, kind, inputs, mask, scalars):
    """Forward: partials and statistics, poisoned, against the PyTorch path's row sums (which the oracle
    tests check) and the oracle's token-sum; backward: the gradient, poisoned, against the oracle's
    token-sum gradient times each (row, chunk)'s upstream gradient."""
    monkeypatch.setattr(ppo_losses, "_TARGET_PROGRAMS", 8)
    rows, cols = LAUNCH_SHAPE
    cfg = ppo_losses._row_tiling(rows, cols)
    assert cfg.chunks == 3
    n_stats, fwd_torch, oracle, max_row = {
        "policy": (cpu.POLICY_STATS, cpu.ppo_policy_loss_fwd_torch, ref.ppo_policy_loss, cpu.P_RATIO_MAX),
        "value": (cpu.VALUE_STATS, cpu.ppo_value_loss_fwd_torch, ref.ppo_value_loss, None),
    }[kind]
    loss_partials = _poisoned(rows, cfg.chunks, order=(1, 0))
    stats = _poisoned(n_stats, rows, cfg.chunks, order=(2, 1, 0))
    ppo_losses._launch_fwd_out(kind, loss_partials, stats, *inputs, mask, *scalars)
    assert not loss_partials.isnan().any() and not stats.isnan().any()
    want_partials, want_stats = fwd_torch(*inputs, mask, *scalars)
    torch.testing.assert_close(chunk_totals(loss_partials), want_partials[:, 0], rtol=1e-5, atol=1e-5)
    sums = slice(None, max_row)
    torch.testing.assert_close(chunk_totals(stats[sums]), want_stats[sums, :, 0], rtol=1e-5, atol=1e-5)
    if max_row is not None:
        torch.testing.assert_close(stats[max_row].amax(-1), want_stats[max_row, :, 0])

    clip_kwargs = (dict(clip_low=scalars[0], clip_high=scalars[1], dual_clip=scalars[2]) if kind == "policy"
                   else dict(clip=scalars[0]))
    x = inputs[0].detach().cpu().double().requires_grad_()
    token_sum, _ = oracle(x, *(t.cpu() for t in inputs[1:]), mask.cpu(), loss_agg="token-sum", **clip_kwargs)
    token_sum.backward()
    assert_close(loss_partials.sum(), token_sum, 2e-5, "total")
    grad_partials = torch.randn(rows, cfg.chunks, device=TRITON_DEVICE)
    grad = _poisoned(rows, cols, order=(1, 0))
    ppo_losses._launch_bwd_out(kind, grad, grad_partials, *inputs, mask, *scalars)
    assert not grad.isnan().any()
    upstream = grad_partials[:, _chunk_of_column(cfg, cols)].cpu().double()
    want = x.grad * upstream
    assert_grad_close(grad, want, 2e-5, f"{kind} grad")


@triton_launchers
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_launchers_write_every_element(monkeypatch, dual_clip):
    lp, old, adv = _policy_inputs(LAUNCH_SHAPE, torch.float32, TRITON_DEVICE, spread=1.0)
    mask = _mask(LAUNCH_SHAPE, TRITON_DEVICE, empty_rows=False)
    _check_launchers(monkeypatch, "policy", (lp, old, adv), mask, (0.2, 0.28, dual_clip))


@triton_launchers
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_launchers_write_every_element(monkeypatch, clip):
    v, v_old, ret = _policy_inputs(LAUNCH_SHAPE, torch.float32, TRITON_DEVICE, spread=1.0)
    mask = _mask(LAUNCH_SHAPE, TRITON_DEVICE, empty_rows=False).float()
    _check_launchers(monkeypatch, "value", (v, v_old, ret), mask, (clip,))


_AOT_SCRIPT = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rlhf_kernels.ops.ppo_losses as ppo

def arg_type(name, pointers):
    if name.endswith("_ptr"):
        return pointers.get(name, "*fp32")
    if name.startswith("stride"):
        return "i64"
    if name in ("T", "tiles_per_program"):
        return "i32"
    if name.upper() == name:
        return "constexpr"
    return "fp32"  # a scalar part

def compile_for_sm90(fn, pointers, constexprs):
    signature = {name: arg_type(name, pointers) for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

bf16_inputs = {"logprobs_ptr": "*bf16", "old_ptr": "*bf16", "adv_ptr": "*bf16", "mask_ptr": "*u8",
               "values_ptr": "*bf16", "returns_ptr": "*bf16", "grad_logprobs_ptr": "*bf16",
               "grad_values_ptr": "*bf16"}
fp64 = {name: "*fp64" for name in ("logprobs_ptr", "old_ptr", "adv_ptr", "values_ptr", "returns_ptr",
                                   "loss_partials_ptr", "stats_ptr", "grad_partials_ptr",
                                   "grad_logprobs_ptr", "grad_values_ptr")}
for pointers, acc in ((bf16_inputs, tl.float32), (fp64, tl.float64)):
    for flag in (True, False):
        for fn in (ppo._ppo_policy_loss_fwd_kernel, ppo._ppo_policy_loss_bwd_kernel):
            compile_for_sm90(fn, pointers, {"BLOCK_T": 1024, "ACC": acc, "HAS_DUAL_CLIP": flag})
        for fn in (ppo._ppo_value_loss_fwd_kernel, ppo._ppo_value_loss_bwd_kernel):
            compile_for_sm90(fn, pointers, {"BLOCK_T": 1024, "ACC": acc, "HAS_CLIP": flag})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels run natively in the other tests")
@triton_launchers
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks the math, not the lowering: compile every kernel of this family to PTX for
    sm_90 (Triton's bundled ptxas; no device needed), in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_AOT_SCRIPT)


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
