"""linear_logprobs (fused lm_head + log-softmax) against the float64 oracle, on every backend."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, run_gloo_workers

import rlhf_kernels as rk  # noqa: F401  (registers every family)
from rlhf_kernels import _dispatch, modules
from rlhf_kernels.ops import _linear_logprobs_kernels as kernels
from rlhf_kernels.ops import linear_logprobs as ops
from rlhf_kernels.ops.cpu import linear_logprobs as cpu_ops
from rlhf_kernels.ops.linear_logprobs import LinearLogprobs, linear_logprobs, linear_token_stats
from rlhf_kernels.reference import linear_logprobs as ref
from rlhf_kernels.reference.token_stats import transformed_logits

# Inputs are exact in every dtype (the oracle multiplies the same rounded values in float64), so forward
# errors come from fp32 accumulation alone.  Gradients are returned in the input dtype; the Triton path
# also rounds the logits gradient to it before its two products (as eager autograd does).
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _inputs(lead, hidden_size, vocab, dtype, device, *, bias=True, logit_scale=3.0, ignore_frac=0.25,
            ignore_index=-100):
    hidden = torch.randn(*lead, hidden_size)
    weight = torch.randn(vocab, hidden_size) * (logit_scale / hidden_size**0.5)
    b = torch.randn(vocab) if bias else None
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < ignore_frac] = ignore_index
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def _assert_close(actual, expected, tol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = tol * (1 + expected.abs())
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g} (tol {tol:g})"


def _assert_grad_close(actual, expected, rtol, what, floor=1e-30):
    """Error relative to the tensor's largest gradient entry (gradients are sums of signed terms), or to
    ``floor`` where the exact gradient is 0 and rounding leaves noise."""
    assert actual is not None, f"{what}: no gradient"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, what
    scale = expected.abs().max() + floor
    err = ((actual - expected).abs() / scale).max().item()
    assert err <= rtol, f"{what}: max scaled error {err:.3g} (tol {rtol:g})"


def _check(hidden, weight, bias, labels, *, temperature=1.0, ignore_index=-100, use_logprobs=True,
           use_entropy=True):
    """Values and the hidden / weight / bias gradients of w·logprobs + u·entropy against the oracle."""
    dtype = hidden.dtype
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    logprobs, entropy = linear_logprobs(
        leaves[0], leaves[1], labels, bias=b, temperature=temperature, ignore_index=ignore_index,
        return_entropy=True,
    )
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == labels.shape

    oracle = [t.detach().cpu().double().requires_grad_() for t in (hidden, weight)]
    b64 = None if bias is None else bias.detach().cpu().double().requires_grad_()
    want_lp, want_h = ref.linear_logprobs(
        oracle[0], oracle[1], labels.cpu(), bias=b64, temperature=temperature, ignore_index=ignore_index,
        return_entropy=True,
    )
    _assert_close(logprobs.detach(), want_lp.detach(), FWD_TOL[dtype], "logprobs")
    _assert_close(entropy.detach(), want_h.detach(), FWD_TOL[dtype], "entropy")

    w = torch.rand(labels.shape, dtype=torch.float64) + 0.5
    u = torch.rand(labels.shape, dtype=torch.float64) - 0.5
    loss = 0.0
    want = 0.0
    if use_logprobs:
        loss = loss + (w.to(logprobs) * logprobs).sum()
        want = want + (w * want_lp).sum()
    if use_entropy:
        loss = loss + (u.to(entropy) * entropy).sum()
        want = want + (u * want_h).sum()
    loss.backward()
    want.backward()
    pairs = (("hidden", leaves[0], oracle[0]), ("weight", leaves[1], oracle[1]), ("bias", b, b64))
    for name, got, expect in pairs:
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == dtype, name
        _assert_grad_close(got.grad, expect.grad, GRAD_RTOL[dtype], f"d_{name}")
    return logprobs, entropy


# --------------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------------
CASES = [
    # (leading shape, H, V, bias, temperature)
    ((1,), 5, 1, False, 1.0),  # N = 1, V = 1: logprob 0, entropy 0
    ((7,), 33, 97, True, 0.7),  # odd H and V, bias, temperature
    ((2, 3), 19, 130, True, 1.0),  # 3-D hidden, V just over one tile
    ((3,), 17, 5003, False, 1.3),  # many vocabulary tiles and splits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-H{c[1]}-V{c[2]}-bias{int(c[3])}-t{c[4]}")
def test_matches_oracle(backend, device, dtype, case):
    lead, hidden_size, vocab, bias, temperature = case
    hidden, weight, b, labels = _inputs(lead, hidden_size, vocab, dtype, device, bias=bias)
    _check(hidden, weight, b, labels, temperature=temperature)


@pytest.mark.parametrize("loss", ["logprobs", "entropy", "both"])
def test_gradients_of_each_output(backend, device, loss):
    hidden, weight, b, labels = _inputs((11,), 29, 203, torch.float32, device)
    _check(hidden, weight, b, labels, temperature=0.9, use_logprobs=loss != "entropy",
           use_entropy=loss != "logprobs")


def test_logprobs_only_call(backend, device):
    hidden, weight, b, labels = _inputs((4, 5), 24, 77, torch.bfloat16, device)
    got = linear_logprobs(hidden, weight, labels, bias=b)
    want = ref.linear_logprobs(hidden.cpu(), weight.cpu(), labels.cpu(), bias=b.cpu())
    assert got.dtype == torch.float32 and got.shape == labels.shape
    _assert_close(got, want, FWD_TOL[torch.bfloat16], "logprobs")


def test_many_chunks_and_splits(backend, device, monkeypatch):
    """Backward over several vocabulary chunks (Triton) and several row x vocabulary chunks (PyTorch)."""
    n, hidden_size, vocab = 100, 45, 300
    monkeypatch.setattr(kernels, "_BWD_BUFFER_BYTES", n * 4 * 128)  # 128-column chunks: 3 passes
    monkeypatch.setattr(cpu_ops, "CHUNK_BYTES", 4 * hidden_size * 40)  # 40 rows x 40 entries
    assert cpu_ops.chunk_sizes(n, vocab, hidden_size) == (40, 40)
    hidden, weight, b, labels = _inputs((n,), hidden_size, vocab, torch.float32, device)
    _check(hidden, weight, b, labels, temperature=1.1)


def test_custom_ignore_index_inside_vocabulary(backend, device):
    hidden, weight, b, labels = _inputs((13,), 16, 40, torch.float32, device, ignore_frac=0.0)
    labels[::3] = 5  # 5 is a real vocabulary id, used here as the ignore index
    lp, h = _check(hidden, weight, b, labels, ignore_index=5)
    assert bool((lp[::3] == 0).all()) and bool((h[::3] == 0).all())


def test_int32_labels(backend, device):
    hidden, weight, b, labels = _inputs((6,), 20, 50, torch.float32, device)
    _check(hidden, weight, b, labels.to(torch.int32))


def test_large_logits_keep_their_digits(backend, device):
    """Logits around 1e4 (no -inf): finite, and the entropy of a peaked row keeps its digits."""
    hidden, weight, _, labels = _inputs((5,), 32, 150, torch.float32, device, logit_scale=20.0, ignore_frac=0)
    bias = torch.full((150,), 1.0e4, device=device)
    lp, h = linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    want_lp, want_h = ref.linear_logprobs(hidden.cpu(), weight.cpu(), labels.cpu(), bias=bias.cpu(),
                                          return_entropy=True)
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(h).all())
    # an fp32 logit near 1e4 carries ±5e-4 of rounding: the bound for both outputs
    _assert_close(lp, want_lp, 4e-3 / (1 + want_lp.abs().max().item()), "logprobs")
    assert (h.double().cpu() - want_h).abs().max().item() < 4e-3


def test_masked_vocabulary_through_bias(backend, device):
    """-inf bias entries have probability 0: finite entropy and gradients, -inf log-prob if labelled."""
    hidden, weight, b, labels = _inputs((9,), 24, 60, torch.float32, device, ignore_frac=0.0)
    b[::4] = float("-inf")
    labels = torch.where(labels % 4 == 0, labels + 1, labels)  # labels on unmasked entries
    _check(hidden, weight, b, labels)
    labels[0] = 8  # masked entry
    lp = linear_logprobs(hidden, weight, labels, bias=b)
    assert lp[0].item() == float("-inf") and bool(torch.isfinite(lp[1:]).all())


def test_nan_propagates_row_by_row(backend, device):
    hidden, weight, b, labels = _inputs((6,), 18, 70, torch.float32, device, ignore_frac=0.0)
    hidden[2, 3] = float("nan")
    lp, h = linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    want_lp, want_h = ref.linear_logprobs(hidden.cpu(), weight.cpu(), labels.cpu(), bias=b.cpu(),
                                          return_entropy=True)
    assert lp[2].isnan().item() and h[2].isnan().item()
    keep = torch.arange(6) != 2
    _assert_close(lp.cpu()[keep], want_lp[keep], 2e-5, "logprobs")
    _assert_close(h.cpu()[keep], want_h[keep], 2e-5, "entropy")


def test_unchecked_out_of_range_label_gives_nan(backend, device):
    """Without the range check (under torch.compile, or RLHF_KERNELS_CHECK_INDICES=0 on CUDA) a bad
    label yields NaN for its row, never a read outside the weight."""
    hidden, weight, b, labels = _inputs((5,), 12, 30, torch.float32, device, ignore_frac=0.0)
    labels[1], labels[3] = 30, -7
    labels[4] = -100
    h = hidden.clone().requires_grad_()
    lp, ent, *_ = ops.linear_logprobs_fwd(h, weight, b, labels, 1.0, -100, True)
    assert lp[1].isnan().item() and lp[3].isnan().item() and lp[4].item() == 0
    assert bool(torch.isfinite(lp[[0, 2]]).all()) and bool(torch.isfinite(ent).all())
    lp.sum().backward()
    bad = h.grad.isnan().any(dim=1)
    assert bad.tolist() == [False, True, False, True, False]


def test_semantics_equal_logprobs_from_logits(backend, device):
    """The same numbers as rk.logprobs_from_logits applied to the (exact) materialised logits."""
    hidden, weight, b, labels = _inputs((3, 7), 40, 333, torch.float32, device)
    logits = (hidden.double() @ weight.double().T + b.double()).float()
    for temperature in (1.0, 0.6):
        want = rk.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
        got = linear_logprobs(hidden, weight, labels, bias=b, temperature=temperature, return_entropy=True)
        for g, w, name in zip(got, want, ("logprobs", "entropy"), strict=True):
            _assert_close(g, w, 2e-5, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_less_accurate_than_the_eager_idiom(backend, device, dtype):
    """The benchmark's eager baseline (logits rounded to the input dtype) against ours, both vs float64."""
    from bench.baselines.linear_logprobs import eager_linear_logprobs

    hidden, weight, b, labels = _inputs((16,), 64, 500, dtype, device, ignore_frac=0.0)
    want_lp, want_h = ref.linear_logprobs(hidden.cpu(), weight.cpu(), labels.cpu(), bias=b.cpu(),
                                          return_entropy=True)
    ours = linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    eager = eager_linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    for got, base, want in zip(ours, eager, (want_lp, want_h), strict=True):
        err = (got.double().cpu() - want).abs().max().item()
        base_err = (base.double().cpu() - want).abs().max().item()
        assert err <= base_err + 2e-5, (err, base_err)


