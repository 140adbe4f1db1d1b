"""sampling_logprobs against the float64 torch.sort oracle (values, and gradients by autograd through
it), on every backend; its kept set against vLLM's sort-based sampler on logits without ties.

Kernels, launchers and routing: rlhf_kernels/ops/sampling_logprobs.py; PyTorch path:
rlhf_kernels/ops/cpu/sampling_logprobs.py; oracle: rlhf_kernels/reference/sampling_logprobs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, assert_close, assert_compiles_for_sm90
from fuzz.oracles import logprobs_grad_oracle

from bench.baselines.sampling_logprobs import vllm_masked_logits
from rlhf_kernels import _dispatch
from rlhf_kernels.ops import sampling_logprobs as ops
from rlhf_kernels.ops.cpu import sampling_logprobs as cpu
from rlhf_kernels.ops.sampling_logprobs import sampling_logprobs
from rlhf_kernels.reference import sampling_logprobs as ref

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

# Inputs are exact in every dtype (the oracle sees the same rounded values): forward errors come from
# fp32 arithmetic; the gradient is also rounded to the logits' dtype.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-12}

# (temperature, top_k, top_p, min_p): each filter alone, and together
SETTINGS = {
    "none": (1.0, 0, 1.0, 0.0),
    "top_k": (0.7, 5, 1.0, 0.0),
    "top_p": (1.3, 0, 0.8, 0.0),
    "min_p": (1.0, 0, 1.0, 0.05),
    "all": (0.7, 9, 0.9, 0.02),
}


def _logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(dtype).to(device)


def _labels(shape, vocab, device, ignore_frac=0.2):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    return labels.to(device)


def _assert_grad_close(got, want, rtol, what="grad", atol=4e-6):
    """Per row, |got − want| ≤ rtol·max_j |want_j| + atol (upstream weights are O(1)); NaN where the
    oracle's gradient is NaN.  ``atol``: the entropy gradient q·(log q + H) cancels where q → 1, and
    log q = x' − lse is exact only to fp32's ulp of lse (~1e-6 at |x'| ~ 10)."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    got, want = got.nan_to_num(0.0), want.nan_to_num(0.0)
    bound = rtol * want.abs().amax(-1, keepdim=True) + atol
    err = (got - want).abs()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}"


