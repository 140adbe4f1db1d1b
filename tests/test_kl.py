"""kl_penalty (every estimator, values and gradients, every backend) and the KL controllers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA

from rlhf_kernels import _dispatch
from rlhf_kernels.kl_control import AdaptiveKLController, FixedKLController
from rlhf_kernels.ops.kl import KL_ESTIMATORS, check_estimator, kl_penalty
from rlhf_kernels.reference import advantages as ref

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
    assert KL_ESTIMATORS == ("k1", "abs", "k2", "k3", "low_var_kl")
    assert check_estimator("low_var_kl") == "k3"
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(x, x, "kl")
    with pytest.raises(ValueError, match="ref_logprobs must have shape"):
        kl_penalty(x, torch.zeros(4))
    with pytest.raises(TypeError, match="logprobs must be a floating tensor"):
        kl_penalty(torch.zeros(3, dtype=torch.long), x)
    with pytest.raises(TypeError, match="ref_logprobs must be a torch.Tensor"):
        kl_penalty(x, [0.0, 0.0, 0.0])


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
