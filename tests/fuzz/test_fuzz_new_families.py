"""Fuzz: the op families added after issue 19 against their float64 oracles (docs/robustness.md):
sampling_logprobs and elo_ratings / kl_penalty(kl_correction=...) / linear_token_stats /
linear_distill_loss on both backends (Triton in the interpreter), and the plain-PyTorch ones
(bradley_terry, linear_preference_loss, linear_policy_loss, is_correction, off_policy_mask) once.

Every drawn case ends in a ValueError/TypeError naming an offending argument, or in outputs (and
gradients) equal to the oracle with NaN exactly where it is NaN and the inputs unchanged.  ``process_group=``
(two processes) is covered by tests/test_parallel*.py, not here.  Shapes stay tiny: the whole file runs
in about 20 s with the ci profile.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

import rlhf_kernels as rk
from rlhf_kernels import _dispatch
from rlhf_kernels.ops.aggregation import LOSS_AGG_MODES
from rlhf_kernels.reference import linear_logprobs as ref_linear
from rlhf_kernels.reference import linear_policy_loss as ref_policy
from rlhf_kernels.reference import linear_preference_loss as ref_pref
from rlhf_kernels.reference import ratings as ref_ratings
from rlhf_kernels.reference import rollout_correction as ref_rollout

from . import strategies as S
from .checks import (
    TOL,
    assert_matches,
    assert_names_argument,
    assert_unchanged,
    call,
    grads_of,
    leaf,
    lse_absorbs_tied_maxima,
    oracle_leaf,
    snapshot,
    upstream_for,
)
from .oracles import (
    bradley_terry_oracle,
    distill_oracle,
    exact_label_column,
    ignored_rows_zeroed,
    kl_penalty_oracle,
    sampling_oracle,
)
from .profiles import fuzz_settings

HEAD_DTYPES = (torch.float32, torch.bfloat16)  # the fused heads' common dtypes (fp16 follows bf16's path)


def _invalid(checks) -> list[str]:
    """The argument names of the failed ``(name, is_valid)`` checks (an event for
    ``--hypothesis-show-statistics``: how many cases reach the oracle)."""
    names = [name for name, ok in checks if not ok]
    event(f"rejected: {names[0]}" if names else "compared with the oracle")
    return names


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., 1]: rows of ``x`` [..., D] holding a non-finite value (where a gradient may be NaN although
    the oracle's derivative is finite: checks.assert_matches' ``may_be_nan``)."""
    return (~x.detach().double().isfinite()).any(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------
# sampling_logprobs (both backends)
# ---------------------------------------------------------------------------------------------------
def _one_bad(draw, valid: dict, invalid: dict) -> tuple[dict, str | None]:
    """Hyperparameters drawn from ``valid``; about every second case one of them (named) is drawn from
    ``invalid`` instead."""
    values = {name: draw(st.sampled_from(options)) for name, options in valid.items()}
    bad = draw(st.sampled_from([None] * len(invalid) + sorted(invalid)))
    if bad is not None:
        values[bad] = draw(st.sampled_from(invalid[bad]))
    return values, bad


@st.composite
def sampling_cases(draw):
    params, bad = _one_bad(
        draw,
        dict(
            temperature=[1.0, 0.7, 1e-3],
            top_k=[0, -1, 1, 3, "V"],
            top_p=[1.0, 0.9, 0.5, 1e-9],
            min_p=[0.0, 0.05, 1.0],
            dtype=S.ALL_FLOAT_DTYPES,
            bad_label=[None],
        ),
        dict(
            temperature=[0.0, -1.0, math.inf],
            top_k=["V+1", -2, 1.5],
            top_p=[0.0, 1.5, math.nan],
            min_p=[-0.1, 1.5],
            dtype=[torch.int32],
            bad_label=["V", "-2"],
        ),
    )
    return dict(
        params,
        lead=tuple(draw(st.lists(S.dims, max_size=2))),
        V=draw(st.sampled_from([0, 1, 2, 5, 17])),
        seed=draw(S.seeds()),
        layout=draw(S.layouts()),
        scale=draw(st.sampled_from([1.0, 5.0, 1e4])),
        special=draw(S.specials(kinds=("nan", "inf", "-inf", "big", "-big", "denormal"))),
        ignore_index=draw(st.sampled_from([-100, 0])),
        return_entropy=draw(st.booleans()),
        return_mask_mass=draw(st.booleans()),
    )


@fuzz_settings(20)
@given(case=sampling_cases())
def test_sampling_logprobs(backend, case):
    lead, V, seed, dtype, scale, temperature, top_k, top_p, min_p, ignore_index = (
        case[k]
        for k in (
            "lead",
            "V",
            "seed",
            "dtype",
            "scale",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "ignore_index",
        )
    )
    return_entropy, return_mask_mass, bad_label = (
        case["return_entropy"],
        case["return_mask_mass"],
        case["bad_label"],
    )
    shape = lead + (V,)
    floating = dtype.is_floating_point
    x = (
        S.values(shape, dtype, seed, scale=scale, special=case["special"])
        if floating
        else torch.zeros(shape, dtype=dtype)
    )
    logits = S.arrange(x, case["layout"])
    labels = S.labels_for(shape[:-1], V, seed, ignore_index=ignore_index)
    if bad_label and labels.numel():
        labels.view(-1)[0] = V if bad_label == "V" else -2
    top_k = {"V": V, "V+1": V + 1}.get(top_k, top_k)
    before = snapshot({"logits": logits, "labels": labels})
    z = leaf(logits) if floating else logits
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, ignore_index=ignore_index)
    result, error = call(
        rk.sampling_logprobs,
        z,
        labels,
        return_entropy=return_entropy,
        return_mask_mass=return_mask_mass,
        **kwargs,
    )
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    offending = _invalid(
        [
            ("logits", floating and V > 0),
            ("temperature", 0 < temperature < math.inf),
            ("top_k", isinstance(top_k, int) and -1 <= top_k <= V),
            ("top_p", 0 < top_p <= 1),
            ("min_p", 0 <= min_p <= 1),
            ("labels", not bool(out_of_range.any())),
        ]
    )
    if offending:
        return assert_names_argument(error, offending)
    assert error is None, error
    outputs = [result] if isinstance(result, torch.Tensor) else list(result)
    ol = ignored_rows_zeroed(logits, labels, ignore_index)
    expected = sampling_oracle(
        ol, labels, return_entropy=return_entropy, return_mask_mass=return_mask_mass, **kwargs
    )
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # fp32 rounding of x / τ ≈ scale / τ, not of the (small) log-prob
    tol = 1e-9 if dtype == torch.float64 else 3e-6 * (1 + scale / temperature)
    names = ["logprobs"] + ["entropy"] * return_entropy + ["mask_mass"] * return_mask_mass
    for name, out, exp in zip(names, outputs, expected):
        assert out.dtype == out_dtype, f"{name} dtype {out.dtype}"
        assert_matches(out, exp, name, tol=tol)
    live = [(o, e) for name, o, e in zip(names, outputs, expected) if name != "mask_mass"]
    if logits.numel():
        up = upstream_for([o for o, _ in live], seed)
        (grad,) = grads_of([o for o, _ in live], [z], up)
        (want,) = torch.autograd.grad([e for _, e in live], [ol], up)
        # the oracle's label column where q_y rounds (oracles.py logprobs_grad_oracle); the library's
        # is minus the sum of the others where q_y > 1/2
        want = exact_label_column(want, labels, ignore_index, where=expected[0].exp() > 0.5)
        assert grad.dtype == logits.dtype
        if lse_absorbs_tied_maxima(logits, temperature):
            # The log-prob ops' documented limitation (docs/sampling_logprobs.md, docs/logprobs.md): the
            # backward reads q = exp(x' − lse) with lse in fp32; with two or more tied maxima so large
            # that lse = m + log s rounds to m, the tied entries read q = 1.  Finite, as asserted there.
            assert bool(grad.isfinite().all() | logits.isnan().any())
            return
        assert_matches(
            grad,
            want,
            "grad logits",
            grad=True,
            tol=max(tol, TOL[grad.dtype]),
            atol=1e-30,
            may_be_nan=_nonfinite_rows(logits),
        )
    assert_unchanged(before, {"logits": logits, "labels": labels})