def _assert_values(got, want, tol, what):
    """assert_close where the oracle is finite; identical ±inf / NaN elsewhere."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = want.isfinite()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()]), f"{what}: infinities"
    assert_close(got[finite], want[finite], tol, what)


def _check(logits, labels, settings, *, use_entropy=True, ignore_index=-100):
    """Values (log-probs, entropy, mask mass) and the logits gradient of w·logprobs + u·entropy against
    the oracle (autograd through it); the logits are not modified."""
    temperature, top_k, top_p, min_p = settings
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, ignore_index=ignore_index)
    dtype = logits.dtype
    x = logits.clone().requires_grad_()
    logprobs, entropy, mass = sampling_logprobs(
        x, labels, **kwargs, return_entropy=True, return_mask_mass=True
    )
    leaf = logits.detach().cpu().double().requires_grad_()
    want_lp, want_h, want_mass = ref.sampling_logprobs(
        leaf, labels.cpu(), **kwargs, return_entropy=True, return_mask_mass=True
    )
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert logprobs.dtype == entropy.dtype == mass.dtype == out_dtype
    assert not mass.requires_grad
    _assert_values(logprobs, want_lp, FWD_TOL[dtype], "logprobs")
    _assert_values(entropy, want_h, FWD_TOL[dtype], "entropy")
    _assert_values(mass, want_mass, FWD_TOL[dtype], "mask_mass")

    w = torch.rand(labels.shape, dtype=torch.float64) + 0.5
    u = (torch.rand(labels.shape, dtype=torch.float64) - 0.5) * use_entropy
    # −inf log-probs carry no gradient: weight them through where so that the loss stays finite
    def loss(lp, h):
        return torch.where(lp.isfinite(), lp, 0.0).mul(w.to(lp)).sum() + (h * u.to(h)).nan_to_num(0.0).sum()

    loss(logprobs, entropy).backward()
    loss(want_lp, want_h).backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(x.detach(), logits, rtol=0, atol=0, equal_nan=True)  # not modified
    atol = 1e-12 if dtype == torch.float64 else 4e-6
    rows = ~want_lp.isnan()  # NaN rows: our gradient is NaN whatever the upstream weight (as in logprobs)
    _assert_grad_close(x.grad.cpu()[rows], leaf.grad[rows], GRAD_RTOL[dtype] * 2, atol=atol)
    return logprobs


# --------------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_matches_oracle(backend, device, setting):
    logits = _logits((4, 67), torch.float32, device)
    _check(logits, _labels((4,), 67, device), SETTINGS[setting])


def test_bf16(backend, device):
    logits = _logits((4, 45), torch.bfloat16, device)
    _check(logits, _labels((4,), 45, device), SETTINGS["all"])


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 3, 17), (1, 1100)])
def test_odd_shapes(backend, device, shape):
    logits = _logits(shape, torch.float16, device)
    temperature, top_k, top_p, min_p = SETTINGS["all"]
    _check(logits, _labels(shape[:-1], shape[-1], device), (temperature, min(top_k, shape[-1]), top_p, min_p))


@pytest.mark.parametrize("vocab", [50257, 151936])
def test_real_vocabularies_torch_path(vocab):
    # the interpreter would take minutes at these sizes: the PyTorch path only (the kernels run the same
    # selection at V = 1100 above, several blocks per pass)
    with _dispatch.use_backend("torch"):
        logits = _logits((3, vocab), torch.bfloat16, "cpu")
        labels = torch.tensor([7, vocab - 1, -100])
        labels[0] = logits[0].float().argmax()  # inside every kept set
        _check(logits, labels, (0.8, 50, 0.9, 0.0))
        _check(logits, labels, (1.0, 0, 0.95, 0.01))


def test_fp64_scalars_keep_fp64_accuracy(backend, device):
    # 1/0.7, 0.7 and log(0.03) are not fp32 numbers: rounded to fp32 they would err by ~1e-8
    logits = _logits((2, 2, 40), torch.float64, device, scale=4.0)
    _check(logits, _labels((2, 2), 40, device), (0.7, 15, 0.7, 0.03))


def test_label_outside_kept_set_is_minus_inf_with_finite_gradient(backend, device):
    logits = torch.tensor([[math.log(4), math.log(3), math.log(2), 0.0]] * 3, device=device)
    labels = torch.tensor([1, 2, -100], device=device)
    x = logits.clone().requires_grad_()
    logprobs, entropy, mass = sampling_logprobs(
        x, labels, top_k=2, return_entropy=True, return_mask_mass=True
    )
    assert_close(logprobs[0], torch.tensor(math.log(3 / 7)), 1e-6, "kept label")
    assert logprobs[1].item() == -math.inf and logprobs[2].item() == 0.0
    assert_close(mass, torch.tensor([0.7, 0.7, 0.0]), 1e-6, "mask_mass")
    (logprobs[1] * 0 + logprobs[:1].sum() + entropy.sum()).backward()
    assert x.grad.isfinite().all()
    assert (x.grad[:, 2:] == 0).all(), "entries outside the kept set receive no gradient"
    _check(logits, labels, (1.0, 2, 1.0, 0.0))


def test_label_gradient_exact_where_its_probability_rounds_to_one(backend, device):
    """The label holds all the kept mass but 4.5e-5 … 8e-40 of it: the label column's g·(1 − q_y), read
    as g − g·q_y, was 0 or kept few digits (ops/logprobs.py's backward, found by the long fuzz profile).
    With top-k = 2 the third token is dropped; without filters the op is logprobs_from_logits, whose
    oracle with an exact label column covers the rows beyond float64's rounding of q_y too."""
    logits = torch.tensor([[5.0, -5.0, -30.0], [40.0, 20.0, -9.0], [-5.0, 5.0, -30.0]], device=device)
    x = logits.clone().requires_grad_()
    labels = torch.tensor([0, 0, 1], device=device)
    lp = sampling_logprobs(x, labels, top_k=2)
    leaf = logits.detach().cpu().double().requires_grad_()
    w = torch.rand(3) + 0.5
    (grad,) = torch.autograd.grad(lp, x, w.to(device))
    (want,) = torch.autograd.grad(ref.sampling_logprobs(leaf, labels.cpu(), top_k=2), leaf, w.double())
    _assert_grad_close(grad, want, GRAD_RTOL[torch.float32] * 2, atol=0.0)
    logits = torch.tensor([[0.0, -37.0], [50.0, -10.0], [-90.0, 0.0]], device=device)
    for use_entropy in (False, True):
        x = logits.clone().requires_grad_()
        lp, h = sampling_logprobs(x, labels, return_entropy=True)
        u = torch.rand(3) - 0.5 if use_entropy else None
        outputs, upstream = ((lp, h), (w.to(device), u.to(device))) if use_entropy else (lp, w.to(device))
        (grad,) = torch.autograd.grad(outputs, x, upstream)
        want = logprobs_grad_oracle(logits.cpu(), labels.cpu(), w, u, temperature=1.0, ignore_index=-100)
        _assert_grad_close(grad, want, GRAD_RTOL[torch.float32] * 2, atol=0.0)


def test_ties_are_kept_whole(backend, device):
    # four copies of the 2nd largest value: top-k = 2 and a top-p crossing inside the tie keep all four
    row = torch.tensor([5.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.0, -2.0], device=device)
    logits = row.repeat(3, 1)
    labels = torch.tensor([4, 5, 0], device=device)
    for settings in ((1.0, 2, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 6, 1.0, 0.0)):
        lp = _check(logits, labels, settings)
        keep = ref.kept_mask(logits.cpu(), top_k=settings[1], top_p=settings[2])
        assert keep[0, :5].all() and not keep[0, -1], "a tie group is kept or dropped as a whole"
        assert lp[0].isfinite()


def test_top_p_keeps_the_token_that_crosses_p(backend, device):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().repeat(2, 1).to(device)
    # each top_p lies between two cumulative masses (0.5, 0.8, 0.95): no rounding decides the set
    for top_p, kept in ((0.45, 1), (0.6, 2), (0.81, 3), (0.96, 4)):
        labels = torch.tensor([kept - 1, min(kept, 3)], device=device)  # the last kept, the next one
        lp = sampling_logprobs(logits, labels, top_p=top_p)
        mass = probs[:kept].sum()
        want = [(probs[j] / mass).log().item() if j < kept else -math.inf for j in labels.tolist()]
        _assert_values(lp, torch.tensor(want, dtype=torch.float64), 1e-6, f"top_p={top_p}")


def test_min_p_stricter_than_top_k(backend, device):
    # min-p keeps fewer tokens than top-k: the top-k search ends below the min-p floor (the kernels
    # start it from the digits the floor shares with the row maximum)
    logits = _logits((4, 67), torch.float32, device)
    logits[1] = logits[1].round()  # ties at the k-th value
    _check(logits, _labels((4,), 67, device), (1.0, 30, 1.0, 0.3))
    _check(logits, _labels((4,), 67, device), (0.8, 40, 0.9, 0.1))
    _check(logits, _labels((4,), 67, device), (1.0, 3, 1.0, 0.001))


def test_minus_inf_logits(backend, device):
    logits = _logits((5, 40), torch.float32, device)
    logits[:, ::3] = -math.inf  # 14 masked entries per row
    logits[1, :] = -math.inf
    logits[1, 5] = 0.0  # one finite logit
    labels = torch.tensor([1, 5, 2, 4, 7], device=device)
    for settings in ((0.9, 30, 1.0, 0.0), (1.0, 5, 0.9, 0.0), (1.0, 0, 0.5, 0.1)):
        _check(logits, labels, settings)


def test_nan_and_all_minus_inf_rows_give_nan(backend, device):
    logits = _logits((4, 23), torch.float32, device)
    logits[0, 3] = math.nan
    logits[1] = -math.inf
    labels = torch.tensor([0, 1, 2, -100], device=device)
    labels[2] = logits[2].argmax()  # always kept: a finite log-prob
    logits[3, 0] = math.nan  # an ignored row: 0 and no gradient, NaN or not
    x = logits.clone().requires_grad_()
    lp, h, mass = sampling_logprobs(x, labels, top_k=4, top_p=0.9, return_entropy=True, return_mask_mass=True)
    for out in (lp, h, mass):
        assert out[:2].isnan().all() and out[2].isfinite() and out[3] == 0
    (lp + h).sum().backward()
    assert x.grad[0].isnan().all() and x.grad[2].isfinite().all() and (x.grad[3] == 0).all()
    _check(logits, labels, (1.0, 4, 0.9, 0.0))


def test_large_logits_and_one_token_rows(backend, device):
    logits = _logits((3, 50), torch.float32, device, scale=1e4)
    _check(logits, _labels((3,), 50, device, ignore_frac=0.0), (1.0, 0, 0.99, 0.0))
    top1 = _logits((4, 30), torch.float32, device)
    labels = top1.argmax(-1)
    lp, h, mass = sampling_logprobs(top1, labels, top_k=1, return_entropy=True, return_mask_mass=True)
    assert (lp == 0).all() and (h == 0).all()
    assert_close(mass, torch.softmax(top1.double(), -1).amax(-1), 1e-6, "top-1 mass")


def test_strided_logits_and_int32_labels(backend, device):
    full = _logits((2, 4, 41), torch.bfloat16, device)
    logits = full[:, :-1]  # [B, T-1, V]: leading dims do not merge
    labels = _labels((2, 3), 41, device).to(torch.int32)
    _check(logits, labels, SETTINGS["all"], ignore_index=-100)
    transposed = _logits((41, 3), torch.float32, device).t()
    _check(transposed, _labels((3,), 41, device), SETTINGS["top_p"])


def test_entropy_not_requested_and_custom_ignore_index(backend, device):
    logits = _logits((6, 30), torch.float32, device)
    labels = _labels((6,), 30, device)
    labels[labels == -100] = 3
    x = logits.clone().requires_grad_()
    lp = sampling_logprobs(x, labels, top_k=7, ignore_index=3)
    lp.sum().backward()
    leaf = logits.double().requires_grad_()
    want = ref.sampling_logprobs(leaf, labels, top_k=7, ignore_index=3)
    _assert_values(lp, want, 2e-5, "logprobs")
    want.nan_to_num(0.0, neginf=0.0).sum().backward()
    _assert_grad_close(x.grad, leaf.grad, 4e-5)


@pytest.mark.parametrize("shape", [(0, 11), (2, 0, 5)])
def test_empty_inputs(backend, device, shape):
    logits = _logits(shape, torch.float32, device).requires_grad_()
    labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    lp, h = sampling_logprobs(logits, labels, top_k=3, top_p=0.5, return_entropy=True)
    assert lp.shape == h.shape == shape[:-1]
    (lp.sum() + h.sum()).backward()
    assert logits.grad.shape == shape


# --------------------------------------------------------------------------------------------------
# Semantics: vLLM's sampler, and the selection on its own
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["top_k", "top_p", "all"])
def test_kept_set_matches_vllm_without_ties(backend, device, setting):
    temperature, top_k, top_p, _ = SETTINGS[setting]
    logits = torch.randn(8, 211) * 2  # continuous values: no ties, so the sort order cannot matter
    labels = torch.randint(0, 211, (8,))
    vllm = vllm_masked_logits(logits, temperature, top_k, top_p)
    logprobs, _, _, _, threshold = ops.sampling_logprobs_fwd(
        logits.to(device), labels.to(device), 1 / temperature, top_k, top_p, -math.inf, -100, False
    )
    kept = cpu.sort_keys(logits / temperature) >= threshold.cpu().unsqueeze(-1)
    assert torch.equal(kept, vllm > -math.inf)
    want = vllm.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    _assert_values(logprobs, want.double(), 2e-5, "vLLM processed logprobs")


