"""group_advantages and broadcast_to_tokens against their float64 oracles; the advantage pipeline of a
PPO step (token rewards → GAE → whitening) compiled and without host syncs; the old import paths."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import HAS_CUDA, assert_close, run_gloo_workers
from test_gae import gae_inputs

import rlhf_kernels.ops.advantages as adv
from rlhf_kernels import _dispatch, _ext
from rlhf_kernels.ops.cpu import advantages as cpu_adv
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


# --------------------------------------------------------------------------------------------------
# Advantage estimators over arbitrary groups, against the float64 oracles
# --------------------------------------------------------------------------------------------------
WHITENED = ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "gdpo")  # whitening runs in fp32


@pytest.fixture(params=["cpp", "torch"])
def estimator_backend(request):
    """The estimators' two CPU paths, forced: the C++ kernels of csrc/advantages.cpp and plain PyTorch.
    The extension is built here on first use: a build failure fails the cpp cases, it does not skip them."""
    if request.param == "cpp":
        reason = _ext.unavailable_reason(adv.FAMILY, "cpp")
        assert reason is None, reason
    with _dispatch.use_backend(request.param):
        yield request.param


def _estimator_batch(dtype=torch.float32, mask_dtype=torch.float32, seed=0, sizes=(3, 1, 5, 2, 4, 1)):
    """Groups of several sizes (singletons too) under scattered, non-consecutive ids, a mask with right
    padding, a hole and an empty row, and the per-token inputs of the optimal-token-baseline family."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([1000 * k - 7 for k, size in enumerate(sizes) for _ in range(size)])
    index = ids[torch.randperm(ids.shape[0], generator=g)]
    B, T = index.shape[0], 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    mask[1, 2:4] = False
    mask[2] = False
    extra = {
        "old_log_probs": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "sum_pi_squared": torch.rand(B, T, generator=g, dtype=torch.float64) * 0.5,
        "rollout_is_weights": torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        "reward_baselines": torch.randn(B, generator=g, dtype=torch.float64),
        "reward_scores": torch.randn(B, 3, generator=g, dtype=torch.float64),
    }
    extra = {key: value.to(dtype) for key, value in extra.items()}
    return rewards.to(dtype), mask.to(mask_dtype), index, extra


def _run_estimator(name, impl, rewards, mask, index, extra):
    """(advantages, returns or None) of ``impl`` (ours: the table; the oracle: reference functions)."""
    ours = impl is adv.ADVANTAGE_ESTIMATORS
    fn = impl[name] if ours else getattr(ref, f"{name}_advantages")
    result = _call_estimator(name, fn, rewards, mask, index, extra)
    if name in ("remax", "reinforce_plus_plus", "optimal_token_baseline", "tir_optimal_token_baseline"):
        return result
    return (result[0] if ours else result), None


def _call_estimator(name, fn, rewards, mask, index, extra):
    if name == "remax":
        return fn(rewards, extra["reward_baselines"], mask)
    if name == "reinforce_plus_plus":
        return fn(rewards, mask, 0.9)
    if name == "flash_reinforce":
        return fn(rewards, mask)
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        return fn(rewards, mask, index, extra["old_log_probs"], extra["sum_pi_squared"],
                  extra["rollout_is_weights"], True, 1e-8)
    if name == "gdpo":
        return fn(rewards, mask, index, 1e-6, True, extra["reward_scores"], [0.5, 1.0, -2.0])
    if name == "gpg":
        return fn(rewards, mask, index, 0.7)
    return fn(rewards, mask, index)


ORACLE_NAMES = sorted(set(adv.ADVANTAGE_ESTIMATORS) - {"gae", "grpo_vectorized", "rloo_vectorized"})


