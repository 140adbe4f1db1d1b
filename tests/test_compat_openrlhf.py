"""rlhf_kernels.compat.openrlhf against faithful re-implementations of OpenRLHF's functions (bench/baselines).

Values and gradients on random inputs, masks and dtypes, on the PyTorch path and the Triton kernels
(interpreted on CPU).  bf16 inputs are compared with OpenRLHF run on the same values upcast, which is
what the fused kernels compute.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/

from bench.baselines.advantages import openrlhf_get_advantages_and_returns  # noqa: E402
from bench.baselines.kl import openrlhf_compute_approx_kl  # noqa: E402
from bench.baselines.logprobs import openrlhf_compute_entropy, openrlhf_log_probs_from_logits  # noqa: E402
from bench.baselines.losses import (  # noqa: E402
    OpenRLHFLogExpLoss,
    OpenRLHFPairWiseLoss,
    OpenRLHFPolicyLoss,
    OpenRLHFValueLoss,
)
from rlhf_kernels import _dispatch  # noqa: E402
from rlhf_kernels.compat import openrlhf as co  # noqa: E402

# OpenRLHF's sequence mode divides each row by n + 1e-8 where the kernels divide by n: a relative
# difference of at most 1e-8 even in fp64.  Metrics are fp32 whatever the inputs (METRIC_TOL).
TOL = {torch.float64: 2e-8, torch.float32: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float64: 2e-8, torch.float32: 2e-5, torch.bfloat16: 1e-2}
METRIC_TOL = 2e-7
OUT_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2**-7}


def _close(actual, expected, tol, what=""):
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=tol, atol=tol, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def _upcast(*tensors):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in tensors]


def _mask(batch, seq, device, dtype=torch.float32):
    mask = torch.rand(batch, seq) < 0.7
    mask[1] = False  # an empty row
    mask[2] = False
    mask[2, seq // 3] = True  # a one-token row
    return mask.to(dtype).to(device)


# ---------------------------------------------------------------------------------------------------
# openrlhf.models.utils
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits(backend, device, dtype, temperature):
    leaf = (torch.randn(3, 6, 41) * 3).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, 41, (3, 6)).to(device)
    logits = leaf * 1  # a non-leaf, as the actor's output (OpenRLHF divides it in place)
    got = co.log_probs_from_logits(logits, labels, temperature)
    assert got.dtype == dtype
    # The side effect OpenRLHF's actor relies on: the logits are now divided by the temperature, in
    # their own dtype, exactly as OpenRLHF's division rounds them.
    divided = leaf.detach().clone()
    openrlhf_log_probs_from_logits(divided, labels, temperature)
    assert torch.equal(logits.detach(), divided)
    # The log-probs of those (rounded) divided logits, and the gradient through the division.
    x = divided.double().cpu().requires_grad_()
    want = openrlhf_log_probs_from_logits(x, labels.cpu())
    _close(got, want.to(dtype), OUT_TOL[dtype], "log probs")
    weights = torch.randn(3, 6, dtype=torch.float64)
    (got.double() * weights.to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(leaf.grad, x.grad / temperature, GRAD_TOL[dtype], "grad")


def test_log_probs_then_entropy_like_the_actor():
    """OpenRLHF's actor: log-probs with a temperature, then the entropy of the (divided) logits."""
    logits = torch.randn(2, 5, 33)
    labels = torch.randint(0, 33, (2, 5))
    ours, theirs = logits.clone(), logits.clone()
    co.log_probs_from_logits(ours, labels, 0.7)
    openrlhf_log_probs_from_logits(theirs, labels, 0.7)
    _close(co.compute_entropy(ours), openrlhf_compute_entropy(theirs), 2e-5, "entropy")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_approx_kl(backend, device, estimator, dtype):
    lp = (-torch.rand(5, 17) * 4).to(dtype).to(device).requires_grad_()
    base = (lp.detach().float() + torch.randn(5, 17) * 3).to(dtype)
    base[0, :4] += torch.tensor([15.0, -15.0, 40.0, -40.0]).to(dtype)  # outside the ±10 clamp
    base.requires_grad_()
    got = co.compute_approx_kl(lp, base, kl_estimator=estimator)
    assert got.dtype == torch.float32
    lp64, base64 = _upcast(lp, base)
    want = openrlhf_compute_approx_kl(lp64, base64, estimator)
    _close(got, want, 2e-5, estimator)
    weights = torch.randn(5, 17, dtype=torch.float64)
    (got.double() * weights.to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(lp.grad, lp64.grad, GRAD_TOL[dtype], "d log_probs")
    _close(base.grad, base64.grad, GRAD_TOL[dtype], "d log_probs_base")


def test_compute_approx_kl_mask_and_errors():
    lp, base = torch.randn(3, 4), torch.randn(3, 4)
    mask = _mask(3, 4, "cpu")
    _close(co.compute_approx_kl(lp, base, "k3", action_mask=mask),
           openrlhf_compute_approx_kl(lp, base, "k3") * mask, 1e-6)
    with pytest.raises(ValueError, match="kl_estimator"):
        co.compute_approx_kl(lp, base, "k4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_entropy(backend, device, dtype):
    logits = (torch.randn(4, 3, 29) * 2).to(dtype).to(device).requires_grad_()
    got = co.compute_entropy(logits)
    assert got.dtype == dtype
    (x,) = _upcast(logits)
    want = openrlhf_compute_entropy(x)
    _close(got, want.to(dtype), OUT_TOL[dtype], "entropy")
    (got.double() ** 2).sum().backward()
    (want**2).sum().backward()
    _close(logits.grad, x.grad, GRAD_TOL[dtype] * 4, "grad")


# ---------------------------------------------------------------------------------------------------
# openrlhf.models.loss
# ---------------------------------------------------------------------------------------------------
def _policy_inputs(shape, dtype, device, spread=0.5):
    lp = -torch.rand(shape) * 3
    old = lp + torch.randn(shape) * spread
    adv = torch.randn(shape)
    return [t.to(dtype).to(device) for t in (lp, old, adv)]


GLOBAL = [{}, dict(dp_size=4, batch_num_tokens=57.0, global_batch_size=11.0)]


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("global_args", range(len(GLOBAL)))
def test_policy_loss(backend, device, token_level_loss, dual_clip, dtype, global_args):
    lp, old, adv = _policy_inputs((5, 21), dtype, device)
    lp.requires_grad_()
    mask = _mask(5, 21, device)
    kwargs = GLOBAL[global_args]
    ours = co.PolicyLoss(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level_loss)
    theirs = OpenRLHFPolicyLoss(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level_loss)
    got = ours(lp, old, adv, mask, **kwargs)
    lp64, old64, adv64 = _upcast(lp, old, adv)
    want = theirs(lp64, old64, adv64, mask.double().cpu(), **kwargs)
    assert got[3] is None and want[3] is None
    _close(got[0], want[0], TOL[dtype], "loss")
    for name, g, w in zip(("clip_ratio", "ppo_kl"), got[1:3], want[1:3]):
        assert g.dtype == torch.float32
        _close(g, w, max(METRIC_TOL, TOL[dtype]), name)
    got[0].backward()
    want[0].backward()
    _close(lp.grad, lp64.grad, GRAD_TOL[dtype], "grad")


def test_policy_loss_without_mask_and_empty_batch():
    lp, old, adv = _policy_inputs((3, 8), torch.float64, "cpu")
    got = co.PolicyLoss()(lp, old, adv)
    want = OpenRLHFPolicyLoss()(lp, old, adv)
    _close(got[0], want[0], 2e-8, "loss")
    for g, w in zip(got[1:3], want[1:3]):
        _close(g, w, METRIC_TOL, "metric")
    # Without a mask OpenRLHF's sequence mode fails (it sums the None mask); the shim counts every token.
    with pytest.raises(AttributeError):
        OpenRLHFPolicyLoss(token_level_loss=False)(lp, old, adv)
    ones = torch.ones(3, 8, dtype=torch.float64)
    _close(co.PolicyLoss(token_level_loss=False)(lp, old, adv)[0],
           OpenRLHFPolicyLoss(token_level_loss=False)(lp, old, adv, ones)[0], 2e-8, "loss")
    for token_level_loss in (True, False):
        # OpenRLHF's masked mean has no epsilon: an all-masked batch is NaN, and so is the shim's.
        empty = torch.zeros(3, 8, dtype=torch.float64)
        got = co.PolicyLoss(token_level_loss=token_level_loss)(lp, old, adv, empty)
        want = OpenRLHFPolicyLoss(token_level_loss=token_level_loss)(lp, old, adv, empty)
        assert all(bool(torch.isnan(t)) for t in got[:3] + want[:3])


def test_policy_loss_ppo_kl_uses_the_clamped_log_ratio():
    """The documented difference: for |lp − old| > 20 the ppo_kl metric averages the clamped log-ratio
    (the loss and its gradient are OpenRLHF's, which clamps too)."""
    lp = torch.tensor([[0.0, -1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-30.0, -1.5, -2.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    got = co.PolicyLoss()(lp, old, adv)
    lp64 = lp.detach().clone().requires_grad_()
    want = OpenRLHFPolicyLoss()(lp64, old, adv)
    _close(got[0], want[0], 1e-12, "loss")
    _close(got[1], want[1], METRIC_TOL, "clip_ratio")
    _close(got[2], torch.tensor((-20.0 - 0.5) / 3, dtype=torch.float64), METRIC_TOL, "ppo_kl (clamped)")
    _close(want[2], torch.tensor((-30.0 - 0.5) / 3, dtype=torch.float64), 1e-12, "OpenRLHF's ppo_kl")
    got[0].backward()
    want[0].backward()
    _close(lp.grad, lp64.grad, 1e-12, "grad")


def test_policy_loss_unsupported_modes():
    with pytest.raises(NotImplementedError, match="gspo"):
        co.PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(NotImplementedError, match="enable_vllm_is_correction"):
        co.PolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.5, 2.0])
    with pytest.raises(ValueError, match="dual_clip"):
        co.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="policy loss type"):
        co.PolicyLoss(policy_loss_type="ppo2")


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("global_args", range(len(GLOBAL)))
def test_value_loss(backend, device, clip_eps, token_level_loss, dtype, global_args):
    old = torch.randn(4, 19).to(dtype).to(device)
    values = (old.float() + torch.randn(4, 19) * 0.5).to(dtype).requires_grad_()
    returns = torch.randn(4, 19).to(dtype).to(device)
    mask = _mask(4, 19, device)
    kwargs = GLOBAL[global_args]
    got = co.ValueLoss(clip_eps, token_level_loss)(values, old, returns, mask, **kwargs)
    v64, o64, r64 = _upcast(values, old, returns)
    want = OpenRLHFValueLoss(clip_eps, token_level_loss)(v64, o64, r64, mask.double().cpu(), **kwargs)
    _close(got, want, TOL[dtype], "loss")
    got.backward()
    want.backward()
    _close(values.grad, v64.grad, GRAD_TOL[dtype], "grad")


@pytest.mark.parametrize("margin", [None, "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pairwise_loss(backend, device, margin, dtype):
    chosen = (torch.randn(17) * 2).to(dtype).to(device).requires_grad_()
    rejected = (torch.randn(17) * 2).to(dtype).to(device).requires_grad_()
    margin = torch.rand(17).to(device) if margin == "tensor" else None
    got = co.PairWiseLoss()(chosen, rejected, margin)
    c64, r64 = _upcast(chosen, rejected)
    want = OpenRLHFPairWiseLoss()(c64, r64, None if margin is None else margin.double().cpu())
    _close(got, want, 2e-5, "loss")
    got.backward()
    want.backward()
    _close(chosen.grad, c64.grad, GRAD_TOL[dtype], "d chosen")
    _close(rejected.grad, r64.grad, GRAD_TOL[dtype], "d rejected")


def test_logexp_loss_matches_and_stays_finite():
    chosen, rejected = torch.randn(11, requires_grad=True), torch.randn(11)
    got = co.LogExpLoss()(chosen, rejected, margin=torch.ones(11))  # margin ignored, as in OpenRLHF
    c64 = chosen.detach().double().requires_grad_()
    want = OpenRLHFLogExpLoss()(c64, rejected.double())
    _close(got, want, 2e-6, "loss")
    got.backward()
    want.backward()
    _close(chosen.grad, c64.grad, 2e-6, "grad")
    # Where OpenRLHF's literal log(1 + e^{r − c}) overflows, the shim's value is the finite limit r − c.
    far = co.LogExpLoss()(torch.tensor([0.0]), torch.tensor([100.0]))
    assert torch.isinf(OpenRLHFLogExpLoss()(torch.tensor([0.0]), torch.tensor([100.0])))
    _close(far, torch.tensor(100.0), 1e-6, "large gap")


# ---------------------------------------------------------------------------------------------------
# get_advantages_and_returns
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [1, 6, 40])
@pytest.mark.parametrize("with_mask", [True, False])
def test_get_advantages_and_returns(backend, device, seq, with_mask):
    values, rewards = torch.randn(5, seq), torch.randn(5, seq)
    mask = (torch.arange(seq) < torch.randint(0, seq + 1, (5, 1))).float() if with_mask else None
    got = co.get_advantages_and_returns(
        values.to(device), rewards.to(device), None if mask is None else mask.to(device), 0.99, 0.95
    )
    want = openrlhf_get_advantages_and_returns(
        values.double(), rewards.double(), None if mask is None else mask.double(), 0.99, 0.95
    )
    for name, g, w in zip(("advantages", "returns"), got, want):
        assert g.dtype == torch.float32 and not g.requires_grad
        _close(g, w, 1e-4, name)


def test_get_advantages_and_returns_packed_lists_and_default_backend():
    values = [torch.randn(n) for n in (3, 1, 8)]
    rewards = [torch.randn(n) for n in (3, 1, 8)]
    advantages, returns = co.get_advantages_and_returns(values, rewards, None, 1.0, 0.9)
    for v, r, a, ret in zip(values, rewards, advantages, returns):
        want_a, want_r = openrlhf_get_advantages_and_returns(
            v[None].double(), r[None].double(), None, 1.0, 0.9
        )
        _close(a, want_a[0], 1e-4)
        _close(ret, want_r[0], 1e-4)
    with pytest.raises(ValueError, match="action_mask"):
        co.get_advantages_and_returns(values, rewards, torch.ones(3), 1.0, 0.9)


def test_compile_fullgraph_losses():
    policy, value = co.PolicyLoss(dual_clip=3.0), co.ValueLoss(0.2, token_level_loss=False)

    def step(lp, old, adv, mask, values, old_values, returns):
        loss, clip_ratio, ppo_kl, _ = policy(lp, old, adv, mask)
        return loss + value(values, old_values, returns, mask), clip_ratio, ppo_kl

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for shape in ((4, 9), (6, 15)):
            lp, old, adv = _policy_inputs(shape, torch.float32, "cpu")
            args = (lp.requires_grad_(), old, adv, _mask(*shape, "cpu"),
                    torch.randn(shape, requires_grad=True), torch.randn(shape), torch.randn(shape))
            eager = step(*args)
            grads = torch.autograd.grad(eager[0], (args[0], args[4]))
            traced = compiled(*args)
            traced_grads = torch.autograd.grad(traced[0], (args[0], args[4]))
            for g, w in zip(traced + traced_grads, eager + grads):
                _close(g, w, 1e-5)
