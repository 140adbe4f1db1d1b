"""Reward-model losses (pairwise, K-way ranking, RRHF hinge, pointwise) against the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, assert_close, assert_grad_close

from bench.baselines import losses as peers
from rlhf_kernels import _dispatch
from rlhf_kernels.ops import reward_losses as ops
from rlhf_kernels.ops.reward_losses import (
    pairwise_reward_loss,
    pointwise_reward_loss,
    ranking_hinge_loss,
    ranking_reward_loss,
)
from rlhf_kernels.reference import reward_losses as ref

# Inputs are exact in every dtype, so forward errors come from fp32 arithmetic; gradients are rounded to
# the input dtype.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def _scores(shape, dtype, device, scale=2.0):
    return (torch.randn(shape) * scale).to(dtype).to(device)


# --------------------------------------------------------------------------------------------------
# Pairwise
# --------------------------------------------------------------------------------------------------
def _check_pairwise(chosen, rejected, **kwargs):
    dtype = chosen.dtype
    c = chosen.clone().requires_grad_()
    r = rejected.clone().requires_grad_()
    loss, metrics = pairwise_reward_loss(c, r, **kwargs)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    c_ref = chosen.cpu().double().requires_grad_()
    r_ref = rejected.cpu().double().requires_grad_()
    margin = kwargs.get("margin")
    ref_kwargs = dict(kwargs, margin=margin.cpu() if isinstance(margin, torch.Tensor) else margin)
    want, want_metrics = ref.pairwise_reward_loss(c_ref, r_ref, **ref_kwargs)
    want.backward()
    assert_close(loss, want, FWD_TOL[dtype], "pairwise loss")
    # margin_mean sums differences of up to max|c − r| in fp32: its error scales with that, not the mean.
    spread = 1.0 + (c_ref - r_ref).abs().max().item()
    for name, tol in (("accuracy", 1e-6), ("margin_mean", 1e-6 * spread)):
        assert metrics[name].dtype == torch.float32 and metrics[name].dim() == 0
        assert not metrics[name].requires_grad
        assert_close(metrics[name], want_metrics[name], tol, name)
    assert c.grad.dtype == dtype and r.grad.dtype == dtype
    assert_grad_close(c.grad, c_ref.grad, GRAD_TOL[dtype], "grad chosen")
    assert_grad_close(r.grad, r_ref.grad, GRAD_TOL[dtype], "grad rejected")
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (3000,), (5, 1)])
def test_pairwise_matches_oracle(backend, device, dtype, shape):
    chosen = _scores(shape, dtype, device)
    rejected = _scores(shape, dtype, device)
    margin_tensor = torch.rand(shape, device=device)
    for kwargs in (
        {},
        {"margin": 0.5},
        {"margin": margin_tensor, "center_coef": 0.01},
        {"margin": margin_tensor.to(torch.float64)},
        {"center_coef": 0.1},
    ):
        _check_pairwise(chosen, rejected, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pairwise_stable_for_huge_reward_gaps(backend, device, dtype):
    gaps = torch.tensor([1e4, -1e4, 5e3, -5e3, 88.0, -88.0, 200.0, -200.0, 30.0, -30.0, 1e-3, 0.0])
    chosen = (torch.randn(gaps.shape) + gaps / 2).to(dtype).to(device)
    rejected = (torch.randn(gaps.shape) - gaps / 2).to(dtype).to(device)
    loss = _check_pairwise(chosen, rejected, margin=1.0)
    assert torch.isfinite(loss) and loss > 1e3  # the −1e4 gaps dominate, exactly
    # Each pair alone: tiny losses keep their relative precision too (no 1 + e^{-x} rounding to 1).
    for i in range(gaps.numel()):
        one = _check_pairwise(chosen[i : i + 1], rejected[i : i + 1])
        assert torch.isfinite(one)
    # The literal log(1 + exp(r − c)) of OpenRLHF's LogExpLoss overflows where ours does not.
    assert not torch.isfinite(peers.OpenRLHFLogExpLoss()(chosen.float(), rejected.float()))


def test_pairwise_accuracy_is_strict_and_margin_mean(backend, device):
    chosen = torch.tensor([1.0, 2.0, 3.0, -1.0], device=device)
    rejected = torch.tensor([1.0, 1.0, 4.0, -2.0], device=device)
    _, metrics = pairwise_reward_loss(chosen, rejected)
    assert metrics["accuracy"].item() == 0.5  # the tie counts as wrong
    assert metrics["margin_mean"].item() == pytest.approx(0.25)


def test_pairwise_matches_trl_and_openrlhf(backend, device):
    chosen = _scores((37,), torch.float32, device)
    rejected = _scores((37,), torch.float32, device)
    margin = torch.rand(37, device=device)
    loss, _ = pairwise_reward_loss(chosen, rejected, margin=margin, center_coef=0.01)
    want = peers.trl_reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=0.01)
    torch.testing.assert_close(loss, want)
    loss, _ = pairwise_reward_loss(chosen, rejected)
    torch.testing.assert_close(loss, peers.OpenRLHFPairWiseLoss()(chosen, rejected))
    torch.testing.assert_close(loss, peers.OpenRLHFLogExpLoss()(chosen, rejected))


@pytest.mark.parametrize("margin, center_coef", [(1 / 3, None), (None, 1 / 3), (1 / 3, 1 / 3), (0.7, 0.01)])
def test_pairwise_float64_scalars_are_exact(backend, device, margin, center_coef):
    # Scalars not representable in fp32: an fp64 computation must not see a 24-bit copy (a relative
    # error of ~1e-8 in the loss and gradients).
    chosen = _scores((1500,), torch.float64, device)  # two kernel blocks
    rejected = _scores((1500,), torch.float64, device)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss, _ = pairwise_reward_loss(c, r, margin=margin, center_coef=center_coef)
    loss.backward()
    c_ref, r_ref = chosen.cpu().clone().requires_grad_(), rejected.cpu().clone().requires_grad_()
    want = ref.pairwise_reward_loss(c_ref, r_ref, margin=margin, center_coef=center_coef)[0]
    want.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want.item()) <= 1e-12 * abs(want.item())
    torch.testing.assert_close(c.grad.cpu(), c_ref.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(r.grad.cpu(), r_ref.grad, rtol=1e-12, atol=1e-15)


def test_pairwise_nan_in_nan_out(backend, device):
    chosen = _scores((9,), torch.float32, device)
    rejected = _scores((9,), torch.float32, device)
    chosen[4] = float("nan")
    c = chosen.clone().requires_grad_()
    loss, metrics = pairwise_reward_loss(c, rejected, center_coef=0.1)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(metrics["margin_mean"]) and torch.isnan(c.grad[4])


# --------------------------------------------------------------------------------------------------
# Ranking (InstructGPT) and RRHF hinge
# --------------------------------------------------------------------------------------------------
def _ranking_mask(shape, device):
    mask = torch.rand(shape) < 0.75
    if shape[0] > 2:
        mask[1] = False  # no valid response
        mask[2] = False
        mask[2, shape[1] // 2] = True  # a single valid response: no pair
    return mask.to(device)


def _check_ranking(scores, mask, hinge):
    dtype = scores.dtype
    s = scores.clone().requires_grad_()
    s_ref = scores.cpu().double().requires_grad_()
    mask_ref = None if mask is None else mask.cpu()
    if hinge:
        loss = ranking_hinge_loss(s, mask=mask)
        want = ref.ranking_hinge_loss(s_ref, mask=mask_ref)
    else:
        loss, metrics = ranking_reward_loss(s, mask=mask)
        want, want_metrics = ref.ranking_reward_loss(s_ref, mask=mask_ref)
        assert metrics["accuracy"].dtype == torch.float32 and not metrics["accuracy"].requires_grad
        assert_close(metrics["accuracy"], want_metrics["accuracy"], 1e-6, "accuracy")
    assert loss.dim() == 0
    loss.backward()
    want.backward()
    assert_close(loss, want, FWD_TOL[dtype], "ranking loss")
    assert s.grad.dtype == dtype
    assert_grad_close(s.grad, s_ref.grad, GRAD_TOL[dtype], "ranking grad")
    if mask is not None:
        assert bool((s.grad[~mask] == 0).all())
    return loss


@pytest.mark.parametrize("hinge", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (4, 5), (5, 64), (3, 65), (2, 130)])
def test_ranking_matches_oracle(backend, device, shape, hinge):
    scores = _scores(shape, torch.float32, device)
    _check_ranking(scores, None, hinge)
    _check_ranking(scores, _ranking_mask(shape, device), hinge)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hinge", [False, True])
def test_ranking_half_precision(backend, device, dtype, hinge):
    scores = _scores((4, 33), dtype, device)
    _check_ranking(scores, _ranking_mask((4, 33), device), hinge)


def test_ranking_strided_scores_float_mask_and_one_prompt(backend, device):
    base = _scores((6, 40), torch.float32, device)
    scores = base[::2, 3:30]  # non-contiguous
    mask = _ranking_mask(scores.shape, device)
    want = _check_ranking(scores, mask, False)
    got, _ = ranking_reward_loss(scores, mask=mask.float())
    torch.testing.assert_close(got, want)
    one = scores[0]
    torch.testing.assert_close(ranking_reward_loss(one)[0], ranking_reward_loss(one.unsqueeze(0))[0])
    torch.testing.assert_close(ranking_hinge_loss(one), ranking_hinge_loss(one.unsqueeze(0)))


def test_ranking_extreme_scores_are_stable(backend, device):
    scores = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, 3.0, -3.0]], device=device)
    loss = _check_ranking(scores, None, False)
    assert torch.isfinite(loss)
    _check_ranking(scores.to(torch.bfloat16), None, False)


def test_ranking_edge_cases(backend, device):
    # No valid pair anywhere: loss 0, accuracy 0, zero gradient.
    scores = _scores((3, 4), torch.float32, device).requires_grad_()
    mask = torch.zeros(3, 4, dtype=torch.bool, device=device)
    mask[0, 1] = True
    loss, metrics = ranking_reward_loss(scores, mask=mask)
    loss.backward()
    assert loss.item() == 0 and metrics["accuracy"].item() == 0 and bool((scores.grad == 0).all())
    # Perfectly ordered scores: accuracy 1; ties in the hinge have zero gradient.
    ordered = torch.tensor([[3.0, 2.0, 1.0, 1.0]], device=device, requires_grad=True)
    _, metrics = ranking_reward_loss(ordered[:, :3])
    assert metrics["accuracy"].item() == 1.0
    hinge = ranking_hinge_loss(ordered)
    hinge.backward()
    assert hinge.item() == 0 and bool((ordered.grad == 0).all())


def test_ranking_matches_eager_instructgpt(backend, device):
    scores = _scores((6, 9), torch.float32, device)
    loss, _ = ranking_reward_loss(scores)
    torch.testing.assert_close(loss, peers.instructgpt_ranking_loss(scores))


def test_ranking_nan_in_nan_out(backend, device):
    scores = _scores((2, 6), torch.float32, device)
    scores[1, 2] = float("nan")
    assert torch.isnan(ranking_reward_loss(scores)[0])
    assert torch.isnan(ranking_hinge_loss(scores))
    # NaN at a masked-out response changes nothing and gets a zero gradient.
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1, 2] = False
    clean = scores.nan_to_num()
    for hinge in (False, True):
        x = scores.clone().requires_grad_()
        loss = ranking_hinge_loss(x, mask=mask) if hinge else ranking_reward_loss(x, mask=mask)[0]
        loss.backward()
        want = ranking_hinge_loss(clean, mask=mask) if hinge else ranking_reward_loss(clean, mask=mask)[0]
        torch.testing.assert_close(loss, want)
        assert x.grad[1, 2] == 0 and bool(torch.isfinite(x.grad).all())


# --------------------------------------------------------------------------------------------------
# Pointwise
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (9, 1), (2500,)])
def test_pointwise_matches_oracle(backend, device, dtype, shape):
    pred = _scores(shape, dtype, device).requires_grad_()
    target = _scores(shape, dtype, device).requires_grad_()
    loss = pointwise_reward_loss(pred, target)
    loss.backward()
    pred_ref = pred.detach().cpu().double().requires_grad_()
    target_ref = target.detach().cpu().double().requires_grad_()
    want = ref.pointwise_reward_loss(pred_ref, target_ref)
    want.backward()
    assert_close(loss, want, FWD_TOL[dtype], "mse")
    assert_grad_close(pred.grad, pred_ref.grad, GRAD_TOL[dtype], "grad pred")
    assert_grad_close(target.grad, target_ref.grad, GRAD_TOL[dtype], "grad target")
    if dtype == torch.float32:
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))


# --------------------------------------------------------------------------------------------------
# Launchers write every element of the outputs their caller allocated (filled with NaN here), and
# nothing outside them (each output sits in a NaN buffer one element longer on both sides).
# --------------------------------------------------------------------------------------------------
LAUNCH_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _poisoned(shape, dtype):
    buffer = torch.full((math.prod(shape) + 2,), float("nan"), dtype=dtype, device=TRITON_DEVICE)
    return buffer[1:-1].view(shape), buffer


def _assert_written(out, buffer, expected, scale, tol, what):
    """Every element of ``out`` finite and within tol·(1 + scale) of ``expected``; the guards untouched."""
    assert torch.isnan(buffer[0]) and torch.isnan(buffer[-1]), f"{what}: written out of bounds"
    assert bool(torch.isfinite(out).all()), f"{what}: elements left unwritten"
    err = (out.double().cpu() - expected.detach()).abs()
    bound = tol * (1 + scale)
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}"


def _block_sums(values, cfg):
    """Sums of ``values`` [N] over the launch's consecutive blocks: [cfg.programs]."""
    padded = torch.zeros(cfg.programs * cfg.block, dtype=values.dtype)
    padded[: values.numel()] = values
    return padded.view(cfg.programs, cfg.block).sum(-1)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", LAUNCH_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 2500])
