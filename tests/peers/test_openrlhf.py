"""rlhf_kernels.compat.openrlhf against the real OpenRLHF 0.11.2: values and gradients, on the PyTorch
path and the Triton kernels (interpreted on CPU).  Intended differences are asserted as such
(docs/compat-openrlhf.md)."""

from __future__ import annotations

import pytest
import torch

from peers.cases import HALF_TOL, MASK_KINDS, TOL, close, grad_close, leaf, logprob_pair, mask, upcast
from rlhf_kernels.compat import openrlhf as co

B, T = 6, 11
FP32 = TOL[torch.float32]


def _global_info(response_mask):
    """What OpenRLHF's get_loss_batch_info passes with two data-parallel ranks (tensors)."""
    return {
        "dp_size": 2,
        "batch_num_tokens": response_mask.sum().float() * 2 + 3,
        "global_batch_size": torch.tensor(2.0 * B + 1),
    }


def _run(module, inputs, grad_of, **kwargs):
    inputs = list(inputs)
    inputs[grad_of] = leaf(inputs[grad_of])
    outputs = module(*inputs, **kwargs)
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    grad = torch.autograd.grad(first, inputs[grad_of], allow_unused=True)[0]
    return outputs, grad


def _compare_policy(ours, peer, all_masked):
    (loss, clip_ratio, ppo_kl, vllm_kl, filter_ratio), grad = ours
    (p_loss, p_clip_ratio, p_ppo_kl, p_vllm_kl, p_filter_ratio), p_grad = peer
    close(loss, p_loss, FP32, "loss")
    close(clip_ratio, p_clip_ratio, FP32, "clip_ratio")
    close(ppo_kl, p_ppo_kl, FP32, "ppo_kl")
    assert (vllm_kl is None) == (p_vllm_kl is None) and (filter_ratio is None) == (p_filter_ratio is None)
    if vllm_kl is not None:
        close(vllm_kl, p_vllm_kl, FP32, "vllm_kl")
        close(filter_ratio, p_filter_ratio, FP32, "is_filter_ratio")
    if all_masked:
        # Intended difference: OpenRLHF's 0/0 mean gives a NaN gradient (∞·0) wherever one flows; ours is 0.
        assert bool(p_grad.isnan().any()) and bool((grad == 0).all())
    else:
        grad_close(grad, p_grad, FP32, "d loss / d log_probs")


# ---------------------------------------------------------------------------------------------------
# PolicyLoss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token", "sample"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
def test_policy_loss(openrlhf_peer, backend, kind, token_level_loss, dual_clip, global_info):
    old, new = logprob_pair(B, T, torch.float32)
    advantages = torch.randn(B, T)
    action_mask = mask(B, T, kind)
    kwargs = _global_info(action_mask) if global_info else {}
    args = (0.2, 0.28, dual_clip, token_level_loss)
    ours = _run(co.PolicyLoss(*args), (new, old, advantages, action_mask), 0, **kwargs)
    peer = _run(openrlhf_peer.PolicyLoss(*args), (new, old, advantages, action_mask), 0, **kwargs)
    _compare_policy(ours, peer, all_masked=kind == "all_masked" and not global_info)


IS_CORRECTIONS = [
    ("token", "mask", "ratio", (0.5, 5.0)),
    ("token", "clip", "ratio", (0.8, 1.25)),
    ("seq", "mask", "ratio", (0.7, 1.4)),
    ("token", "mask", "binary_kl", (0.0, 0.02)),
    ("seq", "mask", "binary_kl", (0.0, 0.01)),
    ("token", "mask", "tv", (0.0, 0.05)),
    ("seq", "mask", "tv", (0.0, 0.03)),
]


@pytest.mark.parametrize(("level", "mode", "gating", "threshold"), IS_CORRECTIONS)
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token", "sample"])
@pytest.mark.parametrize("kind", ["random", "empty_rows"])
def test_policy_loss_is_correction(
    openrlhf_peer, backend, level, mode, gating, threshold, token_level_loss, kind
):
    old, new = logprob_pair(B, T, torch.float32)
    rollout = old + torch.randn(B, T) * 0.3
    advantages = torch.randn(B, T)
    action_mask = mask(B, T, kind)
    args = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        dual_clip=3.0,
        token_level_loss=token_level_loss,
        is_correction_level=level,
        is_correction_mode=mode,
        is_correction_gating=gating,
        is_correction_threshold=threshold,
    )
    inputs = (new, old, advantages, action_mask, rollout)
    ours = _run(co.PolicyLoss(**args), inputs, 0)
    peer = _run(openrlhf_peer.PolicyLoss(**args), inputs, 0)
    _compare_policy(ours, peer, all_masked=False)