# ---------------------------------------------------------------------------------------------------
# ratings: elo_ratings (both backends), bradley_terry (PyTorch only: no kernel)
# ---------------------------------------------------------------------------------------------------
@st.composite
def comparison_cases(draw):
    """Leagues (or none), N comparisons with out-of-range (-1, I) and self-comparisons, optional scores
    in [0, 1] with specials."""
    leagues = draw(st.sampled_from([None, 1, 2]))
    N, I = draw(S.dims), draw(st.sampled_from([0, 1, 2, 3, 7]))
    seed = draw(S.seeds())
    shape = (N,) if leagues is None else (leagues, N)
    g = torch.Generator().manual_seed(seed)
    winners = torch.randint(-1, I + 1, shape, generator=g)
    losers = torch.randint(-1, I + 1, shape, generator=g)
    scores = None
    if draw(st.booleans()):
        scores = torch.rand(shape, generator=g, dtype=torch.float64).round(decimals=1)
        flat = scores.view(-1)
        for position, _ in draw(S.specials(max_size=1, kinds=("nan",))):
            if flat.numel():
                flat[int(position * flat.numel())] = math.nan
        scores = scores.to(draw(st.sampled_from([torch.float32, torch.float64])))
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return dict(
        winners=winners.to(index_dtype),
        losers=losers.to(index_dtype),
        scores=scores,
        I=I,
        leagues=leagues,
        seed=seed,
    )


@fuzz_settings(10)
@given(case=comparison_cases(), data=st.data())
def test_elo_ratings(backend, case, data):
    params, _ = _one_bad(
        data.draw,
        dict(
            k=[32.0, 16.0, 0.5],
            initial=[1000.0, "tensor", -250.0],
            dtype=[None, torch.float32, torch.float64],
            num_items=["I"],
        ),
        dict(
            k=[0.0, -1.0, math.nan],
            initial=[math.inf, "wrong shape"],
            dtype=[torch.float16, torch.int64],
            num_items=[-1, 2.5],
        ),
    )
    I = case["I"]
    num_items = I if params["num_items"] == "I" else params["num_items"]
    initial = params["initial"]
    lead = () if case["leagues"] is None else (case["leagues"],)
    if initial == "tensor":
        initial = S.values(lead + (I,), torch.float64, case["seed"], scale=300.0, offset=1000.0)
    elif initial == "wrong shape":
        initial = torch.zeros(I + 1)
    tensors = {k: case[k] for k in ("winners", "losers", "scores")}
    tensors["initial"] = initial
    before = snapshot(tensors)
    kwargs = dict(k=params["k"], initial=initial, scores=case["scores"], dtype=params["dtype"])
    result, error = call(rk.elo_ratings, case["winners"], case["losers"], num_items, **kwargs)
    offending = _invalid(
        [
            ("num_items", isinstance(num_items, int) and num_items >= 0),
            ("k", 0 < params["k"] < math.inf),
            ("dtype", params["dtype"] in (None, torch.float32, torch.float64)),
            ("initial", not isinstance(initial, float) or math.isfinite(initial)),
            ("initial", not isinstance(initial, torch.Tensor) or initial.shape[-1] == I),
        ]
    )
    if offending:
        return assert_names_argument(error, offending)
    assert error is None, error
    expected = ref_ratings.elo_ratings(case["winners"], case["losers"], I, **kwargs)
    fp64 = params["dtype"] == torch.float64 or (
        params["dtype"] is None
        and any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (initial, case["scores"]))
    )
    assert result.dtype == (torch.float64 if fp64 else torch.float32)
    # Ratings ~1000 after a few steps of size k: relative rounding of the dtype; a fp32 score is read as
    # the fp32 value (the oracle reads the same tensor).
    assert_matches(result, expected, "ratings", tol=1e-12 if fp64 else 2e-6)
    assert not result.requires_grad
    assert_unchanged(before, tensors)


def _skipped_nan_score_pending(case) -> bool:
    """FINDING (this session), test_bradley_terry_skipped_comparison_nan_score below: a NaN score on a
    skipped comparison (out of range or winner = loser) turns the whole league NaN (ops/ratings.py reads
    ``v * scores``: 0 · NaN); fix reported: ``torch.where(valid, scores, 0)``."""
    if case["scores"] is None:
        return False
    w, l, I = case["winners"], case["losers"], case["I"]
    skipped = (w < 0) | (w >= I) | (l < 0) | (l >= I) | (w == l)
    return bool((skipped & case["scores"].isnan()).any())


