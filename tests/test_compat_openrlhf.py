"""rlhf_kernels.compat.openrlhf without OpenRLHF installed: what the peer-parity suite
(tests/peers/test_openrlhf.py, against the real OpenRLHF 0.11.2) cannot show: patch()'s version gate,
the packed-list extension, the in-place temperature division, and tracing without host syncs."""

from __future__ import annotations

import pytest
import torch

from bench.baselines.advantages import openrlhf_get_advantages_and_returns
from rlhf_kernels import _dispatch
from rlhf_kernels.compat import _patching
from rlhf_kernels.compat import openrlhf as co


def _close(actual, expected, tol, what=""):
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        rtol=tol,
        atol=tol,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def test_patch_refuses_other_versions_before_touching_anything(monkeypatch):
    planned = []
    monkeypatch.setattr(_patching, "installed_version", lambda distribution: "0.10.0")
    monkeypatch.setattr(co._PATCHER, "_plan", lambda: planned.append(True) or [])
    with pytest.raises(_patching.UnsupportedVersionError, match=r"OpenRLHF 0\.10\.0 is installed.*0\.11\.2"):
        co.patch()
    assert not planned and not co._PATCHER.active


def test_log_probs_then_entropy_like_the_actor():
    """The actor divides the logits by the temperature, then reads them for the entropy."""
    logits = torch.randn(2, 5, 17)
    labels = torch.randint(0, 17, (2, 5))
    divided = logits.clone()
    co.log_probs_from_logits(divided, labels, temperature=0.5)
    _close(divided, logits / 0.5, 0.0, "logits divided in place")
    _close(co.compute_entropy(divided), torch.distributions.Categorical(logits=logits / 0.5).entropy(), 1e-5)


def test_get_advantages_and_returns_packed_lists():
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
    policy = co.PolicyLoss(dual_clip=3.0, is_correction_level="token", is_correction_mode="clip")
    value = co.ValueLoss(0.2, token_level_loss=False)

    def step(lp, old, adv, mask, rollout, values, old_values, returns):
        loss, clip_ratio, ppo_kl, vllm_kl, filtered = policy(lp, old, adv, mask, rollout)
        kl = co.compute_approx_kl(lp, old, rollout, "k3", True)
        return (
            loss + value(values, old_values, returns, mask) + kl.mean(),
            clip_ratio,
            ppo_kl,
            vllm_kl,
            filtered,
        )

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for shape in ((4, 9), (6, 15)):
            old = -torch.rand(shape) * 3
            lp = (old + 0.3 * torch.randn(shape)).requires_grad_()
            args = (
                lp,
                old,
                torch.randn(shape),
                torch.rand(shape) < 0.7,
                old + 0.1 * torch.randn(shape),
                torch.randn(shape, requires_grad=True),
                torch.randn(shape),
                torch.randn(shape),
            )
            eager = step(*args)
            grads = torch.autograd.grad(eager[0], (args[0], args[5]))
            traced = compiled(*args)
            traced_grads = torch.autograd.grad(traced[0], (args[0], args[5]))
            for got, want in zip(traced + traced_grads, eager + grads):
                _close(got, want, 1e-5)
