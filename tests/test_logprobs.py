"""logprobs_from_logits / entropy_from_logits against the float64 oracle, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close

import rlhf_kernels as rk
from rlhf_kernels import _dispatch
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
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert logprobs.dtype == entropy.dtype == out_dtype
    assert_close(logprobs.detach(), want_lp, FWD_TOL[dtype], "logprobs")
    assert_close(entropy.detach(), want_h, FWD_TOL[dtype], "entropy")

    w = torch.rand(labels.shape, dtype=out_dtype, device=logits.device) + 0.5
    u = torch.rand(labels.shape, dtype=out_dtype, device=logits.device) - 0.5
    loss = (w * logprobs).sum() * use_logprobs + (u * entropy).sum() * use_entropy
    loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    want_grad = ref.logprobs_grad(
        logits.cpu(), labels.cpu(), w.cpu() * use_logprobs, u.cpu() if use_entropy else None,
        temperature=temperature, ignore_index=ignore_index,
    )
    scale = want_grad.abs().amax(-1, keepdim=True) + 1e-30
    err = (x.grad.double().cpu() - want_grad).abs() / scale
    assert bool((err <= GRAD_RTOL[dtype] * 2 + 1e-6).all()), f"grad: max scaled error {err.max().item():.3g}"


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


def test_empty_batch(backend, device):
    logits = _logits((0, 11), torch.float32, device).requires_grad_()
    labels = torch.zeros(0, dtype=torch.long, device=device)
    logprobs, entropy = rk.logprobs_from_logits(logits, labels, return_entropy=True)
    assert logprobs.shape == entropy.shape == (0,)
    (logprobs.sum() + entropy.sum()).backward()
    assert logits.grad.shape == (0, 11)


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


def test_inplace_backward_refuses_layouts_that_need_a_copy(backend, device):
    logits = _logits((2, 3, 5, 19), torch.float32, device)[:, 1:, :-1].requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward"):
        rk.logprobs_from_logits(logits, _labels((2, 2, 4), 19, device), inplace_backward=True)


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


def test_unchecked_out_of_range_label_gives_nan_not_a_wild_read(backend, device):
    logits = _logits((3, 7), torch.float32, device)
    labels = torch.tensor([0, 1 << 40, -5], device=device)
    _dispatch.set_index_checks(False)
    try:
        if device == "cpu":  # CPU tensors are always checked: the check costs no device sync
            with pytest.raises(ValueError):
                rk.logprobs_from_logits(logits, labels)
            return
        x = logits.clone().requires_grad_()
        lp = rk.logprobs_from_logits(x, labels)
    finally:
        _dispatch.set_index_checks(True)
    assert torch.isfinite(lp[0]).item() and torch.isnan(lp[1:]).all().item()
    lp.sum().backward()
    assert bool(torch.isnan(x.grad[1:]).all())


def test_forced_triton_without_interpreter_or_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with _dispatch.use_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton' was forced"):
            rk.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


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
def test_cpu_path_memory_is_chunked():
    from bench.harness import cpu_peak_rss_rise

    n, vocab = 256, 151936
    logits = torch.randn(n, vocab)  # 155 MB
    labels = torch.randint(0, vocab, (n,))
    logits_bytes = logits.numel() * 4
    with _dispatch.use_backend("torch"):
        fwd_peak = cpu_peak_rss_rise(lambda: rk.logprobs_from_logits(logits, labels, return_entropy=True))
        x = logits.requires_grad_()

        def fwd_bwd():
            lp, h = rk.logprobs_from_logits(x, labels, return_entropy=True)
            (lp.sum() + h.sum()).backward()
            return x.grad

        step_peak = cpu_peak_rss_rise(fwd_bwd)
    # forward: a few 16 MiB chunks; forward+backward: the logits gradient plus those chunks
    assert fwd_peak < 0.5 * logits_bytes, fwd_peak / logits_bytes
    assert step_peak < 1.5 * logits_bytes, step_peak / logits_bytes
