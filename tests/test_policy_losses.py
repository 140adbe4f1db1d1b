"""The policy losses of ops/policy_losses.py against the float64 oracle and the real verl 0.9.1, on the
PyTorch path and the Triton kernels (interpreted on CPU), plus their launchers and argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_grad_close
from peers.cases import close, grad_close
from peers.cases import mask as peer_mask
from peers.placeholders import import_peer

from rlhf_kernels import _dispatch
from rlhf_kernels.ops import policy_losses as pl
from rlhf_kernels.ops.aggregation import LOSS_AGG_MODES
from rlhf_kernels.ops.cpu.policy_losses import TOKEN_VARIANTS, clip_cov_selection, kl_cov_selection
from rlhf_kernels.reference import policy_losses as ref

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None


@pytest.fixture(params=["torch", "cpp", "triton"])
def backend(request):
    """Every test once per backend: the PyTorch path, the C++ kernel (csrc/policy_losses.cpp, the default on
    CPU) and the Triton kernels (interpreted on CPU)."""
    with _dispatch.use_backend(request.param):
        yield request.param

NAMES = pl.WEIGHTED_POLICY_LOSSES  # bypass_mode (no is_weights): tests/test_rollout_correction*.py
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float64: 1e-12}
# Arguments that make every branch of each loss happen on small random batches.
KWARGS = {
    "vanilla": {"clip_high": 0.28},
    "dro": {"beta": 0.3},
    "cispo": {"clip_high": 0.28},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "dppo_tv": {"clip_low": 0.05, "clip_high": 0.08, "truncation": 1.3},
    "dppo_kl": {"clip_low": 0.01, "clip_high": 0.02, "truncation": 1.3},
    "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": 0.02, "clip_cov_ub": 3.0},
    "kl_cov": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5},
    "gspo": {"clip_low": 0.05, "clip_high": 0.08},
    "geo_mean": {"clip_low": 0.1},
}
CASES = [
    ((1, 1), "token-mean"),
    ((4, 37), "seq-mean-token-mean"),
    ((3, 130), "token-sum"),
    ((5, 9), "seq-mean-token-sum-norm"),
    ((2, 33), "seq-mean-token-sum"),
]


def _inputs(shape, dtype=torch.float32, spread=0.4, device="cpu"):
    lp = -torch.rand(shape) * 3
    old = lp + torch.randn(shape) * spread
    adv = torch.randn(shape) * 2
    mask = torch.rand(shape) < 0.7
    if shape[0] > 1:
        mask[1] = False
    weights = torch.rand(shape) * 2
    return tuple(t.to(dtype).to(device) for t in (lp, old, adv, weights)) + (mask.to(device),)


def _run(fn, lp, old, adv, mask, **kwargs):
    x = lp.detach().clone().requires_grad_()
    loss, metrics = fn(x, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics


def _check_against_oracle(name, lp, old, adv, mask, **kwargs):
    dtype = lp.dtype
    loss, grad, metrics = _run(pl.POLICY_LOSSES[name], lp, old, adv, mask, **kwargs)
    cpu_kwargs = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    want, want_grad, want_metrics = _run(
        ref.POLICY_LOSSES[name], lp.cpu().double(), old.cpu(), adv.cpu(), mask.cpu(), **cpu_kwargs
    )
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_close(loss, want, FWD_TOL[dtype], f"{name} loss")
    assert_grad_close(grad, want_grad, GRAD_TOL[dtype], f"{name} gradient")
    assert set(want_metrics) <= set(metrics)
    for key, value in want_metrics.items():
        assert metrics[key].dim() == 0 and metrics[key].dtype == torch.float32, key
        assert_close(metrics[key], value, FWD_TOL[torch.float32], f"{name} {key}")
    return loss, grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,mode", CASES)
def test_matches_float64_oracle(backend, device, name, shape, mode):
    lp, old, adv, weights, mask = _inputs(shape, device=device)
    weighted = shape[1] % 2 == 1  # half of the cases with rollout weights
    kwargs = dict(KWARGS.get(name, {}), is_weights=weights if weighted else None)
    if name != "geo_mean":
        kwargs["loss_agg"] = mode
    _check_against_oracle(name, lp, old, adv, mask, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_log_ratios_and_masked_padding(backend, device, name):
    """|lp − old| up to ~60 (past every clamp), NaN/inf at masked positions: oracle values, zero gradient
    at the padding."""
    lp, old, adv, weights, mask = _inputs((3, 21), spread=25.0, device=device)
    if name in ("clip_cov", "kl_cov", "vanilla", "gspo", "geo_mean", "dro"):
        old = lp + (old - lp).clamp(-60, 60)
    pad = ~mask
    lp_p, old_p = torch.where(pad, float("nan"), lp), torch.where(pad, float("inf"), old)
    kwargs = dict(KWARGS.get(name, {}), is_weights=torch.where(pad, float("nan"), weights))
    _check_against_oracle(
        name, torch.where(pad, 0.0, lp), torch.where(pad, 0.0, old), adv, mask,
        **dict(kwargs, is_weights=weights),
    )
    loss, grad_p, _ = _run(
        pl.POLICY_LOSSES[name], lp_p, old_p, torch.where(pad, float("-inf"), adv), mask, **kwargs
    )
    assert bool(torch.isfinite(loss)) or name in ("clip_cov", "kl_cov")
    assert bool((grad_p[pad] == 0).all())


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_batch_gives_zero_loss_and_gradient(backend, device, name):
    lp, old, adv, weights, mask = _inputs((3, 8), device=device)
    kwargs = dict(KWARGS.get(name, {}), is_weights=weights)
    loss, grad, metrics = _run(pl.POLICY_LOSSES[name], lp, old, adv, torch.zeros_like(mask), **kwargs)
    assert float(loss.detach()) == 0.0 and bool((grad == 0).all())
    assert all(float(v) == 0.0 for v in metrics.values())


@pytest.mark.parametrize("name", NAMES)
def test_fp64_with_scalars_not_representable_in_fp32(backend, device, name):
    lp, old, adv, weights, mask = _inputs((3, 19), dtype=torch.float64, device=device)
    kwargs = dict(KWARGS.get(name, {}), is_weights=weights)
    for key in ("clip_low", "beta", "tau_neg", "ppo_kl_coef"):
        if key in kwargs or (key == "clip_low" and name not in ("gpg", "dro", "sapo", "kl_cov")):
            kwargs[key] = 1.0 / 3.0
    _check_against_oracle(name, lp, old, adv, mask, **kwargs)


def test_bf16_inputs_compute_in_fp32(backend, device):
    lp, old, adv, weights, mask = _inputs((3, 40), dtype=torch.bfloat16, device=device)
    for name in ("cispo", "gspo", "sapo"):
        _check_against_oracle(name, lp, old, adv, mask, **KWARGS.get(name, {}))


def test_nan_at_a_valid_position_gives_nan(backend, device):
    lp, old, adv, _, mask = _inputs((2, 9), device=device)
    mask[0, 3] = True
    lp[0, 3] = float("nan")
    for name in NAMES:
        loss, _, _ = _run(pl.POLICY_LOSSES[name], lp, old, adv, mask, **KWARGS.get(name, {}))
        assert bool(loss.isnan()), name


def test_cov_selection_is_deterministic_and_counts_tokens():
    """clip_cov zeroes the first max(⌊ratio·N⌋, 1) eligible tokens; kl_cov penalises exactly that many."""
    lp, old, adv, _, mask = _inputs((6, 50))
    n = int(mask.sum())
    selected = kl_cov_selection(lp, adv, mask, 0.1)
    assert int(selected.sum()) == max(1, int(0.1 * n)) and bool((selected[~mask] == 0).all())
    assert int(kl_cov_selection(lp, adv, torch.zeros_like(mask), 0.1).sum()) == 0
    args = (lp, old, adv, mask, 0.2, 0.2, 0.05, 0.0, 10.0)
    first, second = clip_cov_selection(*args), clip_cov_selection(*args)
    assert torch.equal(first, second) and int(first.sum()) == max(1, int(0.05 * n))


# ---------------------------------------------------------------------------------------------------
# Against the real verl 0.9.1 (imported with the peer suite's placeholder modules).
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verl():
    core = import_peer("verl.trainer.ppo.core_algos")
    actor = import_peer("verl.workers.config.actor")
    return core, actor


def _verl_config(actor, name, mode, kwargs):
    low = kwargs.get("clip_low", 0.2)
    high = kwargs.get("clip_high", low)
    policy_loss = actor.PolicyLossConfig(
        clip_cov_ratio=kwargs.get("clip_cov_ratio", 0.0002),
        clip_cov_lb=kwargs.get("clip_cov_lb", 1.0),
        clip_cov_ub=kwargs.get("clip_cov_ub", 5.0),
        kl_cov_ratio=kwargs.get("kl_cov_ratio", 0.0002),
        ppo_kl_coef=kwargs.get("ppo_kl_coef", 0.1),
        dro_beta=kwargs.get("beta"),
    )
    return actor.ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=mode,
        global_batch_info={},
        clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high,
        clip_ratio_c=kwargs.get("truncation", kwargs.get("dual_clip", 3.0)),
        tau_pos=kwargs.get("tau_pos", 1.0), tau_neg=kwargs.get("tau_neg", 1.05), policy_loss=policy_loss,
    )


VERL_KEYS = {
    "actor/pg_clipfrac": "clipfrac",
    "actor/ppo_kl": "approx_kl",
    "actor/pg_clipfrac_lower": "clipfrac_lower",
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["random", "empty_rows", "left"])
def test_matches_real_verl(verl, backend, device, name, kind):
    core, actor = verl
    B, T = 5, 23
    lp, old, adv, weights, _ = _inputs((B, T), device=device)
    mask = peer_mask(B, T, kind).to(device)
    kwargs = dict(KWARGS.get(name, {}), is_weights=weights)
    if name == "clip_cov":
        kwargs["clip_cov_ratio"] = 1.0  # every eligible token selected: verl's random subset is all of them
    mode = "seq-mean-token-mean" if name in ("gspo", "sapo") else "token-mean"
    agg = {} if name == "geo_mean" else {"loss_agg": mode}
    ours = _run(pl.POLICY_LOSSES[name], lp, old, adv, mask, **kwargs, **agg)
    config = _verl_config(actor, name, mode, kwargs)
    x = lp.detach().clone().cpu().requires_grad_()
    peer_loss, peer_metrics = core.POLICY_LOSS_REGISTRY[name](
        old.cpu(), x, adv.cpu(), mask.cpu(), mode, config, weights.cpu()
    )
    (peer_grad,) = torch.autograd.grad(peer_loss, x)
    close(ours[0], peer_loss, 2e-5, f"{name} loss")
    grad_close(ours[1], peer_grad, 2e-5, f"{name} gradient")
    for key, value in peer_metrics.items():
        close(ours[2][VERL_KEYS[key]], torch.tensor(float(value)), 2e-5, f"{name} {key}")
    assert {VERL_KEYS[k] for k in peer_metrics} <= set(ours[2])


def test_table_matches_verl_registry_names(verl):
    core, _ = verl
    assert set(pl.POLICY_LOSSES) == set(core.POLICY_LOSS_REGISTRY)


# ---------------------------------------------------------------------------------------------------
# Launchers (every variant, outputs poisoned with NaN) and errors.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("variant", TOKEN_VARIANTS)
def test_launchers_write_every_output(variant):
    from conftest import TRITON_DEVICE

    lp, old, adv, weights, mask = _inputs((3, 45), device=TRITON_DEVICE)
    aux = None
    if variant in ("clip_cov", "kl_cov"):
        aux = (torch.rand(3, 45, device=TRITON_DEVICE) < 0.3).float()
    elif variant == "gspo":
        aux = torch.randn(3, 1, device=TRITON_DEVICE).expand(3, 45)
    params = [0.2, 0.28, 3.0]
    with _dispatch.use_backend("torch"):
        want_partials, want_stats = pl.policy_loss_token_fwd(
            lp, old, adv, mask, aux, weights, variant, params
        )
        g = torch.randn_like(want_partials)
        want_grad = pl.policy_loss_token_bwd(g, lp, old, adv, mask, aux, weights, variant, params)
    chunks = pl._row_tiling(3, 45).chunks
    partials = torch.full((3, chunks), float("nan"), device=TRITON_DEVICE)
    stats = torch.full((6, 3, chunks), float("nan"), device=TRITON_DEVICE)
    grad = torch.full((3, 45), float("nan"), device=TRITON_DEVICE)
    pl._launch_fwd_out(partials, stats, lp, old, adv, mask, aux, weights, variant, params)
    pl._launch_bwd_out(grad, g.expand(3, chunks) / chunks, lp, old, adv, mask, aux, weights, variant, params)
    assert_close(partials.sum(-1, keepdim=True), want_partials, 2e-5, "partials")
    assert_close(stats[:5].sum(-1, keepdim=True), want_stats[:5], 2e-5, "statistics")
    assert_close(stats[5].amax(-1, keepdim=True), want_stats[5], 2e-5, "ratio max")
    assert_close(grad, want_grad, 2e-5, "gradient")


def test_errors_name_the_argument():
    lp, old, adv, _, mask = _inputs((2, 5))
    with pytest.raises(ValueError, match="policy loss must be one of"):
        pl.get_policy_loss("ppo")
    with pytest.raises(ValueError, match="clip_low"):
        pl.cispo_policy_loss(lp, old, adv, mask, clip_low=0.0)
    with pytest.raises(ValueError, match="beta"):
        pl.dro_policy_loss(lp, old, adv, mask, beta=-1.0)
    with pytest.raises(ValueError, match="clip_cov_lb"):
        pl.clip_cov_policy_loss(lp, old, adv, mask, clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match="is_weights"):
        pl.gpg_policy_loss(lp, old, adv, mask, is_weights=torch.ones(2, 4))
    with pytest.raises(ValueError, match="loss_agg"):
        pl.sapo_policy_loss(lp, old, adv, mask, loss_agg="mean")
    assert set(LOSS_AGG_MODES)  # the modes the oracle cases cover