@fuzz_settings(10)
@given(case=comparison_cases(), data=st.data())
def test_bradley_terry(case, data):
    params, _ = _one_bad(
        data.draw,
        dict(
            prior=[1.0, 0.5, 3.0],
            scale=["log", "elo"],
            iters=[400],
            tol=[0.0, 1e-14],
            dtype=[None, torch.float64],
        ),
        dict(
            prior=[-1.0, math.nan],
            scale=["linear", None],
            iters=[-1, 2.0],
            tol=[-1e-3, math.inf],
            dtype=[torch.bfloat16],
        ),
    )
    assume(not _skipped_nan_score_pending(case))
    tensors = {k: case[k] for k in ("winners", "losers", "scores")}
    before = snapshot(tensors)
    result, error = call(
        rk.bradley_terry, case["winners"], case["losers"], case["I"], scores=case["scores"], **params
    )
    offending = _invalid(
        [
            ("prior", params["prior"] == params["prior"] and params["prior"] >= 0),
            ("scale", params["scale"] in ("log", "elo")),
            ("iters", isinstance(params["iters"], int) and params["iters"] >= 0),
            ("tol", 0 <= params["tol"] < math.inf),
            ("dtype", params["dtype"] in (None, torch.float64)),
        ]
    )
    if offending:
        return assert_names_argument(error, offending)
    assert error is None, error
    expected = bradley_terry_oracle(
        case["winners"],
        case["losers"],
        case["I"],
        scores=case["scores"],
        prior=params["prior"],
        scale=params["scale"],
    )
    fp64 = params["dtype"] == torch.float64 or (
        case["scores"] is not None and case["scores"].dtype == torch.float64
    )
    assert result.dtype == (torch.float64 if fp64 else torch.float32)
    # The op iterates MM to a fixed count, the oracle Newton to convergence: equal to the fit's accuracy.
    unit = 400 / math.log(10) if params["scale"] == "elo" else 1.0
    assert_matches(
        result,
        expected,
        "strengths",
        tol=0.0,
        atol=(1e-7 if fp64 else 2e-5) * unit + (1000 * 1e-7 if params["scale"] == "elo" and not fp64 else 0),
    )
    assert_unchanged(before, tensors)


# ---------------------------------------------------------------------------------------------------
# kl_penalty with old_logprobs and kl_correction (both backends)
# ---------------------------------------------------------------------------------------------------
@fuzz_settings(10)
@given(
    lead=st.lists(S.dims, max_size=2),
    seed=S.seeds(),
    dtype=st.sampled_from(S.ALL_FLOAT_DTYPES),
    estimator=st.sampled_from(["k1", "abs", "k2", "k3", "low_var_kl", "k3+", "bogus"]),
    kl_correction=st.sampled_from(["unbiased_gradient", "bias_correction", "bias_correction", "TRL"]),
    with_old=st.sampled_from([True, True, False]),
    layout=S.layouts(),
    special=S.specials(kinds=("nan", "inf", "-inf", "denormal")),
)
def test_kl_penalty_correction(
    backend, lead, seed, dtype, estimator, kl_correction, with_old, layout, special
):
    shape = tuple(lead)
    lp = S.arrange(S.values(shape, dtype, seed, scale=1.0, offset=-1.0, special=special), layout)
    ref = S.values(shape, dtype, seed + 1, scale=1.0, offset=-1.0)
    old = S.values(shape, dtype, seed + 2, scale=0.5, offset=-1.0) if with_old else None
    tensors = {"lp": lp, "ref": ref, "old": old}
    before = snapshot(tensors)
    x, r = leaf(lp), leaf(ref)
    result, error = call(rk.kl_penalty, x, r, estimator, old_logprobs=old, kl_correction=kl_correction)
    offending = _invalid([("estimator", estimator != "bogus"), ("kl_correction", kl_correction != "TRL")])
    if offending:
        return assert_names_argument(error, offending)
    assert error is None, error
    ox, orf = oracle_leaf(lp), oracle_leaf(ref)
    old64 = None if old is None else old.double()
    # reference.kl's straight-through sum is NaN at ±inf values (see oracles.kl_penalty_oracle): its
    # corrected form, and for the bias correction the reference's own formula around it
    if old is not None and kl_correction == "bias_correction":
        expected = kl_penalty_oracle(ox, orf, estimator) * torch.exp(ox - old64)
    else:
        expected = kl_penalty_oracle(ox, orf, estimator, old_logprobs=old64)
    out_dtype = torch.float64 if torch.float64 in (dtype,) else torch.float32
    assert result.dtype == out_dtype
    tol = 1e-9 if out_dtype == torch.float64 else 1e-5
    assert_matches(result, expected, "kl", tol=tol)
    if result.numel():
        up = upstream_for([result], seed)
        grads = grads_of([result], [x, r], up)
        want = torch.autograd.grad([expected], [ox, orf], up, allow_unused=True)
        bad = ~lp.double().isfinite()
        for name, g, w in zip(("logprobs", "ref_logprobs"), grads, want):
            w = torch.zeros(shape, dtype=torch.float64) if w is None else w
            assert_matches(
                g, w, f"grad {name}", grad=True, tol=max(tol, TOL[g.dtype]), atol=1e-30, may_be_nan=bad
            )
    assert_unchanged(before, {k: v for k, v in tensors.items() if v is not None})


# ---------------------------------------------------------------------------------------------------
# linear_token_stats (both backends; batch_invariant and labelled-rows-only paths)
# ---------------------------------------------------------------------------------------------------
STAT_FIELDS = ("logprobs", "entropy", "sum_sq_probs", "top1_match", "mean_logit")


