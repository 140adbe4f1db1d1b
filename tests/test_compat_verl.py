"""rlhf_kernels.compat.verl without verl installed: what the peer-parity suite (tests/peers/test_verl.py,
against the real verl 0.9.1) cannot show: install()'s version gate, the in-place backward's buffers,
verl's CUDA-only fused linear cross-entropy (against bench/baselines) and tracing without host syncs."""

from __future__ import annotations

import pytest
import torch

from bench.baselines.linear_logprobs import verl_linear_cross_entropy
from bench.baselines.logprobs import verl_logprobs_from_logits
from rlhf_kernels import _dispatch
from rlhf_kernels.compat import _patching
from rlhf_kernels.compat import verl as cv


def _close(actual, expected, tol, what=""):
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        rtol=tol,
        atol=tol,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


@pytest.mark.parametrize(
    ("installed", "message"), [(None, "verl is not installed"), ("0.9.0", "verl 0.9.0 is installed")]
)
def test_install_refuses_other_versions_before_touching_anything(monkeypatch, installed, message):
    planned = []
    monkeypatch.setattr(_patching, "installed_version", lambda distribution: installed)
    monkeypatch.setattr(cv._PATCHER, "_plan", lambda: planned.append(True) or [])
    with pytest.raises(_patching.UnsupportedVersionError, match=message) as error:
        cv.install()
    assert "0.9.1" in str(error.value) and not planned and not cv._PATCHER.active


def test_logprobs_inplace_backward_writes_over_logits():
    """verl's default: the gradient goes into the logits buffer (no second [N, V] allocation)."""
    leaf = torch.randn(4, 9, 23, requires_grad=True)
    labels = torch.randint(0, 23, (4, 9))
    logits = leaf * 1.0  # a non-leaf, as a model's output is
    cv.logprobs_from_logits(logits, labels).sum().backward()
    want = leaf.detach().clone().requires_grad_()
    verl_logprobs_from_logits(want, labels).sum().backward()
    _close(leaf.grad, want.grad, 2e-5, "grad")
    _close(logits.detach(), want.grad, 2e-5, "logits buffer holds the gradient")


def test_logprobs_inplace_backward_non_contiguous_keeps_logits():
    base = torch.randn(4, 10, 23)
    leaf = base.clone().requires_grad_()
    logits = (leaf * 1.0)[:, :-1]  # a slice: flash-attn's reshape would copy it
    labels = torch.randint(0, 23, (4, 9))
    cv.logprobs_from_logits(logits, labels).sum().backward()
    _close(logits.detach(), base[:, :-1], 0.0, "a non-contiguous view is not overwritten")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy(backend, device, reduction):
    hidden = (torch.randn(2, 5, 16) * 0.5).to(device).requires_grad_()
    weight = (torch.randn(37, 16) * 0.5).to(device).requires_grad_()
    labels = torch.randint(0, 37, (2, 5)).to(device)
    got_lp, got_h = cv.linear_cross_entropy(hidden, weight, labels, 0.7, reduction)
    h64 = hidden.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    want_lp, want_h = verl_linear_cross_entropy(h64, w64, labels.cpu(), 0.7, reduction)
    assert got_h.shape == (10,) and got_lp.shape == want_lp.shape
    _close(got_lp, want_lp, 1e-4, "logprobs")
    _close(got_h, want_h, 1e-4, "entropy")
    weights = torch.randn(10, dtype=torch.float64)
    (got_lp.double().sum() + (got_h.double() * weights.to(device)).sum()).backward()
    (want_lp.sum() + (want_h * weights).sum()).backward()
    _close(hidden.grad, h64.grad, 1e-4, "d hidden")
    _close(weight.grad, w64.grad, 1e-4, "d weight")
    with pytest.raises(ValueError, match="reduction"):
        cv.linear_cross_entropy(hidden, weight, labels, reduction="max")


def test_agg_loss_errors():
    loss, mask = torch.randn(3, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        cv.agg_loss(loss, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        cv.agg_loss(loss, mask, "seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        cv.agg_loss(loss, mask, "sum")


def test_compile_fullgraph_policy_value_and_advantages():
    """No host sync: a policy + value step through the shims traces into one graph (PyTorch path)."""

    def step(old, lp, adv, mask, vpreds, returns, values):
        pg = cv.compute_policy_loss(old, lp, adv, mask, cliprange=0.2, loss_agg_mode="seq-mean-token-mean")
        vf = cv.compute_value_loss(vpreds, returns, values, mask, 0.5, "token-mean", 2, mask.sum() * 2, 7)
        return pg[0] + vf[0], pg[1], pg[2], vf[1]

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for shape in ((3, 11), (5, 20)):
            old = -torch.rand(shape) * 3
            lp = (old + 0.3 * torch.randn(shape)).requires_grad_()
            mask = torch.rand(shape) < 0.7
            args = (
                old,
                lp,
                torch.randn(shape),
                mask,
                torch.randn(shape, requires_grad=True),
                torch.randn(shape),
                torch.randn(shape),
            )
            eager = step(*args)
            grads = torch.autograd.grad(eager[0], (args[1], args[4]))
            traced = compiled(*args)
            traced_grads = torch.autograd.grad(traced[0], (args[1], args[4]))
            for got, want in zip(traced + traced_grads, eager + grads):
                _close(got, want, 1e-5)
