"""Every advantage estimator of verl 0.9.1, fetched through verl's own ``get_adv_estimator_fn(name)`` after
``install()``, against verl's original (captured before install) on the same inputs: string uids in
shuffled order, groups of 1 to 5 samples, masks with holes, an empty and a one-token row, called with the
keyword arguments verl's trainer passes (``ray_trainer.compute_advantage``) and a real ``AlgoConfig``.
Where our defined results differ from verl's raise / NaN on purpose (docs/compat-verl.md), the
difference itself is asserted.  PyTorch path (the estimators are plain torch; GAE's scan is forced to it).
"""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest
import torch

from peers.cases import close
from rlhf_kernels import _dispatch
from rlhf_kernels.compat import verl as cv

TOL = 2e-5  # |ours − verl| ≤ TOL·(1 + |verl|), fp32
WHITENED_TOL = 2e-4  # two whitening passes in fp32
FP64_TOL = 1e-10
WHITENED = ("gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gdpo")
OTB = ("optimal_token_baseline", "tir_optimal_token_baseline")
GDPO_KEYS = ("format_reward", "accuracy_reward")
PROMPT_LEN = 4


@pytest.fixture(autouse=True)
def _torch_path():
    with _dispatch.use_backend("torch"):
        yield


def _run_installed(verl_peer, name: str, **kwargs):
    """``install()``, then verl's ``get_adv_estimator_fn(name)`` (checked to be ours) called as verl's
    trainer calls it; ``unpatch()`` afterwards."""
    cv.install()
    try:
        fn = verl_peer.core.get_adv_estimator_fn(name)
        assert fn is cv.ADVANTAGE_ESTIMATORS[name] and fn is not verl_peer.estimators[name]
        return fn(**kwargs)
    finally:
        cv.unpatch()