@fuzz_settings(10)
@given(
    lead=st.lists(S.dims, max_size=2),
    H=st.sampled_from([1, 3, 8]),
    V=st.sampled_from([1, 2, 5, 17]),
    seed=S.seeds(),
    dtype=st.sampled_from(HEAD_DTYPES),
    layout=S.layouts(),
    with_bias=st.booleans(),
    flags=st.lists(st.booleans(), min_size=4, max_size=4),
    batch_invariant=st.booleans(),
    special=S.specials(max_size=2, kinds=("nan", "inf", "denormal")),
    data=st.data(),
)
def test_linear_token_stats(
    backend, lead, H, V, seed, dtype, layout, with_bias, flags, batch_invariant, special, data
):
    params, _ = _one_bad(
        data.draw,
        dict(
            temperature=[1.0, 0.7],
            logit_scale=[1.0, 0.5, 3.0],
            softcap=[None, 2.0, 30.0],
            weight_dtype=["same"],
        ),
        dict(
            temperature=[0.0, -1.0],
            logit_scale=[0.0, math.nan],
            softcap=[0.0, -2.0],
            weight_dtype=[torch.float64, torch.int32],
        ),
    )
    lead = tuple(lead)
    hidden = S.arrange(S.values(lead + (H,), dtype, seed, scale=0.5, special=special), layout)
    wd = dtype if params["weight_dtype"] == "same" else params["weight_dtype"]
    weight = S.values((V, H), torch.float64, seed + 1, scale=0.7).to(wd)
    bias = S.values((V,), dtype, seed + 2) if with_bias else None
    if with_bias and V > 1 and data.draw(st.booleans()):
        bias[0] = -math.inf  # a masked vocabulary entry
    labels = S.labels_for(lead, V, seed)  # about a fifth ignored: the labelled-rows-first order
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels}
    before = snapshot({k: v for k, v in tensors.items() if v is not None})
    h, b = leaf(hidden), leaf(bias) if with_bias else None
    w = leaf(weight) if wd.is_floating_point else weight
    options = dict(
        temperature=params["temperature"],
        logit_scale=params["logit_scale"],
        softcap=params["softcap"],
        entropy=flags[0],
        sum_sq_probs=flags[1],
        top1_match=flags[2],
        mean_logit=flags[3],
    )
    result, error = call(
        rk.linear_token_stats, h, w, labels, bias=b, batch_invariant=batch_invariant, **options
    )
    offending = _invalid(
        [
            ("temperature", params["temperature"] > 0),
            ("logit_scale", params["logit_scale"] > 0),
            ("softcap", params["softcap"] is None or params["softcap"] > 0),
            ("weight", wd == dtype),
        ]
    )
    if offending:
        return assert_names_argument(error, offending)
    assert error is None, error
    oh, ow, ob = (
        ignored_rows_zeroed(hidden, labels, -100),
        oracle_leaf(weight),
        oracle_leaf(bias) if with_bias else None,
    )
    expected = ref_linear.linear_token_stats(oh, ow, labels, bias=ob, **options)
    outs, exps, names = [], [], []
    for name in STAT_FIELDS:
        got, want = getattr(result, name), getattr(expected, name)
        if want is None:
            assert got is None, f"{name} was not requested but returned"
            continue
        assert got.dtype == torch.float32 and got.shape == labels.shape, name
        # FINDING (this session): top1_match at a row holding a +inf logit is 1.0 (the label's logit is
        # the maximum) in reference/token_stats.py, NaN in both ops (token_stats_from_logits too, both
        # backends: a row whose softmax is undefined is NaN throughout); reported as a spec question.
        may = _nonfinite_rows(hidden).squeeze(-1) if name == "top1_match" else None
        # logits ~ scale·|h||w| / τ: fp32 rounding of the logits, as in the linear_logprobs fuzz
        assert_matches(
            got,
            want,
            name,
            tol=1e-4 * (1 + H) * params["logit_scale"] / params["temperature"],
            may_be_nan=may,
        )
        if name != "top1_match":
            outs.append(got)
            exps.append(want)
            names.append(name)
    if labels.numel():
        up = upstream_for(outs, seed)
        inputs = [h, w] + ([b] if with_bias else [])
        grads = grads_of(outs, inputs, up)
        want_grads = torch.autograd.grad(exps, [oh, ow] + ([ob] if with_bias else []), up, allow_unused=True)
        bad = _nonfinite_rows(hidden)
        for name, g, e, x in zip(("hidden", "weight", "bias"), grads, want_grads, inputs):
            e = torch.zeros(x.shape, dtype=torch.float64) if e is None else e
            g = torch.zeros_like(x) if g is None else g
            assert g.dtype == x.dtype
            assert_matches(
                g,
                e,
                f"grad {name}",
                grad=True,
                tol=max(1e-3, TOL[g.dtype]),
                # fp32 rounding where every oracle gradient is 0 (V = 1: Σp² ≡ 1), which the
                # gradient-scale tolerance cannot absorb: ~1e-6 seen with logit_scale 3
                atol=1e-5,
                may_be_nan=bad if name == "hidden" else bad.any(),
            )
    assert_unchanged(before, tensors)


# ---------------------------------------------------------------------------------------------------
# linear_distill_loss (both backends: the Triton row kernel, the PyTorch rows)
# ---------------------------------------------------------------------------------------------------
@fuzz_settings(10)
@given(
    lead=st.lists(S.dims, max_size=2),
    HS=st.sampled_from([1, 4]),
    HT=st.sampled_from([1, 3]),
    V=st.sampled_from([1, 2, 5, 17]),
    seed=S.seeds(),
    dtype=st.sampled_from(HEAD_DTYPES + (torch.float64,)),
    layout=S.layouts(),
    with_labels=st.booleans(),
    biases=st.sampled_from(["none", "student", "both", "masked"]),
    special=S.specials(max_size=1, kinds=("nan", "inf")),
    data=st.data(),
)
def test_linear_distill_loss(
    backend, lead, HS, HT, V, seed, dtype, layout, with_labels, biases, special, data
):
    params, _ = _one_bad(
        data.draw,
        dict(
            divergence=["forward_kl", "reverse_kl", "jsd"],
            beta=[0.5, 0.0, 1.0, 0.1],
            temperature=[1.0, 0.7],
            teacher_V=["V"],
            accumulation=["float32", "weight_dtype"],
        ),
        dict(
            divergence=["kl", "JSD"],
            beta=[-0.1, 1.5, math.nan],
            temperature=[0.0, -2.0],
            teacher_V=["V+1"],
            accumulation=["float16"],
        ),
    )
    lead = tuple(lead)
    sh = S.arrange(S.values(lead + (HS,), dtype, seed, scale=0.7, special=special), layout)
    sw = S.values((V, HS), dtype, seed + 1, scale=0.7)
    th = S.values(lead + (HT,), dtype, seed + 2, scale=0.7)
    tw = S.values((V + (params["teacher_V"] == "V+1"), HT), dtype, seed + 3, scale=0.7)
    sb = S.values((V,), dtype, seed + 4) if biases != "none" else None
    tb = S.values((tw.shape[0],), dtype, seed + 5) if biases in ("both", "masked") else None
    if biases == "masked" and V > 1:  # the same entry masked in both models: probability 0 in both
        sb[0], tb[0] = -math.inf, -math.inf
    labels = S.labels_for(lead, V, seed) if with_labels else None
    tensors = {"sh": sh, "sw": sw, "th": th, "tw": tw, "sb": sb, "tb": tb, "labels": labels}
    before = snapshot({k: v for k, v in tensors.items() if v is not None})
    x, w, b = leaf(sh), leaf(sw), leaf(sb) if sb is not None else None
    kwargs = dict(divergence=params["divergence"], beta=params["beta"], temperature=params["temperature"])
    result, error = call(
        rk.linear_distill_loss,
        x,
        w,
        th,
        tw,
        labels,
        student_bias=b,
        teacher_bias=tb,
        grad_weight_accumulation=params["accumulation"],
        **kwargs,
    )
    offending = _invalid(
        [
            ("divergence", params["divergence"] in ("forward_kl", "reverse_kl", "jsd")),
            ("beta", 0 <= params["beta"] <= 1),
            ("temperature", params["temperature"] > 0),
            ("teacher_weight", params["teacher_V"] == "V"),
            ("grad_weight_accumulation", params["accumulation"] != "float16"),
        ]
    )
    if offending:
        return assert_names_argument(error, offending + ["teacher_bias"])
    assert error is None, error
    ox = oracle_leaf(sh) if labels is None else ignored_rows_zeroed(sh, labels, -100)
    ow, ob = oracle_leaf(sw), oracle_leaf(sb) if sb is not None else None
    expected = distill_oracle(ox, ow, th, tw, labels, student_bias=ob, teacher_bias=tb, **kwargs)
    assert result.dim() == 0 and result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-9 if dtype == torch.float64 else 1e-4 * (1 + HS + HT)
    assert_matches(result, expected, "loss", tol=tol)
    if bool(expected.isnan()):  # NaN in, NaN out (asserted above); the gradients are NaN then too
        return assert_unchanged(before, {k: v for k, v in tensors.items() if v is not None})
    inputs = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(result, inputs, allow_unused=True)
    want = torch.autograd.grad(expected, [ox, ow] + ([ob] if ob is not None else []), allow_unused=True)
    bad = _nonfinite_rows(sh)
    for name, g, e, t in zip(("student_hidden", "student_weight", "student_bias"), grads, want, inputs):
        e = torch.zeros(t.shape, dtype=torch.float64) if e is None else e
        g = torch.zeros_like(t) if g is None else g
        assert g.dtype == t.dtype, name
        assert_matches(
            g,
            e,
            f"grad {name}",
            grad=True,
            tol=max(tol, TOL[g.dtype], 1e-3 if dtype != torch.float64 else 0),
            atol=1e-7,
            may_be_nan=bad.any(),
        )
    assert_unchanged(before, {k: v for k, v in tensors.items() if v is not None})