def test_strided_inputs(backend, device):
    """Non-contiguous hidden (a slice), column-major weight and a strided bias."""
    base, weight, _, _ = _inputs((3, 6), 22, 45, torch.float32, device)
    hidden = base[:, :-1]
    weight = weight.T.contiguous().T
    bias = torch.randn(90, device=device)[::2]
    labels = torch.randint(0, 45, (3, 5), device=device)
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not bias.is_contiguous()
    _check(hidden, weight, bias, labels)


def test_no_rows(backend, device):
    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    lp, h = linear_logprobs(hidden, weight, labels, return_entropy=True)
    assert lp.shape == h.shape == (0,)
    (lp.sum() + h.sum()).backward()
    assert weight.grad.shape == weight.shape and bool((weight.grad == 0).all())


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_inputs_get_no_gradient(backend, device, frozen):
    hidden, weight, b, labels = _inputs((8,), 20, 66, torch.float32, device)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    linear_logprobs(h, w, labels, bias=b).sum().backward()
    h64 = hidden.double().cpu().requires_grad_()
    w64 = weight.double().cpu().requires_grad_()
    ref.linear_logprobs(h64, w64, labels.cpu(), bias=b.cpu()).sum().backward()
    if frozen == "weight":
        assert w.grad is None
        _assert_grad_close(h.grad, h64.grad, GRAD_RTOL[torch.float32], "d_hidden")
    else:
        assert h.grad is None
        _assert_grad_close(w.grad, w64.grad, GRAD_RTOL[torch.float32], "d_weight")


# --------------------------------------------------------------------------------------------------
# Token statistics (issue 15 item 1): linear_token_stats against token_stats' float64 oracle
# --------------------------------------------------------------------------------------------------
STAT_FIELDS = ("logprobs", "entropy", "sum_sq_probs", "top1_match", "mean_logit")
ALL_STATS = dict(entropy=True, sum_sq_probs=True, top1_match=True, mean_logit=True)
# upstream weights of the differentiable outputs (top1_match is not differentiable)
UPSTREAM = {"logprobs": 1.0, "entropy": -0.4, "sum_sq_probs": 2.5, "mean_logit": 0.3}


def _check_stats(hidden, weight, bias, labels, tol, grad_rtol, **options):
    """Every field and the hidden / weight / bias gradients of a mix of the differentiable fields."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    got = linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2], **ALL_STATS, **options)
    oracle = [None if t is None else t.detach().cpu().double().requires_grad_()
              for t in (hidden, weight, bias)]
    want = ref.linear_token_stats(oracle[0], oracle[1], labels.cpu(), bias=oracle[2], **ALL_STATS, **options)
    assert got.topk_logprobs is None and got.topk_indices is None
    for name in STAT_FIELDS:
        value = getattr(got, name)
        assert value.dtype == torch.float32 and value.shape == labels.shape, name
        if name == "top1_match":  # exact, except where float32 rounding decides a near-tie
            assert (value.cpu() != getattr(want, name)).float().mean().item() <= 0.1, name
        else:  # infinite where the oracle is (the mean logit of a row with a masked entry)
            expect = getattr(want, name).detach()
            finite = torch.isfinite(expect) | expect.isnan()
            assert torch.equal(value.detach().cpu()[~finite].double(), expect[~finite]), name
            _assert_close(value.detach().cpu()[finite], expect[finite], tol, name)
    sum(w * getattr(got, name).sum() for name, w in UPSTREAM.items()).backward()
    sum(w * getattr(want, name).sum() for name, w in UPSTREAM.items()).backward()
    for name, leaf, expect in zip(("hidden", "weight", "bias"), leaves, oracle, strict=True):
        if leaf is not None:
            assert leaf.grad.dtype == hidden.dtype, name
            _assert_grad_close(leaf.grad, expect.grad, grad_rtol, f"d_{name}")
    return got


STATS_CASES = [
    # (leading shape, H, V, options)
    ((1,), 5, 1, dict()),  # V = 1: logprob 0, Σp² 1, top-1 1
    ((7,), 33, 17, dict(temperature=0.7, logit_scale=1.7)),
    ((2, 5), 19, 130, dict(softcap=2.0, logit_scale=1.3, temperature=1.2)),  # the cap bends the logits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", STATS_CASES, ids=lambda c: f"{c[0]}-H{c[1]}-V{c[2]}-{sorted(c[3])}")
def test_token_stats_match_oracle(backend, device, dtype, case):
    lead, hidden_size, vocab, options = case
    hidden, weight, b, labels = _inputs(lead, hidden_size, vocab, dtype, device)
    _check_stats(hidden, weight, b, labels, FWD_TOL[dtype], GRAD_RTOL[dtype], **options)


def test_token_stats_big_vocabulary_torch_path():
    """A real vocabulary (Llama-3's 128256) with every statistic and the soft cap, on the PyTorch path."""
    hidden, weight, b, labels = _inputs((3,), 8, 128256, torch.float32, "cpu", ignore_frac=0.0)
    with _dispatch.use_backend("torch"):
        _check_stats(hidden, weight, b, labels, 2e-5, 2e-5, softcap=3.0, temperature=0.9)


def test_token_stats_known_values(backend, device):
    """token_stats' worked example through the head: logits [0, 0, ln 2], label 2."""
    weight = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(2), 0.0]], device=device)
    stats = linear_token_stats(torch.tensor([[1.0, 0.0]], device=device), weight,
                               torch.tensor([2], device=device), **ALL_STATS)
    want = (math.log(0.5), 1.5 * math.log(2) - 0.5 * math.log(2) + math.log(2) / 2, 0.375, 1.0,
            math.log(2) / 3)
    for name, value in zip(STAT_FIELDS, want, strict=True):
        if name != "entropy":
            assert abs(getattr(stats, name).item() - value) < 1e-6, name
    assert abs(stats.entropy.item() - (math.log(2) * 1.5)) < 1e-6  # −(¼ ln ¼ · 2 + ½ ln ½)