def _batch(seed: int, singletons: bool = True, mask_dtype: torch.dtype = torch.float32, T: int = 13):
    """One RLHF batch: shuffled string uids of groups of 1..5 samples, right padding with holes (tool
    outputs), an empty row and a one-token row, and everything the estimators read."""
    rng = np.random.default_rng(seed)
    sizes = list(rng.integers(2, 6, size=5)) + ([1, 1] if singletons else [2])
    uids = np.array([f"uid-{seed}-{g}" for g, size in enumerate(sizes) for _ in range(size)], dtype=object)
    uids = uids[rng.permutation(len(uids))]
    B = len(uids)
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=generator)
    mask = (torch.arange(T) < lengths[:, None]) & (torch.rand(B, T, generator=generator) < 0.8)
    mask[:, 0] = True
    mask[1] = False  # an empty response
    mask[2] = False
    mask[2, T // 2] = True  # a one-token response
    rewards = torch.randn(B, T, generator=generator) * mask  # token rewards inside the response only
    components = {key: rng.integers(0, 3, size=B).astype(np.float32) / 2 for key in GDPO_KEYS}
    components["accuracy_reward"] += rng.standard_normal(B).astype(np.float32)
    attention = torch.cat([torch.ones(B, PROMPT_LEN, dtype=torch.int64), mask.long()], dim=1)
    return types.SimpleNamespace(
        uids=uids,
        rewards=rewards,
        mask=mask.to(mask_dtype),
        values=torch.randn(B, T, generator=generator),
        baselines=torch.randn(B, generator=generator),
        old_log_probs=-torch.rand(B, T, generator=generator) * 3,
        sum_pi_squared=torch.rand(B, T, generator=generator) * 0.5,
        rollout_is_weights=torch.rand(B, T, generator=generator) * 2,
        non_tensor_batch={"uid": uids, **components},
        batch={"prompts": torch.zeros(B, PROMPT_LEN, dtype=torch.int64), "attention_mask": attention},
    )


# Two settings of every knob an estimator reads.
VARIANTS = {
    "A": dict(norm=True, gamma=0.9, lam=0.95, weights=(0.3, 1.7), is_weights=True, zero_tail=True),
    "B": dict(norm=False, gamma=1.0, lam=1.0, weights=None, is_weights=False, zero_tail=False),
}


def _config(verl_peer, variant: dict):
    return verl_peer.core.AlgoConfig(
        gamma=variant["gamma"],
        lam=variant["lam"],
        norm_adv_by_std_in_grpo=variant["norm"],
        gdpo_reward_keys=list(GDPO_KEYS),
        gdpo_reward_weights=None if variant["weights"] is None else list(variant["weights"]),
    )


def _trainer_kwargs(verl_peer, name: str, data, variant: dict) -> dict:
    """The keyword arguments verl 0.9.1's ``ray_trainer.compute_advantage`` passes for ``name`` (plus
    the GRPO flag, which it passes to "grpo" and which the vectorised forms and gdpo take as an argument)."""
    config = _config(verl_peer, variant)
    if name == "gae":
        return dict(
            token_level_rewards=data.rewards,
            values=data.values,
            response_mask=data.mask,
            gamma=variant["gamma"],
            lam=variant["lam"],
        )
    kwargs = dict(token_level_rewards=data.rewards, response_mask=data.mask, config=config, index=data.uids)
    if name == "grpo":
        del kwargs["config"]
    if name in ("grpo", "grpo_vectorized", "gdpo"):
        kwargs["norm_adv_by_std_in_grpo"] = variant["norm"]
    if name == "grpo_passk":  # verl reads the flag from config, never the argument: pass the opposite
        kwargs["norm_adv_by_std_in_grpo"] = not variant["norm"]
    if name == "remax":
        kwargs["reward_baselines"] = data.baselines
    if name == "gdpo":
        kwargs.update(non_tensor_batch=data.non_tensor_batch, batch=data.batch)
    if name in OTB:
        kwargs.update(
            sum_pi_squared=data.sum_pi_squared,
            old_log_probs=data.old_log_probs,
            rollout_is_weights=data.rollout_is_weights if variant["is_weights"] else None,
            handle_zero_tail=variant["zero_tail"],
        )
    return kwargs


def _verl(verl_peer, name: str, **kwargs):
    """verl's original, on clones (several of verl's estimators write into their score tensors)."""
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return verl_peer.estimators[name](**kwargs)


# ---------------------------------------------------------------------------------------------------
# Registration: every verl estimator name, verl's signature, install() / unpatch()
# ---------------------------------------------------------------------------------------------------
def test_every_verl_estimator_is_registered_with_verls_signature(verl_peer):
    assert set(cv.ADVANTAGE_ESTIMATORS) == set(verl_peer.estimators)
    for name, original in verl_peer.estimators.items():
        ours = cv.ADVANTAGE_ESTIMATORS[name]
        assert ours.__name__ == original.__name__, name
        params = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values()]
        verl_params = [(p.name, p.kind, p.default) for p in inspect.signature(original).parameters.values()]
        assert params == verl_params, name


def test_install_and_unpatch_restore_verl(verl_peer):
    core = verl_peer.core
    replaced = cv.install()
    try:
        assert cv.install() == replaced  # idempotent
        for name, fn in cv.ADVANTAGE_ESTIMATORS.items():
            assert core.get_adv_estimator_fn(name) is fn and f"registry[{name!r}]" in replaced
            assert core.get_adv_estimator_fn(core.AdvantageEstimator(name)) is fn
            assert getattr(core, fn.__name__) is fn  # what verl's trainer calls for "gae" and "grpo"
    finally:
        cv.unpatch()
    assert core.ADV_ESTIMATOR_REGISTRY == verl_peer.estimators
    for name, fn in cv.ADVANTAGE_ESTIMATORS.items():
        assert getattr(core, fn.__name__) is verl_peer.estimators[name]


# ---------------------------------------------------------------------------------------------------
# Parity with verl's originals
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(cv.ADVANTAGE_ESTIMATORS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64], ids=["float_mask", "int_mask"])
def test_fetched_estimator_matches_verl(verl_peer, name, variant, mask_dtype):
    seed = sorted(cv.ADVANTAGE_ESTIMATORS).index(name) + (10 if variant == "B" else 0)
    data = _batch(seed, singletons=name != "grpo_passk", mask_dtype=mask_dtype)  # verl's passk raises
    if name == "grpo_passk":
        data.rewards[:4, 0] = data.rewards[:4, 0].round()  # ties for the best score
    kwargs = _trainer_kwargs(verl_peer, name, data, VARIANTS[variant])
    inputs = {key: value.clone() for key, value in kwargs.items() if isinstance(value, torch.Tensor)}
    peer = _verl(verl_peer, name, **kwargs)
    ours = _run_installed(verl_peer, name, **kwargs)
    valid = data.mask != 0
    tol = WHITENED_TOL if name in WHITENED else TOL
    if name in ("gae", "remax"):  # intended: ours 0 at masked positions, verl's values there are unread
        close(ours[0][valid], peer[0][valid], tol, f"{name} advantages at valid positions")
        assert bool((ours[0][~valid] == 0).all()) and bool((peer[0][~valid] != 0).any())
    else:
        close(ours[0], peer[0], tol, f"{name} advantages")
    close(ours[1], peer[1], TOL if name in ("gae", "reinforce_plus_plus") else tol, f"{name} returns")
    assert bool(ours[0].isfinite().all()) and ours[0].dtype == torch.float32
    for key, value in inputs.items():
        assert torch.equal(kwargs[key], value), f"{name} modified {key}"