@pytest.mark.parametrize("leaders", [(4,), (4, 16)])
def test_torch_path_radix_fallback(monkeypatch, leaders):
    # nuclei wider than every leader count: rows undecided by torch.topk take the radix search
    monkeypatch.setattr(cpu, "TOP_P_LEADERS", leaders)
    with _dispatch.use_backend("torch"):
        logits = _logits((5, 300), torch.float32, "cpu", scale=0.5)
        _check(logits, _labels((5,), 300, "cpu"), (1.0, 0, 0.9, 0.0))
        _check(logits.double(), _labels((5,), 300, "cpu"), (0.7, 0, 0.8, 0.001))


def test_torch_path_mass_histogram():
    # a vocabulary ≥ WIDE_HISTOGRAM_MIN_VOCAB: rows the 256 leaders leave undecided take the histogram of
    # the mass over x' − m; flat rows (nuclei of thousands), ties across a bucket, −inf entries, min-p
    vocab = cpu.WIDE_HISTOGRAM_MIN_VOCAB + 3
    logits = _logits((4, vocab), torch.float32, "cpu", scale=0.5)
    logits[1, :5000] = logits[1, 5000:10000]  # ties
    logits[2, ::7] = -math.inf
    labels = logits.argmax(-1)
    labels[3] = 11
    with _dispatch.use_backend("torch"):
        for settings in ((1.0, 0, 0.9, 0.0), (0.6, 0, 0.5, 0.0), (1.0, 0, 0.95, 0.2)):
            _check(logits, labels, settings)
        # float64, the boundary far down (x' − m ≈ −13.8, bucket 884): a token off would move lse by 2e-8
        spread = torch.linspace(0.0, -600.0, vocab, dtype=torch.float64).repeat(2, 1)
        _check(spread, torch.tensor([700, 5000]), (1.0, 0, 1 - 1e-6, 0.0))
        nan_row = logits[:2].clone()
        nan_row[0, 9] = math.nan
        got = sampling_logprobs(nan_row, labels[:2], top_p=0.9)
        assert got[0].isnan() and got[1].isfinite()