def test_token_stats_masked_entries_and_ignored_rows(backend, device):
    """-inf bias entries (probability 0, and −inf for the mean logit, as token_stats), NaN rows, ignored
    rows (0 in every field, no gradient)."""
    hidden, weight, b, labels = _inputs((9,), 24, 60, torch.float32, device, ignore_frac=0.0)
    b[::4] = float("-inf")
    labels = torch.where(labels % 4 == 0, labels + 1, labels)
    labels[[1, 5]] = -100
    got = _check_stats(hidden, weight, b, labels, 2e-5, 2e-5, softcap=5.0)
    assert bool((got.mean_logit[labels != -100] == float("-inf")).all())
    for name in STAT_FIELDS:
        assert bool((getattr(got, name)[[1, 5]] == 0).all()), name
    hidden[2, 0] = float("nan")
    stats = linear_token_stats(hidden, weight, labels, bias=b, **ALL_STATS)
    for name in STAT_FIELDS:
        value = getattr(stats, name)
        assert value[2].isnan().item() and not bool(value[[0, 3, 4]].isnan().any()), name


def test_top1_match_alone(backend, device):
    """top1_match without Σp² or the entropy (the PyTorch path's log-sum-exp-only fold keeps no row
    maximum: it must take the exponentials' fold): 1 where the label is the argmax, 0 elsewhere."""
    hidden, weight = torch.randn(6, 4, device=device), torch.randn(5, 4, device=device)
    labels = (hidden @ weight.T).argmax(-1)
    labels[::2] = (labels[::2] + 1) % 5
    top1 = linear_token_stats(hidden, weight, labels, top1_match=True).top1_match
    assert top1.tolist() == [0.0, 1.0] * 3


def test_token_stats_match_token_stats_from_logits(backend, device):
    """The same numbers as rk.token_stats_from_logits on the (exact) materialised logits."""
    hidden, weight, b, labels = _inputs((4, 6), 40, 333, torch.float32, device)
    logits = (hidden.double() @ weight.double().T + b.double()).float()
    options = dict(temperature=0.8, logit_scale=1.1, softcap=4.0, **ALL_STATS)
    want = rk.token_stats_from_logits(logits, labels, **options)
    got = linear_token_stats(hidden, weight, labels, bias=b, **options)
    for name in STAT_FIELDS:
        _assert_close(getattr(got, name), getattr(want, name), 2e-5, name)


def test_token_stats_float64_scalars_match_oracle(backend, device):
    """fp64 through the registered op, with logit_scale, soft cap and 1/τ none of them fp32 numbers:
    every output and gradient within 1e-12 of the float64 oracle."""
    hidden, weight, b, labels = _inputs((9,), 21, 103, torch.float64, device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = ops.linear_logprobs_fwd(*leaves, labels, 1 / 0.7, -100, True, 0.7, 0.7, True, True, True)
    oracle = [t.detach().cpu().requires_grad_() for t in (hidden, weight, b)]
    want = ref.linear_token_stats(*oracle[:2], labels.cpu(), bias=oracle[2], temperature=0.7,
                                  logit_scale=0.7, softcap=0.7, **ALL_STATS)
    for name, value in zip(STAT_FIELDS, out[:5], strict=True):
        assert value.dtype == torch.float64
        _assert_close(value.detach(), getattr(want, name).detach(), 1e-12, name)
    names = ("logprobs", "entropy", "sum_sq_probs", "mean_logit")
    sum(UPSTREAM[n] * out[STAT_FIELDS.index(n)].sum() for n in names).backward()
    sum(UPSTREAM[n] * getattr(want, n).sum() for n in names).backward()
    for name, leaf, expect in zip(("hidden", "weight", "bias"), leaves, oracle, strict=True):
        _assert_grad_close(leaf.grad, expect.grad, 1e-12, f"d_{name}")


def test_token_stats_gradcheck_float64_torch_path():
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 4, 0])
    with _dispatch.use_backend("torch"):
        def fn(h, w, b):
            lp, ent, sq, _, mean, *_ = ops.linear_logprobs_fwd(h, w, b, labels, 1.25, -100, True, 1.5, 2.0,
                                                               True, True, True)
            return lp, ent, sq, mean

        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


# --------------------------------------------------------------------------------------------------
# Top-k log-probabilities and their tokens (issue 15 item 1)
# --------------------------------------------------------------------------------------------------
def _check_topk(hidden, weight, bias, labels, top_k, tol, grad_rtol, *, exact_indices=True, **options):
    """topk_logprobs / topk_indices against the oracle (token_stats' on the fp64 logits), and the hidden /
    weight / bias gradients of w·logprobs + Σ u·topk_logprobs.  Without ``exact_indices`` (inputs where
    fp32 rounding may reorder near-ties), each chosen token's oracle log-prob must match the oracle's
    value at its rank instead."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    got = linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2], top_k=top_k, **options)
    oracle = [None if t is None else t.detach().cpu().double().requires_grad_()
              for t in (hidden, weight, bias)]
    want = ref.linear_token_stats(oracle[0], oracle[1], labels.cpu(), bias=oracle[2], top_k=top_k, **options)
    shape = (*labels.shape, top_k)
    assert got.topk_logprobs.shape == got.topk_indices.shape == shape
    assert got.topk_logprobs.dtype == torch.float32 and got.topk_indices.dtype == torch.int64
    values, indices = got.topk_logprobs.detach().cpu(), got.topk_indices.cpu()
    expect = want.topk_logprobs.detach()
    if exact_indices:
        assert torch.equal(indices, want.topk_indices), "topk_indices"
    else:  # a valid ranking: the oracle's log-probs at our tokens are its top-k values
        log_p = torch.log_softmax(
            transformed_logits(oracle[0].detach() @ oracle[1].detach().T
                                   + (0 if bias is None else oracle[2].detach()), **options), dim=-1)
        kept = labels.cpu() != -100
        _assert_close(log_p.gather(-1, indices)[kept], expect[kept], tol, "oracle log p at topk_indices")
    finite = torch.isfinite(expect)
    assert torch.equal(values[~finite].double(), expect[~finite]), "topk_logprobs (infinite entries)"
    _assert_close(values[finite], expect[finite], tol, "topk_logprobs")
    ignored = labels.cpu() == -100
    assert bool((indices[ignored] == 0).all()) and bool((values[ignored] == 0).all())
    u_up = torch.randn(shape, dtype=torch.float64)
    # a −inf top-k log-prob (a masked token) still has a gradient: w·(1 − 0) at its logit
    (got.logprobs.sum() + (u_up.to(got.topk_logprobs.device).float() * got.topk_logprobs).sum()).backward()
    (want.logprobs.sum() + (u_up * want.topk_logprobs).sum()).backward()
    for name, leaf, oracle_leaf in zip(("hidden", "weight", "bias"), leaves, oracle, strict=True):
        if leaf is not None:
            assert leaf.grad.dtype == hidden.dtype, name
            # V = 1: the exact gradient is 0, fp32 leaves ~1e-8 (g + w − (g + w)·p rounded)
            _assert_grad_close(leaf.grad, oracle_leaf.grad, grad_rtol, f"d_{name}",
                               floor=1.0 if weight.shape[0] == 1 else 1e-30)
    return got


TOPK_CASES = [
    # (leading shape, H, V, k, options)
    ((1,), 5, 1, 1, dict()),  # V = 1: the one token, log-prob 0
    ((7,), 33, 17, 17, dict(temperature=0.7, logit_scale=1.7)),  # k = V
    ((9,), 16, 17, 5, dict()),
    ((2, 5), 19, 130, 40, dict(softcap=2.0, logit_scale=1.3, temperature=1.2)),  # k = 64: the launcher test
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: f"{c[0]}-H{c[1]}-V{c[2]}-k{c[3]}-{sorted(c[4])}")
def test_topk_matches_oracle(backend, device, dtype, case):
    lead, hidden_size, vocab, top_k, options = case
    hidden, weight, b, labels = _inputs(lead, hidden_size, vocab, dtype, device)
    _check_topk(hidden, weight, b, labels, top_k, FWD_TOL[dtype], GRAD_RTOL[dtype], exact_indices=False,
                **options)


def test_topk_across_chunks_and_splits(backend, device, monkeypatch):
    """Several vocabulary chunks (PyTorch path) and splits with several tiles each (Triton path): the
    running top-k crosses chunk and tile borders, and the split merge keeps the global order."""
    monkeypatch.setattr(cpu_ops, "CHUNK_BYTES", 4 * 40 * 16)  # 40-column chunks, 16 rows
    hidden, weight, b, labels = _inputs((37,), 40, 300, torch.float32, device)
    if device != "cpu" or backend == "triton":
        cfg = ops._launch_config(37, 300, 40, torch.float32, hidden.device, top_k=20)
        assert cfg.vocab_splits > 1 and cfg.tiles_per_split > 1
    _check_topk(hidden, weight, b, labels, 20, 2e-5, 2e-5, exact_indices=False, softcap=4.0)


def test_topk_ties_go_to_the_smaller_index(backend, device, monkeypatch):
    """Exact ties (repeated weight rows: equal logits) broken towards the smaller token, inside a chunk
    or tile and across chunks, tiles and splits; -inf bias entries beyond the finite ones (k larger
    than the unmasked vocabulary in some rows) are taken smallest index first, with log-prob −inf."""
    monkeypatch.setattr(cpu_ops, "CHUNK_BYTES", 4 * 24 * 8)  # 24-column chunks
    vocab, hidden_size = 90, 8
    # small dyadic numbers: every product and sum is exact, so equal weight rows give equal logits
    base = torch.randint(-4, 5, (6, hidden_size)) / 4
    weight = base[torch.randint(0, 6, (vocab,))].to(device)  # 6 distinct logits per row, each repeated
    hidden = (torch.randint(-4, 5, (11, hidden_size)) / 4).to(device)
    labels = torch.randint(0, vocab, (11,), device=device)
    labels[3] = -100
    _check_topk(hidden, weight, None, labels, 40, 2e-5, 2e-5)
    b = torch.full((vocab,), float("-inf"), device=device)
    b[torch.randperm(vocab)[:9]] = 0.0  # 9 finite entries; k = 33 takes 24 masked ones
    labels = torch.where(b[labels.clamp(min=0)] == 0, labels, -100)
    got = _check_topk(torch.randn(11, hidden_size, device=device), torch.randn(vocab, hidden_size,
                      device=device), b, labels, 33, 2e-5, 2e-5)
    assert bool((got.topk_logprobs[labels != -100][:, 9:] == float("-inf")).all())


def test_topk_known_values(backend, device):
    """logits [0, 0, ln 2], label 2, k = 2: log-probs [ln ½, ln ¼] at tokens [2, 0] (0 before 1)."""
    weight = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(2), 0.0]], device=device)
    stats = linear_token_stats(torch.tensor([[1.0, 0.0]], device=device), weight,
                               torch.tensor([2], device=device), top_k=2)
    assert stats.topk_indices.tolist() == [[2, 0]]
    assert torch.allclose(stats.topk_logprobs.cpu(), torch.tensor([[math.log(0.5), math.log(0.25)]]))


def test_topk_nan_row_and_batch_invariance(backend, device):
    """NaN in a row gives NaN top-k log-probs there (indices still in [0, V)), the other rows unchanged;
    under batch_invariant=True a row's top-k and d_hidden are bitwise the same alone and in a batch."""
    hidden, weight, b, labels = _inputs((12,), 20, 70, torch.float32, device, ignore_frac=0.0)
    first = linear_token_stats(hidden, weight, labels, bias=b, top_k=6, batch_invariant=True)
    hidden[4, 1] = float("nan")
    got = linear_token_stats(hidden, weight, labels, bias=b, top_k=6, batch_invariant=True)
    assert bool(got.topk_logprobs[4].isnan().all())
    assert bool(((got.topk_indices >= 0) & (got.topk_indices < 70)).all())
    rest = torch.arange(12, device=device) != 4
    assert torch.equal(got.topk_logprobs[rest], first.topk_logprobs[rest])
    assert torch.equal(got.topk_indices[rest], first.topk_indices[rest])

    def row_results(rows):
        h = hidden[rows].clone().requires_grad_()
        stats = linear_token_stats(h, weight, labels[rows], bias=b, top_k=6, batch_invariant=True)
        (stats.topk_logprobs * torch.linspace(-1, 1, 6, device=device)).sum().backward()
        return stats.topk_logprobs[:2], stats.topk_indices[:2], h.grad[:2]

    for one, many in zip(row_results(torch.arange(2)), row_results(torch.arange(12) != 4), strict=True):
        assert torch.equal(one, many)