@pytest.mark.parametrize("name", ORACLE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_estimators_match_oracle(name, dtype, estimator_backend):
    mask_dtype = torch.bool if dtype == torch.float64 else torch.float32
    rewards, mask, index, extra = _estimator_batch(dtype, mask_dtype)
    got, got_returns = _run_estimator(name, adv.ADVANTAGE_ESTIMATORS, rewards, mask, index, extra)
    want, want_returns = _run_estimator(name, ref, rewards, mask, index, extra)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == expected_dtype and got.shape == rewards.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    if name in WHITENED or name == "reinforce_plus_plus":
        tol = 2e-5
    assert_close(got, want, tol, name)
    if got_returns is not None:  # the reinforce_plus_plus scan is compute_gae's: fp32 for every input
        fp32_scan = dtype != torch.float64 or name == "reinforce_plus_plus"
        assert_close(got_returns, want_returns, 2e-5 if fp32_scan else 1e-12, f"{name} returns")
    assert bool((got[mask == 0] == 0).all())


def test_rloo_variants_and_grpo_alias(estimator_backend):
    rewards, mask, index, _ = _estimator_batch()
    table = adv.ADVANTAGE_ESTIMATORS
    assert_close(table["rloo"](rewards, mask, index)[0], ref.rloo_advantages(rewards, mask, index), 2e-5,
                 "rloo")
    assert_close(table["rloo_vectorized"](rewards, mask, index)[0],
                 ref.rloo_advantages(rewards, mask, index, singleton="zero"), 2e-5, "rloo_vectorized")
    assert table["grpo_vectorized"] is table["grpo"]


def test_estimators_follow_the_samples_not_their_order(estimator_backend):
    """Permuting the batch (and relabelling the groups) permutes the advantages."""
    rewards, mask, index, extra = _estimator_batch(seed=3)
    perm = torch.randperm(index.shape[0])
    moved = {key: value[perm] for key, value in extra.items()}
    for name in ORACLE_NAMES:
        base = _run_estimator(name, adv.ADVANTAGE_ESTIMATORS, rewards, mask, index, extra)[0]
        shuffled = _run_estimator(name, adv.ADVANTAGE_ESTIMATORS, rewards[perm], mask[perm],
                                  index[perm] * 3 + 11, moved)[0]
        torch.testing.assert_close(shuffled, base[perm], rtol=1e-5, atol=1e-5, msg=name)


def test_group_advantages_fast_path_agrees_with_grpo(estimator_backend):
    scores = torch.randn(24)
    mask = torch.ones(24, 5)
    rewards = torch.zeros(24, 5)
    rewards[:, -1] = scores
    index = torch.arange(24) // 8
    for norm in (True, False):
        grpo, _ = adv.compute_advantages("grpo", rewards, mask, index, 1e-6, norm)
        fast = adv.group_advantages(scores, 8, norm="std" if norm else "none")
        torch.testing.assert_close(grpo[:, 0], fast, rtol=1e-5, atol=1e-6)


def test_estimator_singletons_and_degenerate_batches(estimator_backend):
    rewards = torch.tensor([[1.0, 2.0], [4.0, 0.0], [5.0, 1.0]])
    mask = torch.ones(3, 2)
    index = torch.tensor([0, 1, 1])
    passk, _ = adv.compute_advantages("grpo_passk", rewards, mask, index, 1e-6, False)
    assert passk[:, 0].tolist() == [0.0, 0.0, 2.0]  # alone: 0 (verl raises); best of (4, 6): 6 − 4
    grpo, _ = adv.compute_advantages("grpo", rewards, mask, index)
    torch.testing.assert_close(grpo[0], torch.full((2,), 3.0 / (1 + 1e-6)))  # alone: μ = 0, σ = 1
    # all-masked batch: every estimator defined, zero advantages, no warning, no error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for B in (0, 3):
            r, _, _, extra = _estimator_batch()
            r, extra = r[:B], {k: v[:B] for k, v in extra.items()}
            m = torch.zeros(B, 9)
            idx = torch.arange(B) // 2
            for name in ORACLE_NAMES:
                got = _run_estimator(name, adv.ADVANTAGE_ESTIMATORS, r, m, idx, extra)[0]
                assert got.shape == (B, 9) and bool((got == 0).all()), name


def test_estimator_errors():
    rewards, mask, index = torch.randn(4, 3), torch.ones(4, 3), torch.arange(4)
    with pytest.raises(ValueError, match=r"estimator must be one of \(.*'grpo'.*\); got 'ppo'"):
        adv.compute_advantages("ppo", rewards, mask, index)
    with pytest.raises(ValueError, match="estimator must be one of"):
        adv.ADVANTAGE_ESTIMATORS["GRPO"]
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        adv.compute_advantages("grpo", rewards, mask, index.float())
    with pytest.raises(ValueError, match=r"index must have shape token_level_rewards.shape\[:1\]"):
        adv.compute_advantages("grpo", rewards, mask, index[:3])
    with pytest.raises(ValueError, match=r"response_mask must have shape"):
        adv.compute_advantages("rloo", rewards, mask[:, :2], index)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        adv.compute_advantages("grpo", rewards, mask, index, -1.0)
    with pytest.raises(ValueError, match="reward_weights must have shape"):
        adv.compute_advantages("gdpo", rewards, mask, index, reward_scores=torch.randn(4, 2),
                               reward_weights=[1.0])
    with pytest.raises(TypeError, match="estimator must be a str"):
        adv.compute_advantages(3, rewards, mask, index)


def test_estimators_do_not_modify_inputs(estimator_backend):
    rewards, mask, index, extra = _estimator_batch()
    copies = [t.clone() for t in (rewards, mask, index, *extra.values())]
    for name in ORACLE_NAMES:
        _run_estimator(name, adv.ADVANTAGE_ESTIMATORS, rewards, mask, index, extra)
    for before, after in zip(copies, (rewards, mask, index, *extra.values())):
        assert torch.equal(before, after)


@pytest.mark.skipif(not HAS_CUDA, reason="host-sync detection needs CUDA")
def test_estimators_no_host_sync_on_cuda():
    rewards, mask, index, extra = _estimator_batch()
    rewards, mask, index = rewards.cuda(), mask.cuda(), index.cuda()
    extra = {key: value.cuda() for key, value in extra.items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in ORACLE_NAMES:
            _run_estimator(name, adv.ADVANTAGE_ESTIMATORS, rewards, mask, index, extra)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------
# The C++ kernels (csrc/advantages.cpp) against the PyTorch path: odd shapes, dtypes, strides, NaN
# --------------------------------------------------------------------------------------------------
TOKEN_INPUTS = ("old_log_probs", "sum_pi_squared", "rollout_is_weights")


def _odd_batch(B, T, seed, dtype=torch.float32, mask_kind="float"):
    """An estimator batch of any shape: groups of 1-4 members under scattered ids, a right-padded mask
    with a hole (and an empty row when B > 2), ``mask_kind`` one of bool / float / uint8 / int32 / float64
    / fractional (weights 0, 0.5, 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    index = (torch.randint(0, max(1, B // 2), (B,), generator=g) * 37 - 5)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    valid = torch.arange(T) < lengths[:, None]
    if B > 2 and T > 3:
        valid[1, 1:3] = False
        valid[2] = False
    if mask_kind == "fractional":
        weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[torch.randint(0, 3, (B, T), generator=g)]
        mask = torch.where(valid, weights, 0.0).float()
    else:
        dtypes = {"bool": torch.bool, "float": torch.float32, "uint8": torch.uint8, "int32": torch.int32,
                  "float64": torch.float64}
        mask = valid.to(dtypes[mask_kind])
    extra = {
        "old_log_probs": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "sum_pi_squared": torch.rand(B, T, generator=g, dtype=torch.float64) * 0.5,
        "rollout_is_weights": torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        "reward_baselines": torch.randn(B, generator=g, dtype=torch.float64),
        "reward_scores": torch.randn(B, 3, generator=g, dtype=torch.float64),
    }
    return rewards.to(dtype), mask, index, {key: value.to(dtype) for key, value in extra.items()}


def _both_paths(name, rewards, mask, index, extra):
    """(cpp, torch): each a tuple (advantages, returns or None)."""
    results = []
    for backend in ("cpp", "torch"):
        with _dispatch.use_backend(backend):
            results.append(_run_estimator(name, adv.ADVANTAGE_ESTIMATORS, rewards, mask, index, extra))
    return results


def _assert_same_path(got, want, tol, what):
    """Equal dtype and shape, non-finite values in the same places with the same values (NaN in, NaN
    out exactly as the PyTorch path), the finite ones within ``tol``."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    finite = want.isfinite()
    assert torch.equal(got.isfinite(), finite), f"{what}: non-finite values at other positions"
    assert torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num()), f"{what}: other non-finite"
    assert_close(torch.where(finite, got, 0), torch.where(finite, want, 0), tol, what)


def _compare_paths(name, rewards, mask, index, extra, what):
    (got, got_returns), (want, want_returns) = _both_paths(name, rewards, mask, index, extra)
    fp64 = got.dtype == torch.float64 and name not in WHITENED and name != "reinforce_plus_plus"
    _assert_same_path(got, want, 1e-12 if fp64 else 2e-5, f"{name} {what}")
    if want_returns is not None:
        _assert_same_path(got_returns, want_returns, 1e-12 if fp64 else 2e-5, f"{name} returns {what}")


VARIANTS = {
    "fp32_float_mask": dict(),
    "bf16_bool_mask": dict(dtype=torch.bfloat16, mask_kind="bool"),
    "fp16_int32_mask": dict(dtype=torch.float16, mask_kind="int32"),
    "fp64_uint8_mask": dict(dtype=torch.float64, mask_kind="uint8"),
    "fp32_float64_mask": dict(mask_kind="float64"),
    "fractional_mask": dict(mask_kind="fractional"),
    "fp64_fractional_mask": dict(dtype=torch.float64, mask_kind="fractional"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ORACLE_NAMES)
def test_cpp_kernels_match_torch_path(name, variant):
    """Odd shapes (one sample, one token, 17 tokens), every input dtype and mask kind."""
    for seed, (B, T) in enumerate(((1, 1), (1, 17), (6, 1), (13, 17), (9, 40))):
        _compare_paths(name, *_odd_batch(B, T, seed, **VARIANTS[variant]), f"{variant} B={B} T={T}")


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
@pytest.mark.parametrize("name", ORACLE_NAMES)
def test_cpp_kernels_strided_and_nan_inputs(name, mask_kind):
    """Transposed and sliced views (any strides), and NaN rewards and log-probs at a valid and at a masked
    position: the same NaN (NaN·0 = NaN for a numeric mask, ignored under a bool one) as the PyTorch path."""
    rewards, mask, index, extra = _odd_batch(11, 19, 7, mask_kind=mask_kind)
    views = (lambda x: x.t().contiguous().t(), lambda x: torch.repeat_interleave(x, 2, dim=-1)[:, ::2])
    for view in views:
        moved = {key: view(value) if key in TOKEN_INPUTS else value for key, value in extra.items()}
        assert not view(rewards).is_contiguous()
        _compare_paths(name, view(rewards), view(mask), index, moved, "strided")
    valid = mask != 0
    masked_at = (~valid).nonzero()[0].tolist()
    valid_at = valid.nonzero()[-1].tolist()
    for where in (masked_at, valid_at):
        poisoned, log_probs = rewards.clone(), extra["old_log_probs"].clone()
        poisoned[where[0], where[1]] = float("nan")
        log_probs[where[0], where[1]] = float("nan")
        _compare_paths(name, poisoned, mask, index, {**extra, "old_log_probs": log_probs}, f"NaN at {where}")


def test_cpp_kernels_parallel_rows():
    """Enough rows for several parallel work items, the last with a partial block of interleaved rows;
    groups larger than a block of interleaved members (11 > 8)."""
    rewards, mask, index, extra = _odd_batch(45, 4096, 3)
    for name in ORACLE_NAMES:
        _compare_paths(name, rewards, mask, index, extra, "45 x 4096")
    for name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        _compare_paths(name, rewards[:, :300], mask[:, :300], torch.arange(45) // 11,
                       {key: value[:, :300] if key in TOKEN_INPUTS else value
                        for key, value in extra.items()},
                       "groups of 11")


def test_cpp_optimal_token_baselines_read_strided_rows_in_steps():
    """The optimal-token baselines read a member's inputs 64 positions at a time (csrc/advantages.cpp
    kStageChunk): strided views (column stride 2, and transposed storage) over T = 150, three steps with a
    partial last one, against the PyTorch path."""
    rewards, mask, index, extra = _odd_batch(11, 150, 9)
    views = (lambda x: x.t().contiguous().t(), lambda x: torch.repeat_interleave(x, 2, dim=-1)[:, ::2])
    for view in views:
        moved = {key: view(value) if key in TOKEN_INPUTS else value for key, value in extra.items()}
        for name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
            _compare_paths(name, view(rewards), view(mask), index, moved, "strided, T = 150")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_scans_over_rows_longer_than_one_buffer_fill(dtype):
    """remax and reinforce_plus_plus convert whole rows of up to 8192 positions per buffer fill
    (csrc/advantages.cpp kScanChunk): rows of 8192 + 300 take two fills, the sums carried across them."""
    rewards, mask, index, extra = _odd_batch(9, 8192 + 300, 5, dtype=dtype)
    for name in ("remax", "reinforce_plus_plus"):
        _compare_paths(name, rewards, mask, index, extra, "T = 8492")


def test_auto_backend_on_cpu_is_cpp():
    assert _ext.unavailable_reason(adv.FAMILY, "cpp") is None
    assert _dispatch.backend_for(adv.FAMILY, "cpu") == "cpp"
    with _dispatch.use_backend("triton"):  # a backend this family lacks: the PyTorch path, as before
        rewards, mask, index, _ = _odd_batch(4, 5, 0)
        assert adv.compute_advantages("grpo", rewards, mask, index)[0].shape == (4, 5)


def cpp_op_samples() -> dict[str, list[tuple]]:
    """opcheck samples of the registered C++ ops (the builder tests/test_registration.py needs)."""
    rewards, mask, index, extra = _odd_batch(5, 7, 1)
    ids = cpu_adv.find_groups(index, torch.float32).ids
    lp, pi2, rho = (extra[key] for key in TOKEN_INPUTS)
    values = torch.randn(5)
    return {
        "advantages_on_tokens_cpp": [(values, mask), (values.double(), mask.bool())],
        "advantages_whitened_on_tokens_cpp": [(values, mask, 1e-8), (values.double(), mask.bool(), 0.0)],
        "remax_cpp": [(rewards, extra["reward_baselines"], mask),
                      (rewards.double(), values.double(), mask.bool())],
        "reinforce_plus_plus_cpp": [(rewards, mask, 0.9, 1e-8, False),
                                    (rewards.half(), mask.bool(), 1.0, 1e-8, True)],
        "optimal_token_baseline_cpp": [
            (rewards, mask, ids, lp, pi2, rho, True, 1e-8, False, False),
            (rewards.double(), mask.bool(), ids, lp, pi2, None, False, 0.0, True, True),
        ],
    }


@pytest.mark.parametrize("name", sorted(cpp_op_samples()))
def test_cpp_ops_opcheck(name):
    for args in cpp_op_samples()[name]:
        torch.library.opcheck(getattr(torch.ops.rlhf_kernels, name).default, args)


def test_cpp_ops_compile_fullgraph():
    """The C++ ops trace as opaque registered ops: a compiled step of three estimators equals eager."""

    def step(rewards, mask, index, log_probs, pi_squared, baselines):
        grpo = adv.compute_advantages("grpo", rewards, mask, index)[0]
        rpp = adv.compute_advantages("reinforce_plus_plus", rewards, mask, 0.9)
        remax = adv.compute_advantages("remax", rewards, baselines, mask)
        otb = adv.compute_advantages("optimal_token_baseline", rewards, mask, index, log_probs, pi_squared)
        return grpo, *rpp, *remax, *otb

    rewards, mask, index, extra = _odd_batch(9, 13, 5)
    args = (rewards, mask, index, extra["old_log_probs"], extra["sum_pi_squared"], extra["reward_baselines"])
    with _dispatch.use_backend("cpp"):
        expected = step(*args)
        compiled = torch.compile(step, fullgraph=True)(*args)
    for got, want in zip(compiled, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _rpp_global_worker(rank: int, world: int, port: int) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        gen = torch.Generator().manual_seed(5)
        rewards = torch.randn(6, 11, generator=gen)
        mask = torch.arange(11) < torch.tensor([11, 3, 7, 1, 9, 5])[:, None]
        # one process, the whole batch
        want, want_returns = adv.reinforce_plus_plus_advantages(rewards, mask, 0.9)
        rows = slice(3 * rank, 3 * rank + 3)
        got, returns = adv.reinforce_plus_plus_advantages(rewards[rows], mask[rows], 0.9,
                                                          process_group=dist.group.WORLD)
        torch.testing.assert_close(returns, want_returns[rows], msg=f"rank {rank} returns")
        torch.testing.assert_close(got, want[rows], rtol=1e-5, atol=1e-6, msg=f"rank {rank} advantages")
    finally:
        dist.destroy_process_group()


def test_reinforce_plus_plus_whitens_over_every_rank(monkeypatch):
    """process_group=: each rank's advantages are the rows of the whole batch's whitening (the trainer's
    critic-free reinforce_plus_plus under DDP)."""
    run_gloo_workers(_rpp_global_worker, 2, "reinforce_plus_plus", monkeypatch)