@pytest.mark.parametrize("margin_kind", ["none", "scalar", "tensor"])
def test_pairwise_launchers_write_every_output(dtype, n, margin_kind):
    chosen = _scores((n,), dtype, TRITON_DEVICE)
    rejected = _scores((n,), dtype, TRITON_DEVICE)
    margin = torch.rand(n, device=TRITON_DEVICE) if margin_kind == "tensor" else None
    margin_value = 1 / 3 if margin_kind == "scalar" else 0.0
    cfg = ops._LaunchConfig.flat(n)
    acc = _compute_dtype(dtype)
    (partials, partials_buf), (stats, stats_buf) = (_poisoned((2, cfg.programs), acc) for _ in range(2))
    ops._pairwise_fwd_out(partials, stats, chosen, rejected, margin, margin_value)

    c = chosen.cpu().double().requires_grad_()
    r = rejected.cpu().double().requires_grad_()
    z = c - r - (margin.cpu().double() if margin is not None else margin_value)
    terms = [-torch.nn.functional.logsigmoid(z), (c + r) ** 2, (c > r).double(), c - r]
    for out, buf, rows in ((partials, partials_buf, terms[:2]), (stats, stats_buf, terms[2:])):
        for i, term in enumerate(rows):
            scale = _block_sums(term.detach().abs(), cfg)
            _assert_written(out[i], buf, _block_sums(term.detach(), cfg), scale, FWD_TOL[dtype], "fwd")

    grad_partials = torch.randn(2, cfg.programs, dtype=acc, device=TRITON_DEVICE)
    (grad_c, grad_c_buf), (grad_r, grad_r_buf) = _poisoned((n,), dtype), _poisoned((n,), dtype)
    ops._pairwise_bwd_out(grad_c, grad_r, grad_partials, chosen, rejected, margin, margin_value)
    weighted = (grad_partials.cpu().double() * torch.stack([_block_sums(t, cfg) for t in terms[:2]])).sum()
    want_c, want_r = torch.autograd.grad(weighted, (c, r))
    for out, buf, want in ((grad_c, grad_c_buf, want_c), (grad_r, grad_r_buf, want_r)):
        _assert_written(out, buf, want, want.abs().max(), GRAD_TOL[dtype], "bwd")


