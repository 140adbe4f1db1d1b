"""Preference losses (DPO and its variants, SimPO, CPO, ORPO, KTO) against the float64 oracle.

The parity tests against the real TRL 1.16 and OpenRLHF 0.11.2 code are in test_preference_losses_peers.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_grad_close

from rlhf_kernels.ops import preference_losses as ops
from rlhf_kernels.ops.preference_losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from rlhf_kernels.reference import preference_losses as ref

# Inputs are exact in every dtype, so forward errors come from fp32 arithmetic; gradients are rounded to
# the input dtype.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}
METRIC_TOL = {torch.float64: 1e-6}  # metrics are fp32 whatever the inputs
DTYPES = (torch.float32, torch.bfloat16, torch.float64)

# Scalars that fp32 cannot represent: with fp64 inputs they must reach the arithmetic unrounded.
BETA = 1 / 3
EPS = 0.1
TAU = 0.7


def _logps(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Summed response log-probs of n sequences, in [−60, −5]."""
    return (-5.0 - 55.0 * torch.rand(n)).to(dtype)


def _pairs(n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    chosen, rejected = _logps(n, dtype), _logps(n, dtype)
    return {
        "chosen_logps": chosen,
        "rejected_logps": rejected,
        "ref_chosen_logps": (chosen.double() + 2.0 * torch.randn(n)).to(dtype),
        "ref_rejected_logps": (rejected.double() + 2.0 * torch.randn(n)).to(dtype),
        "chosen_lengths": torch.randint(0, 50, (n,)),  # 0 exercises the clamp to 1
        "rejected_lengths": torch.randint(1, 50, (n,)),
    }


def _check(fn, oracle, tensors: dict, kwargs: dict, dtype: torch.dtype, *, positional=()):
    """Runs ``fn`` and the float64 ``oracle`` on the same values; compares loss, metrics and the
    gradient of every floating input.  ``positional`` names the tensors passed positionally."""
    leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in tensors.items()}
    oracle_leaves = {
        k: (v.detach().double().requires_grad_() if v.is_floating_point() else v) for k, v in tensors.items()
    }
    originals = {k: v.clone() for k, v in tensors.items()}

    def call(f, inputs):
        named = {k: v for k, v in inputs.items() if k not in positional}
        return f(*(inputs[k] for k in positional), **named, **kwargs)

    loss, metrics = call(fn, leaves)
    want, want_metrics = call(oracle, oracle_leaves)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, want, FWD_TOL[dtype], "loss")
    assert metrics.keys() == want_metrics.keys()
    for name, value in metrics.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, name
        assert_close(value, want_metrics[name], 1e-5, name)
    loss.backward()
    want.backward()
    for name, leaf in leaves.items():
        if leaf.is_floating_point() and oracle_leaves[name].grad is not None:
            assert leaf.grad is not None and leaf.grad.dtype == dtype, name
            assert_grad_close(leaf.grad, oracle_leaves[name].grad, GRAD_TOL[dtype], f"grad {name}")
    for name, value in tensors.items():
        assert torch.equal(value, originals[name]), f"{name} was modified"
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_match_oracle(loss_type, dtype):
    torch.manual_seed(DPO_LOSS_TYPES.index(loss_type))
    kwargs = dict(loss_type=loss_type, beta=BETA, label_smoothing=EPS, discopop_tau=TAU)
    _check(dpo_loss, ref.dpo_loss, _pairs(37, dtype), kwargs, dtype)


@pytest.mark.parametrize("n", [1, 2, 3, 1000])
def test_dpo_odd_batch_sizes(n):
    torch.manual_seed(n)
    for loss_type in ("sigmoid", "aot", "ipo"):
        _check(dpo_loss, ref.dpo_loss, _pairs(n, torch.float32), dict(loss_type=loss_type), torch.float32)