@pytest.mark.parametrize("correction", ["off", "token"])
@pytest.mark.parametrize("kind", ["random", "empty_rows", "left"])
def test_policy_loss_gspo(openrlhf_peer, backend, correction, kind):
    old, new = logprob_pair(B, T, torch.float32, spread=0.2)
    rollout = old + torch.randn(B, T) * 0.1
    advantages = torch.randn(B, 1).expand(B, T)
    action_mask = mask(B, T, kind)
    args = dict(
        clip_eps_low=3e-4, clip_eps_high=4e-4, policy_loss_type="gspo", is_correction_level=correction
    )
    inputs = (new, old, advantages, action_mask, rollout)
    ours = _run(co.PolicyLoss(**args), inputs, 0)
    peer = _run(openrlhf_peer.PolicyLoss(**args), inputs, 0)
    _compare_policy(ours, peer, all_masked=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_policy_loss_dtypes(openrlhf_peer, backend, dtype):
    old, new = logprob_pair(B, T, dtype)
    advantages = torch.randn(B, T).to(dtype)
    action_mask = mask(B, T, "holes")
    ours = _run(co.PolicyLoss(0.2, 0.2), (new, old, advantages, action_mask), 0)
    peer = _run(
        openrlhf_peer.PolicyLoss(0.2, 0.2), (upcast(new), upcast(old), upcast(advantages), action_mask), 0
    )
    close(ours[0][0], peer[0][0], TOL[dtype], "loss vs OpenRLHF on the upcast values")
    grad_close(ours[1], peer[1], 1e-2 if dtype == torch.bfloat16 else TOL[dtype], "gradient")
    if dtype == torch.bfloat16:
        native = _run(openrlhf_peer.PolicyLoss(0.2, 0.2), (new, old, advantages, action_mask), 0)
        assert native[0][0].dtype == dtype and ours[0][0].dtype == torch.float32  # intended: fp32 loss
        close(ours[0][0], native[0][0], HALF_TOL[dtype], "loss vs OpenRLHF's bf16 arithmetic")


def test_policy_loss_extreme_ratios(openrlhf_peer, backend):
    """|log-ratio| up to ~100: the loss uses the ±20-clamped ratio, ppo_kl the unclamped one, as OpenRLHF."""
    old, new = logprob_pair(B, T, torch.float32, spread=40.0)
    advantages, action_mask = torch.randn(B, T) * 3, mask(B, T, "random")
    ours = _run(co.PolicyLoss(0.2, 0.3, 2.0), (new, old, advantages, action_mask), 0)
    peer = _run(openrlhf_peer.PolicyLoss(0.2, 0.3, 2.0), (new, old, advantages, action_mask), 0)
    _compare_policy(ours, peer, all_masked=False)


def test_policy_loss_constructor_errors(openrlhf_peer):
    for kwargs in (
        {"is_correction_level": "batch"},
        {"is_correction_mode": "drop"},
        {"is_correction_gating": "kl"},
        {"is_correction_level": "seq", "is_correction_mode": "clip"},
        {"is_correction_level": "token", "is_correction_gating": "tv"},
    ):
        with pytest.raises(ValueError):
            openrlhf_peer.PolicyLoss(**kwargs)
        with pytest.raises(ValueError):
            co.PolicyLoss(**kwargs)
    # an unknown policy_loss_type: OpenRLHF raises at the first forward, the shim already when built
    old, new = logprob_pair(B, T, torch.float32)
    with pytest.raises(ValueError, match="grpo"):
        openrlhf_peer.PolicyLoss(policy_loss_type="grpo")(new, old, torch.randn(B, T), mask(B, T, "random"))
    with pytest.raises(ValueError, match="grpo"):
        co.PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="rollout_log_probs"):
        co.PolicyLoss(is_correction_level="token")(*logprob_pair(B, T, torch.float32), torch.randn(B, T))


