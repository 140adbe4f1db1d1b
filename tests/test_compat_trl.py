"""rlhf_kernels.compat.trl without TRL installed: what the peer-parity suite (tests/peers/test_trl.py and
test_trl_trainers.py, against the real TRL 1.16.0) cannot show: patch()'s version gate, index errors,
the reward-model loss (against bench/baselines) and tracing without host syncs."""

from __future__ import annotations

import pytest
import torch

from bench.baselines.losses import trl_reward_loss
from rlhf_kernels import _dispatch
from rlhf_kernels.compat import _patching
from rlhf_kernels.compat import trl as ct


def _close(actual, expected, tol, what=""):
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        rtol=tol,
        atol=tol,
        msg=lambda m: f"{what}: {m}",
    )


def test_patch_refuses_other_versions_before_touching_anything(monkeypatch):
    planned = []
    monkeypatch.setattr(_patching, "installed_version", lambda distribution: "1.15.2")
    monkeypatch.setattr(ct._PATCHER, "_plan", lambda: planned.append(True) or [])
    with pytest.raises(_patching.UnsupportedVersionError, match=r"TRL 1\.15\.2 is installed.*1\.16\.0"):
        ct.patch()
    assert not planned and not ct._PATCHER.active


def test_selective_log_softmax_bad_index():
    logits = torch.randn(2, 3, 7)
    with pytest.raises(ValueError, match="labels must lie in"):
        ct.selective_log_softmax(logits, torch.full((2, 3), 7))
    with pytest.raises(ValueError, match="labels must lie in"):  # TRL's gather raises a RuntimeError
        ct.selective_log_softmax(logits, torch.full((2, 3, 2), 7))
    with pytest.raises(ValueError, match="chunk_size"):
        ct.entropy_from_logits(logits, chunk_size=0)


@pytest.mark.parametrize("margin", [None, "tensor", 0.5])
@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reward_trainer_loss(backend, device, margin, center, dtype):
    chosen = (torch.randn(13) * 2).to(dtype).to(device).requires_grad_()
    rejected = (torch.randn(13) * 2).to(dtype).to(device).requires_grad_()
    margin_value = torch.rand(13).to(device) if margin == "tensor" else margin
    got = ct.reward_trainer_loss(chosen, rejected, margin_value, center)
    c64 = chosen.detach().double().cpu().requires_grad_()
    r64 = rejected.detach().double().cpu().requires_grad_()
    want_margin = margin_value.double().cpu() if isinstance(margin_value, torch.Tensor) else margin_value
    want = trl_reward_loss(c64, r64, want_margin, center)
    tol = 2e-5 if dtype != torch.float64 else 1e-12
    _close(got, want, tol, "loss")
    got.backward()
    want.backward()
    grad_tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    _close(chosen.grad, c64.grad, grad_tol, "d chosen")
    _close(rejected.grad, r64.grad, grad_tol, "d rejected")


def test_reward_trainer_loss_reward_head_shape_and_metrics():
    """[N, 1] reward-head outputs are squeezed, as TRL's trainer does."""
    chosen, rejected, margin = torch.randn(9, 1), torch.randn(9, 1), torch.rand(9)
    loss, metrics = ct.reward_trainer_loss(chosen, rejected, margin, 0.1, return_metrics=True)
    _close(loss, trl_reward_loss(chosen.squeeze(-1), rejected.squeeze(-1), margin, 0.1), 2e-6)
    _close(metrics["accuracy"], (chosen > rejected).float().mean(), 0.0)
    _close(metrics["margin"], (chosen - rejected).mean(), 1e-6)
    with pytest.raises(ValueError, match="margin"):
        ct.reward_trainer_loss(chosen, rejected, torch.rand(4))


def test_compile_fullgraph_shims():
    def step(logits, index, top_k, row_mask, chosen, rejected):
        logps = ct.selective_log_softmax(logits, index, 0.7, row_mask)
        topk = ct.selective_log_softmax(logits, top_k)
        logps2, entropy = ct.selective_log_softmax_and_entropy(logits, index, True, 1.0, row_mask)
        return (
            logps.sum()
            + topk.sum()
            + logps2.sum()
            + entropy.sum()
            + ct.reward_trainer_loss(chosen, rejected, None, 0.01)
        )

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for rows in (3, 6):
            logits = torch.randn(2, rows, 19, requires_grad=True)
            args = (
                logits,
                torch.randint(0, 19, (2, rows)),
                torch.randint(0, 19, (2, rows, 3)),
                torch.rand(2, rows) < 0.7,
                torch.randn(rows, requires_grad=True),
                torch.randn(rows),
            )
            eager = step(*args)
            eager_grads = torch.autograd.grad(eager, (args[0], args[4]))
            traced = compiled(*args)
            traced_grads = torch.autograd.grad(traced, (args[0], args[4]))
            for got, want in zip((traced,) + traced_grads, (eager,) + eager_grads):
                _close(got, want, 1e-5)
