"""Fuzz: logprobs_from_logits / entropy_from_logits (both backends) against reference/logprobs.py."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import rlhf_kernels as rk
from rlhf_kernels.reference import logprobs as ref

from . import strategies as S
from .checks import (
    assert_matches,
    assert_names_argument,
    assert_unchanged,
    call,
    index_checks,
    leaf,
    lse_absorbs_tied_maxima,
    snapshot,
    upstream_for,
)
from .oracles import entropy_with_nan, logprobs_grad_oracle, logprobs_oracle
from .profiles import fuzz_settings

LOGIT_DTYPES = S.ALL_FLOAT_DTYPES
vocab = st.sampled_from([0, 1, 2, 5, 16, 17])
# Layouts the in-place backward may refuse (overlapping or uncollapsible).
INPLACE_REFUSABLE = ("expanded", "channels_last", "transposed", "sliced")


@st.composite
def logprob_cases(draw):
    lead = tuple(draw(st.lists(S.dims, min_size=0, max_size=2)))
    V = draw(vocab)
    dtype = draw(st.sampled_from(LOGIT_DTYPES + S.REJECTED_FLOAT_DTYPES[:1]))
    seed = draw(S.seeds())
    layout = draw(S.layouts())
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    return dict(
        shape=lead + (V,), dtype=dtype, seed=seed, layout=layout,
        expand_dim=draw(st.integers(0, 3)),
        special=draw(S.specials(kinds=("nan", "inf", "-inf", "big", "-big", "denormal"))),
        edges=draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                      st.sampled_from(["zero", "last", "ignore"])), max_size=2)),
        bad_label=draw(st.sampled_from([None, None, None, "V", "-2"])),
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.int64])),
        temperature=draw(st.sampled_from([1.0, 1.0, 0.7, 3.0, 1e-3])),
        ignore_index=ignore_index,
        return_entropy=draw(st.booleans()),
        inplace_backward=draw(st.booleans()),
        checks=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 5.0, 50.0])),
    )


def _inputs(case):
    shape, V = case["shape"], case["shape"][-1]
    if case["dtype"].is_floating_point:
        x = S.values(shape, case["dtype"], case["seed"], scale=case["scale"], special=case["special"])
    else:
        x = torch.zeros(shape, dtype=case["dtype"])
    logits = S.arrange(x, case["layout"], expand_dim=case["expand_dim"])
    labels = S.labels_for(shape[:-1], V, case["seed"], ignore_index=case["ignore_index"], edges=case["edges"])
    if case["bad_label"] and labels.numel():
        labels.view(-1)[0] = V if case["bad_label"] == "V" else -2
        if labels.view(-1)[0] == case["ignore_index"]:
            labels.view(-1)[0] = V + 1
    return logits, labels.to(case["label_dtype"])


@fuzz_settings(30)
@given(case=logprob_cases())
def test_logprobs_from_logits(backend, case):
    logits, labels = _inputs(case)
    V = case["shape"][-1]
    before = snapshot({"logits": logits, "labels": labels})
    differentiable = logits.dtype.is_floating_point
    x = leaf(logits) if differentiable else logits
    kwargs = dict(temperature=case["temperature"], ignore_index=case["ignore_index"],
                  return_entropy=case["return_entropy"], inplace_backward=case["inplace_backward"])
    with index_checks(case["checks"]):
        result, error = call(rk.logprobs_from_logits, x, labels, **kwargs)

    bad = (labels != case["ignore_index"]) & ((labels < 0) | (labels >= V))
    offending = []
    if not differentiable or V == 0:  # V = 0: a softmax over nothing is undefined (docs/robustness.md)
        offending.append("logits")
    if case["checks"] and bool(bad.any()):
        offending.append("labels")
    if offending and case["inplace_backward"] and case["layout"] in INPLACE_REFUSABLE:
        offending.append("inplace_backward")  # a refused layout may be reported before the labels
    if offending:
        return assert_names_argument(error, offending)
    if case["inplace_backward"] and error is not None:
        # Refused only for layouts the in-place write cannot serve (overlapping or uncollapsible).
        assert case["layout"] in INPLACE_REFUSABLE, error
        return assert_names_argument(error, "inplace_backward")
    assert error is None, error
    # Read before the backward: inplace_backward overwrites the logits with their gradient.
    absorbs = lse_absorbs_tied_maxima(logits, case["temperature"])
    outputs = list(result) if case["return_entropy"] else [result]
    expected = logprobs_oracle(logits, labels, temperature=case["temperature"],
                               ignore_index=case["ignore_index"], return_entropy=case["return_entropy"])
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for name, out, exp in zip(("logprobs", "entropy"), outputs, expected):
        assert out.dtype == out_dtype, f"{name} dtype {out.dtype}"
        assert_matches(out, exp, name, tol=_out_tol(case, logits))
    up = upstream_for(outputs, case["seed"])
    if logits.numel():
        # The oracle first: inplace_backward overwrites the logits with their gradient.
        h = up[1] if case["return_entropy"] else None
        expected_grad = logprobs_grad_oracle(logits, labels, up[0], h, temperature=case["temperature"],
                                             ignore_index=case["ignore_index"])
        atol = 1e-30 + _entropy_term_atol(logits, case["temperature"], h)
        (grad,) = torch.autograd.grad(outputs, [x], [u.to(o.dtype) for o, u in zip(outputs, up)])
        assert grad.dtype == logits.dtype
        if absorbs:
            # Documented limitation (docs/logprobs.md, "Limitations"): the backward reads log p = x/τ − lse
            # with lse in fp32; with two or more tied maxima so large that lse = m + log s rounds to m, the
            # tied entries' p is read as 1.  Asserted as such: NaN exactly where the oracle is NaN (a bad
            # label's row, a NaN row), finite elsewhere.
            nan = grad.isnan()
            assert torch.equal(nan.cpu(), expected_grad.isnan()) and bool(grad[~nan].isfinite().all())
            return
        assert_matches(grad, expected_grad, "grad logits", grad=True, atol=atol)
    assert_unchanged(before, {"logits": logits, "labels": labels},
                     skip=("logits",) if case["inplace_backward"] else ())


def _entropy_term_atol(logits, temperature, grad_entropy):
    """Per row, the rounding of the entropy term −(h/τ)·p_j·(log p_j + H) in the arithmetic dtype: log p_j =
    x'_j − lse and H carry ~eps·(|x'| + |lse| + H) absolute, which a bound relative to the gradient's
    scale cannot absorb where log p_j + H cancels (a uniform row, whose gradient is 0: the float64
    oracle itself gives ~1e-16·h there).  0 without an entropy gradient: the log-prob term is exact to
    the relative bound (the label column too, minus the sum of the others)."""
    if grad_entropy is None:
        return 0.0
    eps = torch.finfo(torch.float64 if logits.dtype == torch.float64 else torch.float32).eps
    z = logits.detach().double() / temperature
    size = z.abs().where(z.isfinite(), 0.0).amax(-1, keepdim=True)  # lse and H are within |x'| + log V
    h = grad_entropy.abs().unsqueeze(-1) / temperature  # the gradient is ∂/∂x = (1/τ)·∂/∂x'
    return 8 * eps * h * (1 + 3 * size + math.log(max(z.shape[-1], 1)))


def _out_tol(case, logits):
    # log-probs of logits ~ s/τ carry fp32 rounding of |z| ≈ scale/τ, not of the (small) result.
    if logits.dtype == torch.float64:
        return 1e-9
    return 3e-6 * (1 + case["scale"] / case["temperature"])


@fuzz_settings(15)
@given(case=logprob_cases())
def test_entropy_from_logits(backend, case):
    logits, _ = _inputs(case)
    V = case["shape"][-1]
    before = snapshot({"logits": logits})
    differentiable = logits.dtype.is_floating_point
    x = leaf(logits) if differentiable else logits
    result, error = call(rk.entropy_from_logits, x, temperature=case["temperature"])
    if not differentiable or V == 0:
        return assert_names_argument(error, "logits")
    assert error is None, error
    expected = entropy_with_nan(logits, ref.entropy_from_logits(logits, temperature=case["temperature"]),
                                case["temperature"])
    assert_matches(result, expected, "entropy", tol=_out_tol(case, logits))
    if logits.numel():
        up = upstream_for([result], case["seed"])[0]
        (grad,) = torch.autograd.grad(result, [x], up.to(result.dtype))
        labels = torch.zeros(case["shape"][:-1], dtype=torch.int64)
        expected_grad = logprobs_grad_oracle(logits, labels, torch.zeros_like(up), up,
                                             temperature=case["temperature"], ignore_index=-100)
        assert_matches(grad, expected_grad, "grad logits", grad=True,
                       atol=1e-30 + _entropy_term_atol(logits, case["temperature"], up))
    assert_unchanged(before, {"logits": logits})