def _pair_sums(scores, mask, hinge):
    """Per prompt (Σ over valid pairs i < j of the loss term, valid pairs, pairs with s_i > s_j,
    Σ |term|), in float64."""
    k = scores.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.cpu() != 0
    pair = valid[:, i] & valid[:, j]
    d = scores[:, i] - scores[:, j]
    term = torch.where(pair, torch.relu(-d) if hinge else -torch.nn.functional.logsigmoid(d), 0.0)
    return term.sum(-1), pair.sum(-1).double(), (pair & (d > 0)).sum(-1).double(), term.abs().sum(-1)


@pytest.mark.parametrize("dtype", LAUNCH_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 70)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("hinge", [False, True])
def test_ranking_launchers_write_every_output(dtype, shape, masked, hinge):
    base = _scores((shape[0], 2 * shape[1]), dtype, TRITON_DEVICE)
    scores = base[:, ::2]  # strided
    mask = _ranking_mask(shape, TRITON_DEVICE) if masked else None
    acc = _compute_dtype(dtype)
    (loss_partials, loss_buf), (stats, stats_buf) = _poisoned(shape[:1], acc), _poisoned((2, shape[0]), acc)
    ops._ranking_fwd_out(loss_partials, stats, scores, mask, hinge)

    s = scores.cpu().double().requires_grad_()
    loss_sums, pairs, correct, scale = _pair_sums(s, mask, hinge)
    _assert_written(loss_partials, loss_buf, loss_sums, scale.detach(), FWD_TOL[dtype], "fwd loss")
    _assert_written(stats[0], stats_buf, pairs, 0.0, 0.0, "fwd pairs")
    _assert_written(stats[1], stats_buf, correct, 0.0, 0.0, "fwd correct")

    grad_partials = torch.randn(shape[0], dtype=acc, device=TRITON_DEVICE)
    grad_scores, grad_buf = _poisoned(shape, dtype)
    ops._ranking_bwd_out(grad_scores, grad_partials, scores, mask, hinge)
    (want,) = torch.autograd.grad((grad_partials.cpu().double() * loss_sums).sum(), (s,))
    _assert_written(grad_scores, grad_buf, want, want.abs().max(), GRAD_TOL[dtype], "bwd")


