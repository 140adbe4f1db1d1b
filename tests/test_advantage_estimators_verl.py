"""The advantage estimators against the real verl 0.9.1 functions (``verl.trainer.ppo.core_algos``,
imported with the peer suite's placeholders for its heavy dependencies): variable group sizes in any
order, singletons, masks with holes and empty rows.  Where verl raises, divides by zero or leaves a value
at a masked position, ours is checked against the documented rule instead (docs/advantages.md)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import assert_close
from peers.placeholders import import_peer
from test_advantages import estimator_backend  # noqa: F401  (the cpp / torch axis of the CPU paths)

from rlhf_kernels.ops import advantages as adv

TOL = 2e-5
WHITENED_TOL = 2e-4  # two whitening passes in fp32


@pytest.fixture(scope="module")
def verl():
    return import_peer("verl.trainer.ppo.core_algos")


def _batch(seed: int, sizes=(3, 1, 5, 2, 4, 1, 2), T: int = 13, singletons: bool = True):
    """Rewards, a mask with right padding, holes and one empty row, shuffled verl uids (strings)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = sizes if singletons else tuple(max(s, 2) for s in sizes)
    uids = np.array([f"prompt-{g}" for g, size in enumerate(sizes) for _ in range(size)], dtype=object)
    uids = uids[torch.randperm(len(uids), generator=generator).numpy()]
    B = len(uids)
    rewards = torch.randn(B, T, generator=generator)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    mask = (torch.arange(T) < lengths[:, None]).to(torch.float32)
    mask[1, 2:5] = 0.0  # a hole (a tool output inside the response)
    mask[2] = 0.0  # an empty response
    return rewards, mask, uids


def _same(ours, theirs, mask, tol=TOL, what=""):
    assert_close(ours, torch.where(mask != 0, theirs, 0.0), tol, what)
    assert bool((ours[mask == 0] == 0).all()), f"{what}: nonzero at masked positions"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("norm", [True, False], ids=["grpo", "dr_grpo"])
@pytest.mark.usefixtures("estimator_backend")
def test_grpo_family(verl, seed, norm):
    rewards, mask, uids = _batch(seed)
    index = adv.uid_index(uids)
    ours = adv.compute_advantages("grpo", rewards, mask, index, 1e-6, norm)
    for name in ("compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"):
        theirs = getattr(verl, name)(rewards.clone(), mask, uids, 1e-6, norm)
        _same(ours[0], theirs[0], mask, what=name)
    assert ours[0] is ours[1]
    gpg = adv.compute_advantages("gpg", rewards, mask, index, f_norm=0.7)
    _same(gpg[0], verl.compute_gpg_outcome_advantage(rewards.clone(), mask, uids, f_norm=0.7)[0], mask,
          what="gpg")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.usefixtures("estimator_backend")
def test_leave_one_out_and_opo(verl, seed):
    rewards, mask, uids = _batch(seed)
    index = adv.uid_index(uids)
    for name in ("rloo", "rloo_vectorized", "opo"):
        ours = adv.compute_advantages(name, rewards, mask, index)
        peer = getattr(verl, f"compute_{name}_outcome_advantage")(rewards.clone(), mask, uids)
        _same(ours[0], peer[0], mask, what=name)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.usefixtures("estimator_backend")
def test_grpo_passk(verl, norm):
    rewards, mask, uids = _batch(2, singletons=False)
    rewards[:, 0] = rewards[:, 0].round()  # ties for the best score in some groups
    ours = adv.compute_advantages("grpo_passk", rewards, mask, adv.uid_index(uids), 1e-6, norm)
    peer = verl.compute_grpo_passk_outcome_advantage(
        rewards.clone(), mask, uids, 1e-6, config={"norm_adv_by_std_in_grpo": norm})
    _same(ours[0], peer[0], mask, what="grpo_passk")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.usefixtures("estimator_backend")