def test_radix_select_two_passes_of_int32_keys():
    # the 65536-bucket search of int32 keys (long rows) on short rows, against sorted keys
    values = torch.randn(5, 300) * 10
    values[0, :100] = values[0, 100:200]  # ties
    values[1, :50] = -math.inf
    keys = cpu.sort_keys(values)
    for k in (1, 2, 150, 300):
        got = cpu._select_int32(keys, torch.ones(5, 300, dtype=torch.float64), torch.full((5, 1), float(k)))
        assert torch.equal(got, keys.long().sort(-1, descending=True).values[:, k - 1 : k])


def test_radix_select_is_the_kth_key():
    keys = cpu.sort_keys(torch.randn(5, 300) * 10)
    for k in (1, 2, 150, 300):
        got = cpu.radix_select(keys, torch.ones(5, 300), torch.full((5, 1), float(k)))
        want = keys.long().sort(-1, descending=True).values[:, k - 1 : k]
        assert torch.equal(got, want)
    # fp64 keys, also of fp32 values (their low 29 bits are 0: the last passes compare keys far below
    # the prefix, where key − prefix would overflow int64)
    for values in (torch.randn(3, 50, dtype=torch.float64), torch.randn(3, 50).double()):
        fp64 = cpu.sort_keys(values)
        for k in (1, 7, 50):
            target = torch.full((3, 1), float(k), dtype=torch.float64)
            got = cpu.radix_select(fp64, torch.ones_like(values), target)
            assert torch.equal(got, fp64.sort(-1, descending=True).values[:, k - 1 : k])