def _compare_metrics(metrics: dict, expected: dict, tol: float, what: str) -> None:
    for key, value in expected.items():
        assert key in metrics, f"{what}: metric {key} missing (got {sorted(metrics)})"
        got = metrics[key]
        assert got.dtype == torch.float32 and got.shape == value.shape, f"{what}: metric {key}"
        assert_matches(got, value, f"{what} metric {key}", tol=tol)


def _head_grads(loss, leaves, oracle_loss, oracle_leaves, tol, what, bad=None):
    live = [(x, ox) for x, ox in zip(leaves, oracle_leaves) if x is not None]
    grads = torch.autograd.grad(loss, [x for x, _ in live], allow_unused=True)
    want = torch.autograd.grad(oracle_loss, [ox for _, ox in live], allow_unused=True)
    for name, g, e, (x, _) in zip(("hidden", "weight", "bias"), grads, want, live):
        g = torch.zeros_like(x) if g is None else g
        e = torch.zeros(x.shape, dtype=torch.float64) if e is None else e
        assert g.dtype == x.dtype, f"{what}: grad {name} dtype {g.dtype}"
        assert_matches(g, e, f"{what}: grad {name}", grad=True, tol=tol, atol=1e-7, may_be_nan=bad)


# ---------------------------------------------------------------------------------------------------
# linear_preference_loss (PyTorch: matmul-bound, no kernel)
# ---------------------------------------------------------------------------------------------------
PREFERENCE_KWARGS = {
    "dpo": [
        dict(beta=0.1),
        dict(beta=0.3, loss_type="ipo"),
        dict(loss_type=["sigmoid", "hinge"], loss_weights=[0.7, 0.3]),
    ],
    "simpo": [dict(beta=2.0, gamma=0.5)],
    "cpo": [dict(beta=0.1, cpo_alpha=1.0)],
    "orpo": [dict(beta=0.1)],
    "kto": [dict(beta=0.1)],
}


@fuzz_settings(10)
@given(
    pairs=st.sampled_from([0, 1, 2, 3]),
    T=st.sampled_from([1, 3, 5]),
    H=st.sampled_from([1, 4]),
    V=st.sampled_from([1, 2, 7]),
    seed=S.seeds(),
    dtype=st.sampled_from(HEAD_DTYPES + (torch.float64,)),
    layout=S.layouts(),
    loss=st.sampled_from(sorted(PREFERENCE_KWARGS)),
    ref=st.sampled_from(["none", "logps", "head"]),
    with_bias=st.booleans(),
    data=st.data(),
)
def test_linear_preference_loss(pairs, T, H, V, seed, dtype, layout, loss, ref, with_bias, data):
    bad_kwargs = data.draw(st.sampled_from([None, None, None, "loss", "beta", "aot"]))
    kwargs = dict(data.draw(st.sampled_from(PREFERENCE_KWARGS[loss])))
    if bad_kwargs == "beta":
        kwargs["beta"] = -1.0 if loss != "simpo" else math.nan
    S_ = 2 * pairs
    if loss == "dpo" and ref == "none":
        ref = "logps"  # the DPO types drawn here need the reference (an error naming ref_logps otherwise)
    hidden = S.arrange(S.values((S_, T, H), dtype, seed, scale=0.7), layout)
    weight = S.values((V, H), dtype, seed + 1, scale=0.7)
    bias = S.values((V,), dtype, seed + 2) if with_bias else None
    labels = S.labels_for((S_, T), V, seed)
    extra = {}
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp64 anywhere: an fp64 loss
    if loss == "kto":
        extra["desirable"] = torch.arange(S_) % 2 == 0
        extra["kl_logps"] = S.values((max(S_, 1),), ref_dtype, seed + 3) - 4
        extra["ref_kl_logps"] = S.values((max(S_, 1),), ref_dtype, seed + 4) - 4
    if ref == "logps" or loss == "kto":
        extra["ref_logps"] = S.values((S_,), ref_dtype, seed + 5, scale=3.0) - 5
    elif ref == "head":
        extra["ref_hidden"] = S.values((S_, T, 2), dtype, seed + 6)
        extra["ref_weight"] = S.values((V, 2), dtype, seed + 7)
    name = {"loss": "unknown", "aot": "dpo"}.get(bad_kwargs, loss)
    if bad_kwargs == "aot":
        kwargs = dict(loss_type="aot")
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels, **extra}
    before = snapshot({k: v for k, v in tensors.items() if v is not None})
    h, w, b = leaf(hidden), leaf(weight), leaf(bias) if with_bias else None
    result, error = call(rk.linear_preference_loss, h, w, labels, loss=name, bias=b, **extra, **kwargs)
    reference_free = name in ("simpo", "cpo", "orpo")
    offending = _invalid(
        [
            ("loss", bad_kwargs != "loss"),
            ("beta", bad_kwargs != "beta"),
            ("loss_type", bad_kwargs != "aot"),
            ("ref_logps", not (reference_free and ref != "none")),
        ]
    )
    if offending:
        return assert_names_argument(error, offending)
    assert error is None, error
    oh, ow, ob = oracle_leaf(hidden), oracle_leaf(weight), oracle_leaf(bias) if with_bias else None
    oextra = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
        for k, v in extra.items()
    }
    want, want_metrics = ref_pref.linear_preference_loss(
        oh, ow, labels, loss=name, bias=ob, **oextra, **kwargs
    )
    got, metrics = result
    assert got.dim() == 0 and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-9 if dtype == torch.float64 else (2e-2 if dtype == torch.bfloat16 else 1e-4)
    assert_matches(got, want, f"{loss} loss", tol=tol)
    _compare_metrics(metrics, want_metrics, max(tol, 1e-5), loss)
    _head_grads(got, [h, w, b], want, [oh, ow, ob], max(tol, 1e-4), loss)
    assert_unchanged(before, {k: v for k, v in tensors.items() if v is not None})