@pytest.mark.parametrize("dtype", LAUNCH_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 2500])
def test_pointwise_launchers_write_every_output(dtype, n):
    pred = _scores((n,), dtype, TRITON_DEVICE)
    target = _scores((n,), dtype, TRITON_DEVICE)
    cfg = ops._LaunchConfig.flat(n)
    partials, partials_buf = _poisoned((cfg.programs,), _compute_dtype(dtype))
    ops._pointwise_fwd_out(partials, pred, target)
    p = pred.cpu().double().requires_grad_()
    squares = (p - target.cpu().double()) ** 2
    sums = _block_sums(squares, cfg)
    _assert_written(partials, partials_buf, sums, sums.detach(), FWD_TOL[dtype], "fwd")

    grad_partials = torch.randn(cfg.programs, dtype=_compute_dtype(dtype), device=TRITON_DEVICE)
    grad_pred, grad_buf = _poisoned((n,), dtype)
    ops._pointwise_bwd_out(grad_pred, grad_partials, pred, target)
    (want,) = torch.autograd.grad((grad_partials.cpu().double() * sums).sum(), (p,))
    _assert_written(grad_pred, grad_buf, want, want.abs().max(), GRAD_TOL[dtype], "bwd")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_bad_inputs():
    c, r = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="rejected must have shape"):
        pairwise_reward_loss(c, r[:3])
    with pytest.raises(TypeError, match="rejected must have the dtype of chosen"):
        pairwise_reward_loss(c, r.half())
    with pytest.raises(TypeError, match="chosen must be a floating tensor"):
        pairwise_reward_loss(c.long(), r)
    with pytest.raises(ValueError, match="margin must have shape"):
        pairwise_reward_loss(c, r, margin=torch.ones(5))
    with pytest.raises(TypeError, match="margin must be a Python float"):
        pairwise_reward_loss(c, r, margin="1")
    with pytest.raises(ValueError, match="center_coef must be finite"):
        pairwise_reward_loss(c, r, center_coef=float("nan"))
    with pytest.raises(ValueError, match="scores must be 2-D"):
        ranking_reward_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        ranking_reward_loss(torch.randn(2, 3), mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        ranking_reward_loss(torch.randn(2, 3), mask=[[1, 1, 1]] * 2)
    with pytest.raises(TypeError, match="seq_scores must be a floating tensor"):
        ranking_hinge_loss(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="target must have shape"):
        pointwise_reward_loss(c, torch.randn(4, 1))


@pytest.mark.parametrize("shape", [(0,), (0, 1), (4, 0)])
def test_empty_inputs_give_zero(backend, device, shape):
    """The empty rule (docs/robustness.md): no pair / prompt / element gives loss 0 and metrics 0, a
    gradient of the input's (empty) shape, and no error."""
    c = torch.randn(shape, device=device, requires_grad=True)
    r = torch.randn(shape, device=device, requires_grad=True)
    loss, metrics = pairwise_reward_loss(c, r, margin=0.5, center_coef=0.1)
    point = pointwise_reward_loss(c, r)
    for value in (loss, point, *metrics.values()):
        assert value.dim() == 0 and value.item() == 0.0
    grads = torch.autograd.grad(loss + point, (c, r))
    assert all(g.shape == shape for g in grads)


@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (0, 0), (0,)])
@pytest.mark.parametrize("masked", [False, True])
def test_ranking_empty_inputs_give_zero(backend, device, shape, masked):
    scores = torch.randn(shape, device=device, requires_grad=True)
    mask = torch.ones(shape, device=device) if masked else None
    loss, metrics = ranking_reward_loss(scores, mask=mask)
    hinge = ranking_hinge_loss(scores, mask=mask)
    for value in (loss, hinge, metrics["accuracy"]):
        assert value.dim() == 0 and value.item() == 0.0
    (grad,) = torch.autograd.grad(loss + hinge, scores)
    assert grad.shape == shape


