"""logprobs_from_logits / entropy_from_logits against the float64 oracle, on every backend.

Kernels, launchers and routing: rlhf_kernels/ops/logprobs.py; PyTorch path: rlhf_kernels/ops/cpu/logprobs.py;
oracle: rlhf_kernels/reference/logprobs.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, assert_close, assert_compiles_for_sm90
from fuzz.oracles import logprobs_grad_oracle

import rlhf_kernels as rk
from bench.baselines.logprobs import eager_logprobs, verl_entropy_from_logits
from rlhf_kernels import _dispatch
from rlhf_kernels.ops import logprobs as ops
from rlhf_kernels.ops.cpu import logprobs as cpu
from rlhf_kernels.reference import logprobs as ref

# Inputs are exact in every dtype (the oracle sees the same rounded values), so forward errors come
# from fp32 arithmetic alone; the gradient is additionally rounded to the logits' dtype.
FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def _logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(dtype).to(device)


def _labels(shape, vocab, device, ignore_frac=0.25, ignore_index=-100):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_frac] = ignore_index
    return labels.to(device)


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assert_grad_close(got, want, rtol, what="grad"):
    """Per row, |got − want| ≤ rtol·max_j |want_j| (+1e-6 absolute): gradients against their row's scale."""
    assert got.shape == want.shape, what
    scale = want.abs().amax(-1, keepdim=True) + 1e-30
    err = (got.double().cpu() - want).abs() / scale
    assert bool((err <= rtol + 1e-6).all()), f"{what}: max scaled error {err.max().item():.3g}"


@pytest.fixture
def unchecked():
    """Label range checks off (RLHF_KERNELS_CHECK_INDICES=0), restored afterwards."""
    previous = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(False)
    yield
    _dispatch.set_index_checks(previous)