@pytest.mark.parametrize("name", sorted(set(cv.ADVANTAGE_ESTIMATORS) - set(WHITENED)))
def test_fp64_matches_verl_in_fp64(verl_peer, name):
    """fp64 inputs: ours computes in fp64 (every estimator without an fp32 scan or whitening): verl's
    fp64 results to 1e-10, or to fp32 rounding where verl itself rounds through fp32."""
    data = _batch(3, singletons=name != "grpo_passk")
    for field in ("rewards", "values", "baselines", "old_log_probs", "sum_pi_squared", "rollout_is_weights"):
        setattr(data, field, getattr(data, field).double())
    kwargs = _trainer_kwargs(verl_peer, name, data, VARIANTS["A"])
    peer = _verl(verl_peer, name, **kwargs)
    ours = _run_installed(verl_peer, name, **kwargs)
    valid = data.mask != 0
    selected = valid if name == "remax" else torch.ones_like(valid)
    assert ours[0].dtype == torch.float64
    # verl rounds through fp32 there: its singleton μ = 0, σ = 1 are fp32 tensors (σ + ε in fp32), its
    # group_mean_std casts to fp32 ("grpo_vectorized"), gpg's α = B / count_nonzero is an fp32 division.
    tol = TOL if name in ("grpo", "grpo_vectorized", "gpg") else FP64_TOL
    close(ours[0][selected], peer[0][selected], tol, f"{name} advantages")
    close(ours[1], peer[1], tol, f"{name} returns")


def test_uid_forms(verl_peer):
    """Integer uids and an integer tensor of group ids group the samples as the string uids do."""
    data = _batch(4)
    fn = cv.ADVANTAGE_ESTIMATORS["rloo"]
    expected = fn(data.rewards, data.mask, data.uids)[0]
    _, dense = np.unique(data.uids, return_inverse=True)
    for index in (dense * 7 + 3, torch.from_numpy(dense.astype(np.int64) * 7 + 3)):
        assert torch.equal(fn(data.rewards, data.mask, index)[0], expected)
    close(
        expected,
        _verl(
            verl_peer, "rloo", token_level_rewards=data.rewards, response_mask=data.mask, index=dense * 7 + 3
        )[0],
        TOL,
        "rloo with integer uids",
    )


# ---------------------------------------------------------------------------------------------------
# Intended differences (docs/compat-verl.md): defined results where verl raises or gives NaN
# ---------------------------------------------------------------------------------------------------
def test_grpo_passk_singleton_groups(verl_peer):
    """verl raises for a group of one; ours gives it 0 and every other group verl's result."""
    data = _batch(5, singletons=True)
    config = _config(verl_peer, VARIANTS["A"])
    kwargs = dict(token_level_rewards=data.rewards, response_mask=data.mask, index=data.uids, config=config)
    with pytest.raises(ValueError, match="at least 2 samples"):
        _verl(verl_peer, "grpo_passk", **kwargs)
    ours = _run_installed(verl_peer, "grpo_passk", **kwargs)[0]
    counts = {uid: int((data.uids == uid).sum()) for uid in data.uids}
    alone = torch.tensor([counts[uid] == 1 for uid in data.uids])
    assert bool(alone.any()) and bool((ours[alone] == 0).all())
    peer = _verl(
        verl_peer,
        "grpo_passk",
        token_level_rewards=data.rewards[~alone],
        response_mask=data.mask[~alone],
        index=data.uids[~alone.numpy()],
        config=config,
    )[0]
    close(ours[~alone], peer, TOL, "grpo_passk on the groups of two or more")