def test_dpo_worked_example():
    one = lambda v: torch.tensor([v])  # noqa: E731
    loss, metrics = dpo_loss(one(-5.0), one(-7.0), one(-6.0), one(-6.0), beta=0.1)
    assert_close(loss, torch.tensor(0.598139), 1e-6, "sp(0.2)")
    for name, value in {"rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/accuracies": 1.0,
                        "rewards/margins": 0.2, "logps/chosen": -5.0, "logps/rejected": -7.0}.items():
        assert_close(metrics[name], torch.tensor(value), 1e-6, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dpo_weighted_combination(dtype):
    torch.manual_seed(1)
    pairs = _pairs(29, dtype)
    types, weights = ["sigmoid", "bco_pair", "sft", "sigmoid_norm"], [0.8, 0.2, 1.0, 1 / 3]
    loss, _ = _check(
        dpo_loss, ref.dpo_loss, pairs, dict(loss_type=types, loss_weights=weights, beta=BETA), dtype
    )
    separate = sum(w * dpo_loss(**pairs, loss_type=t, beta=BETA)[0] for t, w in zip(types, weights))
    assert_close(loss, separate, FWD_TOL[dtype], "sum of the weighted single losses")


def test_dpo_openrlhf_convention():
    torch.manual_seed(2)
    pairs = _pairs(31, torch.float64)
    no_lengths = {k: v for k, v in pairs.items() if not k.endswith("lengths")}
    for loss_type in ("sigmoid", "ipo"):
        kwargs = dict(loss_type=loss_type, beta=BETA, label_smoothing=EPS, convention="openrlhf")
        _check(dpo_loss, ref.dpo_loss, no_lengths, kwargs, torch.float64)  # IPO needs no lengths here
    # TRL's sigmoid ignores label smoothing; OpenRLHF's does not.
    trl, _ = dpo_loss(**no_lengths, label_smoothing=EPS)
    assert_close(trl, dpo_loss(**no_lengths)[0], 1e-15, "trl sigmoid ignores label_smoothing")
    assert not torch.allclose(trl, dpo_loss(**no_lengths, label_smoothing=EPS, convention="openrlhf")[0])


def test_dpo_sft_without_reference():
    torch.manual_seed(3)
    pairs = _pairs(11, torch.float64)
    tensors = {k: pairs[k] for k in ("chosen_logps", "rejected_logps", "chosen_lengths")}
    _, metrics = _check(dpo_loss, ref.dpo_loss, tensors, dict(loss_type="sft", beta=BETA), torch.float64)
    assert_close(
        metrics["rewards/chosen"], BETA * pairs["chosen_logps"].mean(), 1e-6, "reference-free reward"
    )


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradcheck(loss_type):
    torch.manual_seed(4)
    pairs = _pairs(3, torch.float64)
    names = ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    lengths = {k: pairs[k] for k in ("chosen_lengths", "rejected_lengths")}
    kwargs = dict(loss_type=loss_type, beta=BETA, label_smoothing=EPS, discopop_tau=TAU, **lengths)
    inputs = [pairs[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, **kwargs)[0], inputs)


def test_extreme_log_ratios_stay_finite():
    """|βΔ| of 1e4: sp and σ saturate without overflow; DiscoPOP's m·e^{−x} stays finite where the
    naive product gives 0·inf."""
    chosen = torch.tensor([-1.0, -1e5], requires_grad=True)
    rejected = torch.tensor([-1e5, -1.0], requires_grad=True)
    zeros = torch.zeros(2)
    for loss_type in ("sigmoid", "discopop", "nca_pair", "bco_pair", "robust", "exo_pair"):
        loss, _ = dpo_loss(chosen, rejected, zeros, zeros, loss_type=loss_type, beta=0.1, label_smoothing=EPS)
        (grad_c, grad_r) = torch.autograd.grad(loss, (chosen, rejected))
        if loss_type == "discopop":  # e^{1e4} is the loss itself: inf, not NaN
            assert not loss.isnan()
        else:
            assert (
                torch.isfinite(loss) and torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
            ), loss_type


# --------------------------------------------------------------------------------------------------
# CPO, SimPO, ORPO
# --------------------------------------------------------------------------------------------------
POLICY_ONLY = ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.25])
@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
def test_cpo_matches_oracle(loss_type, alpha, dtype):
    torch.manual_seed(5)
    pairs = {k: v for k, v in _pairs(23, dtype).items() if k in POLICY_ONLY}
    kwargs = dict(
        loss_type=loss_type, alpha=alpha, beta=BETA, label_smoothing=EPS, simpo_gamma=0.7, cpo_alpha=1 / 3
    )
    _check(cpo_loss, ref.cpo_loss, pairs, kwargs, dtype)