def test_topk_float64_matches_oracle(backend, device):
    """fp64 through the registered op with logit_scale, soft cap and 1/τ not fp32 numbers: top-k values and
    gradients within 1e-12 of the oracle, indices equal."""
    hidden, weight, b, labels = _inputs((9,), 21, 103, torch.float64, device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = ops.linear_logprobs_fwd(*leaves, labels, 1 / 0.7, -100, False, 0.7, 0.7, False, False, False,
                                  False, 7)
    topk_logprobs, topk_indices = out[5], out[6]
    oracle = [t.detach().cpu().requires_grad_() for t in (hidden, weight, b)]
    want = ref.linear_token_stats(*oracle[:2], labels.cpu(), bias=oracle[2], temperature=0.7,
                                  logit_scale=0.7, softcap=0.7, top_k=7)
    assert topk_logprobs.dtype == torch.float64
    assert torch.equal(topk_indices.cpu(), want.topk_indices)
    _assert_close(topk_logprobs.detach(), want.topk_logprobs.detach(), 1e-12, "topk_logprobs")
    u_up = torch.randn(9, 7, dtype=torch.float64)
    (u_up.to(device) * topk_logprobs).sum().backward()
    (u_up * want.topk_logprobs).sum().backward()
    for name, leaf, expect in zip(("hidden", "weight", "bias"), leaves, oracle, strict=True):
        _assert_grad_close(leaf.grad, expect.grad, 1e-12, f"d_{name}")


def test_topk_gradcheck_float64_torch_path():
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 4, 0])
    with _dispatch.use_backend("torch"):
        def fn(h, w, b):
            out = ops.linear_logprobs_fwd(h, w, b, labels, 1.25, -100, True, 1.5, 2.0, True, False, True,
                                          False, 3)
            return out[0], out[1], out[5]

        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("top_k", [1, 64])
def test_stats_launcher_writes_every_topk_slot(top_k):
    """Each split's top-k set (NaN / -1 filled first): the split's k largest x' and their entries, in
    any order; a split narrower than k fills its own entries, then −inf at indices ≥ V."""
    n, hidden_size, vocab = 70, 16, 150
    hidden, weight, b, labels = _inputs((n,), hidden_size, vocab, torch.float32, TRITON_DEVICE)
    # k = 64 (the largest): more than the last split holds (fp32 top-k tiles of 32: splits of 64, 64, 22)
    cfg = ops._launch_config(n, vocab, hidden_size, torch.float32, hidden.device, top_k=top_k)
    assert cfg.vocab_splits > 1 and n > cfg.block_n
    partials = torch.full((6, cfg.vocab_splits, n), float("nan"))
    top_values = torch.full((cfg.vocab_splits, n, top_k), float("nan"))
    top_index = torch.full((cfg.vocab_splits, n, top_k), -1, dtype=torch.int64)
    ops._launch_stats_out(partials, hidden, weight, b, labels, 0.9, 0, False, top_values=top_values,
                          top_index=top_index)
    z = (hidden.double() @ weight.double().T + b.double()) * 0.9
    span = cfg.tiles_per_split * cfg.block_v
    for split in range(cfg.vocab_splits):
        zk = z[:, split * span : (split + 1) * span]
        kept = min(top_k, zk.shape[1])
        want = torch.sort(zk, dim=1, descending=True, stable=True)
        got_index, order = top_index[split].sort(dim=1)
        got_values = top_values[split].gather(1, order)
        want_index, want_order = (want.indices[:, :kept] + split * span).sort(dim=1)
        assert torch.equal(got_index[:, :kept], want_index), f"split {split}"
        want_values = want.values[:, :kept].gather(1, want_order)
        _assert_close(got_values[:, :kept], want_values, 2e-5, f"split {split}")
        assert bool((got_index[:, kept:] >= vocab).all()), f"split {split}: empty slots"
        assert bool((got_values[:, kept:] == float("-inf")).all()), f"split {split}: empty slots"


# --------------------------------------------------------------------------------------------------
# Labelled rows only (issue 15 item 2) and batch invariance (item 4)
# --------------------------------------------------------------------------------------------------
def test_cpu_path_projects_labelled_rows_only(monkeypatch):
    """The PyTorch path folds and differentiates only the labelled rows (cost ∝ labelled tokens); the
    results equal the oracle's, and ignored rows (NaN hidden states here) touch no gradient."""
    hidden, weight, b, labels = _inputs((30,), 16, 50, torch.float32, "cpu", ignore_frac=0.0)
    labels[torch.randperm(30)[:20]] = -100
    ignored = labels == -100
    hidden[ignored] = float("nan")
    seen = []
    fold, bwd_rows = cpu_ops._fold, cpu_ops._bwd_rows
    monkeypatch.setattr(cpu_ops, "_fold", lambda h, *a: seen.append(h.shape[0]) or fold(h, *a))
    monkeypatch.setattr(cpu_ops, "_bwd_rows", lambda g, h, *a: seen.append(h.shape[0]) or bwd_rows(g, h, *a))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with _dispatch.use_backend("torch"):
        lp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert seen == [10, 10]
    assert bool((h.grad[ignored] == 0).all()) and bool(torch.isfinite(w.grad).all())
    keep = ~ignored
    want_lp, want_h = ref.linear_logprobs(hidden[keep], weight, labels[keep], bias=b, return_entropy=True)
    _assert_close(lp[keep], want_lp, 2e-5, "logprobs")
    _assert_close(ent[keep], want_h, 2e-5, "entropy")