def _check_fwd_bwd(
    logits, labels, *, temperature=1.0, ignore_index=-100, use_logprobs=True, use_entropy=True
):
    """Forward values and the logits gradient of w·logprobs + u·entropy against the oracle."""
    dtype = logits.dtype
    x = logits.clone().requires_grad_()
    logprobs, entropy = rk.logprobs_from_logits(
        x, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    want_lp, want_h = ref.logprobs_from_logits(
        logits.cpu(), labels.cpu(), temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    out_dtype = _out_dtype(dtype)
    assert logprobs.dtype == entropy.dtype == out_dtype
    assert_close(logprobs.detach(), want_lp, FWD_TOL[dtype], "logprobs")
    assert_close(entropy.detach(), want_h, FWD_TOL[dtype], "entropy")

    w = torch.rand(labels.shape, dtype=out_dtype, device=logits.device) + 0.5
    u = torch.rand(labels.shape, dtype=out_dtype, device=logits.device) - 0.5
    loss = (w * logprobs).sum() * use_logprobs + (u * entropy).sum() * use_entropy
    loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert torch.equal(x.detach(), logits), "the logits were modified"
    want_grad = ref.logprobs_grad(
        logits.cpu(), labels.cpu(), w.cpu() * use_logprobs, u.cpu() if use_entropy else None,
        temperature=temperature, ignore_index=ignore_index,
    )
    _assert_grad_close(x.grad, want_grad, GRAD_RTOL[dtype] * 2)


# --------------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (4, 17), (3, 4097), (2, 3, 33)])
def test_matches_oracle(backend, device, dtype, shape):
    logits = _logits(shape, dtype, device)
    labels = _labels(shape[:-1], shape[-1], device)
    _check_fwd_bwd(logits, labels)


@pytest.mark.parametrize("vocab", [50257, 151936])
def test_real_vocabularies(backend, device, vocab):
    logits = _logits((2, vocab), torch.bfloat16, device)
    labels = torch.tensor([7, vocab - 1], device=device)
    _check_fwd_bwd(logits, labels)


def test_vocab_262144(backend, device):
    logits = _logits((1, 262144), torch.bfloat16, device)
    labels = torch.tensor([262143], device=device)
    _check_fwd_bwd(logits, labels)


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature(backend, device, temperature):
    logits = _logits((6, 129), torch.float32, device)
    labels = _labels((6,), 129, device)
    _check_fwd_bwd(logits, labels, temperature=temperature)


@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_gradient_of_one_output(backend, device, which):
    logits = _logits((5, 300), torch.float32, device)
    labels = _labels((5,), 300, device)
    _check_fwd_bwd(logits, labels, use_logprobs=which == "logprobs", use_entropy=which == "entropy")


def test_custom_ignore_index_and_int32_labels(backend, device):
    logits = _logits((7, 40), torch.float32, device)
    labels = _labels((7,), 40, device, ignore_index=3).to(torch.int32)
    _check_fwd_bwd(logits, labels, ignore_index=3)


def test_fp64_matches_oracle_closely(backend, device):
    logits = _logits((4, 33), torch.float64, device)
    labels = _labels((4,), 33, device)
    _check_fwd_bwd(logits, labels)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_fp64_temperature_keeps_fp64_accuracy(backend, device, temperature):
    # 1/0.7 and 1/1.3 are not fp32 numbers: rounded to fp32 they would err by ~1e-8 relative.
    logits = _logits((5, 2, 300), torch.float64, device, scale=4.0)
    labels = _labels((5, 2), 300, device)
    _check_fwd_bwd(logits, labels, temperature=temperature)
    entropy = rk.entropy_from_logits(logits, temperature=temperature)
    assert_close(entropy, ref.entropy_from_logits(logits.cpu(), temperature=temperature), 1e-12, "entropy")


@pytest.mark.parametrize("shape", [(0, 11), (2, 0, 5), (0, 3, 5), (3, 0, 1)])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_empty_inputs(backend, device, shape, inplace_backward):
    # issue 19: a zero-sized leading dimension after the first used to divide by zero on the PyTorch path
    logits = _logits(shape, torch.float32, device).requires_grad_()
    labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    logprobs, entropy = rk.logprobs_from_logits(
        logits, labels, return_entropy=True, inplace_backward=inplace_backward
    )
    assert logprobs.shape == entropy.shape == shape[:-1]
    assert logprobs.dtype == entropy.dtype == torch.float32
    (logprobs.sum() + entropy.sum()).backward()
    assert logits.grad.shape == shape and logits.grad.dtype == torch.float32
    alone = rk.entropy_from_logits(logits)
    assert alone.shape == shape[:-1]
    alone.sum().backward()
    assert logits.grad.shape == shape


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------
def test_sliced_time_axis_without_copy(backend, device):
    full = _logits((3, 9, 70), torch.bfloat16, device)
    logits = full[:, :-1]  # [B, T-1, V]: leading dims do not merge
    assert not logits.is_contiguous()
    labels = _labels((3, 8), 70, device)
    _check_fwd_bwd(logits, labels)


def test_transposed_vocab_axis(backend, device):
    logits = _logits((50, 6), torch.float32, device).t()  # [6, 50] with vocab stride 6
    labels = _labels((6,), 50, device)
    _check_fwd_bwd(logits, labels)


def test_four_dims_with_two_slices(backend, device):
    full = _logits((2, 3, 5, 19), torch.float32, device)
    logits = full[:, 1:, :-1]  # needs three row dims: copied once
    labels = _labels((2, 2, 4), 19, device)
    _check_fwd_bwd(logits, labels)


def test_inplace_backward(backend, device):
    logits = _logits((6, 2, 45), torch.float32, device)[:, 1]  # strided rows
    labels = _labels((6,), 45, device)
    expected = logits.clone().requires_grad_()
    rk.logprobs_from_logits(expected, labels).sum().backward()

    leaf = logits.clone().requires_grad_()
    rk.logprobs_from_logits(leaf, labels, inplace_backward=True).sum().backward()
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=1e-5, atol=1e-6)
    # the gradient was written over the logits buffer itself (autograd may still copy it into .grad)
    torch.testing.assert_close(leaf.detach(), expected.grad, rtol=1e-5, atol=1e-6)


# (buffer shape, the view of it passed as logits): each leaves part of the buffer outside the view.
INPLACE_LAYOUTS = {
    "strided_rows": ((6, 2, 45), lambda t: t[:, 1]),
    "sliced_time": ((3, 9, 70), lambda t: t[:, :-1]),  # two row dims that do not merge, short rows
    "transposed_vocab": ((50, 7), lambda t: t[:, 1:].t()),
}


@pytest.mark.parametrize("layout", sorted(INPLACE_LAYOUTS))
def test_inplace_backward_layouts(backend, device, layout):
    shape, view = INPLACE_LAYOUTS[layout]
    base = _logits(shape, torch.float32, device)
    labels = _labels(view(base).shape[:-1], view(base).shape[-1], device)
    weights = torch.rand(labels.shape, device=device) - 0.5

    def loss(logits, inplace):
        lp, h = rk.logprobs_from_logits(
            logits, labels, temperature=0.8, return_entropy=True, inplace_backward=inplace
        )
        return lp.sum() + (weights * h).sum()

    leaf = base.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(view(leaf), False), leaf)
    leaf = base.clone().requires_grad_()
    buffer = leaf * 1.0  # a non-leaf, as a model's output is
    (got,) = torch.autograd.grad(loss(view(buffer), True), leaf)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the gradient was written over the view itself, and nothing outside it was touched
    torch.testing.assert_close(view(buffer.detach()), view(want), rtol=1e-5, atol=1e-6)
    outside = torch.ones(shape, dtype=torch.bool, device=device)
    view(outside).fill_(False)
    assert torch.equal(buffer.detach()[outside], base[outside])


