"""rollout_correction and bypass_mode_policy_loss against the real verl 0.9.1 (imported with the peer suite's
placeholder modules): weights, rejection masks and every metric verl reports, by name."""

from __future__ import annotations

import pytest
import torch
from peers.cases import close, grad_close
from peers.cases import mask as make_mask
from peers.placeholders import import_peer

from rlhf_kernels.ops import policy_losses as pl
from rlhf_kernels.ops.rollout_correction import REJECTION_OPTIONS, rollout_correction

TOL = 2e-5  # both in fp32 (verl's row means add 1e-8 to the token count, ours divide by max(n, 1))
PREFIX = "rollout_corr/"


@pytest.fixture(scope="module")
def verl():
    helper = import_peer("verl.trainer.ppo.rollout_corr_helper")
    core = import_peer("verl.trainer.ppo.core_algos")
    actor = import_peer("verl.workers.config.actor")
    algorithm = import_peer("verl.trainer.config.algorithm")
    return helper, core, actor, algorithm


def _verl_threshold(spec):
    return "_".join(str(x) for x in spec) if isinstance(spec, tuple) else spec


def _verl_rejection(rejection):
    """Our mapping as verl's (rollout_rs, rollout_rs_threshold) strings."""
    if rejection is None:
        return None, None
    return ",".join(rejection), ",".join(str(_verl_threshold(v)) for v in rejection.values())


# (level, threshold, rejection, batch_normalize): TIS / IcePop at both levels, every rejection option,
# chained, with token-level IS next to sequence-level rejection.
CONFIGS = [
    ("token", 1.5, None, False),
    ("sequence", 3.0, None, True),
    ("token", (0.7, 1.4), {"token_k1": (0.6, 1.8), "seq_mean_k3": 0.15, "seq_max_k2": 0.8}, True),
    ("sequence", (0.05, 20.0), {"seq_sum_k1": 20.0, "token_k2": 0.4, "seq_sum_k3": 5.0}, False),
    (None, 2.0, {"seq_mean_k1": (0.8, 1.3), "token_k3": 0.3, "seq_mean_k2": 0.2, "seq_max_k3": 1.5,
                 "seq_sum_k2": 4.0}, False),
    ("token", 2.0, {"token_k1": 1.5}, True),  # a single k1 bound u: [1/u, u]
]


def test_configs_cover_every_rejection_option():
    assert set(REJECTION_OPTIONS) == {o for *_, rejection, _ in CONFIGS if rejection for o in rejection}


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("kind", ["random", "holes", "left", "empty_rows"])
def test_matches_verl(verl, config, kind):
    helper = verl[0]
    level, threshold, rejection, batch_normalize = config
    B, T = 7, 29
    rollout = -torch.rand(B, T) * 4
    logprobs = rollout + torch.randn(B, T) * 0.5
    mask = make_mask(B, T, kind, torch.float32 if kind == "left" else torch.bool)
    rs, rs_threshold = _verl_rejection(rejection)
    peer_weights, peer_mask, peer_metrics = helper.compute_rollout_correction_and_rejection_mask(
        logprobs, rollout, mask, rollout_is=level, rollout_is_threshold=_verl_threshold(threshold),
        rollout_is_batch_normalize=batch_normalize, rollout_rs=rs, rollout_rs_threshold=rs_threshold,
    )
    weights, keep, metrics = rollout_correction(
        logprobs, rollout, mask, level=level, threshold=threshold, rejection=rejection,
        batch_normalize=batch_normalize,
    )
    if level is None:
        assert weights is None and peer_weights is None
    else:
        close(weights, peer_weights.batch["rollout_is_weights"], TOL, "is_weights")
    assert keep.dtype == peer_mask.dtype and torch.equal(keep, peer_mask)
    assert {PREFIX + key for key in metrics} == set(peer_metrics)
    for key, value in peer_metrics.items():
        close(metrics[key.removeprefix(PREFIX)], torch.tensor(value, dtype=torch.float64), TOL, key)