def _per_row_results(hidden, weight, bias, labels, u_up, **options):
    """(logprobs, entropy, sum_sq_probs, d_hidden) of a batch under batch_invariant=True."""
    h = hidden.clone().requires_grad_()
    stats = linear_token_stats(h, weight, labels, bias=bias, entropy=True, sum_sq_probs=True,
                               batch_invariant=True, **options)
    (stats.logprobs.sum() + (u_up * stats.entropy).sum() - stats.sum_sq_probs.sum()).backward()
    return stats.logprobs, stats.entropy, stats.sum_sq_probs, h.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_bitwise(backend, device, dtype, monkeypatch):
    """Issue 15 item 4: three probe rows give bitwise the same log-prob, entropy, Σp² and d_hidden row
    alone, at other positions of a larger batch with other rows (ignored ones included), and in a batch
    large enough to change the default mode's tiles and the backward's vocabulary chunk."""
    monkeypatch.setattr(kernels, "_BWD_BUFFER_BYTES", 40 * 4 * 64)  # the chunk shrinks as N grows
    monkeypatch.setattr(cpu_ops, "CHUNK_BYTES", 4 * 256 * 32)  # several vocabulary chunks (32 columns)
    hidden_size, vocab = 24, 150
    probe, weight, b, probe_labels = _inputs((3,), hidden_size, vocab, dtype, device, ignore_frac=0.0)
    u_probe = torch.tensor([0.5, -1.0, 2.0], device=device)
    options = dict(temperature=0.8, softcap=3.0)
    alone = _per_row_results(probe, weight, b, probe_labels, u_probe, **options)
    for n_rows in (10, 150):
        hidden, _, _, labels = _inputs((n_rows,), hidden_size, vocab, dtype, device, ignore_frac=0.3)
        u_up = torch.randn(n_rows, device=device)
        where = torch.randperm(n_rows)[:3].to(device)
        hidden[where], labels[where], u_up[where] = probe, probe_labels, u_probe
        batch = _per_row_results(hidden, weight, b, labels, u_up, **options)
        for name, one, many in zip(("logprobs", "entropy", "sum_sq_probs", "d_hidden"), alone, batch,
                                   strict=True):
            assert torch.equal(many[where], one), f"{name} differs at N = {n_rows}"
    want = ref.linear_token_stats(probe, weight, probe_labels, bias=b, **options)
    _assert_close(alone[0], want.logprobs, FWD_TOL[dtype], "logprobs")
    cfg = [ops._launch_config(n, vocab, hidden_size, dtype, probe.device, True) for n in (3, 150)]
    # tiles and splits fixed; the backward's chunk still follows N (d_hidden's sums do not depend on it)
    assert cfg[0] == dataclasses.replace(cfg[1], bwd_chunk_v=cfg[0].bwd_chunk_v) and cfg[0].block_n == 128
    assert cfg[0].bwd_chunk_v > cfg[1].bwd_chunk_v


def test_batch_invariant_is_off_by_default():
    """The default mode's tiles follow N (a smaller row tile for a small batch): the reason for the flag."""
    small, large = (ops._launch_config(n, 1000, 64, torch.bfloat16, torch.device("cpu")) for n in (3, 1000))
    assert small.block_n == 16 and large.block_n == 128
    assert ops._launch_config(3, 1000, 64, torch.bfloat16, torch.device("cpu"), True).block_n == 128
    assert cpu_ops.chunk_sizes(3, 1000, 64) != cpu_ops.chunk_sizes(1000, 1000, 64)
    assert cpu_ops.chunk_sizes(3, 1000, 64, True) == cpu_ops.chunk_sizes(1000, 1000, 64, True)


# --------------------------------------------------------------------------------------------------
# float64 and the temperature's fp64 parts; d_hidden rounded once (issue 15)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_float64_with_temperature_matches_oracle(backend, device, with_bias):
    """fp64 inputs compute in fp64 on both paths (through the registered op: the public function takes
    16/32-bit inputs), 1/τ included: with τ = 0.7, 1/τ is not an fp32 number and reaches the kernels as
    three fp32 parts, so values and gradients match the float64 oracle to ~1e-12."""
    temperature = 0.7
    hidden, weight, b, labels = _inputs((9,), 21, 203, torch.float64, device, bias=with_bias)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, b)]
    lp, ent, *_ = ops.linear_logprobs_fwd(*leaves, labels, 1 / temperature, -100, True)
    assert lp.dtype == ent.dtype == torch.float64
    oracle = [None if t is None else t.detach().cpu().requires_grad_() for t in (hidden, weight, b)]
    want_lp, want_h = ref.linear_logprobs(oracle[0], oracle[1], labels.cpu(), bias=oracle[2],
                                          temperature=temperature, return_entropy=True)
    _assert_close(lp.detach(), want_lp.detach(), 1e-12, "logprobs")
    _assert_close(ent.detach(), want_h.detach(), 1e-12, "entropy")
    w_up = torch.rand(9, dtype=torch.float64) + 0.5
    u_up = torch.rand(9, dtype=torch.float64) - 0.5
    ((w_up.to(device) * lp).sum() + (u_up.to(device) * ent).sum()).backward()
    ((w_up * want_lp).sum() + (u_up * want_h).sum()).backward()
    for name, got, expect in zip(("hidden", "weight", "bias"), leaves, oracle, strict=True):
        if got is not None:
            assert got.grad.dtype == torch.float64, name
            _assert_grad_close(got.grad, expect.grad, 1e-12, f"d_{name}")
    # The bound can fail: 1/τ rounded to fp32 moves the log-probs by ~1e-7.
    inv_t32 = torch.tensor(1 / temperature, dtype=torch.float32).item()
    rounded = ref.linear_logprobs(oracle[0].detach(), oracle[1].detach(), labels.cpu(),
                                  bias=None if b is None else oracle[2].detach(), temperature=1 / inv_t32)
    assert (rounded - want_lp.detach()).abs().max().item() > 1e-10


def test_bf16_d_hidden_is_rounded_once(backend, device, monkeypatch):
    """Issue 15: d_hidden sums the vocabulary chunks' products in fp32 and is rounded to bf16 once, so its
    error stays within bf16's unit roundoff (2⁻⁸) of the gradient's scale with 24 chunks, where rounding
    each chunk's product to bf16 first (what the Triton path did) exceeds it."""
    n, hidden_size, chunk, chunks = 8, 16, 128, 24
    vocab = chunk * chunks
    monkeypatch.setattr(kernels, "_BWD_BUFFER_BYTES", 0)  # the smallest chunk: one vocabulary tile
    monkeypatch.setattr(cpu_ops, "CHUNK_BYTES", 4 * hidden_size * chunk)
    cfg = ops._launch_config(n, vocab, hidden_size, torch.bfloat16, torch.device(device))
    assert cfg.bwd_chunk_v == chunk
    assert cpu_ops.chunk_sizes(n, vocab, hidden_size)[1] == chunk
    # Logits rise along the vocabulary (weight column 0 is a ramp, hidden[:, 0] > 0); the other columns are
    # the same for every entry, so their d_hidden is exactly 0 (Σ_j G_j = 0) while each chunk's share of it
    # is not: per-chunk products are large next to the final value, which per-chunk rounding cannot hide.
    hidden = torch.randn(n, hidden_size)
    hidden[:, 0] = torch.rand(n) + 0.5
    weight = torch.empty(vocab, hidden_size)
    weight[:, 0] = 10 * torch.arange(vocab) / vocab
    weight[:, 1:] = torch.rand(hidden_size - 1) + 0.5
    hidden, weight = hidden.bfloat16().to(device), weight.bfloat16().to(device)
    labels = torch.randint(0, vocab, (n,), device=device)
    u_up = torch.rand(n, dtype=torch.float64) + 0.5  # entropy only: G has no one-hot term to round
    h = hidden.clone().requires_grad_()
    _, ent = linear_logprobs(h, weight, labels, return_entropy=True)
    (u_up.float().to(device) * ent).sum().backward()

    h64 = hidden.double().cpu().requires_grad_()
    w64 = weight.double().cpu()
    _, want_h = ref.linear_logprobs(h64, w64, labels.cpu(), return_entropy=True)
    (u_up * want_h).sum().backward()
    bound = 2**-8 * h64.grad.abs().max().item()
    err = (h.grad.double().cpu() - h64.grad).abs().max().item()
    assert err <= bound, f"d_hidden error {err:.3g} > {bound:.3g}"

    z = (h64.detach() @ w64.T).requires_grad_()  # G = ∂(u·H)/∂z, to replay the per-chunk rounding
    log_p = torch.log_softmax(z, dim=-1)
    (u_up * -(log_p.exp() * log_p).sum(dim=-1)).sum().backward()
    g16, w32 = z.grad.bfloat16().float(), weight.float().cpu()
    chunked = sum((g16[:, v0 : v0 + chunk] @ w32[v0 : v0 + chunk]).bfloat16().double()
                  for v0 in range(0, vocab, chunk))
    chunked_err = (chunked.bfloat16().double() - h64.grad).abs().max().item()
    assert chunked_err > 1.5 * bound, (chunked_err, bound)