# Layouts the in-place backward must refuse: writing through them is unsafe or needs a copy.
REFUSED_LAYOUTS = {
    "expanded_rows": lambda device: torch.randn(1, 1, 6, device=device).expand(3, 4, 6),
    "expanded_vocab": lambda device: torch.randn(5, 1, device=device).expand(5, 8),
    "overlapping_rows": lambda device: torch.randn(40, device=device).as_strided((4, 6), (2, 1)),
    "three_row_dims": lambda device: torch.randn(2, 3, 5, 19, device=device)[:, 1:, :-1],
}


@pytest.mark.parametrize("layout", sorted(REFUSED_LAYOUTS))
def test_inplace_backward_refuses_unsafe_layouts(backend, device, layout):
    # refused at the public boundary, before any work (issue 19: an expanded tensor got a silently wrong
    # gradient from Triton and a RuntimeError from inside torch on the PyTorch path)
    logits = REFUSED_LAYOUTS[layout](device)
    before = logits.clone()
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], device=logits.device)
    with pytest.raises(ValueError, match=r"inplace_backward.*logits"):
        rk.logprobs_from_logits(logits.requires_grad_(), labels, inplace_backward=True)
    assert torch.equal(logits.detach(), before)
    lp = rk.logprobs_from_logits(logits, labels)  # the copying backward is fine
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    want = ref.logprobs_grad(logits.detach().cpu(), labels.cpu(), torch.ones(labels.shape), None)
    _assert_grad_close(grad, want, 2e-5)


# --------------------------------------------------------------------------------------------------
# Numerics: large magnitudes, masked vocabulary, NaN and inf
# --------------------------------------------------------------------------------------------------
def test_magnitude_1e4_is_stable(backend, device):
    logits = _logits((4, 1000), torch.float32, device, scale=1e4)
    labels = _labels((4,), 1000, device, ignore_frac=0.0)
    _check_fwd_bwd(logits, labels)


def test_peaked_entropy_keeps_its_digits(backend, device):
    # lse ≈ 1e4 while H ≈ 1e-3: the naive lse − E[x] loses every digit in fp32.
    logits = torch.full((1, 64), 1e4, device=device)
    logits[0, 1:] -= 8.0
    entropy = rk.entropy_from_logits(logits)
    want = ref.entropy_from_logits(logits.cpu())
    assert abs(entropy.item() - want.item()) <= 1e-5 * want.item()


def test_masked_vocabulary_entries(backend, device):
    logits = _logits((5, 64), torch.float32, device)
    logits[:, ::3] = float("-inf")
    labels = torch.tensor([1, 2, 4, -100, 62], device=device)
    _check_fwd_bwd(logits, labels)
    x = logits.clone().requires_grad_()
    lp, h = rk.logprobs_from_logits(x, labels, return_entropy=True)
    assert bool(torch.isfinite(lp).all() and torch.isfinite(h).all())
    (lp.sum() + h.sum()).backward()
    assert bool((x.grad[:, ::3] == 0).all())


def test_label_on_masked_entry_gives_minus_inf(backend, device):
    logits = _logits((2, 10), torch.float32, device)
    logits[:, 4] = float("-inf")
    lp = rk.logprobs_from_logits(logits, torch.tensor([4, 5], device=device))
    assert lp[0].item() == float("-inf") and torch.isfinite(lp[1]).item()


# Rows whose label holds all the probability but 4.5e-5 … 8e-40 of it (found by the long fuzz profile:
# logits [0, −37]): the label column's g·(1 − p_y), read as g − g·exp(x_y − lse), was 0 there (or kept
# few digits: lse carries ulps of |m|).  Now (p_y > 1/2) minus the sum of the others: exact to fp32.
PEAKED_ROWS = [[0.0, -37.0], [5.0, -5.0], [50.0, -10.0], [3.0, -30.0], [-90.0, 0.0], [-20.0, -45.0]]
PEAKED_LABELS = [0, 0, 0, 0, 1, 0]


def _peaked(vocab, device):
    """3 rows of ``vocab`` logits: the label at 4, the others 12 to 40 below it."""
    logits = -12.0 - 28.0 * torch.rand(3, vocab)
    labels = torch.randint(0, vocab, (3,))
    logits[torch.arange(3), labels] = 4.0
    return logits.to(device), labels.to(device)