# ---------------------------------------------------------------------------------------------------
# ValueLoss, aggregate_loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token", "sample"])
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
def test_value_loss(openrlhf_peer, backend, kind, clip_eps, token_level_loss, global_info):
    old_values = torch.randn(B, T)
    values, returns = old_values + torch.randn(B, T) * 0.5, torch.randn(B, T)
    action_mask = mask(B, T, kind)
    kwargs = _global_info(action_mask) if global_info else {}
    inputs = (values, old_values, returns, action_mask)
    ours = _run(co.ValueLoss(clip_eps, token_level_loss), inputs, 0, **kwargs)
    peer = _run(openrlhf_peer.ValueLoss(clip_eps, token_level_loss), inputs, 0, **kwargs)
    close(ours[0], peer[0], FP32, "loss")
    if kind == "all_masked" and not global_info:
        assert bool(peer[1].isnan().any()) and bool((ours[1] == 0).all())  # intended, as PolicyLoss
    else:
        grad_close(ours[1], peer[1], FP32, "gradient")


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("token_level_loss", [True, False], ids=["token", "sample"])
def test_aggregate_loss(openrlhf_peer, backend, kind, token_level_loss):
    loss, action_mask = torch.randn(B, T), mask(B, T, kind)
    for kwargs in ({}, _global_info(action_mask)):
        close(
            co.aggregate_loss(loss, action_mask, token_level_loss, **kwargs),
            openrlhf_peer.aggregate_loss(loss, action_mask, token_level_loss, **kwargs),
            FP32,
            str(kwargs),
        )
    close(co.aggregate_loss(loss, None), openrlhf_peer.aggregate_loss(loss, None), FP32, "no mask")


# ---------------------------------------------------------------------------------------------------
# Reward-model losses
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["[N]", "[N,1]", "[N,1] with an [N] margin", "[N] with a margin"])
@pytest.mark.parametrize("cls", ["PairWiseLoss", "LogExpLoss"])
def test_reward_losses_broadcast_as_openrlhf(openrlhf_peer, backend, shape, cls):
    """Same broadcasting as OpenRLHF, including [N, 1] rewards against an [N] margin ([N, N] pairs)."""
    n = 7
    rewards_shape = (n, 1) if "[N,1]" in shape else (n,)
    chosen, rejected = torch.randn(rewards_shape) * 3, torch.randn(rewards_shape) * 3
    margin = torch.rand(n) if "margin" in shape else None
    results = []
    for module in (getattr(co, cls)(), getattr(openrlhf_peer, cls)()):
        c, r = leaf(chosen), leaf(rejected)
        loss = module(c, r, margin)
        results.append((loss, *torch.autograd.grad(loss, (c, r))))
    for ours, peer, what in zip(*results, ("loss", "d/d chosen", "d/d rejected")):
        (grad_close if what != "loss" else close)(ours, peer, FP32, what)


def test_log_exp_loss_extreme_gaps(openrlhf_peer, backend):
    """Intended difference: OpenRLHF's log(1 + e^{r − c}) overflows to inf beyond r − c ≈ 88; ours is the
    exact value (a softplus), equal to OpenRLHF's PairWiseLoss."""
    chosen, rejected = torch.tensor([0.0, -150.0, 200.0]), torch.tensor([100.0, 0.0, -5.0])
    assert bool(openrlhf_peer.LogExpLoss()(chosen, rejected).isinf())
    close(co.LogExpLoss()(chosen, rejected), openrlhf_peer.PairWiseLoss()(chosen, rejected), FP32, "loss")
    close(
        co.PairWiseLoss()(chosen, rejected), openrlhf_peer.PairWiseLoss()(chosen, rejected), FP32, "pairwise"
    )