def test_sort_keys_preserve_order():
    values = torch.tensor([-math.inf, -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-45, 2.0, 3e38, math.inf])
    for dtype in (torch.float32, torch.float64):
        keys = cpu.sort_keys(values.to(dtype)).long()
        assert (keys[1:] >= keys[:-1]).all() and (keys[1:] > keys[:-1]).sum() == len(values) - 2
        assert keys[4] == keys[5], "−0 and +0 share one key"


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(top_k=-2), ValueError, r"top_k must be 0 or -1 \(off\) or in \[1, 10\].*got -2"),
        (dict(top_k=11), ValueError, r"top_k .* in \[1, 10\] .*got 11"),
        (dict(top_k=2.0), TypeError, "top_k must be a Python int; got float"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]; got 0.0"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]; got 1.5"),
        (dict(top_p=math.nan), ValueError, "top_p must be finite; got nan"),
        (dict(min_p=-0.1), ValueError, r"min_p must be in \[0.0, 1.0\]; got -0.1"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0; got 0.0"),
        (dict(labels=torch.tensor([0, 10])), ValueError, r"labels must lie in \[0, 10\).*got label 10"),
        (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must have shape logits.shape\[:-1\]"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    labels = kwargs.pop("labels", torch.tensor([0, 1]))
    with pytest.raises(error, match=match):
        sampling_logprobs(torch.randn(2, 10), labels, **kwargs)


# --------------------------------------------------------------------------------------------------
# Launchers write every element of the outputs they are given
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(triton is None, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_launchers_write_every_output(dtype):
    device = "cuda" if HAS_CUDA else "cpu"
    logits = _logits((5, 40), dtype, device)
    labels = _labels((5,), 40, device)
    outputs = cpu.empty_outputs(logits, 5, True)
    for out in outputs:
        out.fill_(-1 if out.dtype == torch.int64 else math.nan)
    settings = (1 / 0.9, 11, 0.85, math.log(0.01), -100)
    ops._launch_fwd(outputs, logits, labels, *settings)
    want = cpu.sampling_logprobs_fwd_torch(logits.cpu(), labels.cpu(), *settings, True)
    for got, expected in zip(outputs, want, strict=True):
        assert torch.equal(got.cpu().isnan(), expected.isnan())
        if got.dtype == torch.int64:
            assert torch.equal(got.cpu(), expected), "threshold keys"
        else:
            got, expected = got.cpu().nan_to_num(0.0, neginf=0.0), expected.nan_to_num(0.0, neginf=0.0)
            assert_close(got, expected, 2e-5, "fwd")
    grad = torch.full_like(logits, math.nan)
    g, h = torch.rand(5, dtype=outputs[0].dtype), torch.rand(5, dtype=outputs[0].dtype)
    _, entropy, _, lse, threshold = outputs
    ops._launch_bwd(grad, g.to(device), h.to(device), logits, labels, lse, entropy, threshold, 1 / 0.9, -100)
    want = cpu.sampling_logprobs_bwd_torch(g, h, logits.cpu(), labels.cpu(), lse.cpu(), entropy.cpu(),
                                           threshold.cpu(), 1 / 0.9, -100)
    assert not grad.isnan().any()
    _assert_grad_close(grad, want, 1e-5)


_AOT_SCRIPT = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_kernels.ops import sampling_logprobs as ops

def compile_for_sm90(fn, types, constexprs):
    triton.compile(ASTSource(fn=fn, signature=dict(zip(fn.arg_names, types)), constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

c = "constexpr"
for dtype, out, key in (("bf16", "fp32", {"ACC": tl.float32, "KEY": tl.int32, "KEY_BITS": 32}),):
    compile_for_sm90(
        ops._sampling_logprobs_fwd_kernel,
        [f"*{dtype}", "*i64"] + [f"*{out}"] * 4 + ["*i64"] + ["i64"] * 3 + ["i32"] * 3 + ["fp32"] * 9
        + ["i32"] + [c] * 8,
        {"BLOCK_V": 4096, "SELECT_BLOCK": 1024, "HAS_TOP_K": False, "HAS_TOP_P": True, "HAS_ENTROPY": True,
         **key},
    )
    compile_for_sm90(
        ops._sampling_logprobs_bwd_kernel,
        [f"*{dtype}", f"*{out}", f"*{out}", f"*{dtype}", "*i64", f"*{out}", f"*{out}", "*i64"] + ["i64"] * 3
        + ["i32"] * 2 + ["fp32"] * 3 + ["i32"] + [c] * 5,
        {"BLOCK_V": 4096, "HAS_GRAD_ENTROPY": True, **key},
    )
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels run natively in the other tests")
@pytest.mark.skipif(triton is None, reason="needs triton")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks the math, not the lowering: compile both kernels (bf16 logits, top-p and
    entropy on; top-k runs the same selection loop by count) to PTX for sm_90 with Triton's bundled
    ptxas, in a process without TRITON_INTERPRET."""
    assert_compiles_for_sm90(_AOT_SCRIPT)