# --------------------------------------------------------------------------------------------------
# The launchers write every element of outputs the caller allocated (NaN-filled here)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extras", [True, False])
def test_stats_launcher_writes_every_output(extras):
    """(m, s, t, z_label, q, total) of every vocabulary split and row, for a weight slice starting at
    vocab_start (t, q and the total are 0 when not requested)."""
    n, hidden_size, vocab, vocab_start, inv_t = 150, 24, 300, 7, 0.8
    hidden, weight, b, _ = _inputs((n,), hidden_size, vocab, torch.float32, TRITON_DEVICE)
    labels = torch.randint(0, vocab + 2 * vocab_start, (n,), device=TRITON_DEVICE)  # some off this slice
    cfg = ops._launch_config(n, vocab, hidden_size, torch.float32, hidden.device)
    assert cfg.vocab_splits > 1 and n > cfg.block_n  # several splits and row blocks
    partials = torch.full((6, cfg.vocab_splits, n), float("nan"), device=TRITON_DEVICE)
    ops._launch_stats_out(partials, hidden, weight, b, labels, inv_t, vocab_start, extras, 1.0, 0.0,
                          extras, extras)

    z = (hidden.double() @ weight.double().T + b.double()).cpu() * inv_t
    local = labels.cpu() - vocab_start
    span = cfg.tiles_per_split * cfg.block_v
    zero = torch.zeros(n, dtype=torch.float64)
    for split in range(cfg.vocab_splits):
        zk = z[:, split * span : (split + 1) * span]
        m = zk.amax(dim=1)
        e = (zk - m[:, None]).exp()
        t = (e * (zk - m[:, None])).sum(dim=1) if extras else zero
        col = local - split * span
        hit = (col >= 0) & (col < zk.shape[1])
        z_label = torch.where(hit, zk.gather(1, col.clamp(0, zk.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        q, total = ((e * e).sum(dim=1), zk.sum(dim=1)) if extras else (zero, zero)
        wants = (m, e.sum(dim=1), t, z_label, q, total)
        for got, want, name in zip(partials[:, split], wants, "mstzqT", strict=True):
            assert not bool(got.isnan().any()), f"split {split}: {name} not written everywhere"
            _assert_close(got, want, 2e-5, f"split {split} {name}")


def test_stats_launcher_never_projects_ignored_row_tiles():
    """Labelled rows only (issue 15): rows are ordered labelled-first on the device, and a row tile past
    the labelled count does no product: its rows (NaN hidden states here) hold the accumulators of no
    entry, while an ignored row sharing a tile with labelled ones is computed (and masked later)."""
    n, hidden_size, vocab = 160, 16, 70
    hidden, weight, b, labels = _inputs((n,), hidden_size, vocab, torch.float32, TRITON_DEVICE, ignore_frac=0)
    ignored = torch.ones(n, dtype=torch.bool)
    ignored[torch.randperm(n)[:10]] = False
    labels[ignored] = -100
    hidden[ignored] = float("nan")
    cfg = ops._launch_config(n, vocab, hidden_size, torch.float32, hidden.device)
    assert cfg.block_n == 128  # 10 labelled rows: tile 0 busy, tile 1 (rows 128..159 in order) skipped
    partials = torch.full((6, cfg.vocab_splits, n), float("nan"))
    ops._launch_stats_out(partials, hidden, weight, b, labels, 1.0, 0, True, ignore_index=-100)
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    skipped, shared = order[128:], order[10:128]
    m, rest = partials[0], partials[1:]
    assert bool((m[:, skipped] == float("-inf")).all()) and bool((rest[:, :, skipped] == 0).all())
    assert bool(partials[1][:, shared].isnan().all())  # s computed from their NaN hidden states
    assert bool(torch.isfinite(partials[:, :, order[:10]]).all())
    lp, h = linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    want_lp, want_h = ref.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    assert bool((lp[ignored] == 0).all()) and bool((h[ignored] == 0).all())
    _assert_close(lp[~ignored], want_lp[~ignored], 2e-5, "logprobs")
    _assert_close(h[~ignored], want_h[~ignored], 2e-5, "entropy")


@pytest.mark.parametrize("mode", ["logprobs", "entropy", "all+batch_invariant", "top-k"])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_bwd_launcher_writes_every_output(monkeypatch, needs, mode):
    """d_hidden, d_weight and d_bias over three vocabulary chunks and two row blocks, against G in float64
    (with every upstream gradient and the fixed-tile d_hidden product in the last mode)."""
    n, hidden_size, vocab, inv_t = 150, 24, 300, 1.25
    monkeypatch.setattr(kernels, "_BWD_BUFFER_BYTES", 0)
    invariant = mode == "all+batch_invariant"
    cfg = ops._launch_config(n, vocab, hidden_size, torch.float32, torch.device(TRITON_DEVICE), invariant)
    assert cfg.bwd_chunk_v < vocab and n > cfg.block_n  # several chunks and row blocks
    hidden, weight, b, labels = _inputs((n,), hidden_size, vocab, torch.float32, TRITON_DEVICE)
    h64, w64, labels_cpu = hidden.double().cpu(), weight.double().cpu(), labels.cpu()
    z = (h64 @ w64.T + b.double().cpu()) * inv_t
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=-1)
    sum_sq = (p * p).sum(dim=-1)
    g, eta, rho, r = (torch.randn(n, dtype=torch.float64) for _ in range(4))
    eta, rho, r = (x if mode != "logprobs" and (x is eta or invariant) else 0 * x for x in (eta, rho, r))
    ignored = labels_cpu == -100
    onehot = torch.nn.functional.one_hot(labels_cpu.clamp(min=0), vocab).double()
    G = g[:, None] * (onehot - p) - eta[:, None] * p * (log_p + entropy[:, None])
    G = inv_t * (G + 2 * rho[:, None] * p * (p - sum_sq[:, None]) + r[:, None] / vocab)
    # top-k: Σ_k w_k (1[j = i_k] − p_j) for 9 distinct tokens per row, spread over every chunk and tile
    topk_indices = torch.rand(n, vocab).argsort(dim=1)[:, :9]
    w_topk = torch.randn(n, 9, dtype=torch.float64)
    if mode == "top-k":
        spread = torch.zeros(n, vocab, dtype=torch.float64).scatter_(1, topk_indices, w_topk)
        G += inv_t * (spread - w_topk.sum(dim=1, keepdim=True) * p)
    G[ignored] = 0.0

    grads = cpu_ops.empty_grads(hidden, weight, b, *needs)
    for out in grads:
        out.fill_(float("nan"))
    to = lambda t: t.float().to(TRITON_DEVICE)  # noqa: E731
    grad_entropy = to(eta) if mode != "logprobs" else hidden.new_empty(0)
    extras = (to(rho), to(r / vocab), to(sum_sq), 1.0, 0.0, True) if invariant else ()
    if mode == "top-k":
        extras = (None, None, None, 1.0, 0.0, False, to(w_topk), topk_indices.to(TRITON_DEVICE))
    ops._launch_bwd_out(*grads, to(g), grad_entropy, hidden, weight, b, labels, to(torch.logsumexp(z, -1)),
                        to(entropy), inv_t, -100, 0, *extras)
    wants = (G @ w64, G.T @ h64, G.sum(dim=0))
    for got, want, needed, name in zip(grads, wants, needs, ("hidden", "weight", "bias"), strict=True):
        if not needed:
            assert got.numel() == 0, name
            continue
        assert got.shape == want.shape and not bool(got.isnan().any()), f"d_{name} not written everywhere"
        _assert_grad_close(got, want, 2e-5, f"d_{name}")


# --------------------------------------------------------------------------------------------------
# The nn.Module wrapper
# --------------------------------------------------------------------------------------------------
def test_module_wrapper(backend, device):
    torch.manual_seed(1)
    head = torch.nn.Linear(26, 91, bias=True).to(device)
    wrapper = LinearLogprobs(head, temperature=0.8)
    assert wrapper.lm_head is head and "temperature=0.8" in repr(wrapper)
    hidden = torch.randn(2, 5, 26, device=device, requires_grad=True)
    labels = torch.randint(0, 91, (2, 5), device=device)
    lp, h = wrapper(hidden, labels, return_entropy=True)
    (lp.sum() + h.sum()).backward()
    want_lp, want_h = ref.linear_logprobs(hidden.detach().cpu(), head.weight.detach().cpu(), labels.cpu(),
                                          bias=head.bias.detach().cpu(), temperature=0.8, return_entropy=True)
    _assert_close(lp.detach(), want_lp, 2e-5, "logprobs")
    _assert_close(h.detach(), want_h, 2e-5, "entropy")
    assert head.weight.grad is not None and head.bias.grad is not None and hidden.grad is not None
    lp_t1 = wrapper(hidden.detach(), labels, temperature=1.0)
    want_t1 = ref.linear_logprobs(hidden.detach().cpu(), head.weight.detach().cpu(), labels.cpu(),
                                  bias=head.bias.detach().cpu())
    _assert_close(lp_t1, want_t1, 2e-5, "logprobs at temperature 1")


def test_module_lives_in_modules_and_is_reexported():
    assert LinearLogprobs is modules.LinearLogprobs is rk.LinearLogprobs
    with pytest.raises(AttributeError, match="no attribute 'NotThere'"):
        ops.NotThere  # noqa: B018


def test_module_wrapper_batch_invariant(backend, device):
    head = torch.nn.Linear(12, 40, bias=False).to(device)
    wrapper = LinearLogprobs(head, batch_invariant=True)
    assert "batch_invariant=True" in repr(wrapper)
    hidden = torch.randn(7, 12, device=device)
    labels = torch.randint(0, 40, (7,), device=device)
    want = linear_logprobs(hidden, head.weight, labels, batch_invariant=True)
    assert torch.equal(wrapper(hidden, labels).detach(), want.detach())
    assert torch.equal(wrapper(hidden[3:4], labels[3:4]).detach(), want[3:4].detach())  # one row alone


def test_module_wrapper_rejects_non_linear():
    with pytest.raises(TypeError, match="lm_head must be an nn.Module with a 2-D"):
        LinearLogprobs(torch.nn.ReLU())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LinearLogprobs(torch.nn.Linear(3, 4), temperature=0.0)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _good():
    return dict(hidden=torch.randn(2, 3, 8), weight=torch.randn(10, 8), labels=torch.randint(0, 10, (2, 3)),
                bias=torch.randn(10))


BAD = [
    (dict(weight=torch.randn(10, 8, 1)), ValueError, r"weight must be 2-D \[V, H\].*got shape \(10, 8, 1\)"),
    (dict(weight=torch.randn(80)), ValueError, r"weight must be 2-D"),
    (dict(weight=torch.randn(10, 7)), ValueError,
     r"hidden must have shape \[\.\.\., H\] with H = weight.shape\[1\] = 7"),
    (dict(weight=torch.randn(0, 8), bias=None, labels=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     r"weight must be non-empty"),
    (dict(hidden=torch.randn(2, 3, 9)), ValueError, r"H = weight.shape\[1\] = 8; got \(2, 3, 9\)"),
    (dict(labels=torch.randint(0, 10, (2, 4))), ValueError,
     r"labels must have shape hidden.shape\[:-1\] = \(2, 3\)"),
    (dict(labels=torch.randint(0, 10, (6,))), ValueError, r"labels must have shape"),
    (dict(bias=torch.randn(11)), ValueError,
     r"bias must have shape \(weight.shape\[0\],\) = \(10,\); got \(11,\)"),
    (dict(bias=torch.randn(10, 1)), ValueError, r"bias must have shape"),
    (dict(weight=torch.randn(10, 8, dtype=torch.bfloat16)), TypeError,
     r"weight must have the dtype of hidden \(torch.float32\); got torch.bfloat16"),
    (dict(bias=torch.randn(10, dtype=torch.float16)), TypeError, r"bias must have the dtype of hidden"),
    (dict(hidden=torch.randn(2, 3, 8, dtype=torch.float64), weight=torch.randn(10, 8, dtype=torch.float64),
          bias=None), TypeError, r"hidden must be a floating tensor"),
    (dict(hidden=torch.randint(0, 3, (2, 3, 8))), TypeError, r"hidden must be a floating tensor"),
    (dict(labels=torch.rand(2, 3)), TypeError, r"labels must be an integer tensor"),
    (dict(weight=[[1.0]]), TypeError, r"weight must be a torch.Tensor"),
    (dict(labels=torch.full((2, 3), 10)), ValueError, r"labels must lie in \[0, 10\)"),
    (dict(labels=torch.full((2, 3), -1)), ValueError, r"got label -1"),
    (dict(temperature=0.0), ValueError, r"temperature must be > 0"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be finite"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be a Python int"),
    (dict(return_entropy="yes"), TypeError, r"return_entropy must be a bool"),
    (dict(process_group="tp"), TypeError, r"process_group must be a torch.distributed.ProcessGroup or None"),
    (dict(batch_invariant=1), TypeError, r"batch_invariant must be a bool; got int"),
    (dict(batch_invariant=True, process_group="tp"), ValueError,
     r"batch_invariant=True is not supported with a process_group"),
]

BAD_STATS = [
    (dict(softcap=0.0), ValueError, r"softcap must be > 0"),
    (dict(softcap=-1.0), ValueError, r"softcap must be > 0"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be finite"),
    (dict(logit_scale=0.0), ValueError, r"logit_scale must be > 0"),
    (dict(temperature=-1.0), ValueError, r"temperature must be > 0"),
    (dict(sum_sq_probs=1), TypeError, r"sum_sq_probs must be a bool; got int"),
    (dict(top1_match=None), TypeError, r"top1_match must be a bool; got NoneType"),
    (dict(entropy="yes"), TypeError, r"entropy must be a bool; got str"),
    (dict(batch_invariant=0), TypeError, r"batch_invariant must be a bool"),
    (dict(top_k=-1), ValueError, r"top_k must be 0 \(off\) or in \[1, min\(64, V = 10\)\]; got -1"),
    (dict(top_k=11), ValueError, r"top_k must be 0 \(off\) or in \[1, min\(64, V = 10\)\]; got 11"),
    (dict(top_k=65, weight=torch.randn(100, 8), bias=None), ValueError, r"min\(64, V = 100\)\]; got 65"),
    (dict(top_k=2.0), TypeError, r"top_k must be a Python int"),
    (dict(labels=torch.full((2, 3), 10)), ValueError, r"labels must lie in \[0, 10\)"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(change, error, message):
    args = _good()
    args.update(change)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=message):
        linear_logprobs(hidden, weight, labels, **args)


@pytest.mark.parametrize("change,error,message", BAD_STATS, ids=[str(i) for i in range(len(BAD_STATS))])
def test_bad_input_token_stats(change, error, message):
    args = _good()
    args.update(change)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=message):
        linear_token_stats(hidden, weight, labels, **args)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_bad_input_devices():
    args = _good()
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        linear_logprobs(args["hidden"].cuda(), args["weight"], args["labels"])


# --------------------------------------------------------------------------------------------------
# Autograd, registration and compile
# --------------------------------------------------------------------------------------------------
def test_gradcheck_float64_torch_path():
    """The registered op computes float64 inputs in float64 (internal: the public function refuses it)."""
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 4, 0])
    with _dispatch.use_backend("torch"):
        def fn(h, w, b):
            lp, ent, *_ = ops.linear_logprobs_fwd(h, w, b, labels, 1.25, -100, True)
            return lp, ent

        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_opcheck_torch_path():
    hidden = torch.randn(6, 9, requires_grad=True)
    weight = torch.randn(13, 9, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    labels = torch.tensor([0, 12, -100, 3, 3, 7])
    with _dispatch.use_backend("torch"):
        for b in (None, bias):
            for with_entropy in (False, True):
                torch.library.opcheck(
                    torch.ops.rlhf_kernels.linear_logprobs_fwd.default,
                    (hidden, weight, b, labels, 0.7, -100, with_entropy),
                )
        h, w, b = hidden.detach(), weight.detach(), bias.detach()
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_stats.default,
                              (h, w, b, labels, 1.0, 0, True))
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_stats_torch.default,
                              (h, w, None, labels, 0.5, 3, False))
        _, ent, *_, lse = ops.linear_logprobs_fwd(h, w, b, labels, 1.0, -100, True)
        for needs in ((True, True, True), (False, True, False)):
            args = (torch.randn(6), torch.randn(6), h, w, b, labels, lse, ent, 1.0, -100, 0, 13, *needs)
            torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd.default, args)
            torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd_torch.default,
                                  args[:10] + (0,) + needs)
        # the statistics, the logit transform, labelled rows only and batch invariance (issue 15)
        extras = (1.3, 2.0, True, True, True, True)
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_fwd.default,
                              (hidden, weight, bias, labels, 0.7, -100, True, *extras))
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_stats.default,
                              (h, w, b, labels, 1.0, 0, True, -100, True))
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_stats_torch.default,
                              (h, w, b, labels, 0.5, 3, True, 1.3, 2.0, True, True, -100, True))
        _, ent, sq, *_, lse = ops.linear_logprobs_fwd(h, w, b, labels, 1.0, -100, True, *extras)
        args = (torch.randn(6), torch.randn(6), h, w, b, labels, lse, ent, 1.0, -100, 0, 13, True, True, True,
                torch.randn(6), torch.randn(6), sq, 1.3, 2.0, True)
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd.default, args)
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd_torch.default, args[:11] + args[12:])
        # the top-k (issue 15): k = 4 log-probs and tokens, and their upstream gradient
        top = (*extras, 4)
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_fwd.default,
                              (hidden, weight, bias, labels, 0.7, -100, False, *top))
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_stats_torch.default,
                              (h, w, b, labels, 0.5, 0, False, 1.3, 2.0, False, False, -100, False, 4))
        _, ent, sq, _, _, _, topk_indices, lse = ops.linear_logprobs_fwd(h, w, b, labels, 1.0, -100, True,
                                                                          *top)
        args = args[:6] + (lse, ent) + args[8:17] + (sq, 1.3, 2.0, True, torch.randn(6, 4), topk_indices)
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd.default, args)
        torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd_torch.default, args[:11] + args[12:])