# ---------------------------------------------------------------------------------------------------
# openrlhf.models.utils
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased_gradient", [False, True])
@pytest.mark.parametrize("with_old", [False, True], ids=["no_old", "log_probs_old"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_approx_kl(openrlhf_peer, backend, estimator, unbiased_gradient, with_old, dtype):
    """Values and gradients, with log-ratios up to ±40 (past the ±10 clamps); log_probs_old passed as
    OpenRLHF's actor passes it (keyword) and positionally (the third argument)."""
    base, log_probs = logprob_pair(B, T, dtype, spread=15.0)
    old = (log_probs.float() + torch.randn(B, T)).to(dtype) if with_old else None
    results = []
    for fn in (co.compute_approx_kl, openrlhf_peer.compute_approx_kl):
        lp = leaf(log_probs)
        value = fn(lp, base, old, estimator, unbiased_gradient)
        keyword = fn(lp, base, log_probs_old=old, kl_estimator=estimator, unbiased_gradient=unbiased_gradient)
        results.append((value, keyword, torch.autograd.grad(value.sum(), lp)[0]))
    close(results[0][0], results[1][0], FP32, "kl")
    close(results[0][1], results[1][0], FP32, "kl (keywords)")
    assert results[0][0].dtype == results[1][0].dtype == torch.float32
    grad_close(results[0][2], results[1][2], 1e-2 if dtype == torch.bfloat16 else FP32, "gradient")


def test_compute_approx_kl_unknown_estimator(openrlhf_peer):
    base, log_probs = logprob_pair(B, T, torch.float32)
    for fn in (co.compute_approx_kl, openrlhf_peer.compute_approx_kl):
        with pytest.raises(ValueError, match="k4"):
            fn(log_probs, base, kl_estimator="k4")


@pytest.mark.parametrize("kind", ["random", "holes", "left", "right", "empty_rows"])
@pytest.mark.parametrize(("kl_coef", "clip_range"), [(0.05, None), (-1.0, None), (0.1, (-0.5, 0.8))])
def test_compute_reward(openrlhf_peer, backend, kind, kl_coef, clip_range):
    """Equal at every valid position.  Intended differences: masked positions hold 0 (OpenRLHF keeps
    −kl_coef·kl there, where its actor has already made kl 0) and a row without valid tokens gets no score
    (OpenRLHF puts it in the last column, which every consumer masks out)."""
    r, kl = torch.randn(B) * 2, torch.randn(B, T) * 0.1
    action_mask = mask(B, T, kind)
    ours = co.compute_reward(r, kl_coef, kl, action_mask, clip_range)
    peer = openrlhf_peer.compute_reward(r, kl_coef, kl, action_mask=action_mask, reward_clip_range=clip_range)
    valid = action_mask.bool()
    close(ours[valid], peer[valid], FP32, "rewards at valid positions")
    assert bool((ours[~valid] == 0).all())
    # with kl = 0 at masked positions, as OpenRLHF's actor gives it, the only difference left is the empty row
    expected = openrlhf_peer.compute_reward(
        r, kl_coef, kl * action_mask, action_mask=action_mask, reward_clip_range=clip_range
    )
    empty = ~valid.any(dim=-1)
    if kind == "empty_rows":
        assert bool((expected[empty, -1] != 0).all())  # OpenRLHF's score of an empty row, in its last column
    close(ours, expected.masked_fill(empty[:, None], 0.0), FP32, "everywhere")


@pytest.mark.parametrize("dim", [None, -1, 0])
def test_masked_mean(openrlhf_peer, dim):
    x, action_mask = torch.randn(B, T), mask(B, T, "empty_rows", torch.float32)
    close(
        co.masked_mean(x, action_mask, dim),
        openrlhf_peer.masked_mean(x, action_mask, dim),
        FP32,
        "masked mean",
    )
    close(co.masked_mean(x, None, dim), openrlhf_peer.masked_mean(x, None, dim), FP32, "no mask")


def test_masked_normalize(openrlhf_peer, backend):
    """Per-row whitening.  Intended difference: ÷ sqrt(var + eps) where OpenRLHF divides by
    sqrt(max(var, eps)): at most eps/(2·var) relative (5e-9 for var = 1 here); rows of variance near eps
    differ, and a constant row is 0 in both."""
    x, action_mask = torch.randn(B, T) * 2 + 1, mask(B, T, "holes", torch.float32)
    x[3] = 4.0
    close(
        co.masked_normalize(x, action_mask),
        openrlhf_peer.masked_normalize(x, action_mask),
        1e-5,
        "normalised",
    )
    with pytest.raises(NotImplementedError, match="dim=0"):
        co.masked_normalize(x, action_mask, dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_entropy(openrlhf_peer, backend, dtype, temperature):
    """Log-probs in the logits' dtype, with the logits divided in place by the temperature (as OpenRLHF:
    its actor reads the divided logits for the entropy afterwards)."""
    logits = (torch.randn(3, 5, 41) * 3).to(dtype)
    labels = torch.randint(0, 41, (3, 5))
    ours_logits, peer_logits = logits.clone(), upcast(logits)
    ours = co.log_probs_from_logits(ours_logits, labels, temperature)
    peer = openrlhf_peer.log_probs_from_logits(peer_logits, labels, temperature)
    assert ours.dtype == dtype
    close(ours, peer, 1e-2 if dtype == torch.bfloat16 else FP32, "log probs")
    close(ours_logits, peer_logits, 1e-2 if dtype == torch.bfloat16 else 0.0, "logits divided in place")
    with torch.compiler.set_stance("force_eager"):  # OpenRLHF's @torch.compile, run as its eager body
        peer_entropy = openrlhf_peer.compute_entropy(upcast(logits))
    close(co.compute_entropy(logits), peer_entropy, 1e-2 if dtype == torch.bfloat16 else FP32, "entropy")


# ---------------------------------------------------------------------------------------------------
# RemoteExperienceMaker's advantages and returns
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "holes", "left", "right", "empty_rows", "all_masked"])
@pytest.mark.parametrize(("gamma", "lambd"), [(1.0, 1.0), (0.99, 0.95)])
def test_advantages_and_returns(openrlhf_peer, backend, kind, gamma, lambd):
    values, rewards = torch.randn(B, T), torch.randn(B, T)
    action_mask = mask(B, T, kind)
    ours = co.get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)
    peer = openrlhf_peer.get_advantages_and_returns(None, values, rewards, action_mask, gamma, lambd)
    close(ours[0], peer[0], FP32, "advantages")
    close(ours[1], peer[1], FP32, "returns")
    close(
        co.get_cumulative_returns(rewards, action_mask, gamma),
        openrlhf_peer.get_cumulative_returns(None, rewards, action_mask, gamma),
        FP32,
        "cumulative returns",
    )


