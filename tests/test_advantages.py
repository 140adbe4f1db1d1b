"""group_advantages and broadcast_to_tokens against their float64 oracles; the advantage pipeline of a
PPO step (token rewards → GAE → whitening) compiled and without host syncs; the old import paths."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import HAS_CUDA
from test_gae import gae_inputs

import rlhf_kernels.ops.advantages as adv
from rlhf_kernels import _dispatch
from rlhf_kernels.reference import advantages as ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# group advantages and the broadcast helper
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["std", "none"])
@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages_match_oracle(norm, leave_one_out, dtype):
    scores = (torch.randn(15) * 3).to(dtype)
    for group_size in (3, 5, 15):
        got = adv.group_advantages(scores, group_size, norm=norm, leave_one_out=leave_one_out)
        expected = ref.group_advantages(scores, group_size, norm=norm, leave_one_out=leave_one_out)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_group_advantages_special_cases():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    grpo = adv.group_advantages(scores, 3)
    assert torch.equal(grpo[:3], torch.zeros(3))  # identical scores: σ = 0, A = 0/eps = 0
    torch.testing.assert_close(grpo[3:], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-6))
    rloo = adv.group_advantages(scores, 3, norm="none", leave_one_out=True)
    torch.testing.assert_close(rloo[3:], torch.tensor([-1.5, 0.0, 1.5]))  # s_i − mean of the others
    assert torch.equal(adv.group_advantages(scores, 1, norm="none"), torch.zeros(6))
    x = torch.randn(6, requires_grad=True)
    adv.group_advantages(x, 3).sum().backward()
    assert x.grad is not None


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size must divide the number of scores"):
        adv.group_advantages(torch.randn(10), 3)
    with pytest.raises(ValueError, match="group_size must be >= 2 with norm='std'"):
        adv.group_advantages(torch.randn(4), 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        adv.group_advantages(torch.randn(4), 1, norm="none", leave_one_out=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        adv.group_advantages(torch.randn(4), 2, norm="mad")
    with pytest.raises(ValueError, match=r"scores must be 1-D \[B\]"):
        adv.group_advantages(torch.randn(4, 1), 2)
    with pytest.raises(TypeError, match="group_size must be a Python int"):
        adv.group_advantages(torch.randn(4), 2.0)


def test_broadcast_to_tokens():
    values = torch.tensor([1.5, float("nan"), -2.0])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    out = adv.broadcast_to_tokens(values, mask)
    torch.testing.assert_close(out.double(), ref.broadcast_to_tokens(values.nan_to_num(0.0), mask))
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    with pytest.raises(ValueError, match=r"advantages must have shape mask.shape\[:1\]"):
        adv.broadcast_to_tokens(torch.randn(2), mask)


def test_group_advantages_of_no_scores_is_empty_without_warning():
    """An empty batch (issue 19): a defined empty result, and no degrees-of-freedom warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for norm in ("std", "none"):
            for leave_one_out in (False, True):
                out = adv.group_advantages(torch.randn(0), 4, norm=norm, leave_one_out=leave_one_out)
                assert out.shape == (0,) and out.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# The advantage pipeline of a PPO step, compiled
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["torch", "auto"])  # auto: GAE through the C++ kernel
def test_compile_fullgraph_dynamic_cpu(backend_name):
    def step(rewards, values, mask, scores, lp, ref_lp):
        token_rewards, kl_mean = adv.token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.05,
                                                         estimator="k3")
        a, r = adv.compute_gae(token_rewards + rewards, values, mask, 0.99, 0.95)
        return adv.masked_whiten(a, mask), r, kl_mean

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend(backend_name):
        for B, T in ((3, 17), (5, 29)):
            rewards, values, mask = gae_inputs(B, T, seed=11)
            args = (rewards, values, mask, torch.randn(B), torch.randn(B, T), torch.randn(B, T))
            with _dispatch.use_backend("torch"):
                expected = step(*args)
            for got, want in zip(compiled(*args), expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_compile_fullgraph_dynamic_triton():
    def step(rewards, values, mask, scores, lp, ref_lp):
        token_rewards, kl_mean = adv.token_level_rewards(scores, lp, ref_lp, mask, kl_coef=0.05)
        a, r = adv.compute_gae(token_rewards + rewards, values, mask, 0.99, 0.95)
        return adv.masked_whiten(a, mask, dim=-1), r, kl_mean

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    rewards, values, mask = gae_inputs(16, 300, device="cuda", seed=12)
    args = (rewards, values, mask, torch.randn(16, device="cuda"), torch.randn(16, 300, device="cuda"),
            torch.randn(16, 300, device="cuda"))
    with _dispatch.use_backend("triton"):
        expected = step(*args)
        for got, want in zip(compiled(*args), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="host-sync detection needs CUDA")
def test_no_host_sync_on_cuda():
    rewards, values, mask = gae_inputs(8, 500, device="cuda", seed=13)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in ("triton", "cuda", "torch"):
            with _dispatch.use_backend(backend):
                adv.compute_gae(rewards, values, mask, 0.99, 0.95)
        adv.masked_whiten(values, mask)
        adv.masked_whiten(values, mask, dim=-1)
        adv.token_level_rewards(values[:, 0], rewards, values, mask, kl_coef=0.1, score_clip=1.0)
        adv.group_advantages(values[:, 0], 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------
# Old import paths (``rlhf_kernels.compat`` and the compat tests use them)
# --------------------------------------------------------------------------------------------------
def test_old_import_paths_reexport_the_families():
    from bench.baselines import advantages as old_peers
    from bench.baselines import gae, token_rewards, whiten
    from rlhf_kernels.ops.gae import compute_gae
    from rlhf_kernels.ops.token_rewards import token_level_rewards
    from rlhf_kernels.ops.whiten import masked_whiten
    from rlhf_kernels.reference import gae as ref_gae
    from rlhf_kernels.reference import token_rewards as ref_token_rewards
    from rlhf_kernels.reference import whiten as ref_whiten

    assert (adv.compute_gae, adv.masked_whiten, adv.token_level_rewards) == (
        compute_gae, masked_whiten, token_level_rewards)
    assert (ref.compute_gae, ref.masked_whiten, ref.token_level_rewards) == (
        ref_gae.compute_gae, ref_whiten.masked_whiten, ref_token_rewards.token_level_rewards)
    assert not hasattr(ref, "kl_penalty")  # the KL oracle lives in reference/kl.py only
    assert old_peers.verl_gae is gae.verl_gae
    assert old_peers.verl_compute_gae_advantage_return is gae.verl_compute_gae_advantage_return
    assert old_peers.openrlhf_get_advantages_and_returns is gae.openrlhf_get_advantages_and_returns
    assert old_peers.openrlhf_normalize is whiten.openrlhf_normalize
    assert old_peers.verl_token_level_rewards is token_rewards.verl_token_level_rewards