def test_extreme_log_ratios_match_verl(verl):
    """|ℓ| up to 60: past the ±20 clamp at token level, sums far past it at sequence level."""
    helper = verl[0]
    rollout = -torch.rand(6, 31) * 4
    logprobs = rollout + (torch.randn(6, 31) * 25).clamp(-60, 60)
    mask = make_mask(6, 31, "holes")
    for level, threshold in (("token", 3.0), ("sequence", (1e-9, 1e8))):  # rows at +20 zeroed
        rejection = {"token_k1": (0.1, 10.0), "seq_max_k3": 1e6}
        peer_weights, peer_mask, peer_metrics = helper.compute_rollout_correction_and_rejection_mask(
            logprobs, rollout, mask, rollout_is=level, rollout_is_threshold=_verl_threshold(threshold),
            rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="0.1_10.0,1000000.0",
        )
        weights, keep, metrics = rollout_correction(
            logprobs, rollout, mask, level=level, threshold=threshold, rejection=rejection
        )
        close(weights, peer_weights.batch["rollout_is_weights"], TOL, f"{level} weights")
        assert torch.equal(keep, peer_mask)
        # Intended difference: every row's max k3 is past 1e6, so the clamped statistic is constant and its
        # std is 0 (ours); verl's fp32 E[x²] − E[x]² cancels to rounding noise (~256) there.
        assert float(metrics["rollout_rs_seq_max_k3_std"]) == 0.0
        assert peer_metrics.pop(PREFIX + "rollout_rs_seq_max_k3_std") > 1.0
        for key, value in peer_metrics.items():
            close(metrics[key.removeprefix(PREFIX)], torch.tensor(value, dtype=torch.float64), TOL, key)


def test_verl_raises_where_ours_is_defined(verl):
    """An all-masked batch (verl: ValueError) and IcePop zeroing every weight (verl: ZeroDivisionError in
    the effective sample size); ours: tested values in tests/test_rollout_correction.py."""
    helper = verl[0]
    rollout = -torch.rand(3, 8) * 4
    logprobs = rollout + torch.randn(3, 8) * 0.5
    with pytest.raises(ValueError):
        helper.compute_rollout_correction_and_rejection_mask(
            logprobs, rollout, torch.zeros(3, 8, dtype=torch.bool)
        )
    with pytest.raises(ZeroDivisionError):
        helper.compute_rollout_correction_and_rejection_mask(
            logprobs, rollout, torch.ones(3, 8, dtype=torch.bool), rollout_is="token",
            rollout_is_threshold="100.0_200.0",
        )
    _, _, metrics = rollout_correction(
        logprobs, rollout, torch.ones(3, 8, dtype=torch.bool), threshold=(100.0, 200.0)
    )
    assert float(metrics["rollout_is_eff_sample_size"]) == 0.0


# ---------------------------------------------------------------------------------------------------
# bypass_mode against verl's registered "bypass_mode" loss
# ---------------------------------------------------------------------------------------------------
VERL_KEYS = {
    "actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl", "actor/pg_clipfrac_lower": "clipfrac_lower"
}
BYPASS = [
    ("ppo_clip", None, 2.0, None, False, "token-mean"),
    ("ppo_clip", "token", 2.0, {"token_k1": (0.6, 1.8), "seq_mean_k3": 0.15}, False, "seq-mean-token-mean"),
    ("reinforce", "token", 1.5, None, False, "token-mean"),
    ("reinforce", "sequence", (0.2, 5.0), {"seq_mean_k3": 0.15}, True, "token-mean"),
    ("reinforce", None, 2.0, {"token_k2": 0.3}, False, "seq-mean-token-sum"),
]


@pytest.mark.parametrize("case", BYPASS, ids=range(len(BYPASS)))
def test_bypass_mode_matches_verl(verl, case):
    _, core, actor, algorithm = verl
    loss_type, level, threshold, rejection, batch_normalize, mode = case
    B, T = 6, 23
    rollout = -torch.rand(B, T) * 4
    logprobs = rollout + torch.randn(B, T) * 0.4
    advantages, mask = torch.randn(B, T), make_mask(B, T, "empty_rows")
    rs, rs_threshold = _verl_rejection(rejection)
    correction = algorithm.RolloutCorrectionConfig(
        rollout_is=level, rollout_is_threshold=_verl_threshold(threshold),
        rollout_is_batch_normalize=batch_normalize, rollout_rs=rs, rollout_rs_threshold=rs_threshold,
        bypass_mode=True, loss_type=loss_type,
    )
    config = actor.ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=mode,
        global_batch_info={}, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
        policy_loss=actor.PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=correction),
    )
    x = logprobs.clone().requires_grad_()
    bypass = core.POLICY_LOSS_REGISTRY["bypass_mode"]
    peer_loss, peer_metrics = bypass(rollout, x, advantages, mask, mode, config)
    (peer_grad,) = torch.autograd.grad(peer_loss, x)
    y = logprobs.clone().requires_grad_()
    loss, metrics = pl.bypass_mode_policy_loss(
        y, rollout, advantages, mask, loss_type=loss_type, level=level, threshold=threshold,
        rejection=rejection, batch_normalize=batch_normalize, clip_high=0.28, loss_agg=mode,
    )
    (grad,) = torch.autograd.grad(loss, y)
    close(loss, peer_loss, TOL, "loss")
    grad_close(grad, peer_grad, TOL, "gradient")
    for key, value in peer_metrics.items():
        ours = metrics[VERL_KEYS[key]] if key in VERL_KEYS else metrics[key.removeprefix(PREFIX)]
        close(ours, torch.tensor(float(value), dtype=torch.float64), TOL, key)
