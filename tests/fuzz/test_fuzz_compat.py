"""Fuzz: the compat shims (verl, TRL, OpenRLHF) over the same drawn logits / log-prob cases, against the
float64 oracles of the ops they run (the peer-parity suite tests/peers compares them with the real
frameworks).  Outputs are in each shim's documented dtype; inputs stay unchanged except where the shim's
contract modifies them (OpenRLHF divides the logits in place by a temperature ≠ 1; verl's
``inplace_backward=True`` overwrites them in the backward pass)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from rlhf_kernels.compat import openrlhf, trl, verl
from rlhf_kernels.reference import logprobs as ref_lp
from rlhf_kernels.reference import reward_losses as ref_rw

from . import strategies as S
from .checks import TOL, assert_matches, assert_unchanged, leaf, oracle_leaf, snapshot
from .oracles import entropy_with_nan, kl_penalty_oracle, logprobs_oracle
from .profiles import fuzz_settings

LOGPROB_SHIMS = {
    "verl.logprobs_from_logits": lambda x, y, t: verl.logprobs_from_logits(x, y, inplace_backward=False),
    "trl.selective_log_softmax": lambda x, y, t: trl.selective_log_softmax(x, y, temperature=t),
    "openrlhf.log_probs_from_logits": lambda x, y, t: openrlhf.log_probs_from_logits(x, y, temperature=t),
}
ENTROPY_SHIMS = {
    "verl.entropy_from_logits": verl.entropy_from_logits,
    "verl.entropy_from_logits_with_chunking": verl.entropy_from_logits_with_chunking,
    "trl.entropy_from_logits": trl.entropy_from_logits,
    "openrlhf.compute_entropy": openrlhf.compute_entropy,
}


def _tol(out, scale, temperature=1.0):
    return max(TOL[out.dtype], 3e-6 * (1 + scale / temperature))


@fuzz_settings(15)
@given(shim=st.sampled_from(sorted(LOGPROB_SHIMS)), n=S.dims, V=st.sampled_from([1, 5, 17]), seed=S.seeds(),
       dtype=st.sampled_from(S.ALL_FLOAT_DTYPES), layout=S.layouts(), special=S.specials(),
       temperature=st.sampled_from([1.0, 0.7]), scale=st.sampled_from([1.0, 20.0]))
def test_logprob_shims(backend, shim, n, V, seed, dtype, layout, special, temperature, scale):
    if shim == "verl.logprobs_from_logits":
        temperature = 1.0  # verl's function has no temperature
    logits = S.arrange(S.values((n, V), dtype, seed, scale=scale, special=special), layout)
    labels = S.labels_for((n,), V, seed)
    before = snapshot({"logits": logits, "labels": labels})
    out = LOGPROB_SHIMS[shim](logits, labels, temperature)
    (expected,) = logprobs_oracle(before["logits"], labels, temperature=temperature, ignore_index=-100,
                                  return_entropy=False)
    assert_matches(out, expected, shim, tol=_tol(out, scale, temperature))
    if shim == "openrlhf.log_probs_from_logits" and temperature != 1.0:
        # OpenRLHF's contract: the logits are divided in place by the temperature, and nothing else.
        before["logits"] = before["logits"] / temperature
    assert_unchanged(before, {"logits": logits, "labels": labels})


@fuzz_settings(10)
@given(shim=st.sampled_from(sorted(ENTROPY_SHIMS)), n=S.dims, V=st.sampled_from([1, 5, 17]), seed=S.seeds(),
       dtype=st.sampled_from(S.ALL_FLOAT_DTYPES), layout=S.layouts(), special=S.specials())
def test_entropy_shims(backend, shim, n, V, seed, dtype, layout, special):
    logits = S.arrange(S.values((n, V), dtype, seed, special=special), layout)
    before = snapshot({"logits": logits})
    out = ENTROPY_SHIMS[shim](logits)
    expected = entropy_with_nan(logits, ref_lp.entropy_from_logits(logits), 1.0)
    assert_matches(out, expected, shim, tol=_tol(out, 2.0))
    assert_unchanged(before, {"logits": logits})


VERL_KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


@fuzz_settings(15)
@given(name=st.sampled_from(sorted(VERL_KL)), shape=st.tuples(S.dims, S.dims), seed=S.seeds(),
       dtype=st.sampled_from(S.ALL_FLOAT_DTYPES),
       special=S.specials(kinds=("nan", "big", "-big", "denormal")))
def test_verl_kl_penalty(backend, name, shape, seed, dtype, special):
    lp = S.values(shape, dtype, seed, special=special)
    ref = S.values(shape, dtype, seed + 1)
    before = snapshot({"lp": lp, "ref": ref})
    out = verl.kl_penalty(lp, ref, name)
    expected = kl_penalty_oracle(lp.double(), ref.double(), VERL_KL[name])
    assert_matches(out, expected, f"verl.kl_penalty({name})", tol=max(1e-4, TOL[out.dtype]))
    assert_unchanged(before, {"lp": lp, "ref": ref})


@fuzz_settings(15)
@given(estimator=st.sampled_from(["k1", "k2", "k3"]), unbiased=st.booleans(), with_old=st.booleans(),
       shape=st.tuples(S.dims, S.dims), seed=S.seeds(), dtype=st.sampled_from(S.ALL_FLOAT_DTYPES))
def test_openrlhf_compute_approx_kl(backend, estimator, unbiased, with_old, shape, seed, dtype):
    lp, base = S.values(shape, dtype, seed), S.values(shape, dtype, seed + 1)
    old = S.values(shape, dtype, seed + 2) if with_old else None
    x, o = leaf(lp), oracle_leaf(lp)
    out = openrlhf.compute_approx_kl(x, base, old, kl_estimator=estimator, unbiased_gradient=unbiased)
    # OpenRLHF: fp32 log-probs, every estimator clamped to [−10, 10].
    est = estimator + ("+" if unbiased else "")
    o32, b32 = o.float().double(), base.float().double()
    expected = kl_penalty_oracle(o32, b32, est, old_logprobs=old.float().double() if (unbiased and with_old) else None)  # noqa: E501
    expected = torch.clamp(expected, -10, 10) if not unbiased else expected.clamp(-10, 10).detach() + (expected - expected.detach())  # noqa: E501
    assert_matches(out, expected, f"compute_approx_kl({estimator})", tol=1e-4)
    if lp.numel():
        up = S.values(shape, torch.float64, seed + 9)
        (g,) = torch.autograd.grad(out, x, up.float())
        (e,) = torch.autograd.grad(expected, o, up)
        assert_matches(g, e, "grad log_probs", grad=True, tol=max(1e-4, TOL[g.dtype]), atol=1e-6)


@fuzz_settings(10)
@given(loss=st.sampled_from(["PairWiseLoss", "LogExpLoss"]), n=S.positive_dims, seed=S.seeds(),
       dtype=st.sampled_from(S.ALL_FLOAT_DTYPES), scale=st.sampled_from([1.0, 100.0]),
       with_margin=st.booleans())
def test_openrlhf_pairwise_losses(backend, loss, n, seed, dtype, scale, with_margin):
    c, r = S.values((n,), dtype, seed, scale=scale), S.values((n,), dtype, seed + 1, scale=scale)
    margin = S.values((n,), dtype, seed + 2).abs() if with_margin else None
    before = snapshot({"c": c, "r": r})
    out = getattr(openrlhf, loss)()(c, r, margin)
    expected, _ = ref_rw.pairwise_reward_loss(c, r, margin=margin if loss == "PairWiseLoss" else None)
    assert_matches(out, expected, loss, tol=1e-4)
    assert_unchanged(before, {"c": c, "r": r})