def test_whitened_estimators(verl, seed):
    rewards, mask, uids = _batch(seed)
    index = adv.uid_index(uids)
    ours = adv.compute_advantages("reinforce_plus_plus_baseline", rewards, mask, index)
    peer = verl.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards.clone(), mask, uids)
    _same(ours[0], peer[0], mask, WHITENED_TOL, "reinforce_plus_plus_baseline")
    for gamma in (1.0, 0.9):
        ours = adv.compute_advantages("reinforce_plus_plus", rewards, mask, gamma=gamma)
        peer = verl.compute_reinforce_plus_plus_outcome_advantage(
            rewards, mask, config=types.SimpleNamespace(gamma=gamma))
        _same(ours[0], peer[0], mask, WHITENED_TOL, "reinforce_plus_plus advantages")
        _same(ours[1], peer[1], mask, TOL, "reinforce_plus_plus returns")
    ours = adv.compute_advantages("gdpo", rewards, mask, index)
    peer = verl.compute_gdpo_outcome_advantage(rewards.clone(), mask, uids)
    _same(ours[0], peer[0], mask, WHITENED_TOL, "gdpo (one component)")


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.usefixtures("estimator_backend")
def test_gdpo_reward_components(verl, norm):
    rewards, mask, uids = _batch(3)
    B, T = rewards.shape
    components = {"format": torch.randint(0, 2, (B,)).float(), "accuracy": torch.randn(B)}
    weights = [0.3, 1.7]
    prompts = torch.zeros(B, 4, dtype=torch.long)
    batch = {"prompts": prompts, "attention_mask": torch.cat([torch.ones(B, 4), mask], dim=1).long()}
    config = {"gdpo_reward_keys": list(components), "gdpo_reward_weights": weights}
    peer = verl.compute_gdpo_outcome_advantage(
        rewards, mask, uids, 1e-6, norm, config=config,
        non_tensor_batch={key: value.numpy() for key, value in components.items()}, batch=batch)
    ours = adv.compute_advantages(
        "gdpo", rewards, mask, adv.uid_index(uids), 1e-6, norm,
        reward_scores=torch.stack(list(components.values()), dim=-1), reward_weights=weights)
    _same(ours[0], peer[0], mask, WHITENED_TOL, "gdpo")


@pytest.mark.usefixtures("estimator_backend")
def test_remax(verl):
    rewards, mask, _ = _batch(4)
    baselines = torch.randn(rewards.shape[0])
    ours = adv.compute_advantages("remax", rewards, baselines, mask)
    peer = verl.compute_remax_outcome_advantage(rewards, baselines, mask)
    # verl: G ≠ 0 at masked positions before a valid one
    _same(ours[0], peer[0], mask, what="remax advantages")
    assert_close(ours[1], peer[1], TOL, "remax returns")


def test_gae(verl):
    rewards, mask, _ = _batch(4)
    values = torch.randn(rewards.shape)
    ours = adv.compute_advantages("gae", rewards, values, mask, 0.99, 0.95)
    peer = verl.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    _same(ours[0], peer[0], mask, WHITENED_TOL, "gae advantages")
    assert_close(ours[1], peer[1], TOL, "gae returns")


@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "rollout_is_weights"])
@pytest.mark.usefixtures("estimator_backend")
def test_optimal_token_baseline(verl, name, zero_tail, weighted):
    rewards, mask, uids = _batch(5)
    mask[4, 7:] = 0.0
    generator = torch.Generator().manual_seed(6)
    old_log_probs = -torch.rand(rewards.shape, generator=generator) * 3
    sum_pi_squared = torch.rand(rewards.shape, generator=generator) * 0.5
    weights = torch.rand(rewards.shape, generator=generator) * 2 if weighted else None
    fn = {"optimal_token_baseline": verl.compute_optimal_token_baseline_advantage,
          "tir_optimal_token_baseline": verl.compute_multi_turn_optimal_token_baseline_advantage}[name]
    peer = fn(rewards, mask, uids, old_log_probs, sum_pi_squared, weights, zero_tail)
    ours = adv.compute_advantages(name, rewards, mask, adv.uid_index(uids), old_log_probs, sum_pi_squared,
                                  weights, zero_tail)
    _same(ours[0], peer[0], mask, 1e-4, f"{name} advantages")
    assert_close(ours[1], peer[1], TOL, f"{name} returns")


def test_uid_index_matches_verl_grouping(verl):
    uids = np.array(["b", "a", "b", "c", "a"], dtype=object)
    index = adv.uid_index(uids)
    assert index.dtype == torch.int64 and index.tolist() == [1, 0, 1, 2, 0]
    assert adv.uid_index(np.array([7, 3, 7])).tolist() == [1, 0, 1]
    assert adv.uid_index([]).shape == (0,)
