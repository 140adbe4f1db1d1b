"""Fuzz: linear_logprobs (both backends) against reference/linear_logprobs.py: log-probs, entropy and the
gradients of hidden, weight and bias."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import rlhf_kernels as rk
from rlhf_kernels.reference import linear_logprobs as ref

from . import strategies as S
from .checks import (
    TOL,
    assert_matches,
    assert_names_argument,
    assert_unchanged,
    call,
    leaf,
    oracle_leaf,
    snapshot,
)
from .profiles import fuzz_settings


@fuzz_settings(15)
@given(lead=st.lists(S.dims, max_size=2), H=st.sampled_from([0, 1, 3, 8]), V=st.sampled_from([0, 1, 5, 17]),
       seed=S.seeds(), dtype=st.sampled_from(S.ALL_FLOAT_DTYPES), with_bias=st.booleans(),
       layout=S.layouts(), temperature=st.sampled_from([1.0, 0.7]), return_entropy=st.booleans(),
       # ±1e30 hidden values are left out: logits ~1e30 make even the float64 oracle's entropy gradient
       # (autograd through lse − Σ p·z) rounding noise; the logits-level fuzz covers huge logits.
       special=S.specials(kinds=("nan", "inf", "denormal")))
def test_linear_logprobs(backend, lead, H, V, seed, dtype, with_bias, layout, temperature, return_entropy, special):  # noqa: E501
    lead = tuple(lead)
    hidden = S.arrange(S.values(lead + (H,), dtype, seed, scale=0.5, special=special), layout)
    weight = S.values((V, H), dtype, seed + 1, scale=0.5)
    bias = S.values((V,), dtype, seed + 2) if with_bias else None
    labels = S.labels_for(lead, V, seed)
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    before = snapshot(tensors)
    h, w = leaf(hidden), leaf(weight)
    b = leaf(bias) if with_bias else None
    kwargs = dict(temperature=temperature, return_entropy=return_entropy)
    result, error = call(rk.linear_logprobs, h, w, labels, bias=b, **kwargs)
    if dtype == torch.float64:
        return assert_names_argument(error, "hidden")
    if V == 0 or H == 0:  # the rule: a 0-wide lm_head (no vocabulary or no features) is refused
        return assert_names_argument(error, "weight")
    assert error is None, error
    oh, ow = oracle_leaf(hidden), oracle_leaf(weight)
    ob = oracle_leaf(bias) if with_bias else None
    expected = ref.linear_logprobs(oh, ow, labels, bias=ob, **kwargs)
    outputs = list(result) if return_entropy else [result]
    expected = list(expected) if return_entropy else [expected]
    for name, out, exp in zip(("logprobs", "entropy"), outputs, expected):
        assert out.dtype == torch.float32
        assert_matches(out, exp, name, tol=1e-4 * (1 + H))
    if labels.numel():
        ups = [S.values(o.shape, torch.float64, seed + 7 + i) for i, o in enumerate(outputs)]
        inputs = [h, w] + ([b] if with_bias else [])
        oracle_inputs = [oh, ow] + ([ob] if with_bias else [])
        grads = torch.autograd.grad(outputs, inputs, [u.float() for u in ups])
        exp_grads = torch.autograd.grad(expected, oracle_inputs, ups)
        bad = ~hidden.double().isfinite().all(-1)  # a NaN hidden row makes its logits row NaN
        for name, g, e in zip(("hidden", "weight", "bias"), grads, exp_grads):
            may = bad.unsqueeze(-1) if name == "hidden" else bad.any()
            assert_matches(g, e, f"grad {name}", grad=True, tol=max(1e-3, TOL[g.dtype]), atol=1e-6, may_be_nan=may)  # noqa: E501
    assert_unchanged(before, tensors)