@pytest.mark.parametrize(
    "dtype, temperature, inplace_backward",
    [
        (torch.float32, 1.0, False),
        (torch.float32, 1.0, True),
        (torch.float32, 0.7, False),
        (torch.bfloat16, 1.0, True),
    ],
)
def test_label_gradient_exact_where_its_probability_rounds_to_one(
    backend, device, dtype, temperature, inplace_backward
):
    cases = [(torch.tensor(PEAKED_ROWS, device=device), torch.tensor(PEAKED_LABELS, device=device))]
    cases += [_peaked(vocab, device) for vocab in (17, 5000)]  # 5000: a row of two blocks of 4096
    for logits, labels in cases:
        logits = logits.to(dtype)
        for use_entropy in (False, True):
            x = logits.clone().requires_grad_()
            lp, h = rk.logprobs_from_logits(
                x, labels, temperature=temperature, return_entropy=True, inplace_backward=inplace_backward
            )
            g = torch.rand(lp.shape, device=device) + 0.5
            u = torch.rand(h.shape, device=device) - 0.5 if use_entropy else None
            (grad,) = torch.autograd.grad((lp, h) if use_entropy else lp, x, (g, u) if use_entropy else g)
            want = logprobs_grad_oracle(
                logits.cpu(), labels.cpu(), g.cpu(), u.cpu() if use_entropy else None,
                temperature=temperature, ignore_index=-100,
            )
            what = f"V={logits.shape[-1]} entropy={use_entropy}"
            _assert_grad_close(grad, want, GRAD_RTOL[dtype] * 2, what)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_logits_give_nan(backend, device, bad):
    logits = _logits((3, 20), torch.float32, device).requires_grad_(False)
    logits[1, 7] = bad
    logits[2, 3] = bad
    x = logits.clone().requires_grad_()
    labels = torch.tensor([0, 1, -100], device=device)
    lp, h = rk.logprobs_from_logits(x, labels, return_entropy=True)
    assert torch.isfinite(lp[0]).item() and torch.isfinite(h[0]).item()
    assert torch.isnan(lp[1]).item() and torch.isnan(h[1]).item()
    # an ignored row gives 0 and zero gradient whatever its logits hold
    assert lp[2].item() == 0.0 and h[2].item() == 0.0
    (lp.sum() + h.sum()).backward()
    assert bool(torch.isnan(x.grad[1]).all())
    assert bool((x.grad[2] == 0).all())
    assert bool(torch.isfinite(x.grad[0]).all())


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    logits = torch.randn(4, 7)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must have shape logits.shape\[:-1\] = \(4,\); got \(5,\)"):
        rk.logprobs_from_logits(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        rk.logprobs_from_logits(logits.long(), labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        rk.logprobs_from_logits(logits, labels.float())
    with pytest.raises(ValueError, match="temperature must be > 0; got 0.0"):
        rk.logprobs_from_logits(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rk.entropy_from_logits(logits, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature must be a Python float"):
        rk.logprobs_from_logits(logits, labels, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="non-empty last"):
        rk.logprobs_from_logits(torch.randn(4, 0), labels)
    with pytest.raises(ValueError, match="non-empty last"):
        rk.entropy_from_logits(torch.randn(3, 0))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        rk.logprobs_from_logits([1.0, 2.0], labels)


@pytest.mark.parametrize("bad_label", [7, -1, 10**6])
def test_out_of_range_label_raises(backend, device, bad_label):
    logits = _logits((4, 7), torch.float32, device)
    labels = torch.tensor([0, bad_label, 2, -100], device=device)
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 7\).*got label {bad_label}"):
        rk.logprobs_from_logits(logits, labels)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_unchecked_out_of_range_label_gives_nan_not_a_wild_read(backend, device, unchecked, label_dtype):
    # set_index_checks(False) applies on every device: no ValueError, and no error from inside torch
    logits = _logits((5, 7), torch.float32, device)
    far = (1 << 40) if label_dtype == torch.int64 else (1 << 31) - 1
    labels = torch.tensor([0, far, -5, 7, -100], dtype=label_dtype, device=device)
    x = logits.clone().requires_grad_()
    lp, h = rk.logprobs_from_logits(x, labels, return_entropy=True)
    want_lp, want_h = ref.logprobs_from_logits(logits.cpu(), labels.cpu(), return_entropy=True)
    assert torch.equal(torch.isnan(lp).cpu(), torch.tensor([False, True, True, True, False]))
    assert torch.equal(torch.isnan(want_lp), torch.isnan(lp).cpu())
    assert_close(lp[[0, 4]], want_lp[[0, 4]], 2e-5, "logprobs of the valid and ignored rows")
    assert_close(h, want_h, 2e-5, "entropy (independent of the label)")
    (lp.sum() + h.sum()).backward()
    assert bool(torch.isnan(x.grad[1:4]).all())
    assert bool(torch.isfinite(x.grad[0]).all()) and bool((x.grad[4] == 0).all())


def test_forced_triton_without_interpreter_or_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with _dispatch.use_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton' was forced"):
            rk.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_agrees_with_the_benchmark_baseline(backend, device):
    # what bench/bench_logprobs.py times as "eager": the same numbers in fp32
    logits = _logits((6, 300), torch.float32, device)
    labels = torch.randint(0, 300, (6,), device=device)
    lp, h = rk.logprobs_from_logits(logits, labels, return_entropy=True)
    assert_close(lp, eager_logprobs(logits, labels), 2e-5, "logprobs vs eager log_softmax+gather")
    assert_close(h, verl_entropy_from_logits(logits), 2e-5, "entropy vs verl entropy_from_logits")


# --------------------------------------------------------------------------------------------------
# Launchers write every element of the outputs the caller allocated
# --------------------------------------------------------------------------------------------------
def _row_stats(logits, labels, temperature):
    """lse and entropy per row (float64 oracle), rounded to the arithmetic dtype, as the forward saves
    them."""
    x = logits.detach().double().cpu() / temperature
    _, entropy = ref.logprobs_from_logits(
        logits.detach().cpu(), labels.cpu(), temperature=temperature, ignore_index=-1, return_entropy=True
    )
    dtype = _out_dtype(logits.dtype)
    return torch.logsumexp(x, -1).to(dtype), entropy.to(dtype)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fwd_launcher_writes_every_output(dtype, with_entropy):
    device = TRITON_DEVICE
    logits = _logits((5, 3, 37), dtype, device)[:, 1:]  # [5, 2, 37], rows strided
    labels = _labels((5, 2), 37, device).reshape(-1)
    n, out_dtype = labels.numel(), _out_dtype(dtype)
    logprobs, lse = (torch.full((n,), float("nan"), dtype=out_dtype, device=device) for _ in range(2))
    entropy = torch.full((n if with_entropy else 0,), float("nan"), dtype=out_dtype, device=device)
    ops._launch_fwd(logprobs, entropy, lse, logits, labels, 1 / 0.7, -100)
    want_lp, want_h = ref.logprobs_from_logits(
        logits.cpu(), labels.view(5, 2).cpu(), temperature=0.7, return_entropy=True
    )
    want_lse, _ = _row_stats(logits.reshape(n, 37), labels, 0.7)
    assert_close(logprobs, want_lp.reshape(-1), FWD_TOL[dtype], "logprobs")
    assert_close(lse, want_lse, FWD_TOL[dtype], "lse")
    if with_entropy:
        assert_close(entropy, want_h.reshape(-1), FWD_TOL[dtype], "entropy")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("with_grad_entropy", [False, True])
def test_bwd_launcher_writes_every_element(impl, in_place, with_grad_entropy):
    """The Triton launcher and the PyTorch path's writer, into a NaN-filled gradient or over the logits."""
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    launch = ops._launch_bwd if impl == "triton" else cpu.logprobs_bwd_out
    buffer = _logits((6, 2, 45), torch.float32, device)
    buffer[:, 0] = float("nan")  # outside the logits: must stay as it is
    logits = buffer[:, 1]
    original = logits.clone()
    labels = _labels((6,), 45, device)
    lse, entropy = _row_stats(logits, labels, 0.7)
    lse, entropy = lse.to(device), entropy.to(device)
    grad_logprobs = torch.randn(6, device=device)
    grad_entropy = torch.randn(6 if with_grad_entropy else 0, device=device)
    grad = logits if in_place else torch.full((6, 45), float("nan"), device=device)
    launch(grad, grad_logprobs, grad_entropy, logits, labels, lse, entropy, 1 / 0.7, -100)
    want = ref.logprobs_grad(
        original.cpu(), labels.cpu(), grad_logprobs.cpu(), grad_entropy.cpu() if with_grad_entropy else None,
        temperature=0.7,
    )
    _assert_grad_close(grad, want, 2e-5)
    assert bool(torch.isnan(buffer[:, 0]).all())
    if not in_place:
        assert torch.equal(logits, original)


# --------------------------------------------------------------------------------------------------
# Autograd, registration and compile
# --------------------------------------------------------------------------------------------------
def test_gradcheck_float64_torch_path():
    logits = torch.randn(3, 2, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100], [8, 0], [4, 4]])
    with _dispatch.use_backend("torch"):
        def fn(x):
            lp, h = rk.logprobs_from_logits(x, labels, temperature=0.8, return_entropy=True)
            return lp, h

        assert torch.autograd.gradcheck(fn, (logits,))
        assert torch.autograd.gradcheck(lambda x: rk.entropy_from_logits(x), (logits,))


def test_gradcheck_float64_triton_path():
    if HAS_CUDA:
        device = "cuda"
    else:
        device = "cpu"
    logits = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([1, -100, 10], device=device)
    with _dispatch.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda x: rk.logprobs_from_logits(x, labels, return_entropy=True), (logits,)
        )


