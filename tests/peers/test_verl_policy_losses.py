"""verl 0.9.1's registered policy losses after ``rlhf_kernels.compat.verl.install()``: every loss fetched
through verl's own ``get_policy_loss_fn(name)`` against verl's original function (captured before
install), values, gradients and metrics, on the PyTorch path and the Triton kernels (interpreted on CPU);
verl's own ``ppo_loss`` with ``policy_loss.loss_mode`` set to the fused losses; ``unpatch()`` restoring
verl's originals.  The intended differences (docs/compat-verl.md) are asserted as such.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from peers.cases import HALF_TOL, MASK_KINDS, TOL, close, grad_close, leaf, logprob_pair, mask
from peers.placeholders import import_peer
from rlhf_kernels import _dispatch
from rlhf_kernels.compat import verl as cv
from rlhf_kernels.ops.cpu.policy_losses import clip_cov_selection

B, T = 6, 11
NAMES = tuple(name for name in cv.POLICY_LOSSES if name != "vanilla")  # vanilla: tests/peers/test_verl.py
AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
GLOBAL_BATCH_INFO = {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 9, "loss_scale_factor": 16}
# Hyperparameters that make every branch of each loss happen on small random batches: clip_ratio_c = 1.5
# truncates DPPO's ratios; clip_cov_ratio = 1 detaches every eligible token (verl's random subset is then
# all of them); kl_cov_ratio = 0.1 selects several tokens.
POLICY_LOSS = {
    "clip_cov_ratio": 1.0,
    "clip_cov_lb": 0.02,
    "clip_cov_ub": 3.0,
    "kl_cov_ratio": 0.1,
    "ppo_kl_coef": 0.5,
    "dro_beta": 0.3,
}
VERL_KEYS = {
    "gpg": set(),
    "clip_cov": {"actor/pg_clipfrac", "actor/ppo_kl"},
    "kl_cov": {"actor/ppo_kl"},
    "dro": {"actor/ppo_kl"},
}
ALL_KEYS = {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}


def _policy_loss_config(verl_peer, **fields):
    """verl's PolicyLossConfig (its module is imported by the verl_peer fixture)."""
    return import_peer(verl_peer.ActorConfig.__module__).PolicyLossConfig(**fields)


def _config(verl_peer, mode="token-mean", global_batch_info=None, policy_loss=None, **fields):
    section = _policy_loss_config(verl_peer, **(POLICY_LOSS if policy_loss is None else policy_loss))
    fields = {
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 1.5,
        **fields,
    }
    return verl_peer.ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        loss_agg_mode=mode,
        global_batch_info=dict(global_batch_info or {}),
        policy_loss=section,
        **fields,
    )


def _run(fn, old, new, advantages, response_mask, mode, config, weights):
    new = leaf(new)
    loss, metrics = fn(old, new, advantages, response_mask, mode, config, weights)
    (grad,) = torch.autograd.grad(loss, new)
    return loss, grad, metrics


def _compare(ours, peer, name, tol, grad_tol=None, what=""):
    close(ours[0], peer[0], tol, f"{name} pg_loss {what}")
    grad_close(ours[1], peer[1], tol if grad_tol is None else grad_tol, f"{name} gradient {what}")
    assert ours[2].keys() == peer[2].keys() == VERL_KEYS.get(name, ALL_KEYS), name
    for key, value in ours[2].items():
        # intended difference: 0-dim fp32 tensors (no host sync) where verl calls .item()
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.float32, key
        assert isinstance(peer[2][key], float), key
        close(value, peer[2][key], tol, f"{name} {key} {what}")


def _padded_mask() -> torch.Tensor:
    """Left padding, holes, an empty row and a one-token row in one batch."""
    m = mask(B, T, "left") & (torch.rand(B, T) < 0.75)
    m[:, -1] = True
    m[1] = False
    m[3] = False
    m[3, 5] = True
    return m