# --------------------------------------------------------------------------------------------------
# Autograd, registration and compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gradcheck_float64(backend_name):
    device = "cuda" if (backend_name == "triton" and HAS_CUDA) else "cpu"
    chosen = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    rejected = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    margin = torch.rand(4, dtype=torch.float64, device=device)
    scores = torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 0, 0, 1]], device=device, dtype=torch.bool)
    pred = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    with _dispatch.use_backend(backend_name):
        assert torch.autograd.gradcheck(
            lambda c, r: pairwise_reward_loss(c, r, margin=margin, center_coef=0.05)[0], (chosen, rejected)
        )
        assert torch.autograd.gradcheck(lambda s: ranking_reward_loss(s, mask=mask)[0], (scores,))
        assert torch.autograd.gradcheck(lambda s: ranking_hinge_loss(s, mask=mask), (scores,))
        assert torch.autograd.gradcheck(pointwise_reward_loss, (pred, target))


def test_opcheck_torch_path():
    chosen, rejected = torch.randn(7, requires_grad=True), torch.randn(7, requires_grad=True)
    scores = torch.randn(3, 6, requires_grad=True)
    mask = torch.rand(3, 6) < 0.7
    registered = torch.ops.rlhf_kernels
    with _dispatch.use_backend("torch"):
        for margin in (None, torch.rand(7)):
            torch.library.opcheck(
                registered.pairwise_reward_loss_fwd.default, (chosen, rejected, margin, 0.5)
            )
            detached = (chosen.detach(), rejected.detach(), margin, 0.5)
            torch.library.opcheck(registered.pairwise_reward_loss_fwd_torch.default, detached)
            bwd = (torch.randn(2, 1), chosen.detach(), rejected.detach(), margin, 0.5)
            torch.library.opcheck(registered.pairwise_reward_loss_bwd.default, bwd)
            torch.library.opcheck(registered.pairwise_reward_loss_bwd_torch.default, bwd)
        for m, hinge in ((None, False), (mask, True)):
            torch.library.opcheck(registered.ranking_loss_fwd.default, (scores, m, hinge))
            torch.library.opcheck(registered.ranking_loss_fwd_torch.default, (scores.detach(), m, hinge))
            bwd = (torch.randn(3), scores.detach(), m, hinge)
            torch.library.opcheck(registered.ranking_loss_bwd.default, bwd)
            torch.library.opcheck(registered.ranking_loss_bwd_torch.default, bwd)
        torch.library.opcheck(registered.pointwise_reward_loss_fwd.default, (chosen, rejected))
        detached = (chosen.detach(), rejected.detach())
        torch.library.opcheck(registered.pointwise_reward_loss_fwd_torch.default, detached)
        bwd = (torch.randn(1), chosen.detach(), rejected.detach())
        torch.library.opcheck(registered.pointwise_reward_loss_bwd.default, bwd)
        torch.library.opcheck(registered.pointwise_reward_loss_bwd_torch.default, bwd)