# ---------------------------------------------------------------------------------------------------
# linear_policy_loss (PyTorch: three matmul passes per chunk, no kernel)
# ---------------------------------------------------------------------------------------------------
POLICY_PARAMS = {
    "vanilla": [None, {"clip_high": 0.28}, {"dual_clip": None}],
    "dro": [{"beta": 0.3}],
    "cispo": [None, {"clip_high": 0.28}],
    # FINDING (this session): reference/linear_policy_loss.py's _sapo builds τ with
    # torch.where(adv > 0, tau_pos, tau_neg) of two Python floats, a float32 tensor: τ_neg = 1.05 is
    # 1.0499999523 and 4/τ a float32 quotient, so the fp64 oracle is off by ~1e-7 (the op equals
    # sapo_policy_loss exactly).  Fix reported: a float64 τ.  Here τ with 4/τ exact in float32.
    "sapo": [{"tau_pos": 1.0, "tau_neg": 2.0}, {"tau_pos": 0.5, "tau_neg": 1.0}],
    "dppo_tv": [{"clip_low": 0.05, "clip_high": 0.08, "truncation": 1.3}],
    "dppo_kl": [{"clip_low": 0.01, "clip_high": 0.02, "truncation": 1.3}],
}


@fuzz_settings(10)
@given(
    B=st.sampled_from([1, 2, 3]),
    T=st.sampled_from([1, 3, 5]),
    H=st.sampled_from([1, 4]),
    V=st.sampled_from([1, 2, 7]),
    seed=S.seeds(),
    dtype=st.sampled_from(HEAD_DTYPES + (torch.float64,)),
    layout=S.layouts(),
    mask=S.masks(),
    with_bias=st.booleans(),
    data=st.data(),
)
def test_linear_policy_loss(B, T, H, V, seed, dtype, layout, mask, with_bias, data):
    loss = data.draw(st.sampled_from(sorted(POLICY_PARAMS)))
    params, bad = _one_bad(
        data.draw,
        dict(
            loss_params=POLICY_PARAMS[loss],
            entropy_coef=[0.0, 0.03],
            kl=["none", "ref", "ref+coef"],
            estimator=["low_var_kl", "k1", "k3+"],
            temperature=[1.0, 0.7],
            loss_agg=list(LOSS_AGG_MODES),
            normalizer=[None, 3.0],
            is_weights=[False, True],
            chunk_rows=[None, 1, 4],
        ),
        dict(
            loss_params=[{"clip_low": -0.1}],
            kl=["coef only"],
            estimator=["k9"],
            temperature=[0.0],
            loss_agg=["mean"],
            chunk_rows=[0, True],
        ),
    )
    if loss == "dro" and bad == "loss_params":
        params["loss_params"] = {}  # dro's beta is required
    hidden = S.arrange(S.values((B, T, H), dtype, seed, scale=0.7), layout)
    weight = S.values((V, H), dtype, seed + 1, scale=0.7)
    bias = S.values((V,), dtype, seed + 2) if with_bias else None
    labels = S.labels_for((B, T), V, seed)
    token_dtype = data.draw(st.sampled_from([torch.float32, dtype]))
    old = (-S.values((B, T), torch.float64, seed + 3).abs()).to(token_dtype)
    adv = S.values((B, T), token_dtype, seed + 4)
    m = S.mask_for((B, T), mask[0], mask[1], seed)
    ref = (
        (-S.values((B, T), torch.float64, seed + 5).abs()).to(token_dtype)
        if params["kl"] in ("ref", "ref+coef")
        else None
    )
    kl_coef = 0.2 if params["kl"] in ("ref+coef", "coef only") else 0.0
    is_weights = (
        S.values((B, T), torch.float64, seed + 6).abs().to(token_dtype) if params["is_weights"] else None
    )
    kwargs = dict(
        loss=loss,
        loss_params=params["loss_params"],
        entropy_coef=params["entropy_coef"],
        ref_logprobs=ref,
        kl_coef=kl_coef,
        kl_estimator=params["estimator"],
        temperature=params["temperature"],
        loss_agg=params["loss_agg"],
        normalizer=params["normalizer"],
        is_weights=is_weights,
    )
    tensors = {
        "hidden": hidden,
        "weight": weight,
        "bias": bias,
        "labels": labels,
        "old": old,
        "adv": adv,
        "mask": m,
        "ref": ref,
        "is_weights": is_weights,
    }
    before = snapshot({k: v for k, v in tensors.items() if v is not None})
    h, w, b = leaf(hidden), leaf(weight), leaf(bias) if with_bias else None
    result, error = call(
        rk.linear_policy_loss,
        h,
        w,
        labels,
        old,
        adv,
        m,
        bias=b,
        chunk_rows=params["chunk_rows"],
        return_logprobs=True,
        **kwargs,
    )
    names = {
        "loss_params": ["loss_params", "clip_low", "beta"],
        "kl": ["kl_coef", "ref_logprobs"],
        "estimator": ["estimator", "kl_estimator"],
        "temperature": ["temperature"],
        "loss_agg": ["loss_agg"],
        "chunk_rows": ["chunk_rows"],
    }
    event(f"rejected: {bad}" if bad else "compared with the oracle")
    if bad:
        return assert_names_argument(error, names[bad])
    assert error is None, error
    oh, ow, ob = oracle_leaf(hidden), oracle_leaf(weight), oracle_leaf(bias) if with_bias else None
    want, want_metrics, want_lp = ref_policy.linear_policy_loss(
        oh, ow, labels, old, adv, m, bias=ob, return_logprobs=True, **kwargs
    )
    got, metrics, lp = result
    assert got.dim() == 0 and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-9 if dtype == torch.float64 else (3e-2 if dtype == torch.bfloat16 else 1e-4)
    assert_matches(got, want, f"{loss} loss", tol=tol)
    assert set(metrics) == set(want_metrics), (sorted(metrics), sorted(want_metrics))
    for key in ("clipfrac", "clipfrac_lower"):  # a fraction: one token's flip across a clip edge is 1/n
        want_metrics.pop(key, None)
        metrics.pop(key, None)
    _compare_metrics(metrics, {k: v.double() for k, v in want_metrics.items()}, max(tol, 1e-5), loss)
    assert_matches(lp, torch.where((m != 0) & (labels != -100), want_lp, 0.0), "logprobs", tol=max(tol, 1e-5))
    _head_grads(got, [h, w, b], want, [oh, ow, ob], max(tol, 1e-4), loss)
    assert_unchanged(before, {k: v for k, v in tensors.items() if v is not None})