@pytest.fixture
def installed(verl_peer):
    cv.install()
    yield verl_peer.core.get_policy_loss_fn
    cv.unpatch()


# ---------------------------------------------------------------------------------------------------
# Fetched through verl's registry, against verl's originals
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fetched_loss_matches_verl(verl_peer, installed, name):
    """PyTorch path: every mask layout (holes, left/right padding, empty rows, all masked) × every
    loss_agg_mode × with and without rollout_is_weights × with and without global_batch_info.

    All-masked batches: the shim passes verl's own denominators, so it reproduces verl's NaN (0/0 for
    token-mean and the sequence modes without global_batch_info) and gradient 0; the library functions
    alone give 0 (docs/policy_losses.md)."""
    fetched = installed(name)
    assert fetched is cv.POLICY_LOSSES[name] and fetched is not verl_peer.policy_losses[name]
    for kind, mode, weighted, global_info in itertools.product(
        MASK_KINDS, AGG_MODES, (False, True), (False, True)
    ):
        old, new = logprob_pair(B, T, torch.float32)
        advantages, response_mask = torch.randn(B, T), mask(B, T, kind)
        weights = torch.rand(B, T) * 2 if weighted else None
        config = _config(verl_peer, mode, GLOBAL_BATCH_INFO if global_info else None)
        args = (old, new, advantages, response_mask, mode, config, weights)
        ours, peer = _run(fetched, *args), _run(verl_peer.policy_losses[name], *args)
        _compare(ours, peer, name, TOL[torch.float32], what=f"({kind}, {mode}, {weighted=}, {global_info=})")
        if kind == "all_masked" and name != "geo_mean":  # geo_mean: the mean of B zeros
            divides_by_zero = not global_info and (mode != "token-sum" or name == "sapo")
            assert bool(ours[0].isnan()) == bool(peer[0].isnan()) == divides_by_zero


@pytest.mark.parametrize("name", NAMES)
def test_fetched_loss_matches_verl_on_triton(verl_peer, installed, name):
    """The Triton kernels (interpreted on CPU): one batch with left padding, holes, an empty and a
    one-token row, rollout weights and global_batch_info; each loss gets another loss_agg_mode."""
    mode = AGG_MODES[NAMES.index(name) % len(AGG_MODES)]
    old, new = logprob_pair(B, T, torch.float32)
    advantages, weights = torch.randn(B, T), torch.rand(B, T) * 2
    config = _config(verl_peer, mode, GLOBAL_BATCH_INFO)
    args = (old, new, advantages, _padded_mask(), mode, config, weights)
    with _dispatch.use_backend("triton"):
        ours = _run(installed(name), *args)
    _compare(ours, _run(verl_peer.policy_losses[name], *args), name, TOL[torch.float32])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_fetched_loss_dtypes(verl_peer, installed, name, dtype):
    """fp64 matches verl in fp64.  bf16 (intended difference): the loss is fp32, computed in fp32, equal
    to verl on the same values in fp32; the gradient keeps the input dtype."""
    mode = "seq-mean-token-mean"
    old, new = logprob_pair(B, T, dtype)
    advantages = torch.randn(B, T).to(dtype)
    response_mask = _padded_mask()
    if dtype == torch.float64:  # with a bool mask verl's geo_mean adds its 1e-8 to an fp32 token count
        response_mask = response_mask.to(dtype)
    config = _config(verl_peer, mode)
    ours = _run(installed(name), old, new, advantages, response_mask, mode, config, None)
    assert ours[1].dtype == dtype
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    upcast = [t.double() if dtype == torch.float64 else t.float() for t in (old, new, advantages)]
    peer = _run(verl_peer.policy_losses[name], *upcast, response_mask, mode, config, None)
    _compare(ours, peer, name, TOL[dtype], 1e-2 if dtype == torch.bfloat16 else None)
    if dtype == torch.bfloat16 and name in ("gpg", "dro", "geo_mean", "sapo"):
        # losses without a data-dependent token choice: also within verl's own bf16 rounding
        native = _run(verl_peer.policy_losses[name], old, new, advantages, response_mask, mode, config, None)
        close(ours[0], native[0], HALF_TOL[dtype], f"{name} vs verl's bf16 arithmetic")