def test_opcheck_torch_path():
    logits = torch.randn(5, 13, requires_grad=True)
    labels = torch.tensor([0, 12, -100, 3, 3])
    with _dispatch.use_backend("torch"):
        for with_entropy in (False, True):
            torch.library.opcheck(
                torch.ops.rlhf_kernels.logprobs_fwd.default, (logits, labels, 0.7, -100, with_entropy, False)
            )
        lp, h, lse = torch.ops.rlhf_kernels.logprobs_fwd(logits.detach(), labels, 1.0, -100, True, False)
        args = (torch.randn(5), torch.randn(5), logits.detach(), labels, lse, h, 1.0, -100)
        torch.library.opcheck(torch.ops.rlhf_kernels.logprobs_bwd.default, args)
        torch.library.opcheck(
            torch.ops.rlhf_kernels.logprobs_fwd_torch.default, (logits.detach(), labels, 1.0, -100, True)
        )


def test_torch_ops_eager_body_equals_registered_op():
    # eager calls run the plain body (.body); the registered op must compute the same
    logits = torch.randn(2, 4, 13)[:, 1:]
    labels = torch.tensor([0, 12, -100, 3, 3, 5])
    args = (logits, labels, 1 / 0.7, -100, True)
    body = cpu.logprobs_fwd_torch.body(*args)
    registered = torch.ops.rlhf_kernels.logprobs_fwd_torch(*args)
    assert cpu.logprobs_fwd_torch.op is not None
    for a, b in zip(body, registered, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    lp, h, lse = body
    bwd_args = (torch.randn(6), torch.randn(6), logits, labels, lse, h, 1 / 0.7, -100)
    torch.testing.assert_close(
        cpu.logprobs_bwd_torch.body(*bwd_args), torch.ops.rlhf_kernels.logprobs_bwd_torch(*bwd_args),
        rtol=0, atol=0,
    )


def test_compile_fullgraph_dynamic_torch_path():
    def step(logits, labels):
        lp, h = rk.logprobs_from_logits(logits, labels, temperature=0.9, return_entropy=True)
        return lp.sum() - 0.01 * h.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for n in (6, 9):
            logits = torch.randn(n, 2, 31)
            labels = torch.randint(0, 31, (n, 2))
            x_eager = logits.clone().requires_grad_()
            x_comp = logits.clone().requires_grad_()
            eager = step(x_eager, labels)
            eager.backward()
            got = compiled(x_comp, labels)
            got.backward()
            torch.testing.assert_close(got, eager)
            torch.testing.assert_close(x_comp.grad, x_eager.grad)


@pytest.mark.skipif(
    not HAS_CUDA, reason="torch.compile of Triton kernels needs CUDA (the interpreter reads FakeTensor data)"
)
def test_compile_fullgraph_dynamic_triton_path():
    def step(logits, labels):
        lp, h = rk.logprobs_from_logits(logits, labels, return_entropy=True)
        return lp.sum() + h.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    _dispatch.set_index_checks(False)
    try:
        logits = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16)
        labels = torch.randint(0, 1000, (64,), device="cuda")
        x_eager = logits.clone().requires_grad_()
        x_comp = logits.clone().requires_grad_()
        step(x_eager, labels).backward()
        compiled(x_comp, labels).backward()
        torch.testing.assert_close(x_comp.grad, x_eager.grad)
    finally:
        _dispatch.set_index_checks(True)