def test_compile_fullgraph_dynamic_torch_path():
    def step(hidden, weight, bias, labels):
        lp, h = linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.9, return_entropy=True)
        return lp.sum() - 0.1 * h.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for n in (6, 9):
            hidden, weight, bias, labels = _inputs((n, 2), 12, 31, torch.float32, "cpu")
            eager_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            comp_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            eager = step(*eager_leaves, labels)
            eager.backward()
            got = compiled(*comp_leaves, labels)
            got.backward()
            torch.testing.assert_close(got, eager)
            for a, b in zip(comp_leaves, eager_leaves, strict=True):
                torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.skipif(not HAS_CUDA, reason="compiling Triton kernels needs CUDA")
def test_compile_fullgraph_dynamic_triton_path():
    def step(hidden, weight, labels):
        lp, h = linear_logprobs(hidden, weight, labels, return_entropy=True)
        return lp.sum() + h.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    _dispatch.set_index_checks(False)
    try:
        hidden, weight, _, labels = _inputs((96,), 128, 1000, torch.bfloat16, "cuda")
        eager_leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        comp_leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        step(*eager_leaves, labels).backward()
        compiled(*comp_leaves, labels).backward()
        for a, b in zip(comp_leaves, eager_leaves, strict=True):
            torch.testing.assert_close(a.grad, b.grad)
    finally:
        _dispatch.set_index_checks(True)