def test_compile_fullgraph_dynamic_torch_path():
    def step(chosen, rejected, margin, scores, mask, pred, target):
        pair, metrics = pairwise_reward_loss(chosen, rejected, margin=margin, center_coef=0.01)
        rank, rank_metrics = ranking_reward_loss(scores, mask=mask)
        total = pair + rank + ranking_hinge_loss(scores, mask=mask) + pointwise_reward_loss(pred, target)
        return total, metrics["accuracy"], rank_metrics["accuracy"]

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for n, b, k in ((5, 3, 4), (8, 4, 7)):
            chosen, rejected, margin = torch.randn(n), torch.randn(n), torch.rand(n)
            scores, mask = torch.randn(b, k), torch.rand(b, k) < 0.7
            pred, target = torch.randn(n), torch.randn(n)
            eager_in = [t.clone().requires_grad_() for t in (chosen, rejected, scores, pred)]
            comp_in = [t.clone().requires_grad_() for t in (chosen, rejected, scores, pred)]
            want = step(eager_in[0], eager_in[1], margin, eager_in[2], mask, eager_in[3], target)
            got = compiled(comp_in[0], comp_in[1], margin, comp_in[2], mask, comp_in[3], target)
            want[0].backward()
            got[0].backward()
            for a, b_ in zip(got, want, strict=True):
                torch.testing.assert_close(a, b_)
            for a, b_ in zip(comp_in, eager_in, strict=True):
                torch.testing.assert_close(a.grad, b_.grad)


@pytest.mark.skipif(
    not HAS_CUDA, reason="torch.compile of Triton kernels needs CUDA (interpreter reads FakeTensor data)"
)
def test_compile_fullgraph_dynamic_triton_path():
    def step(chosen, rejected, scores):
        pair, _ = pairwise_reward_loss(chosen, rejected, margin=0.1)
        rank, _ = ranking_reward_loss(scores)
        return pair + rank + ranking_hinge_loss(scores)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    chosen, rejected = torch.randn(3000, device="cuda"), torch.randn(3000, device="cuda")
    scores = torch.randn(64, 70, device="cuda", dtype=torch.bfloat16)
    eager_in = [t.clone().requires_grad_() for t in (chosen, rejected, scores)]
    comp_in = [t.clone().requires_grad_() for t in (chosen, rejected, scores)]
    step(*eager_in).backward()
    compiled(*comp_in).backward()
    for a, b in zip(comp_in, eager_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