# ---------------------------------------------------------------------------------------------------
# rollout_correction: is_correction, off_policy_mask (PyTorch: O(B·T) elementwise, no kernel)
# ---------------------------------------------------------------------------------------------------
@fuzz_settings(15)
@given(batch=S.token_batches(2, (torch.float32, torch.float64, torch.bfloat16)), data=st.data())
def test_is_correction(batch, data):
    B, T, (old, rollout), mask, case = batch
    params, bad = _one_bad(
        data.draw,
        dict(
            level=["token", "sequence"],
            mode=["mask", "clip"],
            gating=["ratio", "binary_kl", "tv"],
            threshold=["ratio pair", "bound"],
        ),
        dict(level=["row"], mode=["drop"], gating=["kl"], threshold=["reversed", "triple", "nan"]),
    )
    gating = params["gating"]
    if params["mode"] == "clip" and bad is None:  # clip: token level and ratio gating only
        params["level"], gating = "token", "ratio"
    threshold = {
        "ratio pair": (0.5, 2.0) if gating == "ratio" else (0.0, 0.1),
        "bound": 2.0 if gating == "ratio" else 0.05,
        "reversed": (2.0, 0.5),
        "triple": (0.5, 1.0, 2.0),
        "nan": math.nan,
    }[params["threshold"]]
    # log-probs are ≤ 0; shift the drawn values there (specials keep their meaning)
    old, rollout = old - 1.0, rollout - 1.0
    tensors = {"old": old, "rollout": rollout, "mask": mask}
    before = snapshot(tensors)
    kwargs = dict(level=params["level"], mode=params["mode"], gating=gating, threshold=threshold)
    result, error = call(rk.is_correction, old, rollout, mask, **kwargs)
    event(f"rejected: {bad}" if bad else "compared with the oracle")
    if bad is not None:
        return assert_names_argument(
            error, [bad, "threshold low", "threshold high"] + ["mode"] * (params["mode"] == "clip")
        )
    if B == 0 or T == 0:  # the [B, T] token checks ask for B, T ≥ 1 (docs/robustness.md, empty rule)
        if error is not None:
            return assert_names_argument(error, ["old_logprobs", "mask"])
    assert error is None, error
    coef, metrics = result
    if B == 0:  # the oracle divides by B = 0; the empty rule: an empty coefficient, metrics 0
        want, want_metrics = (
            torch.zeros(0, T, dtype=torch.float64),
            {
                "vllm_kl": torch.zeros((), dtype=torch.float64),
                "is_filter_ratio": torch.zeros((), dtype=torch.float64),
            },
        )
    else:
        want, want_metrics = ref_rollout.is_correction(old, rollout, mask, **kwargs)
    fp64 = old.dtype == torch.float64
    assert coef.dtype == (torch.float64 if fp64 else torch.float32) and not coef.requires_grad
    tol = 1e-9 if fp64 else 1e-5
    if bool((old.isnan() & (mask != 0)).any()):
        # FINDING (this session, a spec question): a NaN statistic fails OpenRLHF's keep test, so the op
        # (like OpenRLHF 0.11.2's PolicyLoss: torch.where(keep, ratio, 0)) drops the unit — coefficient 0,
        # counted as filtered — where reference/rollout_correction.py keeps it (coefficient NaN).  The
        # NaN still surfaces in vllm_kl; asserted here, the rest follows OpenRLHF.
        event("NaN log-prob: OpenRLHF's drop rule")
        assert bool(metrics["vllm_kl"].isnan()), metrics
        at_nan = old.isnan() & (mask != 0)
        dropped = coef[at_nan].isnan() if params["mode"] == "clip" else coef[at_nan] == 0
        assert bool(dropped.all()), coef
        return assert_unchanged(before, tensors)
    assert_matches(coef, want, "coefficient", tol=tol)
    for key, value in want_metrics.items():
        assert_matches(metrics[key], value, f"metric {key}", tol=tol)
    assert_unchanged(before, tensors)


@fuzz_settings(15)
@given(batch=S.token_batches(2, (torch.float32, torch.float64, torch.bfloat16)), data=st.data())
def test_off_policy_mask(batch, data):
    B, T, (lp, sampling), mask, case = batch
    adv_shape = data.draw(st.sampled_from(["B", "B1", "BT", "wrong"]))
    threshold = data.draw(st.sampled_from([0.5, 0.0, -1.0, 1e30, math.nan, "0.5"]))
    shape = {"B": (B,), "B1": (B, 1), "BT": (B, T), "wrong": (B + 1,)}[adv_shape]
    adv = S.values(shape, torch.float32, case["seed"] + 9)
    tensors = {"lp": lp, "sampling": sampling, "mask": mask, "adv": adv}
    before = snapshot(tensors)
    result, error = call(rk.off_policy_mask, adv, lp, sampling, mask, threshold)
    valid_threshold = isinstance(threshold, float) and math.isfinite(threshold)
    offending = _invalid([("advantages", adv_shape != "wrong"), ("threshold", valid_threshold)])
    if offending:
        return assert_names_argument(error, offending + ["logprobs", "mask"])
    if (B == 0 or T == 0) and error is not None:
        return assert_names_argument(error, ["logprobs", "mask"])
    assert error is None, error
    if B == 0:  # the oracle's reshape(0, -1) fails; the result is empty
        want = torch.zeros((0, T) if adv_shape == "BT" else (0, 1), dtype=mask.dtype)
    else:
        want = ref_rollout.off_policy_mask(adv, lp, sampling, mask, threshold)
    if adv_shape == "B":
        want = want.reshape(B, 1)
    assert result.dtype == mask.dtype and result.shape == want.shape
    assert torch.equal(result.double(), want.double()), (result, want)
    assert_unchanged(before, tensors)


