"""kl_penalty and kl_loss (every estimator, values and gradients, every backend, the launchers) and the
KL controllers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, assert_close, assert_compiles_for_sm90, assert_grad_close

from rlhf_kernels import _dispatch
from rlhf_kernels.kl_control import AdaptiveKLController, FixedKLController
from rlhf_kernels.ops import kl as kl_ops
from rlhf_kernels.ops.aggregation import LOSS_AGG_MODES
from rlhf_kernels.ops.kl import KL_ESTIMATORS, check_estimator, kl_loss, kl_penalty
from rlhf_kernels.reference import aggregation as ref_agg
from rlhf_kernels.reference import kl as ref
from rlhf_kernels.reference import kl as ref_kl

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl")
# Inputs are rounded to the dtype first and the oracle reads the rounded values, so only fp32
# arithmetic separates us from float64: one tolerance for values.  Gradients are stored in the input
# dtype, so they carry its rounding.
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


def _inputs(shape, dtype, device, scale=3.0):
    lp = (torch.randn(shape) * scale - 2).to(dtype).to(device)
    ref_lp = (torch.randn(shape) * scale - 2).to(dtype).to(device)
    return lp, ref_lp


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_gradients_match_oracle(backend, device, estimator, dtype):
    lp, ref_lp = _inputs((3, 37), dtype, device)
    lp.requires_grad_()
    ref_lp.requires_grad_()
    got = kl_penalty(lp, ref_lp, estimator)
    assert got.dtype == torch.float32 and got.shape == (3, 37)
    grad_out = torch.randn(3, 37, device=device)
    g_lp, g_ref = torch.autograd.grad(got, (lp, ref_lp), grad_out)

    lp64 = lp.detach().double().requires_grad_()
    ref64 = ref_lp.detach().double().requires_grad_()
    expected = ref.kl_penalty(lp64, ref64, estimator)
    e_lp, e_ref = torch.autograd.grad(expected, (lp64, ref64), grad_out.double())
    torch.testing.assert_close(got.double(), expected, **VALUE_TOL)
    assert g_lp.dtype == dtype and g_ref.dtype == dtype
    torch.testing.assert_close(g_lp.double(), e_lp, **GRAD_TOL[dtype])
    torch.testing.assert_close(g_ref.double(), e_ref, **GRAD_TOL[dtype])


@pytest.mark.parametrize("estimator", ["k3", "low_var_kl"])
def test_k3_clamps(backend, device, estimator):
    # ref − lp beyond ±20 clamps d; e^d − d − 1 beyond 10 clamps the value; both stop the gradient.
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], device=device, requires_grad=True)
    ref_lp = torch.tensor([25.0, -25.0, 3.0, -9.0, 0.5, 0.0, -1.0], device=device)
    got = kl_penalty(lp, ref_lp, estimator)
    (grad,) = torch.autograd.grad(got.sum(), lp)
    lp64 = lp.detach().double().requires_grad_()
    expected = ref.kl_penalty(lp64, ref_lp.double(), estimator)
    (e_grad,) = torch.autograd.grad(expected.sum(), lp64)
    torch.testing.assert_close(got.double(), expected, **VALUE_TOL)
    torch.testing.assert_close(grad.double(), e_grad, **VALUE_TOL)
    # d = 20 (clamped from 25), d = −20 (clamped from −25) and d = 3 all exceed the value clamp of 10.
    assert got[:3].tolist() == [10.0, 10.0, 10.0] and grad[:3].tolist() == [0.0, 0.0, 0.0]
    assert got[3].item() == pytest.approx(math.exp(-9) + 8)
    assert grad[3].item() == pytest.approx(1 - math.exp(-9))
    assert got[4].item() == pytest.approx(math.exp(0.5) - 1.5)
    assert grad[4].item() == pytest.approx(1 - math.exp(0.5))
    assert got[5].item() == 0.0 and got[6].item() == 0.0


def test_nan_propagates(backend, device):
    lp = torch.tensor([float("nan"), 0.5, 1.0], device=device, requires_grad=True)
    ref_lp = torch.tensor([0.0, float("nan"), 0.0], device=device)
    for estimator in ESTIMATORS:
        got = kl_penalty(lp, ref_lp, estimator)
        (grad,) = torch.autograd.grad(got.sum(), lp)
        assert torch.isnan(got[:2]).all() and torch.isfinite(got[2]), estimator
        assert torch.isnan(grad[:2]).all() and torch.isfinite(grad[2]), estimator


def test_non_contiguous_and_any_shape(backend, device):
    base = torch.randn(4, 9, 6, device=device)
    lp = base[:, ::2, 1]  # strided view
    ref_lp = torch.randn(5, 4, device=device).t()
    for estimator in ESTIMATORS:
        torch.testing.assert_close(kl_penalty(lp, ref_lp, estimator).double(),
                                   ref.kl_penalty(lp, ref_lp, estimator), **VALUE_TOL)
    scalar = kl_penalty(torch.tensor(0.3, device=device), torch.tensor(0.1, device=device), "k2")
    assert scalar.shape == () and scalar.item() == pytest.approx(0.02)
    assert kl_penalty(torch.empty(0, 3, device=device), torch.empty(0, 3, device=device)).shape == (0, 3)


def test_ref_gradient_only_when_needed(backend, device):
    lp = torch.randn(2, 5, device=device, requires_grad=True)
    ref_lp = torch.randn(2, 5, device=device)
    kl_penalty(lp, ref_lp, "k3").sum().backward()
    assert lp.grad is not None and ref_lp.grad is None


def test_gradcheck_float64_torch_path():
    lp = (torch.randn(4, 7, dtype=torch.float64) * 2).requires_grad_()
    ref_lp = (torch.randn(4, 7, dtype=torch.float64) * 2).requires_grad_()
    with _dispatch.use_backend("torch"):
        for estimator in ("k1", "abs", "k2", "k3"):
            assert torch.autograd.gradcheck(lambda a, b, e=estimator: kl_penalty(a, b, e), (lp, ref_lp))


def test_opcheck_torch_path():
    lp = torch.randn(11, requires_grad=True)
    ref_lp = torch.randn(11, requires_grad=True)
    with _dispatch.use_backend("torch"):
        for estimator in ("k1", "abs", "k2", "k3"):
            torch.library.opcheck(torch.ops.rlhf_kernels.kl_penalty.default, (lp, ref_lp, estimator))
            torch.library.opcheck(
                torch.ops.rlhf_kernels.kl_penalty_bwd.default,
                (torch.randn(11), lp.detach(), ref_lp.detach(), estimator, True),
            )


def test_compile_fullgraph_dynamic_torch_path():
    def step(lp, ref_lp):
        return kl_penalty(lp, ref_lp, "k3").sum() + kl_penalty(lp, ref_lp, "k1").square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for n in (5, 8):
            lp = torch.randn(3, n)
            ref_lp = torch.randn(3, n)
            x_eager, x_comp = lp.clone().requires_grad_(), lp.clone().requires_grad_()
            eager = step(x_eager, ref_lp)
            eager.backward()
            got = compiled(x_comp, ref_lp)
            got.backward()
            torch.testing.assert_close(got, eager)
            torch.testing.assert_close(x_comp.grad, x_eager.grad)


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_compile_fullgraph_dynamic_triton_path():
    def step(lp, ref_lp):
        return kl_penalty(lp, ref_lp, "low_var_kl").sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("triton"):
        lp = torch.randn(8, 300, device="cuda", dtype=torch.bfloat16)
        ref_lp = torch.randn(8, 300, device="cuda", dtype=torch.bfloat16)
        x_eager, x_comp = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        step(x_eager, ref_lp).backward()
        compiled(x_comp, ref_lp).backward()
        torch.testing.assert_close(x_comp.grad, x_eager.grad)


def test_estimator_names_and_errors():
    assert KL_ESTIMATORS == (
        "k1", "abs", "k2", "k3", "low_var_kl", "k1+", "abs+", "k2+", "k3+", "low_var_kl+"
    )
    assert check_estimator("low_var_kl") == "k3"
    assert check_estimator("low_var_kl+") == "k3+" and check_estimator("k2+") == "k2"
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(x, x, "kl")
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        kl_penalty(x, torch.zeros(4))
    with pytest.raises(TypeError, match="logprobs must be a floating tensor"):
        kl_penalty(torch.zeros(3, dtype=torch.long), x)
    with pytest.raises(TypeError, match="ref_logprobs must be a torch.Tensor"):
        kl_penalty(x, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_float64_inputs_are_computed_in_float64(backend, device, estimator):
    lp, ref_lp = _inputs((4, 45), torch.float64, device, scale=8.0)  # k3's clamps are reached too
    lp.requires_grad_()
    ref_lp.requires_grad_()
    grad_out = torch.randn(4, 45, dtype=torch.float64)
    got = kl_penalty(lp, ref_lp, estimator)
    assert got.dtype == torch.float64
    g_lp, g_ref = torch.autograd.grad(got, (lp, ref_lp), grad_out.to(device))
    lp64, ref64 = lp.detach().cpu().requires_grad_(), ref_lp.detach().cpu().requires_grad_()
    want = ref.kl_penalty(lp64, ref64, estimator)
    e_lp, e_ref = torch.autograd.grad(want, (lp64, ref64), grad_out)
    torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_lp.cpu(), e_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ref.cpu(), e_ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Launchers: outputs allocated by the caller, every element written
# --------------------------------------------------------------------------------------------------
triton_launchers = pytest.mark.skipif(triton is None, reason="needs triton")


@triton_launchers
@pytest.mark.parametrize("n", [1, 37, 2500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_launchers_write_every_element(n, dtype):
    device = "cuda" if HAS_CUDA else "cpu"
    lp, ref_lp = _inputs((n,), dtype, device, scale=8.0)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    grad_kl = torch.randn(n, dtype=compute, device=device)
    lp64 = lp.detach().cpu().double().requires_grad_()
    ref64 = ref_lp.detach().cpu().double().requires_grad_()
    for estimator in ("k1", "abs", "k2", "k3"):
        kl = torch.full((n,), float("nan"), dtype=compute, device=device)
        kl_ops._launch_fwd_out(kl, lp, ref_lp, estimator)
        want = ref.kl_penalty(lp64, ref64, estimator)
        assert not kl.isnan().any(), estimator
        torch.testing.assert_close(kl.cpu().double(), want, **VALUE_TOL)
        e_lp, e_ref = torch.autograd.grad(want, (lp64, ref64), grad_kl.cpu().double())
        for with_ref in (True, False):
            grad_lp = torch.full((n,), float("nan"), dtype=dtype, device=device)
            grad_ref = torch.full((n,), float("nan"), dtype=dtype, device=device) if with_ref else None
            kl_ops._launch_bwd_out(grad_lp, grad_ref, grad_kl, lp, ref_lp, estimator)
            tol = GRAD_TOL.get(dtype, VALUE_TOL)
            assert not grad_lp.isnan().any(), estimator
            torch.testing.assert_close(grad_lp.cpu().double(), e_lp, **tol)
            if with_ref:
                assert not grad_ref.isnan().any(), estimator
                torch.testing.assert_close(grad_ref.cpu().double(), e_ref, **tol)


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rlhf_kernels.ops.kl as kl

def compile_for_sm90(fn, types, constexprs):
    triton.compile(ASTSource(fn=fn, signature=dict(zip(fn.arg_names, types)), constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

for estimator in range(4):
    compile_for_sm90(kl._kl_penalty_fwd_kernel, ["*bf16", "*fp32", "*fp32", "i32", "constexpr", "constexpr"],
                     {"ESTIMATOR": estimator, "BLOCK": 1024})
    compile_for_sm90(kl._kl_penalty_bwd_kernel, ["*fp64"] * 5 + ["i32"] + ["constexpr"] * 3,
                     {"ESTIMATOR": estimator, "BLOCK": 1024, "HAS_GRAD_REF": True})
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels run natively in the other tests")
@triton_launchers
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks the math, not the lowering (it would accept a plain-float global that a
    compiled kernel refuses): compile every kernel of this family to PTX for sm_90 (Triton's bundled
    ptxas; no device needed), in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_AOT_SCRIPT)


# --------------------------------------------------------------------------------------------------
# KL loss
# --------------------------------------------------------------------------------------------------
def _token_mask(shape, device, empty_rows=True):
    mask = torch.rand(shape) < 0.7
    if empty_rows and shape[0] > 1:
        mask[1] = False
    return mask.to(device)


def _token_inputs(shape, dtype, device):
    lp = -torch.rand(shape) * 3
    ref_lp = lp + torch.randn(shape)
    return lp.to(dtype).to(device), ref_lp.to(dtype).to(device)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_kl_loss_matches_oracle(backend, device, estimator, mode):
    shape = (5, 27)
    lp, ref_lp = _token_inputs(shape, torch.float32, device)
    ref_lp[0, :3] = lp[0, :3] + 30.0  # k3's clamps
    mask = _token_mask(shape, device)
    x = lp.clone().requires_grad_()
    loss = kl_loss(x, ref_lp, mask, estimator=estimator, loss_agg=mode, normalizer=None)
    loss.backward()
    x_ref = lp.cpu().double().requires_grad_()
    want = ref.kl_loss(x_ref, ref_lp.cpu(), mask.cpu(), estimator=estimator, loss_agg=mode)
    want.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
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


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_loss_float64(backend, device, estimator):
    lp, ref_lp = _token_inputs((4, 19), torch.float64, device)
    mask = _token_mask((4, 19), device)
    x = lp.clone().requires_grad_()
    loss = kl_loss(x, ref_lp, mask, estimator=estimator, loss_agg="seq-mean-token-mean", normalizer=1 / 3)
    loss.backward()
    x_ref = lp.cpu().requires_grad_()
    want = ref.kl_loss(x_ref, ref_lp.cpu(), mask.cpu(), estimator=estimator, loss_agg="seq-mean-token-mean",
                       normalizer=1 / 3)
    want.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_kl_loss_fully_masked_batch_has_zero_gradient(backend, device, mode):
    lp, ref_lp = _token_inputs((3, 8), torch.float32, device)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=device)
    for normalizer in (None, torch.tensor(0.0)):
        x = torch.where(torch.rand(3, 8, device=device) < 0.5, lp, float("nan")).requires_grad_()
        loss = kl_loss(x, ref_lp, mask, loss_agg=mode, normalizer=normalizer)
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x)), (mode, normalizer)
        if normalizer is None:
            assert loss.item() == 0.0


def test_kl_loss_gradcheck_float64():
    lp, ref_lp = _token_inputs((3, 7), torch.float64, "cpu")
    mask = _token_mask((3, 7), "cpu")
    for backend in ("torch", "triton") if triton is not None else ("torch",):
        device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
        x, r, m = lp.to(device).requires_grad_(), ref_lp.to(device), mask.to(device)

        def loss(x, r=r, m=m):
            return kl_loss(x, r, m, estimator="k3")

        with _dispatch.use_backend(backend):
            assert torch.autograd.gradcheck(loss, (x,))


def test_kl_loss_bad_inputs():
    lp, ref_lp = _token_inputs((3, 5), torch.float32, "cpu")
    mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_loss(lp, ref_lp, mask, estimator="k4")
    with pytest.raises(TypeError, match="ref_logprobs must have the dtype"):
        kl_loss(lp, ref_lp.half(), mask)
    with pytest.raises(ValueError, match="^loss_agg must be one of"):
        kl_loss(lp, ref_lp, mask, loss_agg="token_mean")
    with pytest.raises(ValueError, match="mask must have shape"):
        kl_loss(lp, ref_lp, mask[:2])
    with pytest.raises(ValueError, match="logprobs must be 2-D"):
        kl_loss(lp[0], ref_lp[0], mask[0])


def test_kl_loss_is_reexported_from_ppo_losses():
    import rlhf_kernels
    from rlhf_kernels.ops import ppo_losses

    assert ppo_losses.kl_loss is kl_loss is rlhf_kernels.kl_loss


# --------------------------------------------------------------------------------------------------
# Controllers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kl,expected_error", [(0.5, -0.2), (0.9, -0.1), (1.0, 0.0), (1.15, 0.15), (3.0, 0.2)]
)
def test_adaptive_controller_follows_ziegler(kl, expected_error):
    controller = AdaptiveKLController(0.2, target=1.0, horizon=10000)
    controller.update(kl, n_steps=256)
    assert controller.value == pytest.approx(0.2 * (1 + expected_error * 256 / 10000))
    # a 0-dim tensor works the same (read once on the host)
    from_tensor = AdaptiveKLController(0.2, target=1.0, horizon=10000)
    from_tensor.update(torch.tensor(kl), n_steps=256)
    assert from_tensor.value == pytest.approx(controller.value)


def test_adaptive_controller_compounds_and_fixed_stays():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    value = 0.1
    for kl in (12.0, 7.0, 3.0, 6.0):
        controller.update(kl, n_steps=100)
        value *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * 100 / 1000
        assert controller.value == pytest.approx(value)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.05


def test_controller_errors():
    with pytest.raises(ValueError, match="target must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon must be > 0"):
        AdaptiveKLController(0.1, target=1.0, horizon=-1)
    with pytest.raises(ValueError, match="init_kl_coef must be >= 0"):
        AdaptiveKLController(-0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        FixedKLController(-1.0)
    with pytest.raises(ValueError, match="current_kl must be a number or a one-element tensor"):
        AdaptiveKLController(0.1, 1.0, 10).update(torch.zeros(3), 1)
    with pytest.raises(TypeError, match="n_steps must be a Python int"):
        AdaptiveKLController(0.1, 1.0, 10).update(1.0, 1.5)


# ---------------------------------------------------------------------------------------------------
# Straight-through ("k3+") and importance-weighted unbiased (old_logprobs) variants.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1+", "abs+", "k2+", "k3+", "low_var_kl+"])
def test_straight_through_value_of_named_gradient_of_k2(backend, device, estimator):
    lp = (-torch.rand(4, 33) * 3).to(device)
    ref = lp + torch.randn(4, 33, device=device) * 2
    x, r = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    got = kl_penalty(x, r, estimator)
    got.backward(torch.ones_like(got))
    xr, rr = lp.cpu().double().requires_grad_(), ref.cpu().double().requires_grad_()
    want = ref_kl.kl_penalty(xr, rr, estimator)
    want.backward(torch.ones_like(want))
    assert_close(got, want, 2e-5, "value")
    assert_close(got, ref_kl.kl_penalty(lp.cpu().double(), ref.cpu().double(), estimator.rstrip("+")), 2e-5,
                 "value of the named estimator")
    assert_close(x.grad, (lp - ref).cpu().double(), 2e-5, "gradient of k2")
    assert_close(r.grad, rr.grad, 2e-5, "reference gradient")


def test_straight_through_matches_real_verl():
    from peers.placeholders import import_peer

    core = import_peer("verl.trainer.ppo.core_algos")
    lp, ref = -torch.rand(3, 40) * 3, -torch.rand(3, 40) * 3
    for estimator in ("k1+", "k3+", "low_var_kl+", "abs+", "k2+"):
        x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        ours, peer = kl_penalty(x, ref, estimator), core.kl_penalty(y, ref, estimator)
        g = torch.randn_like(peer)
        ours.backward(g)
        peer.backward(g)
        assert_close(ours, peer, 2e-5, estimator)
        assert_close(x.grad, y.grad, 2e-5, f"{estimator} gradient")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_unbiased_gradient_matches_oracle_and_openrlhf(backend, device, estimator):
    from peers.placeholders import import_peer

    utils = import_peer("openrlhf.models.utils")
    lp = -torch.rand(3, 29) * 3
    ref, old = lp + torch.randn(3, 29), lp + torch.randn(3, 29) * 2  # some weights hit the clip at 10
    mask = torch.rand(3, 29) < 0.7
    x = lp.clone().to(device).requires_grad_()
    loss = kl_loss(x, ref.to(device), mask.to(device), estimator=estimator, old_logprobs=old.to(device),
                   loss_agg="token-sum")
    loss.backward()
    xr = lp.double().requires_grad_()
    want = ref_agg.agg_loss(ref_kl.kl_penalty(xr, ref, estimator, old_logprobs=old), mask, "token-sum")
    want.backward()
    assert_close(loss, want, 2e-5, "loss")
    assert_close(x.grad, xr.grad, 2e-5, "gradient")
    # OpenRLHF's gradient (its value differs for k3, whose clamps are verl's here): w·(lp − ref) per token.
    y = lp.clone().requires_grad_()
    peer = utils.compute_approx_kl(y, ref, old, kl_estimator=estimator, unbiased_gradient=True)
    (peer * mask).sum().backward()
    assert_close(x.grad, y.grad, 2e-5, "OpenRLHF gradient")


# TRL 1.16's use_bias_correction_kl: k·e^{lp − old}, the ratio differentiable (per token or per sequence).
@pytest.mark.parametrize("estimator", ["k1", "k3", "k3+"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_correction_matches_oracle(backend, device, estimator, level):
    lp = -torch.rand(4, 23) * 3
    ref, old = lp + torch.randn(4, 23) * 0.5, lp + torch.randn(4, 23) * 0.5
    mask = (torch.rand(4, 23) < 0.7).float()
    mask[1] = 0.0  # an empty row
    lp[2, ~mask[2].bool()] = float("nan")  # padding never matters
    mode = "seq-mean-token-mean"
    x = lp.clone().to(device).requires_grad_()
    loss = kl_loss(x, ref.to(device), mask.to(device), estimator=estimator, old_logprobs=old.to(device),
                   kl_correction="bias_correction", importance_sampling_level=level, loss_agg=mode)
    loss.backward()
    xr = torch.where(mask != 0, lp, 0.0).double().requires_grad_()
    want = ref_kl.kl_loss(xr, ref, mask, estimator=estimator, old_logprobs=old,
                          kl_correction="bias_correction", importance_sampling_level=level, loss_agg=mode)
    want.backward()
    assert_close(loss, want, 2e-5, "loss")
    assert_close(x.grad, xr.grad, 2e-5, "gradient")
    assert bool((x.grad[mask == 0] == 0).all())


def test_bias_correction_float64_and_on_policy_gradient(backend, device):
    lp = (-torch.rand(2, 17, dtype=torch.float64) * 3).to(device)
    ref = lp + 0.3
    x = lp.clone().requires_grad_()
    value = kl_penalty(x, ref, "k3", old_logprobs=lp, kl_correction="bias_correction")
    value.sum().backward()
    xr = lp.cpu().clone().requires_grad_()
    want = ref_kl.kl_penalty(xr, ref.cpu(), "k3", old_logprobs=lp.cpu(), kl_correction="bias_correction")
    want.sum().backward()
    assert_close(value, want, 1e-12, "fp64 value")
    assert_close(x.grad, xr.grad, 1e-12, "fp64 gradient")
    # on-policy (old = lp) the value is k3 but the gradient is k3' + k3 (TRL's documented behaviour)
    assert_close(value, kl_penalty(lp, ref, "k3"), 1e-12, "on-policy value")
    k3 = ref_kl.kl_penalty(lp.cpu(), ref.cpu(), "k3")
    assert_close(x.grad, (1 - torch.exp(ref.cpu() - lp.cpu())) + k3, 1e-12, "k3' + k3")


def test_kl_correction_errors():
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="kl_correction must be one of"):
        kl_penalty(lp, lp, old_logprobs=lp, kl_correction="trl")
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        kl_loss(lp, lp, mask, old_logprobs=lp, importance_sampling_level="row")
    with pytest.raises(ValueError, match="importance_sampling_level='sequence' weights the KL"):
        kl_loss(lp, lp, mask, old_logprobs=lp, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="importance_sampling_level='sequence' weights the KL"):
        kl_loss(lp, lp, mask, kl_correction="bias_correction", importance_sampling_level="sequence")