@pytest.mark.skipif(not HAS_CUDA, reason="host-sync detection needs CUDA")
def test_no_host_sync_on_cuda():
    logits = torch.randn(32, 5000, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5000, (32,), device="cuda")
    _dispatch.set_index_checks(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, h = rk.logprobs_from_logits(logits, labels, return_entropy=True)
        (lp.sum() + h.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _dispatch.set_index_checks(True)


# --------------------------------------------------------------------------------------------------
# Memory of the CPU path
# --------------------------------------------------------------------------------------------------
_MEMORY_PROBE = """
import json, torch
import rlhf_kernels as rk
from bench.harness import cpu_peak_rss_rise
from rlhf_kernels import _dispatch

n, vocab = 256, 151936
logits = torch.randn(n, vocab)  # 155 MB
labels = torch.randint(0, vocab, (n,))
with _dispatch.use_backend("torch"):
    # warm up: the package imports a family's module (and Triton) on first use
    rk.logprobs_from_logits(logits[:2, :8], labels[:2] % 8, return_entropy=True)
    fwd_peak = cpu_peak_rss_rise(lambda: rk.logprobs_from_logits(logits, labels, return_entropy=True))
    x = logits.requires_grad_()

    def fwd_bwd():
        lp, h = rk.logprobs_from_logits(x, labels, return_entropy=True)
        (lp.sum() + h.sum()).backward()
        return x.grad

    step_peak = cpu_peak_rss_rise(fwd_bwd)
print(json.dumps({"fwd": fwd_peak / logits.nbytes, "step": step_peak / logits.nbytes}))
"""


def test_cpu_path_memory_is_chunked():
    """Peak resident-set rise of the CPU path, measured in a fresh process whose allocator maps every
    large block on its own (``exact_rss_env``): with glibc's dynamic mmap threshold the figure moved
    with heap reuse and fragmentation (fwd 0.51x in one CI run, 0.15-0.20x locally)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from bench.harness import exact_rss_env

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], cwd=root, env=exact_rss_env(root),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = json.loads(out.stdout.strip().splitlines()[-1])
    # forward: a few 8 MiB chunks (live peak 0.15x); forward+backward: the logits gradient (1x, which
    # shows the measurement sees large allocations) plus those chunks (1.14x)
    assert ratios["fwd"] < 0.3, ratios
    assert 1.0 < ratios["step"] < 1.3, ratios


def test_entropy_gradient_at_minus_inf_logits_with_a_large_upstream_gradient(backend, device):
    """A masked (-inf) logit gets exactly zero gradient even when the entropy's upstream gradient is
    large: the CPU path clamped log p = -inf to the dtype's minimum, which overflowed back to -inf once
    multiplied by |∂L/∂H| > 1 and gave 0·inf = NaN (found by the fuzz suite)."""
    logits = torch.tensor([[float("-inf"), 0.267, -1.5]], device=device, requires_grad=True)
    entropy = rk.entropy_from_logits(logits)
    (grad,) = torch.autograd.grad(entropy, logits, torch.tensor([3.0], device=device))
    # a probability-0 entry changes nothing: the oracle on the finite entries gives the rest
    finite = torch.tensor([[0.267, -1.5]], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([3.0], dtype=torch.float64)
    (expected,) = torch.autograd.grad(ref.entropy_from_logits(finite), finite, upstream)
    assert grad[0, 0].item() == 0.0
    assert_close(grad[:, 1:], expected, 1e-6, "entropy gradient")


# --------------------------------------------------------------------------------------------------
# Batch invariance (issue 15; verl #6280: log_prob ≠ old_log_prob when micro-batch sizes differ)
# --------------------------------------------------------------------------------------------------
# The torch path's V = 40000 makes a lone row's reduction large enough for ATen to split it over
# threads (it did, and the lone row's entropy then differed in its last bits); its chunks are cut to
# 4 rows below, so that 9 rows are chunks of 4, 4 and 1.  The interpreter's V spans two blocks of 256.
INVARIANCE_VOCAB = {"torch": 40000, "triton": 300}
INVARIANCE_ROWS = {"torch": (2, 5, 9), "triton": (2, 5)}


def _row_results(base, view, labels, row):
    """(logprob, entropy, gradient) of flattened row ``row`` of ``view`` (a view of ``base``, which
    gets the gradient): the upstream gradients are the same constants for every row."""
    lp, h = rk.logprobs_from_logits(view, labels, temperature=0.7, return_entropy=True, batch_invariant=True)
    (0.75 * lp.sum() - 0.3 * h.sum()).backward()
    grad = base.grad[..., : view.shape[-2], :] if view.dim() == 3 else base.grad
    vocab = view.shape[-1]
    return lp.reshape(-1)[row], h.reshape(-1)[row], grad.reshape(-1, vocab)[row]


def _assert_bitwise(got, want, what):
    for name, g, w in zip(("logprob", "entropy", "gradient"), got, want):
        assert torch.equal(g, w), f"{what}: {name} differs from the row computed alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_bitwise(backend, device, dtype, monkeypatch):
    """A row computed alone, then inside batches of several sizes at the first, a middle and the last
    position among random rows, contiguous and as a [:, :-1] slice: forward and gradient bitwise equal."""
    vocab = INVARIANCE_VOCAB[backend]
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 4 * vocab)
    if backend == "triton":
        monkeypatch.setattr(ops, "_launch_config", lambda v: ops._LaunchConfig(block_v=256, num_warps=4))
    row = _logits((1, vocab), dtype, device)
    label = torch.randint(0, vocab, (1,), device=device)
    alone = row.clone().requires_grad_()
    want = _row_results(alone, alone, label, 0)
    for n in INVARIANCE_ROWS[backend]:
        for position in sorted({0, n // 2, n - 1}):
            batch = _logits((n, vocab), dtype, device)
            labels = _labels((n,), vocab, device)
            batch[position], labels[position] = row[0], label[0]
            base = batch.requires_grad_()
            _assert_bitwise(_row_results(base, base, labels, position), want, f"{n} rows, row {position}")
    # [2, 4, V][:, :-1]: the row at (1, 1), flattened 4, among a strided batch
    batch = _logits((2, 4, vocab), dtype, device)
    labels = _labels((2, 3), vocab, device)
    batch[1, 1], labels[1, 1] = row[0], label[0]
    base = batch.requires_grad_()
    _assert_bitwise(_row_results(base, base[:, :-1], labels, 4), want, "sliced batch")


def _launch_specialisation(monkeypatch, module, launch):
    """What Triton specialises a forward launch on: each int argument's class (== 1, divisible by 16)
    and each tensor's 16-byte alignment, plus the constexprs; the launch itself does not run."""
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def record(*args, **constexprs):
                seen.append((
                    tuple(
                        ("ptr", a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                        else ("int", a == 1, a % 16 == 0) if isinstance(a, int) else type(a).__name__
                        for a in args
                    ),
                    sorted(constexprs.items(), key=lambda kv: kv[0]),
                ))
            return record

    monkeypatch.setattr(module, "wrap_triton", lambda kernel: Recorder())
    launch()
    return seen[-1]


@pytest.mark.skipif(ops.triton is None, reason="needs triton")
@pytest.mark.parametrize("vocab", [37, 48])
def test_lone_row_compiles_like_a_batch(monkeypatch, vocab):
    """On a GPU, Triton specialises integer arguments equal to 1 or divisible by 16, and the load layout
    (so the order of the row sums) follows: a lone row used to launch with rows1 = 1, stride 0 and got
    8 bf16 per thread where a batch of V = 50257 gets 1 (sm_90 TTGIR, docs/logprobs.md).  Every call
    with one row must now specialise as a batch does; the interpreter cannot show the difference."""
    from rlhf_kernels.ops import token_stats

    batch = torch.randn(6, vocab).to(torch.bfloat16)
    lone_rows = {"[1, V]": batch[:1].clone(), "[V]": batch[0].clone(), "[1, 1, V]": batch[:1].clone()[None]}

    def launches(logits):
        labels = torch.zeros(logits.shape[:-1].numel(), dtype=torch.long)
        return (
            _launch_specialisation(
                monkeypatch, ops, lambda: ops._fwd_triton(logits, labels, 1.0, -100, True)
            ),
            _launch_specialisation(
                monkeypatch, token_stats,
                lambda: token_stats._fwd_triton(
                    logits, labels, 1.0, 0.0, 1.0, -100, True, True, False, False, 0
                ),
            ),
        )

    want = launches(batch)
    for name, logits in lone_rows.items():
        assert launches(logits) == want, f"a lone row {name} specialises unlike a batch"


def test_batch_invariant_must_be_a_bool():
    logits, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match="batch_invariant must be a bool; got str"):
        rk.logprobs_from_logits(logits, labels, batch_invariant="yes")
    with pytest.raises(TypeError, match="batch_invariant must be a bool; got int"):
        rk.entropy_from_logits(logits, batch_invariant=1)
    # False is accepted and computes the same (the invariant computation is the only one)
    assert torch.equal(rk.logprobs_from_logits(logits, labels, batch_invariant=False),
                       rk.logprobs_from_logits(logits, labels))


_SM90_LAYOUT_SCRIPT = """
import re
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_kernels.ops import _launch, logprobs as ops

kernel = ops._logprobs_fwd_kernel
CONSTEXPRS = {"BLOCK_V": 4096, "HAS_ENTROPY": True, "ACC": triton.language.float32}


def layouts(logits, row_args):
    # Triton's specialisation of a launch: an int equal to 1 becomes a constant, an int divisible by 16
    # and a 16-byte aligned pointer get tt.divisibility 16 (the other pointers are fresh, aligned)
    rows1, s0, s1, sv = row_args
    ints = dict(stride_x0=s0, stride_x1=s1, stride_xv=sv, rows1=rows1, V=logits.shape[-1], ignore_index=-100)
    signature, constexprs, attrs = {}, dict(CONSTEXPRS), {}
    for i, name in enumerate(kernel.arg_names):
        if name in CONSTEXPRS:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = {"logits_ptr": "*bf16", "labels_ptr": "*i64"}.get(name, "*fp32")
            if name != "logits_ptr" or logits.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("inv_t"):
            signature[name] = "fp32"
        elif ints[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    return sorted(set(re.findall(r"#ttg.blocked<[^>]*>", compiled.asm["ttgir"])))


def launched(logits):
    _, rows1, s0, s1, sv = ops.forward_row_layout(logits)
    return rows1, s0, s1, sv


batch = torch.zeros(6, 50257, dtype=torch.bfloat16)  # V not a multiple of 16 (GPT-2's)
lone = torch.zeros(1, 50257, dtype=torch.bfloat16)
_, _, rows1, s0, s1, sv = _launch.row_layout(lone)  # how a lone row launched before issue 15
want = layouts(batch, launched(batch))
assert "sizePerThread = [1]" in want[0], want
assert layouts(lone, launched(lone)) == want, (layouts(lone, launched(lone)), want)
assert layouts(lone, (rows1, s0, s1, sv)) != want  # the old launch: vectorised, other sum order
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels run natively")
@pytest.mark.skipif(ops.triton is None, reason="needs triton")
def test_lone_row_kernel_layout_on_sm90():
    """The reason for forward_row_layout, compiled for sm_90 without a GPU: a lone row's kernel has the
    load layout (so the reduction order) of a batch's, where the plain row_layout gave another."""
    assert_compiles_for_sm90(_SM90_LAYOUT_SCRIPT)
