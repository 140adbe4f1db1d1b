"""rlhf_kernels.compat.verl against the real verl 0.9.1: values and gradients, on the PyTorch path and the
Triton kernels (interpreted on CPU), for every mask layout, with and without verl's global-batch
arguments and rollout importance weights.  Intended differences are asserted as such (docs/compat-verl.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peers.cases import HALF, HALF_TOL, MASK_KINDS, TOL, close, grad_close, leaf, logprob_pair, mask, upcast
from rlhf_kernels.compat import verl as cv

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
B, T = 6, 11
GLOBAL_BATCH_INFO = {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 9, "loss_scale_factor": 16}


def _config(verl_peer, loss_agg_mode="token-mean", global_batch_info=None, **clips):
    clips = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, **clips}
    return verl_peer.ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        loss_agg_mode=loss_agg_mode,
        global_batch_info=dict(global_batch_info or {}),
        **clips,
    )


def _run_policy_loss(fn, old, new, advantages, response_mask, mode, config, weights):
    new = leaf(new)
    loss, metrics = fn(old, new, advantages, response_mask, mode, config, weights)
    (grad,) = torch.autograd.grad(loss, new, allow_unused=False)
    return loss, grad, {key: float(value) for key, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# The registered "vanilla" policy loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "rollout_is_weights"])
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global_batch_info"])
def test_policy_loss_vanilla(verl_peer, backend, mode, kind, weighted, global_info):
    old, new = logprob_pair(B, T, torch.float32)
    advantages = torch.randn(B, T)
    response_mask = mask(B, T, kind)
    weights = torch.rand(B, T) * 2 if weighted else None
    config = _config(verl_peer, mode, GLOBAL_BATCH_INFO if global_info else None)
    ours = _run_policy_loss(
        cv.compute_policy_loss_vanilla, old, new, advantages, response_mask, mode, config, weights
    )
    peer = _run_policy_loss(
        verl_peer.original.compute_policy_loss_vanilla,
        old,
        new,
        advantages,
        response_mask,
        mode,
        config,
        weights,
    )
    close(ours[0], peer[0], TOL[torch.float32], "pg_loss")
    grad_close(ours[1], peer[1], TOL[torch.float32], "d pg_loss / d log_prob")
    assert ours[2].keys() == peer[2].keys()
    for key in peer[2]:
        close(ours[2][key], peer[2][key], TOL[torch.float32], key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_vanilla_dtypes(verl_peer, backend, dtype, mode):
    """fp64 matches verl in fp64; half inputs match verl on the same values in fp32 (the fused loss
    computes in fp32) and differ from verl's half-precision arithmetic by its rounding only."""
    old, new = logprob_pair(B, T, dtype)
    advantages = torch.randn(B, T).to(dtype)
    response_mask = mask(B, T, "holes")
    config = _config(verl_peer, mode)
    fn = verl_peer.original.compute_policy_loss_vanilla
    ours = _run_policy_loss(
        cv.compute_policy_loss_vanilla, old, new, advantages, response_mask, mode, config, None
    )
    upcast_peer = _run_policy_loss(
        fn, upcast(old), upcast(new), upcast(advantages), response_mask, mode, config, None
    )
    close(ours[0], upcast_peer[0], TOL[dtype], "pg_loss vs verl on the upcast values")
    assert ours[1].dtype == dtype
    grad_close(ours[1], upcast_peer[1], 1e-2 if dtype in HALF else TOL[dtype], "gradient")
    if dtype in HALF:
        native_peer = _run_policy_loss(fn, old, new, advantages, response_mask, mode, config, None)
        assert (
            ours[0].dtype == torch.float32
        )  # the intended difference: verl keeps (part of) its arithmetic in half
        close(ours[0], native_peer[0], HALF_TOL[dtype], "pg_loss vs verl's half-precision arithmetic")


def test_policy_loss_vanilla_extreme_ratios(verl_peer, backend):
    """Log-ratios far beyond verl's ±20 clamp, advantages of both signs (dual clip)."""
    old, new = logprob_pair(B, T, torch.float32, spread=40.0)
    advantages = torch.randn(B, T) * 5
    config = _config(verl_peer, "token-mean", clip_ratio_c=2.5)
    response_mask = mask(B, T, "random")
    ours = _run_policy_loss(
        cv.compute_policy_loss_vanilla, old, new, advantages, response_mask, "token-mean", config, None
    )
    peer = _run_policy_loss(
        verl_peer.original.compute_policy_loss_vanilla,
        old,
        new,
        advantages,
        response_mask,
        "token-mean",
        config,
        None,
    )
    close(ours[0], peer[0], TOL[torch.float32], "pg_loss")
    grad_close(ours[1], peer[1], TOL[torch.float32], "gradient")
    for key in peer[2]:
        close(ours[2][key], peer[2][key], TOL[torch.float32], key)