# ---------------------------------------------------------------------------------------------------
# process_group= (the two-process runs live in tests/test_parallel*.py): a non-group is refused, by name
# ---------------------------------------------------------------------------------------------------
PROCESS_GROUP_CALLS = {
    "masked_whiten": lambda pg: rk.masked_whiten(torch.randn(2, 3), torch.ones(2, 3), process_group=pg),
    "logprobs_from_logits": lambda pg: rk.logprobs_from_logits(
        torch.randn(2, 5), torch.tensor([0, 1]), process_group=pg
    ),
    "entropy_from_logits": lambda pg: rk.entropy_from_logits(torch.randn(2, 5), process_group=pg),
    "token_stats_from_logits": lambda pg: rk.token_stats_from_logits(
        torch.randn(2, 5), torch.tensor([0, 1]), process_group=pg
    ),
    "linear_logprobs": lambda pg: rk.linear_logprobs(
        torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), process_group=pg
    ),
    "linear_distill_loss": lambda pg: rk.linear_distill_loss(
        torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3), torch.randn(5, 3), process_group=pg
    ),
}


@pytest.mark.parametrize("op", sorted(PROCESS_GROUP_CALLS))
@pytest.mark.parametrize("group", ["world", 1, object()])
def test_process_group_must_be_a_group(op, group):
    _, error = call(PROCESS_GROUP_CALLS[op], group)
    assert_names_argument(error, "process_group")


# ---------------------------------------------------------------------------------------------------
# Regressions: library defects this file found, fixed in the same session (see docs/robustness.md)
# ---------------------------------------------------------------------------------------------------
def test_bradley_terry_skipped_comparison_nan_score():
    """Found by this file and fixed (ops/ratings.py bradley_terry): a skipped comparison (winner −1 here)
    must not matter, whatever its score; ``s = v * scores`` is 0 · NaN = NaN and turned the whole league
    NaN.  Fix: ``torch.where(valid, scores, 0)``."""
    winners, losers = torch.tensor([-1, 0, 1]), torch.tensor([0, 1, 0])
    clean = rk.bradley_terry(winners, losers, 2, scores=torch.tensor([0.5, 0.3, 0.8]))
    poisoned = rk.bradley_terry(winners, losers, 2, scores=torch.tensor([math.nan, 0.3, 0.8]))
    assert torch.equal(poisoned, clean), (poisoned, clean)  # clean ≈ (−0.343, +0.343)


def test_is_correction_sequence_level_empty_batch_metrics_are_zero():
    """Found by this file and fixed (ops/rollout_correction.py is_correction): the empty rule
    (docs/robustness.md) — B = 0 gives metrics 0; the sequence level's is_filter_ratio was the mean over
    no row, NaN."""
    empty = torch.zeros(0, 3)
    coef, metrics = rk.is_correction(empty, empty, torch.ones(0, 3), level="sequence")
    assert coef.shape == (0, 3)
    assert all(v.dim() == 0 and v.item() == 0.0 for v in metrics.values()), metrics


def test_ignored_row_never_reaches_d_weight(backend):
    """Found by this file and fixed (ops/linear_logprobs.py Triton backward; ops/linear_distill_loss.py,
    both backends): a position labelled ``ignore_index`` counts for nothing, so a NaN in its hidden state
    must not reach d_weight; d_weight = Gᵀ·hidden over all rows is 0 · NaN = NaN in its column
    (linear_logprobs' PyTorch path drops the ignored rows and is right).  Fix: the product over the
    labelled rows only (or the ignored rows of hidden read as 0)."""
    torch.manual_seed(0)
    hidden = torch.tensor([[math.nan, 1.0], [0.5, -0.2]])
    weight, labels = torch.randn(3, 2), torch.tensor([-100, 1])
    for name, fn in (
        ("linear_logprobs", lambda h, w: rk.linear_logprobs(h, w, labels).sum()),
        (
            "linear_distill_loss",
            lambda h, w: rk.linear_distill_loss(h, w, torch.ones(2, 2), torch.ones(3, 2), labels),
        ),
    ):
        h, w = leaf(hidden), leaf(weight)
        (d_weight,) = torch.autograd.grad(fn(h, w), [w])
        assert bool(d_weight.isfinite().all()), f"{name}: d_weight {d_weight.tolist()}"


def test_linear_token_stats_top1_without_exponentials():
    """Found by this file (fixed in ops/linear_logprobs.py during the same session): with neither entropy
    nor sum_sq_probs the PyTorch path folded each chunk as (lse_c, 1), so ``m`` was the row's
    log-sum-exp, not its maximum, and top1_match = (z_label == m) was 0 everywhere."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 4), torch.randn(5, 4)
    labels = (hidden @ weight.T).argmax(-1)  # every label is its row's maximum
    with _dispatch.use_backend("torch"):
        top1 = rk.linear_token_stats(hidden, weight, labels, top1_match=True).top1_match
    assert top1.tolist() == [1.0] * 6


def test_distill_triton_rows_keep_nan(backend):
    """Found by this file and fixed (ops/linear_distill_loss.py, the Triton row kernel): NaN in, NaN out —
    a student row whose logits are NaN gives loss 0 under reverse KL and JSD on the Triton path
    (the PyTorch path: NaN)."""
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss = rk.linear_distill_loss(
            torch.tensor([[math.nan]]),
            torch.ones(3, 1),
            torch.ones(1, 1),
            torch.ones(3, 1),
            divergence=divergence,
        )
        assert bool(loss.isnan()), f"{divergence}: {loss.item()}"


def test_preference_fp64_reference_head_error_names_it():
    """Found by this file and fixed (ops/linear_preference_loss.py): fp64 hidden is accepted, but an fp64
    reference head (ref_hidden / ref_weight) raises
    "hidden must be a floating tensor (float32, bfloat16, float16)", naming the policy's argument; it
    should either compute (as for the fp64 policy head) or name ref_hidden."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3))
    ref_head = dict(
        ref_hidden=torch.randn(2, 3, 2, dtype=torch.float64),
        ref_weight=torch.randn(5, 2, dtype=torch.float64),
    )
    _, error = call(
        rk.linear_preference_loss, hidden, torch.randn(5, 4, dtype=torch.float64), labels, **ref_head
    )
    if error is not None:
        assert_names_argument(error, ["ref_hidden", "ref_weight"])