@pytest.mark.skipif(not HAS_CUDA, reason="host-sync detection needs CUDA")
def test_no_host_sync_on_cuda():
    hidden, weight, bias, labels = _inputs((64,), 96, 5000, torch.bfloat16, "cuda")
    hidden.requires_grad_()
    weight.requires_grad_()
    _dispatch.set_index_checks(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, h = linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
        (lp.sum() + h.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _dispatch.set_index_checks(True)


# --------------------------------------------------------------------------------------------------
# Memory of the CPU path
# --------------------------------------------------------------------------------------------------
_MEMORY_SCRIPT = """
import json, sys
import torch
from bench.harness import peak_memory_bytes
from rlhf_kernels import _dispatch
from rlhf_kernels.ops.linear_logprobs import linear_logprobs

n, hidden_size, vocab = 256, 16, 131072
hidden = torch.randn(n, hidden_size, requires_grad=True)
weight = (torch.randn(vocab, hidden_size) * 0.5).requires_grad_()
bias = torch.randn(vocab)
labels = torch.randint(0, vocab, (n,))

def ours(rows=n):
    hidden.grad = weight.grad = None
    lp, h = linear_logprobs(hidden[:rows], weight, labels[:rows], bias=bias, return_entropy=True)
    (lp.sum() + h.sum()).backward()

def eager():  # verl's fallback idiom, for a sanity check of the measurement
    hidden.grad = weight.grad = None
    log_p = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).float(), dim=-1)
    log_p.gather(-1, labels.unsqueeze(-1)).sum().backward()

with _dispatch.use_backend("torch"):
    ours(2)  # first-call costs (thread pools, kernels) outside the measurement
    step = peak_memory_bytes(ours, "cpu")
    fwd = peak_memory_bytes(lambda: linear_logprobs(hidden, weight, labels, return_entropy=True), "cpu")
    reference = peak_memory_bytes(eager, "cpu")
print(json.dumps(dict(step=step, fwd=fwd, eager=reference, logits=n * vocab * 4)))
"""


def test_cpu_path_memory_stays_far_below_the_logits():
    """Peak resident-set rise of forward and forward+backward on the PyTorch path, measured in a fresh
    process, against one fp32 copy of the logits (128 MiB; eager holds about three)."""
    import json
    import subprocess
    import sys

    from bench.harness import exact_rss_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], cwd=root, env=exact_rss_env(root),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    logits = peaks["logits"]
    assert peaks["eager"] > 2 * logits, peaks  # the measurement sees large allocations
    # two 8 MiB chunks alive at a time, plus the 8 MiB weight gradient in the backward
    assert peaks["fwd"] < logits / 4, peaks
    assert peaks["step"] < logits / 4, peaks


# --------------------------------------------------------------------------------------------------
# Vocabulary (tensor) parallelism: 2 CPU processes on gloo against the unsharded oracle
# --------------------------------------------------------------------------------------------------
def _tp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same full tensors on every rank
        hidden_size, local_vocab = 21, 37
        vocab = local_vocab * world
        hidden, weight, bias, labels = _inputs((3, 3), hidden_size, vocab, torch.float32, "cpu")
        labels[0, 0], labels[0, 1] = 0, vocab - 1  # first entry of rank 0, last of the last rank
        w_up = torch.rand(3, 3, dtype=torch.float64) + 0.5
        u_up = torch.rand(3, 3, dtype=torch.float64) - 0.5
        rows = slice(rank * local_vocab, (rank + 1) * local_vocab)
        for backend in ("torch", "triton"):
            for with_bias, temperature in ((True, 0.8), (False, 1.0)):
                h = hidden.clone().requires_grad_()
                w = weight[rows].clone().requires_grad_()
                b = bias[rows].clone().requires_grad_() if with_bias else None
                with _dispatch.use_backend(backend):
                    lp, ent = linear_logprobs(h, w, labels, bias=b, temperature=temperature,
                                              return_entropy=True, process_group=dist.group.WORLD)
                    ((w_up.float() * lp).sum() + (u_up.float() * ent).sum()).backward()
                h64 = hidden.double().requires_grad_()
                w64 = weight.double().requires_grad_()
                b64 = bias.double().requires_grad_() if with_bias else None
                want_lp, want_h = ref.linear_logprobs(h64, w64, labels, bias=b64, temperature=temperature,
                                                      return_entropy=True)
                ((w_up * want_lp).sum() + (u_up * want_h).sum()).backward()
                what = f"rank {rank} {backend} bias={with_bias}"
                _assert_close(lp.detach(), want_lp.detach(), 2e-5, f"{what} logprobs")
                _assert_close(ent.detach(), want_h.detach(), 2e-5, f"{what} entropy")
                _assert_grad_close(h.grad, h64.grad, 2e-5, f"{what} d_hidden")
                _assert_grad_close(w.grad, w64.grad[rows], 2e-5, f"{what} d_weight")
                if with_bias:
                    _assert_grad_close(b.grad, b64.grad[rows], 2e-5, f"{what} d_bias")
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {vocab}\)"):
            linear_logprobs(hidden, weight[rows], torch.full((3, 3), vocab), process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_two_processes(monkeypatch):
    run_gloo_workers(_tp_worker, 2, "vocabulary-parallel", monkeypatch)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_autocast_region_does_not_lower_the_precision(backend_name):
    """Inside torch.autocast(bf16) the op still computes in fp32 (its products are not autocast to
    bf16), values and gradients equal to the call outside the region; the entropy backward used to
    overflow bf16 there."""
    torch.manual_seed(3)
    hidden = torch.randn(6, 16, dtype=torch.float32)
    weight = torch.randn(37, 16, dtype=torch.float32) * 0.5
    labels = torch.randint(0, 37, (6,))
    results = []
    for autocast in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with rk.use_backend(backend_name), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp, ent = rk.linear_logprobs(h, w, labels, return_entropy=True)
            (lp.sum() + ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), h.grad, w.grad))
    for plain, autocast in zip(*results):
        assert plain.dtype == autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)