def test_cpo_without_nll_needs_no_lengths():
    torch.manual_seed(6)
    pairs = {k: v for k, v in _pairs(9, torch.float64).items() if k in POLICY_ONLY[:2]}
    _, metrics = _check(cpo_loss, ref.cpo_loss, pairs, dict(loss_type="hinge", cpo_alpha=0.0), torch.float64)
    assert metrics["nll_loss"] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_simpo_matches_oracle(sft_weight, dtype):
    torch.manual_seed(7)
    pairs = {k: v for k, v in _pairs(41, dtype).items() if k in POLICY_ONLY}
    kwargs = dict(beta=2.5, gamma=1 / 3, label_smoothing=EPS, sft_weight=sft_weight)
    _check(simpo_loss, ref.simpo_loss, pairs, kwargs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orpo_matches_oracle(dtype):
    torch.manual_seed(8)
    pairs = {k: v for k, v in _pairs(33, dtype).items() if k in POLICY_ONLY}
    _check(orpo_loss, ref.orpo_loss, pairs, dict(beta=BETA), dtype)
    pairs["nll_loss"] = torch.tensor(2.5, dtype=dtype)  # TRL's NLL over prompt and response
    _check(orpo_loss, ref.orpo_loss, pairs, dict(beta=BETA), dtype)


def test_orpo_gradient_finite_near_zero_log_prob():
    """Average log-probs within 1e-8 of 0: e^a rounds to 1 in fp32, the unused log1p(−e^a) branch has an
    infinite derivative, and must not leak 0·inf = NaN into the gradient."""
    chosen = torch.tensor([-1e-8, -3.0], requires_grad=True)
    rejected = torch.tensor([-2.0, -5e-9], requires_grad=True)
    lengths = torch.tensor([1, 2])
    loss, _ = orpo_loss(chosen, rejected, lengths, lengths)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    want, _ = ref.orpo_loss(chosen.detach(), rejected.detach(), lengths, lengths)
    assert_close(loss, want, 1e-5, "orpo near 0")


# --------------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------------
def _unpaired(n: int, m: int, dtype: torch.dtype, desirable_fraction: float = 0.5) -> dict[str, torch.Tensor]:
    policy = _logps(n, dtype)
    kl_policy = _logps(m, dtype)
    return {
        "policy_logps": policy,
        "ref_logps": (policy.double() + 2.0 * torch.randn(n)).to(dtype),
        "desirable": torch.rand(n) < desirable_fraction,
        "kl_logps": kl_policy,
        "ref_kl_logps": (kl_policy.double() - 1.0 + torch.randn(m)).to(dtype),  # z > 0 mostly
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_kto_matches_oracle(loss_type, dtype):
    torch.manual_seed(9)
    kwargs = dict(loss_type=loss_type, beta=BETA, desirable_weight=1.0, undesirable_weight=4 / 3)
    _check(kto_loss, ref.kto_loss, _unpaired(37, 37, dtype), kwargs, dtype)


def test_kto_reference_point():
    """z = max(0, mean(kl − kl_ref)) without gradient; a group absent from the batch has metrics 0."""
    torch.manual_seed(10)
    inputs = _unpaired(16, 16, torch.float64, desirable_fraction=1.1)  # every response desirable
    inputs["ref_kl_logps"] = inputs["kl_logps"] + 1.0  # negative KL estimate: clamped to 0
    kl = inputs["kl_logps"].clone().requires_grad_()
    loss, metrics = kto_loss(**dict(inputs, kl_logps=kl), beta=BETA)
    assert metrics["kl"] == 0 and metrics["rewards/rejected"] == 0 and metrics["logps/rejected"] == 0
    assert not loss.requires_grad  # only kl_logps requires grad here, and it is never differentiated
    _check(kto_loss, ref.kto_loss, inputs, dict(beta=BETA), torch.float64)


# --------------------------------------------------------------------------------------------------
# Every function: empty batches, NaN, compile
# --------------------------------------------------------------------------------------------------
def _every_function(n: int, dtype: torch.dtype):
    pairs = _pairs(n, dtype)
    policy = {k: pairs[k] for k in POLICY_ONLY}
    yield "dpo", dpo_loss, pairs, dict(loss_type=["sigmoid", "aot", "ipo", "sft"])
    yield "cpo", cpo_loss, policy, dict(loss_type="simpo")
    yield "simpo", simpo_loss, policy, {}
    yield "orpo", orpo_loss, policy, {}
    yield "kto", kto_loss, _unpaired(n, n, dtype), {}


def test_empty_batches():
    for name, fn, tensors, kwargs in _every_function(0, torch.float32):
        leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in tensors.items()}
        loss, metrics = fn(**leaves, **kwargs)
        assert loss.dim() == 0 and loss.item() == 0, name
        assert all(m.dim() == 0 and m.item() == 0 for m in metrics.values()), name
        loss.backward()
        assert all(v.grad is None or v.grad.shape == (0,) for v in leaves.values() if v.is_floating_point())


def test_nan_in_nan_out():
    for name, fn, tensors, kwargs in _every_function(5, torch.float32):
        first = next(iter(tensors))
        nan_first = tensors[first].clone().index_fill_(0, torch.tensor([2]), float("nan"))
        poisoned = dict(tensors, **{first: nan_first})
        loss, _ = fn(**poisoned, **kwargs)
        assert loss.isnan(), name


def test_compile_fullgraph_no_host_sync():
    """fullgraph=True fails on a graph break, which any host sync (.item(), a data-dependent branch) is."""
    torch.manual_seed(11)
    for name, fn, tensors, kwargs in _every_function(13, torch.float32):
        compiled = torch.compile(
            lambda t, fn=fn, kwargs=kwargs: fn(**t, **kwargs), fullgraph=True, backend="aot_eager"
        )
        loss, metrics = compiled(tensors)
        want, want_metrics = fn(**tensors, **kwargs)
        assert_close(loss, want, 1e-6, name)
        for key in want_metrics:
            assert_close(metrics[key], want_metrics[key], 1e-6, f"{name} {key}")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def _bad_inputs():
    p = _pairs(4, torch.float32)
    refs = (p["ref_chosen_logps"], p["ref_rejected_logps"])
    c, r = p["chosen_logps"], p["rejected_logps"]
    n = p["chosen_lengths"]
    k = _unpaired(4, 4, torch.float32)
    yield lambda: dpo_loss(c, r, *refs, loss_type="dpo"), "loss_type must be one of"
    yield lambda: dpo_loss(c, r, *refs, loss_type=[]), "non-empty list"
    yield lambda: dpo_loss(c, r, *refs, beta=0.0), "beta must be > 0"
    yield lambda: dpo_loss(c, r, *refs, beta=-1.0), "beta must be > 0"
    yield lambda: dpo_loss(c, r[:3], *refs), "rejected_logps must have one entry per pair"
    yield lambda: dpo_loss(c, r, refs[0][:3], refs[1]), "ref_chosen_logps must have shape"
    yield lambda: dpo_loss(c, r), "needs reference log-probs; ref_chosen_logps is None"
    yield lambda: dpo_loss(c, r, refs[0], None, loss_type=["sft", "hinge"]), "'hinge' needs reference"
    yield lambda: dpo_loss(c, r, *refs, loss_type="ipo"), "'ipo' needs chosen_lengths"
    yield lambda: dpo_loss(c, r, *refs, loss_type="sigmoid_norm", chosen_lengths=n), "needs rejected_lengths"
    yield (
        lambda: dpo_loss(c, r, *refs, loss_type="ipo", chosen_lengths=n, rejected_lengths=n[:2]),
        "rejected_lengths must have shape",
    )
    yield lambda: dpo_loss(c, r, *refs, loss_type="sft", chosen_lengths=n > 0), "integer or floating tensor"
    yield lambda: dpo_loss(c, r, *refs, loss_type="exo_pair"), "label_smoothing must be in (0, 1)"
    yield lambda: dpo_loss(c, r, *refs, loss_type="robust", label_smoothing=0.5), "[0, 0.5)"
    yield (
        lambda: dpo_loss(c, r, *refs, loss_type=["sigmoid", "hinge"], loss_weights=[1.0]),
        "one weight per loss type",
    )
    yield lambda: dpo_loss(c, r, *refs, convention="verl"), "convention must be one of"
    yield lambda: dpo_loss(c.long(), r, *refs), "chosen_logps must be a floating tensor"
    yield lambda: dpo_loss(c[None], r[None], refs[0][None], refs[1][None]), "chosen_logps must be 1-D"
    yield lambda: cpo_loss(c, r, loss_type="kto"), "loss_type must be one of"
    yield lambda: cpo_loss(c, r), "needs chosen_lengths"
    yield lambda: cpo_loss(c, r, n, loss_type="simpo"), "'simpo' needs rejected_lengths"
    yield lambda: simpo_loss(c, r, n, n, beta=0.0), "beta must be > 0"
    yield lambda: orpo_loss(c, r[:2], n, n), "one entry per pair"
    yield lambda: orpo_loss(c, r, n, n, nll_loss=torch.ones(2)), "nll_loss must be 0-D"
    yield lambda: kto_loss(k["policy_logps"], k["ref_logps"], k["desirable"]), "kl_logps is None"
    yield lambda: kto_loss(**dict(k, desirable=k["desirable"][:3])), "desirable must have shape"
    yield lambda: kto_loss(**k, loss_type="sigmoid"), "loss_type must be one of"
    yield lambda: kto_loss(**k, beta=0.0), "beta must be > 0"
    yield lambda: kto_loss(**k, undesirable_weight=-1.0), "undesirable_weight must be in"


@pytest.mark.parametrize("case", range(29))
def test_bad_input_errors(case):
    call, message = list(_bad_inputs())[case]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert message in str(info.value)


def test_bad_input_cases_all_run():
    assert len(list(_bad_inputs())) == 29


def test_public_constants():
    assert DPO_LOSS_TYPES == (
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    )
    assert ops.REFERENCE_FREE_LOSS_TYPES == ("sft",)