# ---------------------------------------------------------------------------------------------------
# clip_cov / kl_cov token selection, config defaults and errors
# ---------------------------------------------------------------------------------------------------
def test_clip_cov_selection(verl_peer, installed, backend, monkeypatch):
    """Intended difference: verl detaches a random subset (torch.randperm) of the eligible tokens; ours
    the first ones in row-major order.  (1) Against verl's own random draw: the same number of tokens
    (pg_clipfrac) and ppo_kl, and our tokens are eligible ones by verl's definition (recomputed here in
    float64).  (2) With randperm fixed to the identity verl picks the same tokens, and the two agree in
    loss, gradient and metrics."""
    rows, cols, ratio, lower, upper = 8, 24, 0.05, 0.0, 5.0
    old, new = logprob_pair(rows, cols, torch.float32)
    advantages, response_mask = torch.randn(rows, cols), mask(rows, cols, "holes")
    section = dict(POLICY_LOSS, clip_cov_ratio=ratio, clip_cov_lb=lower, clip_cov_ub=upper)
    config = _config(verl_peer, "token-mean", policy_loss=section)
    args = (old, new, advantages, response_mask, "token-mean", config, None)
    ours = _run(installed("clip_cov"), *args)
    random_draw = _run(verl_peer.policy_losses["clip_cov"], *args)
    assert ours[2].keys() == random_draw[2].keys()
    for key in random_draw[2]:
        close(ours[2][key], random_draw[2][key], TOL[torch.float32], key)

    selected = clip_cov_selection(new, old, advantages, response_mask, 0.2, 0.28, ratio, lower, upper).bool()
    m = response_mask.double()
    adv, lp = advantages.double(), new.double()
    cov = (adv - (adv * m).sum() / m.sum()) * (lp - (lp * m).sum() / m.sum())
    r = torch.exp(lp - old.double())
    clipped = -adv * r.clamp(1 - 0.2, 1 + 0.28) > -adv * r
    eligible = response_mask & ~clipped & (cov > lower) & (cov < upper)
    budget = min(max(int(ratio * int(response_mask.sum())), 1), int(eligible.sum()))
    assert int(eligible.sum()) > budget >= 2  # a real choice among the eligible tokens
    assert bool((selected <= eligible).all()) and int(selected.sum()) == budget
    close(ours[2]["actor/pg_clipfrac"], budget / int(response_mask.sum()), TOL[torch.float32], "pg_clipfrac")

    arange = torch.arange
    monkeypatch.setattr(torch, "randperm", lambda n, **kwargs: arange(n, **kwargs))
    _compare(ours, _run(verl_peer.policy_losses["clip_cov"], *args), "clip_cov", TOL[torch.float32])


def test_kl_cov_selection_and_default_coefficient(verl_peer, installed, backend):
    """kl_cov picks the same tokens as verl's host-side top-k (continuous covariances: no ties), with
    the smallest ratio (one token) and with ppo_kl_coef=None (verl's fallback 1.0, not the config's 0.1)."""
    old, new = logprob_pair(B, T, torch.float32)
    advantages, response_mask = torch.randn(B, T), _padded_mask()
    for section in (dict(POLICY_LOSS, kl_cov_ratio=0.0002), dict(POLICY_LOSS, ppo_kl_coef=None)):
        config = _config(verl_peer, "token-mean", policy_loss=section)
        args = (old, new, advantages, response_mask, "token-mean", config, None)
        _compare(
            _run(installed("kl_cov"), *args), _run(verl_peer.policy_losses["kl_cov"], *args), "kl_cov", 2e-5
        )