def test_policy_loss_vanilla_errors(verl_peer):
    old, new = logprob_pair(B, T, torch.float32)
    with pytest.raises(ValueError, match="config"):
        cv.compute_policy_loss_vanilla(old, new, torch.randn(B, T), mask(B, T, "random"), "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        cv.compute_policy_loss_vanilla(
            old,
            new,
            torch.randn(B, T),
            mask(B, T, "random"),
            "token-mean",
            _config(verl_peer, clip_ratio_c=1.0),
        )


@pytest.mark.filterwarnings(
    "ignore:Warning. Function 'verl.trainer.ppo.core_algos.compute_policy_loss':FutureWarning"
)
@pytest.mark.parametrize("kind", ["random", "all_masked"])
def test_deprecated_compute_policy_loss(verl_peer, backend, kind):
    old, new = logprob_pair(B, T, torch.float32)
    advantages, response_mask = torch.randn(B, T), mask(B, T, kind)
    results = []
    for fn in (cv.compute_policy_loss, verl_peer.original.compute_policy_loss):
        lp = leaf(new)
        outputs = fn(old, lp, advantages, response_mask, cliprange=0.2, cliprange_high=0.3)
        results.append((*outputs, torch.autograd.grad(outputs[0], lp)[0]))
    for ours, peer, what in zip(*results, ("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "grad")):
        (grad_close if what == "grad" else close)(ours, peer, TOL[torch.float32], what)


# ---------------------------------------------------------------------------------------------------
# agg_loss, value loss, entropy loss, KL
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global_batch_info"])
def test_agg_loss(verl_peer, backend, mode, kind, global_info):
    loss_mat = torch.randn(B, T) * 3
    response_mask = mask(B, T, kind)
    info = GLOBAL_BATCH_INFO if global_info else {}
    results = []
    for fn in (cv.agg_loss, verl_peer.original.agg_loss):
        x = leaf(loss_mat)
        loss = fn(x, response_mask, mode, **info)
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    close(results[0][0], results[1][0], TOL[torch.float32], "loss")
    grad_close(results[0][1], results[1][1], TOL[torch.float32], "gradient")


def test_agg_loss_float_weights_and_nan_padding(verl_peer, backend):
    """Non-0/1 weights weight the sums as in verl.  NaN at masked positions: verl's token modes zero them
    (torch.where), its sequence modes multiply them by 0 and return NaN; ours never reads them
    (intended), so it equals verl on the same loss with 0 there."""
    loss_mat = torch.randn(B, T)
    weights = mask(B, T, "right", torch.float32) * (0.5 + torch.rand(B, T))
    padded = loss_mat.masked_fill(weights == 0, float("nan"))
    for mode in AGG_MODES:
        expected = verl_peer.original.agg_loss(loss_mat.masked_fill(weights == 0, 0.0), weights, mode)
        close(cv.agg_loss(loss_mat, weights, mode), expected, TOL[torch.float32], mode)
        close(cv.agg_loss(padded, weights, mode), expected, TOL[torch.float32], f"{mode}, NaN padding")
        assert bool(verl_peer.original.agg_loss(padded, weights, mode).isnan()) == mode.startswith("seq-mean")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ["random", "left", "empty_rows", "all_masked"])
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global_batch_info"])
def test_value_loss(verl_peer, backend, mode, kind, global_info):
    values = torch.randn(B, T)
    vpreds = values + torch.randn(B, T) * 0.5
    returns = torch.randn(B, T)
    response_mask = mask(B, T, kind)
    info = GLOBAL_BATCH_INFO if global_info else {}
    results = []
    for fn in (cv.compute_value_loss, verl_peer.original.compute_value_loss):
        v = leaf(vpreds)
        loss, clipfrac = fn(v, returns, values, response_mask, 0.2, mode, **info)
        results.append((loss, clipfrac, torch.autograd.grad(loss, v)[0]))
    close(results[0][0], results[1][0], TOL[torch.float32], "vf_loss")
    close(results[0][1], results[1][1], TOL[torch.float32], "vf_clipfrac")
    grad_close(results[0][2], results[1][2], TOL[torch.float32], "gradient")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_entropy_loss(verl_peer, backend, mode):
    logits = torch.randn(B, T, 37) * 2
    response_mask = mask(B, T, "holes")
    results = []
    for fn in (cv.compute_entropy_loss, verl_peer.original.compute_entropy_loss):
        x = leaf(logits)
        loss = fn(x, response_mask, mode)
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    close(results[0][0], results[1][0], TOL[torch.float32], "entropy loss")
    grad_close(results[0][1], results[1][1], TOL[torch.float32], "gradient")


KL_NAMES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


@pytest.mark.parametrize("name", KL_NAMES + tuple(f"{n}+" for n in KL_NAMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty(verl_peer, backend, name, dtype):
    """Values and gradients of both inputs, with log-ratios up to ±30 (past k3's ±20 clamp)."""
    ref, logprob = logprob_pair(B, T, dtype, spread=12.0)
    results = []
    for fn in (cv.kl_penalty, verl_peer.original.kl_penalty):
        lp, rp = leaf(logprob), leaf(ref)
        value = fn(lp, rp, name)
        results.append((value, *torch.autograd.grad(value.sum(), (lp, rp))))
    close(results[0][0], results[1][0], TOL[dtype], "kl")
    grad_close(results[0][1], results[1][1], TOL[dtype], "d/d logprob")
    grad_close(results[0][2], results[1][2], TOL[dtype], "d/d ref_logprob")


@pytest.mark.parametrize("name", ["full", "k4", "full+"])
def test_kl_penalty_not_implemented(verl_peer, name):
    ref, logprob = logprob_pair(B, T, torch.float32)
    for fn in (cv.kl_penalty, verl_peer.original.kl_penalty):
        with pytest.raises(NotImplementedError):
            fn(logprob, ref, name)


def test_kl_penalty_forward(verl_peer, backend):
    ref, logprob = logprob_pair(B, T, torch.float32, spread=3.0)
    for name in KL_NAMES:
        close(
            cv.kl_penalty_forward(logprob, ref, name),
            verl_peer.original.kl_penalty_forward(logprob, ref, name),
            TOL[torch.float32],
            name,
        )


# ---------------------------------------------------------------------------------------------------
# verl.utils.torch_functional
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_logprobs_and_entropy(verl_peer, backend, dtype):
    """Log-probs are fp32 (verl's flash-attn path, the one it takes on GPUs; on this CPU verl runs its
    row-wise fallback in the logits' dtype): equal to verl on the same values in fp32, within verl's own
    rounding of half-precision logits.  Entropies keep verl's dtypes."""
    logits = (torch.randn(4, 7, 53) * 3).to(dtype)
    labels = torch.randint(0, 53, (4, 7))
    f = verl_peer.original
    x = leaf(logits)
    ours = cv.logprobs_from_logits(x, labels, inplace_backward=False)
    (grad,) = torch.autograd.grad(ours.sum(), x)
    y = leaf(upcast(logits))
    peer = f.logprobs_from_logits(y, labels)
    (peer_grad,) = torch.autograd.grad(peer.sum(), y)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(ours, peer, TOL[dtype], "logprobs vs verl on the upcast logits")
    grad_close(grad, peer_grad, 1e-2 if dtype in HALF else TOL[dtype], "d logprobs / d logits")
    if dtype in HALF:
        close(
            ours, f.logprobs_from_logits(logits, labels), HALF_TOL[dtype], "vs verl's half-precision logprobs"
        )

    entropy = cv.entropy_from_logits(logits)
    assert entropy.dtype == f.entropy_from_logits(logits).dtype
    close(entropy, f.entropy_from_logits(upcast(logits)), 1e-2 if dtype in HALF else TOL[dtype], "entropy")
    chunked = cv.entropy_from_logits_with_chunking(logits.reshape(-1, 53), chunk_size=5)
    peer_chunked = f.entropy_from_logits_with_chunking(logits.reshape(-1, 53), chunk_size=5)
    assert chunked.dtype == peer_chunked.dtype == torch.float32
    close(chunked, peer_chunked, TOL[torch.float32], "chunked entropy")


def test_logprobs_inplace_backward(verl_peer, backend):
    """inplace_backward=True (verl's default) writes the gradient over the logits, with verl's values."""
    logits = torch.randn(5, 31)
    labels = torch.randint(0, 31, (5,))
    x = leaf(logits)
    cv.logprobs_from_logits(x, labels).sum().backward()
    y = leaf(logits)
    verl_peer.original.logprobs_from_logits(y, labels).sum().backward()
    grad_close(x.grad, y.grad, TOL[torch.float32], "gradient")


def test_entropy_of_minus_inf_logits(verl_peer, backend):
    """Intended difference: a vocabulary entry at −inf (a banned token) makes verl's entropy NaN
    (0·(−inf)); ours is the entropy over the remaining entries, and so are its log-probs."""
    logits = torch.randn(4, 23)
    logits[:, :5] = float("-inf")
    assert bool(verl_peer.original.entropy_from_logits(logits).isnan().all())
    close(
        cv.entropy_from_logits(logits),
        verl_peer.original.entropy_from_logits(logits[:, 5:]),
        TOL[torch.float32],
        "entropy over the finite entries",
    )


# ---------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "holes", "left", "right", "empty_rows"])
@pytest.mark.parametrize("gamma_lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae(verl_peer, backend, kind, gamma_lam):
    """Returns everywhere and whitened advantages at valid positions match verl; outside the mask verl
    leaves (x − μ)/σ of its carried values and ours holds 0 (intended: no verl loss reads them)."""
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    response_mask = mask(B, T, kind, torch.float32)
    gamma, lam = gamma_lam
    ours = cv.compute_gae_advantage_return(rewards, values, response_mask, gamma, lam)
    peer = verl_peer.original.compute_gae_advantage_return(
        rewards, values, response_mask, torch.tensor(gamma), lam
    )
    valid = response_mask.bool()
    close(ours[1], peer[1], TOL[torch.float32], "returns")
    close(ours[0][valid], peer[0][valid], 1e-4, "advantages at valid positions")
    assert bool((ours[0][~valid] == 0).all())


def test_gae_fewer_than_two_tokens(verl_peer, backend):
    """Intended difference: verl raises (a host read of the mask sum every call); ours whitens to 0."""
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    one_token = torch.zeros(B, T)
    one_token[2, 4] = 1.0
    for response_mask in (torch.zeros(B, T), one_token):
        with pytest.raises(ValueError):
            verl_peer.original.compute_gae_advantage_return(rewards, values, response_mask, 1.0, 1.0)
        advantages, returns = cv.compute_gae_advantage_return(rewards, values, response_mask, 1.0, 1.0)
        assert bool((advantages == 0).all()) and bool(returns.isfinite().all())


def _index(layout: str, batch: int) -> np.ndarray:
    """verl's uid arrays (strings): groups in order, shuffled, of uneven sizes, with lone samples."""
    if layout == "equal":
        groups = np.repeat(np.arange(batch // 4), 4)
    elif layout == "shuffled":
        groups = np.random.default_rng(1).permutation(np.repeat(np.arange(batch // 4), 4))
    elif layout == "ragged":
        groups = np.random.default_rng(2).permutation([0] * 5 + [1] * 3 + [2] * 2 + [3] * 6)[:batch]
    else:  # singletons
        groups = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5, 6, 6, 7, 8])[:batch]
    return np.array([f"uid-{g}" for g in groups], dtype=object)


GROUP_ESTIMATORS = [
    ("grpo", True),
    ("grpo", False),
    ("grpo_vectorized", True),
    ("grpo_vectorized", False),
    ("rloo", None),
    ("rloo_vectorized", None),
]


@pytest.mark.parametrize(("name", "norm"), GROUP_ESTIMATORS)
@pytest.mark.parametrize("layout", ["equal", "shuffled", "ragged", "singletons"])
def test_group_estimators(verl_peer, name, layout, norm):
    batch = 16
    rewards = torch.randn(batch, T) * mask(batch, T, "right", torch.float32)
    response_mask = mask(batch, T, "holes")
    index = _index(layout, batch)
    kwargs = {} if norm is None else {"norm_adv_by_std_in_grpo": norm}
    ours = cv.ADVANTAGE_ESTIMATORS[name](rewards, response_mask, index, **kwargs)
    peer = verl_peer.estimators[name](
        token_level_rewards=rewards.clone(), response_mask=response_mask, index=index, **kwargs
    )
    close(ours[0], peer[0], 1e-5, "advantages")
    close(ours[1], peer[1], 1e-5, "returns")


# ---------------------------------------------------------------------------------------------------
# install(): verl's own registries and modules hand out the fused functions
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def installed(verl_peer):
    replaced = cv.install()
    yield replaced
    cv.unpatch()


def test_install_registers_under_verl_names(verl_peer, installed, backend):
    core, functional = verl_peer.core, verl_peer.functional
    assert core.get_policy_loss_fn("vanilla") is cv.compute_policy_loss_vanilla
    for name, fn in cv.ADVANTAGE_ESTIMATORS.items():
        assert core.get_adv_estimator_fn(name) is fn
    for name, fn in cv.POLICY_LOSSES.items():  # every loss rlhf_kernels implements
        assert core.get_policy_loss_fn(name) is fn
    # not implemented here: verl's own stays registered
    assert core.get_policy_loss_fn("bypass_mode") is verl_peer.policy_losses["bypass_mode"]
    # every advantage estimator of verl 0.9.1 is ours (parity: tests/peers/test_verl_estimators.py)
    assert set(cv.ADVANTAGE_ESTIMATORS) == set(verl_peer.estimators)
    # the names verl's workers imported before install() see the fused functions too
    assert verl_peer.losses.agg_loss is cv.agg_loss and verl_peer.losses.kl_penalty is cv.kl_penalty
    assert verl_peer.losses.compute_value_loss is cv.compute_value_loss
    assert functional.entropy_from_logits is cv.entropy_from_logits
    assert "registry['vanilla']" in installed

    old, new = logprob_pair(B, T, torch.float32)
    advantages, response_mask, weights = torch.randn(B, T), mask(B, T, "left"), torch.rand(B, T)
    mode = "seq-mean-token-sum-norm"
    config = _config(verl_peer, mode, GLOBAL_BATCH_INFO)
    fetched = _run_policy_loss(
        core.get_policy_loss_fn("vanilla"), old, new, advantages, response_mask, mode, config, weights
    )
    original = _run_policy_loss(
        verl_peer.policy_losses["vanilla"], old, new, advantages, response_mask, mode, config, weights
    )
    close(fetched[0], original[0], TOL[torch.float32], "pg_loss")
    grad_close(fetched[1], original[1], TOL[torch.float32], "gradient")
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    gae = core.get_adv_estimator_fn("gae")(rewards, values, response_mask.float(), 0.99, 0.95)
    close(
        gae[1],
        verl_peer.estimators["gae"](rewards, values, response_mask.float(), 0.99, 0.95)[1],
        1e-5,
        "returns",
    )


def test_verl_worker_loss_runs_on_installed_functions(verl_peer, installed):
    """verl's own actor loss (verl.workers.utils.losses.ppo_loss, unmodified: policy loss from the
    registry, entropy bonus and KL loss through agg_loss / kl_penalty) gives the same loss and gradient
    with the fused functions installed as with verl's own."""
    from verl.utils import tensordict_utils

    prompt_len = 3
    response_mask = mask(B, T, "right")
    response_lens = response_mask.sum(-1)
    attention_mask = torch.cat([torch.ones(B, prompt_len, dtype=torch.bool), response_mask], dim=1)
    data = tensordict_utils.get_tensordict(
        {
            "prompts": torch.randint(0, 50, (B, prompt_len)),
            "responses": torch.randint(0, 50, (B, T)),
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "old_log_probs": logprob_pair(B, T, torch.float32)[0],
            "advantages": torch.randn(B, T),
            "ref_log_prob": logprob_pair(B, T, torch.float32)[0],
        },
        {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None},
    )
    flat_log_probs = -torch.rand(int((prompt_len + response_lens).sum())) * 3
    flat_entropy = torch.rand(flat_log_probs.shape[0])
    results = []
    for fused in (True, False):
        if not fused:
            cv.unpatch()
        config = _config(
            verl_peer, "token-mean", None, use_kl_loss=True, kl_loss_type="low_var_kl+", entropy_coeff=0.01
        )
        lp = leaf(flat_log_probs)
        try:
            loss, _ = verl_peer.losses.ppo_loss(config, {"log_probs": lp, "entropy": flat_entropy}, data)
        finally:
            if not fused:
                cv.install()
        results.append((loss, torch.autograd.grad(loss, lp)[0]))
    close(results[0][0], results[1][0], TOL[torch.float32], "ppo_loss")
    grad_close(results[0][1], results[1][1], TOL[torch.float32], "gradient")