def test_opo_group_of_empty_responses(verl_peer):
    """verl's length-weighted baseline of a group whose responses are all empty is 0/0 = NaN on those
    rows; ours is baseline 0 there (all-masked rows: advantages 0); the other groups are verl's."""
    data = _batch(6)
    empty = torch.from_numpy(data.uids == data.uids[0])
    assert int(empty.sum()) >= 2
    data.mask[empty] = 0
    kwargs = dict(token_level_rewards=data.rewards, response_mask=data.mask, index=data.uids)
    peer = _verl(verl_peer, "opo", **kwargs)[0]
    ours = _run_installed(verl_peer, "opo", **kwargs)[0]
    assert bool(peer[empty].isnan().all()) and bool((ours[empty] == 0).all())
    close(ours[~empty], peer[~empty], TOL, "opo on the other groups")


@pytest.mark.parametrize("name", WHITENED)
@pytest.mark.parametrize("valid_tokens", [0, 1])
def test_whitening_fewer_than_two_tokens(verl_peer, name, valid_tokens):
    """verl's masked_whiten raises ValueError (its check reads the mask sum on the host); ours whitens
    to zeros."""
    data = _batch(7)
    data.mask.zero_()
    if valid_tokens:
        data.mask[3, 2] = 1.0
    kwargs = _trainer_kwargs(verl_peer, name, data, VARIANTS["A"])
    if name == "gdpo":  # its fallback component (Σ_t rewards): verl reaches the whitening before any assert
        kwargs.pop("non_tensor_batch")
    with pytest.raises(ValueError):
        _verl(verl_peer, name, **kwargs)
    advantages, returns = _run_installed(verl_peer, name, **kwargs)
    assert bool((advantages == 0).all()) and bool(returns.isfinite().all())


def test_optimal_token_baseline_zero_divisor(verl_peer):
    """ε = 0: past the end of every member of a group Σ_g W·m = 0, where verl's baseline is 0/0 = NaN (and
    NaN·0 stays NaN in its advantages); ours is baseline 0 there.  Equal wherever verl is finite."""
    data = _batch(8, singletons=False)
    data.mask[:, -3:] = 0
    for name in OTB:
        kwargs = _trainer_kwargs(verl_peer, name, data, VARIANTS["B"])
        kwargs["epsilon"] = 0.0
        peer = _verl(verl_peer, name, **kwargs)[0]
        ours = _run_installed(verl_peer, name, **kwargs)[0]
        finite = peer.isfinite()
        assert name == "tir_optimal_token_baseline" or bool((~finite).any())
        assert bool(ours.isfinite().all()) and bool((ours[~finite] == 0).all())
        close(ours[finite], peer[finite], 1e-4, f"{name} where verl is finite")


def test_config_errors(verl_peer):
    """Where verl asserts (an AssertionError), ours raises a ValueError naming what is missing."""
    data = _batch(9, singletons=False)
    kwargs = dict(token_level_rewards=data.rewards, response_mask=data.mask)
    for name in ("grpo_passk", "reinforce_plus_plus"):
        with pytest.raises(AssertionError):
            _verl(verl_peer, name, index=data.uids, **kwargs)
        with pytest.raises(ValueError, match="needs config"):
            cv.ADVANTAGE_ESTIMATORS[name](index=data.uids, **kwargs)
    config = verl_peer.core.AlgoConfig()  # no gdpo_reward_keys
    gdpo = dict(
        kwargs, index=data.uids, config=config, non_tensor_batch=data.non_tensor_batch, batch=data.batch
    )
    with pytest.raises(AssertionError):
        _verl(verl_peer, "gdpo", **gdpo)
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        cv.compute_gdpo_outcome_advantage(**gdpo)
    gdpo["config"] = verl_peer.core.AlgoConfig(gdpo_reward_keys=["missing_reward"])
    with pytest.raises(ValueError, match="missing_reward"):
        cv.compute_gdpo_outcome_advantage(**gdpo)
    with pytest.raises(ValueError, match="index"):
        cv.compute_grpo_outcome_advantage(data.rewards, data.mask, None)
    with pytest.raises(ValueError, match="index"):
        cv.compute_rloo_outcome_advantage(data.rewards, data.mask, data.uids[:-1])