# ---------------------------------------------------------------------------------------------------
# patch(): OpenRLHF's modules hand out the fused classes and functions
# ---------------------------------------------------------------------------------------------------
def test_patch_replaces_what_openrlhf_uses(openrlhf_peer, backend):
    import openrlhf.models as models

    co.patch()
    try:
        assert openrlhf_peer.loss.PolicyLoss is co.PolicyLoss and models.PolicyLoss is co.PolicyLoss
        assert openrlhf_peer.ppo_actor.PolicyLoss is co.PolicyLoss  # imported by name before patch()
        assert openrlhf_peer.ppo_actor.compute_approx_kl is co.compute_approx_kl
        assert openrlhf_peer.ppo_actor.aggregate_loss is co.aggregate_loss
        assert openrlhf_peer.maker.compute_reward is co.compute_reward
        assert openrlhf_peer.rm_trainer.PairWiseLoss is co.PairWiseLoss
        maker = openrlhf_peer.maker.RemoteExperienceMaker
        values, rewards, action_mask = torch.randn(B, T), torch.randn(B, T), mask(B, T, "right")
        ours = maker.get_advantages_and_returns(None, values, rewards, action_mask, 0.9, 0.8)
        peer = openrlhf_peer.get_advantages_and_returns(None, values, rewards, action_mask, 0.9, 0.8)
        close(ours[0], peer[0], FP32, "advantages through the patched method")
        # the actor's own call: 0.11.2's constructor arguments and five outputs
        loss_fn = openrlhf_peer.ppo_actor.PolicyLoss(
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            dual_clip=None,
            token_level_loss=True,
            policy_loss_type="ppo",
            is_correction_level="token",
            is_correction_mode="mask",
            is_correction_gating="ratio",
            is_correction_threshold=[0.5, 5.0],
        )
        old, new = logprob_pair(B, T, torch.float32)
        loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = loss_fn(
            new,
            old,
            torch.randn(B, T),
            action_mask=action_mask,
            rollout_log_probs=old + 0.1,
            dp_size=1,
            batch_num_tokens=action_mask.sum().float(),
            global_batch_size=torch.tensor(float(B)),
        )
        assert vllm_kl is not None and is_filter_ratio is not None
    finally:
        co.unpatch()
    assert openrlhf_peer.ppo_actor.PolicyLoss is openrlhf_peer.PolicyLoss
    assert (
        openrlhf_peer.maker.RemoteExperienceMaker.get_advantages_and_returns
        is openrlhf_peer.get_advantages_and_returns
    )