def test_default_config(verl_peer, installed):
    """An ActorConfig with verl's defaults (clip_ratio_c = 3: DPPO truncates at 3, not the function's 20;
    PolicyLossConfig's ratios and coefficients), DRO's required beta aside."""
    old, new = logprob_pair(B, T, torch.float32, spread=1.5)
    advantages, response_mask = torch.randn(B, T) * 2, _padded_mask()
    config = verl_peer.ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=_policy_loss_config(verl_peer, dro_beta=0.1),
    )
    assert config.clip_ratio_c == 3.0
    for name in NAMES:
        if name == "clip_cov":
            continue  # one token of ~40 eligible ones drawn at random: see test_clip_cov_selection
        args = (old, new, advantages, response_mask, config.loss_agg_mode, config, None)
        _compare(
            _run(installed(name), *args), _run(verl_peer.policy_losses[name], *args), name, TOL[torch.float32]
        )


def test_errors(verl_peer, installed):
    old, new = logprob_pair(B, T, torch.float32)
    args = (old, new, torch.randn(B, T), mask(B, T, "random"), "token-mean")
    for name in NAMES:
        with pytest.raises(ValueError, match="config"):
            installed(name)(*args, None)
    no_beta = _config(verl_peer, policy_loss=dict(POLICY_LOSS, dro_beta=None))
    for fn in (installed("dro"), verl_peer.policy_losses["dro"]):
        with pytest.raises(ValueError, match="dro_beta"):
            fn(*args, no_beta)


# ---------------------------------------------------------------------------------------------------
# install() / unpatch(), and verl's own actor loss
# ---------------------------------------------------------------------------------------------------
def test_install_and_unpatch_restore_verl(verl_peer):
    core = verl_peer.core
    replaced = cv.install()
    try:
        for name, fn in cv.POLICY_LOSSES.items():
            assert core.get_policy_loss_fn(name) is fn and f"registry[{name!r}]" in replaced
            assert getattr(core, fn.__name__) is fn
        assert core.get_policy_loss_fn("bypass_mode") is verl_peer.policy_losses["bypass_mode"]
    finally:
        cv.unpatch()
    assert core.POLICY_LOSS_REGISTRY == verl_peer.policy_losses
    for name, fn in cv.POLICY_LOSSES.items():
        assert core.get_policy_loss_fn(name) is verl_peer.policy_losses[name]
        assert getattr(core, fn.__name__) is verl_peer.policy_losses[name]


@pytest.mark.parametrize("loss_mode", ["gspo", "dppo_tv", "kl_cov", "geo_mean"])
def test_verl_ppo_loss_with_fused_loss_modes(verl_peer, installed, loss_mode):
    """verl's own actor loss (verl.workers.utils.losses.ppo_loss, unmodified) with policy_loss.loss_mode
    set to a fused loss: the same loss and gradient as with verl's own functions."""
    from verl.utils import tensordict_utils

    prompt_len = 3
    response_mask = mask(B, T, "right")
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
    flat_log_probs = -torch.rand(int((prompt_len + response_mask.sum(-1)).sum())) * 3
    flat_entropy = torch.rand(flat_log_probs.shape[0])
    results = []
    for fused in (True, False):
        if not fused:
            cv.unpatch()
        section = dict(POLICY_LOSS, loss_mode=loss_mode)
        config = _config(
            verl_peer,
            "seq-mean-token-mean",
            None,
            section,
            use_kl_loss=True,
            kl_loss_type="low_var_kl+",
            entropy_coeff=0.01,
        )
        lp = leaf(flat_log_probs)
        try:
            loss, metrics = verl_peer.losses.ppo_loss(
                config, {"log_probs": lp, "entropy": flat_entropy}, data
            )
        finally:
            if not fused:
                cv.install()
        results.append((loss, torch.autograd.grad(loss, lp)[0], metrics))
    close(results[0][0], results[1][0], TOL[torch.float32], "ppo_loss")
    grad_close(results[0][1], results[1][1], TOL[torch.float32], "gradient")
    assert results[0][2].keys() == results[1][2].keys()
