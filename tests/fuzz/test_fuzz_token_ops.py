"""Fuzz: the token-level families gae, whiten, token_rewards and advantages (both backends where they
have two) against reference/{gae,whiten,token_rewards,advantages}.py, plus the masked-garbage property
(masked positions never leak into the outputs)."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlhf_kernels as rk
from rlhf_kernels.reference import advantages as ref_adv
from rlhf_kernels.reference import gae as ref_gae
from rlhf_kernels.reference import token_rewards as ref_tr
from rlhf_kernels.reference import whiten as ref_whiten

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

KERNEL_DTYPES = S.FLOAT_DTYPES  # gae, whiten and token rewards accept fp32/bf16/fp16; fp64 is refused
DRAWN_DTYPES = S.FLOAT_DTYPES + (torch.float64,)


@fuzz_settings(25)
@given(batch=S.token_batches(2, DRAWN_DTYPES, same_dtype=False),
       gamma=st.sampled_from([1.0, 0.99, 0.0, 1 / 3]), lam=st.sampled_from([1.0, 0.95, 0.0]),
       mask_mode=st.sampled_from(["carry", "zero"]))
def test_compute_gae(backend, batch, gamma, lam, mask_mode):
    B, T, (rewards, values), mask, case = batch
    inputs = dict(rewards=rewards, values=values, mask=mask)
    before = snapshot(inputs)
    result, error = call(rk.compute_gae, rewards, values, mask, gamma, lam, mask_mode=mask_mode)
    rejected = [n for n in ("rewards", "values") if inputs[n].dtype not in KERNEL_DTYPES]
    if rejected:
        return assert_names_argument(error, rejected)
    assert error is None, error
    expected = ref_gae.compute_gae(rewards, values, mask, gamma, lam, mask_mode=mask_mode)
    for name, out, exp in zip(("advantages", "returns"), result, expected):
        assert out.dtype == torch.float32
        # T sequential fp32 steps: a few ulps per step of the running sum's scale.
        assert_matches(out, exp, name, tol=2e-5 * (1 + T))
    assert_unchanged(before, inputs)


@fuzz_settings(15)
@given(batch=S.token_batches(2, KERNEL_DTYPES, same_dtype=False),
       mask_mode=st.sampled_from(["carry", "zero"]))
def test_compute_gae_masked_garbage(backend, batch, mask_mode):
    B, T, (rewards, values), mask, case = batch
    clean = rk.compute_gae(rewards, values, mask, 0.9, 0.8, mask_mode=mask_mode)
    dirty = rk.compute_gae(S.garbage_at_masked(rewards, mask), S.garbage_at_masked(values, mask), mask, 0.9, 0.8,  # noqa: E501
                           mask_mode=mask_mode)
    valid = mask != 0
    assert_matches(dirty[0], clean[0], "advantages with garbage at masked positions", tol=0.0)
    # carry-mode returns add V at a masked position too (as verl); compare valid positions there.
    returns_where = valid if mask_mode == "carry" else torch.ones_like(valid)
    assert_matches(dirty[1][returns_where], clean[1][returns_where], "returns", tol=0.0)


@fuzz_settings(25)
@given(shape=st.lists(S.dims, min_size=0, max_size=3), seed=S.seeds(), layout=S.layouts(),
       dtype=st.sampled_from(DRAWN_DTYPES), mask=S.masks(), per_row=st.booleans(),
       shift_mean=st.booleans(), unbiased=st.booleans(), eps=st.sampled_from([1e-8, 0.0, 1e-3]),
       special=S.specials(), offset=st.sampled_from([0.0, 1000.0, 1e30]), expand_dim=st.integers(0, 2))
def test_masked_whiten(backend, shape, seed, layout, dtype, mask, per_row, shift_mean, unbiased, eps, special,
                       offset, expand_dim):
    shape = tuple(shape)
    kind, mask_dtype = mask
    m = S.mask_for(shape, kind, mask_dtype, seed) if len(shape) else torch.tensor(True).to(mask_dtype)
    scale = 1.0 if offset < 1e29 else 1e29
    x = S.with_specials_at_valid(S.values(shape, torch.float64, seed, scale=scale, offset=offset), m, special)
    x = S.arrange(x.to(dtype), layout, expand_dim=expand_dim)
    dim = -1 if per_row else None
    before = snapshot({"x": x, "mask": m})
    result, error = call(rk.masked_whiten, x, m, shift_mean=shift_mean, unbiased=unbiased, eps=eps, dim=dim)
    if dtype not in KERNEL_DTYPES:
        return assert_names_argument(error, "x")
    if per_row and len(shape) == 0:
        return assert_names_argument(error, "dim")
    assert error is None, error
    if x.numel() == 0:
        # FINDING (issue 19): the oracle cannot reshape an empty [..., 0] tensor per row (RuntimeError);
        # the empty rule gives an empty result.  Oracle fix reported: return zeros of x's shape first.
        expected = torch.empty(shape, dtype=torch.float64)
    else:
        expected = ref_whiten.masked_whiten(x, m, shift_mean=shift_mean, unbiased=unbiased, eps=eps, dim=dim)
    assert result.dtype == torch.float32
    # Whitened values are O(1); with shift_mean=False they carry μ (compared relative to it).
    assert_matches(result, expected, "whitened", tol=2e-5 * (1 + (shape[-1] if shape else 1)))
    assert_unchanged(before, {"x": x, "mask": m})


@fuzz_settings(25)
@given(batch=S.token_batches(2, DRAWN_DTYPES, same_dtype=False), scores_dtype=st.sampled_from(DRAWN_DTYPES),
       kl_coef=st.sampled_from([0.1, 0.0, -0.5, 1 / 3]),
       estimator=st.sampled_from(["k1", "abs", "k2", "k3", "low_var_kl"]),
       score_clip=st.sampled_from([None, 0.5, 10.0]))
def test_token_level_rewards(backend, batch, scores_dtype, kl_coef, estimator, score_clip):
    B, T, (logprobs, ref_logprobs), mask, case = batch
    scores = S.values((B,), scores_dtype, case["seed"] + 5)
    inputs = dict(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    before = snapshot(inputs)
    result, error = call(rk.token_level_rewards, scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef,
                         estimator=estimator, score_clip=score_clip)
    rejected = [n for n in ("scores", "logprobs", "ref_logprobs") if inputs[n].dtype not in KERNEL_DTYPES]
    if rejected:
        return assert_names_argument(error, rejected)
    assert error is None, error
    rewards, kl_mean = result
    exp_rewards, exp_kl_mean = ref_tr.token_level_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef,  # noqa: E501
                                                          estimator=estimator, score_clip=score_clip)
    if B == 0:
        # FINDING (issue 19): the oracle's mean over no rows is NaN; the empty rule (docs/robustness.md)
        # and the library give 0.  Oracle fix reported: `row_kl.sum() / max(B, 1)`.
        exp_kl_mean = torch.zeros((), dtype=torch.float64)
    assert rewards.dtype == torch.float32 and kl_mean.dtype == torch.float32 and kl_mean.dim() == 0
    assert_matches(rewards, exp_rewards, "rewards")
    assert_matches(kl_mean, exp_kl_mean, "kl_mean")
    assert_unchanged(before, inputs)


@fuzz_settings(15)
@given(batch=S.token_batches(2, KERNEL_DTYPES), estimator=st.sampled_from(["k1", "k3"]))
def test_token_level_rewards_masked_garbage(backend, batch, estimator):
    B, T, (logprobs, ref_logprobs), mask, case = batch
    scores = S.values((B,), torch.float32, case["seed"])
    clean = rk.token_level_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.2, estimator=estimator)
    dirty = rk.token_level_rewards(scores, S.garbage_at_masked(logprobs, mask),
                                   S.garbage_at_masked(ref_logprobs, mask), mask, kl_coef=0.2, estimator=estimator)  # noqa: E501
    assert_matches(dirty[0], clean[0], "rewards with garbage at masked positions", tol=0.0)
    assert_matches(dirty[1], clean[1], "kl_mean with garbage at masked positions", tol=0.0)


@fuzz_settings(25)
@given(groups=st.sampled_from([0, 1, 2, 3]), group_size=st.sampled_from([1, 2, 3, 5]), seed=S.seeds(),
       dtype=st.sampled_from(DRAWN_DTYPES), norm=st.sampled_from(["std", "none"]), loo=st.booleans(),
       eps=st.sampled_from([1e-6, 0.0]), layout=S.layouts(), special=S.specials())
def test_group_advantages(groups, group_size, seed, dtype, norm, loo, eps, layout, special):
    # FINDING (issue 19), test_regressions.py::test_group_advantages_leave_one_out_inf: the baseline
    # (Σ − s)/(G − 1) is inf − inf = NaN for an infinite member (the oracle gives ±inf).
    assume(not (loo and any(name in ("inf", "-inf") for _, name in special)))
    scores = S.arrange(S.values((groups * group_size,), dtype, seed, special=special), layout)
    before = snapshot({"scores": scores})
    s = leaf(scores) if dtype in S.FLOAT_DTYPES else scores
    result, error = call(rk.group_advantages, s, group_size, norm=norm, eps=eps, leave_one_out=loo)
    if dtype not in S.FLOAT_DTYPES:
        return assert_names_argument(error, "scores")
    if group_size < 2 and (norm == "std" or loo):
        return assert_names_argument(error, "group_size")
    assert error is None, error
    o = oracle_leaf(scores)
    expected = ref_adv.group_advantages(o, group_size, norm=norm, eps=eps, leave_one_out=loo)
    # std with eps = 0 of a constant group is 0 -> inf/NaN in both; fp32 rounding of s − μ near 0 is
    # amplified by 1/(σ + eps): relative to the group's spread.
    assert_matches(result, expected, "advantages", tol=max(1e-4, TOL[scores.dtype]))
    if scores.numel():
        up = torch.randn(scores.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        (grad,) = torch.autograd.grad(result, [s], up.float())
        (exp_grad,) = torch.autograd.grad(expected, [o], up)
        assert_matches(grad, exp_grad, "grad scores", grad=True, tol=max(1e-3, TOL[grad.dtype]), atol=1e-5)
    assert_unchanged(before, {"scores": scores})


@fuzz_settings(15)
@given(batch=S.token_batches(1, DRAWN_DTYPES))
def test_broadcast_to_tokens(batch):
    B, T, (x,), mask, case = batch
    advantages = S.values((B,), x.dtype, case["seed"], special=case["special"])
    result, error = call(rk.broadcast_to_tokens, advantages, mask)
    if x.dtype not in S.FLOAT_DTYPES:
        return assert_names_argument(error, "advantages")
    assert error is None, error
    assert_matches(result, ref_adv.broadcast_to_tokens(advantages, mask), "broadcast")
