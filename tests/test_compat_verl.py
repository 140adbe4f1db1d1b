"""rlhf_kernels.compat.verl against faithful re-implementations of verl's functions (bench/baselines).

Every shim is compared on random inputs, masks (empty rows, holes, left/right padding) and dtypes with
what verl computes, values and gradients, on the PyTorch path and the Triton kernels (interpreted on
CPU).  bf16 inputs are compared with verl run on the same values upcast to fp32, which is what the
fused kernels compute (verl itself would compute in bf16, less accurately).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/

from bench.baselines.advantages import verl_compute_gae_advantage_return  # noqa: E402
from bench.baselines.kl import verl_kl_penalty  # noqa: E402
from bench.baselines.linear_logprobs import verl_linear_cross_entropy  # noqa: E402
from bench.baselines.logprobs import verl_entropy_from_logits, verl_logprobs_from_logits  # noqa: E402
from bench.baselines.losses import (  # noqa: E402
    verl_agg_loss,
    verl_compute_policy_loss,
    verl_compute_value_loss,
)
from bench.baselines.masked import verl_masked_mean, verl_masked_whiten  # noqa: E402
from rlhf_kernels import _dispatch  # noqa: E402
from rlhf_kernels.compat import verl as cv  # noqa: E402

# verl divides by Σm + 1e-8 (masked means) and n + 1e-8 (row means), where the kernels divide by Σm:
# a relative difference of at most 1e-8 even in fp64.
TOL = {torch.float64: 2e-8, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float64: 2e-8, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


AGG_MODES = (
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
)


def _close(actual, expected, tol, what=""):
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=tol, atol=tol, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def _mask(batch, seq, device, kind="random", dtype=torch.float32):
    """0/1 masks of the shapes RLHF batches have; "random" has an empty row and a one-token row."""
    t = torch.arange(seq)
    lengths = torch.randint(1, seq + 1, (batch,))
    if kind == "right":
        mask = t < lengths[:, None]
    elif kind == "left":
        mask = t >= (seq - lengths)[:, None]
    elif kind == "holes":
        mask = (t < lengths[:, None]) & (torch.rand(batch, seq) < 0.7)
        mask[:, 0] = True
    else:
        mask = torch.rand(batch, seq) < 0.7
        if batch > 2:
            mask[1] = False
            mask[2] = False
            mask[2, seq // 2] = True
    return mask.to(dtype).to(device)


def _upcast(*tensors):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in tensors]


# ---------------------------------------------------------------------------------------------------
# verl.utils.torch_functional
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 5, 37)])
def test_logprobs_from_logits(backend, device, dtype, shape):
    logits = (torch.randn(shape) * 3).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels.view(-1)[::3] = -100  # flash-attn's ignore index
    labels = labels.to(device)
    got = cv.logprobs_from_logits(logits, labels, inplace_backward=False)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    (x,) = _upcast(logits)
    want = verl_logprobs_from_logits(x, labels.cpu())
    _close(got, want, TOL[dtype], "logprobs")
    weights = torch.randn(shape[:-1], dtype=torch.float64)
    (got * weights.to(got.dtype).to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(logits.grad, x.grad, GRAD_TOL[dtype], "grad")


def test_logprobs_inplace_backward_writes_over_logits():
    """verl's default: the gradient goes into the logits buffer (no second [N, V] allocation)."""
    leaf = torch.randn(4, 9, 23, requires_grad=True)
    labels = torch.randint(0, 23, (4, 9))
    logits = leaf * 1.0  # a non-leaf, as a model's output is
    logits.retain_grad()
    out = cv.logprobs_from_logits(logits, labels)  # inplace_backward=True by default
    out.sum().backward()
    want_logits = leaf.detach().clone().requires_grad_()
    verl_logprobs_from_logits(want_logits, labels).sum().backward()
    _close(leaf.grad, want_logits.grad, 2e-5, "grad")
    _close(logits.detach(), want_logits.grad, 2e-5, "logits buffer holds the gradient")


def test_logprobs_inplace_backward_non_contiguous_keeps_logits():
    base = torch.randn(4, 10, 23)
    leaf = base.clone().requires_grad_()
    logits = (leaf * 1.0)[:, :-1]  # a slice: flash-attn's reshape would copy it
    labels = torch.randint(0, 23, (4, 9))
    cv.logprobs_from_logits(logits, labels).sum().backward()
    _close(logits.detach(), base[:, :-1], 0.0, "a non-contiguous view is not overwritten")
    want = base[:, :-1].clone().requires_grad_()
    verl_logprobs_from_logits(want, labels).sum().backward()
    _close(leaf.grad[:, :-1], want.grad, 2e-5, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(backend, device, dtype):
    logits = (torch.randn(3, 4, 41) * 2).to(dtype).to(device).requires_grad_()
    got = cv.entropy_from_logits(logits)
    assert got.dtype == dtype and got.shape == (3, 4)
    (x,) = _upcast(logits)
    want = verl_entropy_from_logits(x)
    # fp32 math rounded once to the logits' dtype
    _close(got, want, 2e-5 if dtype == torch.float32 else 2**-7, "entropy")
    weights = torch.randn(3, 4, dtype=torch.float64)
    (got.double() * weights.to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(logits.grad, x.grad, GRAD_TOL[dtype], "grad")


def test_entropy_with_chunking_is_fp32_on_cpu():
    logits = torch.randn(37, 19).to(torch.bfloat16)
    got = cv.entropy_from_logits_with_chunking(logits, chunk_size=8)
    assert got.dtype == torch.float32
    _close(got, verl_entropy_from_logits(logits.double()), 2e-5, "entropy")
    with pytest.raises(ValueError, match="chunk_size"):
        cv.entropy_from_logits_with_chunking(logits, chunk_size=0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("kind", ["random", "left", "holes"])
def test_masked_whiten(backend, device, shift_mean, kind):
    x = torch.randn(6, 29) * 3 + 1
    mask = _mask(6, 29, "cpu", kind)
    got = cv.masked_whiten(x.to(device), mask.to(device), shift_mean=shift_mean)
    want = verl_masked_whiten(x.double(), mask.double(), shift_mean=shift_mean)
    valid = mask.bool()
    _close(got.cpu()[valid], want[valid], 2e-5, "valid positions")
    # Outside the mask verl leaves (x − μ)/σ (+ μ), which nothing reads; the shim writes 0 (μ).
    outside = got.cpu()[~valid]
    if shift_mean:
        assert bool((outside == 0).all())
    else:
        mean = verl_masked_mean(x.double(), mask.double())
        _close(outside, mean.expand_as(outside), 2e-5, "μ outside the mask")


def test_masked_whiten_degenerate_masks_give_zeros_where_verl_raises():
    x = torch.randn(3, 5)
    single = torch.zeros(3, 5)
    single[1, 2] = 1.0
    for mask in (torch.zeros(3, 5), single):
        with pytest.raises(ValueError):
            verl_masked_whiten(x, mask)
        assert bool((cv.masked_whiten(x, mask) == 0).all())


# ---------------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["right", "left", "holes", "random"])
@pytest.mark.parametrize("seq", [1, 7, 33])
def test_compute_gae_advantage_return(backend, device, kind, seq):
    batch = 5
    rewards, values = torch.randn(batch, seq), torch.randn(batch, seq)
    mask = _mask(batch, seq, "cpu", kind)
    if mask.sum() < 2:
        mask[0, 0] = mask[-1, -1] = 1.0  # verl raises with fewer than two valid tokens
    got_adv, got_ret = cv.compute_gae_advantage_return(
        rewards.to(device), values.to(device), mask.to(device), gamma=0.99, lam=0.95
    )
    want_adv, want_ret = verl_compute_gae_advantage_return(
        rewards.double(), values.double(), mask.double(), 0.99, 0.95
    )
    assert got_adv.dtype == got_ret.dtype == torch.float32
    valid = mask.bool()
    _close(got_adv.cpu()[valid], want_adv[valid], 1e-4, "whitened advantages")
    assert bool((got_adv.cpu()[~valid] == 0).all())
    _close(got_ret, want_ret, 1e-4, "returns")


def test_compute_gae_default_backend_and_tensor_hyperparameters():
    """The CPU default (the C++ extension, or PyTorch when it cannot be built) and verl's tensor-typed
    gamma / lam (read once on the host)."""
    rewards, values = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    mask = _mask(4, 50, "cpu", "holes", dtype=torch.float64)
    got_adv, got_ret = cv.compute_gae_advantage_return(
        rewards, values, mask, torch.tensor(1.0), torch.tensor(0.9)
    )
    want_adv, want_ret = verl_compute_gae_advantage_return(rewards, values, mask, 1.0, 0.9)
    valid = mask.bool()
    _close(got_adv[valid], want_adv[valid], 1e-4, "advantages")
    _close(got_ret, want_ret, 1e-4, "returns")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_agg_loss(mode, dtype):
    loss = torch.randn(6, 13, dtype=dtype, requires_grad=True)
    mask = _mask(6, 13, "cpu")
    got = cv.agg_loss(loss, mask, mode)
    (x,) = _upcast(loss)
    want = verl_agg_loss(x, mask.double(), mode)
    _close(got, want, TOL[dtype], mode)
    got.backward()
    want.backward()
    _close(loss.grad, x.grad, TOL[dtype], f"{mode} grad")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_global_batch_arguments(mode):
    """dp_size / batch_num_tokens / global_batch_size / loss_scale_factor, as numbers and as tensors."""
    loss = torch.randn(5, 11, dtype=torch.float64)
    mask = _mask(5, 11, "cpu", dtype=torch.float64)
    for kwargs in (
        dict(dp_size=4, batch_num_tokens=123, global_batch_size=17, loss_scale_factor=64),
        dict(dp_size=2, batch_num_tokens=torch.tensor(77.0), global_batch_size=torch.tensor(9.0)),
        dict(loss_scale_factor=5),
    ):
        want = verl_agg_loss(loss, mask, mode, **kwargs)
        _close(cv.agg_loss(loss, mask, mode, **kwargs), want, 2e-8, mode)


def test_agg_loss_empty_and_errors():
    loss = torch.randn(3, 4)
    empty = torch.zeros(3, 4)
    for mode in AGG_MODES:
        got, want = cv.agg_loss(loss, empty, mode), verl_agg_loss(loss, empty, mode)
        assert torch.isnan(got) == torch.isnan(want), mode  # verl: 0/0 for the mean modes
        if not torch.isnan(want):
            assert got.item() == want.item() == 0.0
    with pytest.raises(ValueError, match="batch_num_tokens"):
        cv.agg_loss(loss, empty, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        cv.agg_loss(loss, empty, "seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        cv.agg_loss(loss, empty, "token-median")


def _policy_inputs(shape, dtype, device, spread=0.5):
    lp = -torch.rand(shape) * 3
    old = lp + torch.randn(shape) * spread
    adv = torch.randn(shape)
    return [t.to(dtype).to(device) for t in (old, lp, adv)]


@pytest.mark.parametrize("mode", AGG_MODES[:1] + AGG_MODES[2:])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_compute_policy_loss(backend, device, mode, dtype):
    old, lp, adv = _policy_inputs((5, 19), dtype, device)
    lp.requires_grad_()
    mask = _mask(5, 19, device)
    got = cv.compute_policy_loss(old, lp, adv, mask, cliprange=0.2, cliprange_high=0.28, loss_agg_mode=mode)
    old64, lp64, adv64 = _upcast(old, lp, adv)
    want = verl_compute_policy_loss(
        old64, lp64, adv64, mask.double().cpu(), cliprange=0.2, cliprange_high=0.28, loss_agg_mode=mode
    )
    for name, g, w in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), got, want):
        assert g.dim() == 0
        _close(g, w, TOL[dtype], name)
    got[0].backward()
    want[0].backward()
    _close(lp.grad, lp64.grad, GRAD_TOL[dtype], "grad")


def test_compute_policy_loss_extreme_ratios_and_empty_rows():
    old, lp, adv = _policy_inputs((4, 16), torch.float64, "cpu")
    lp = (lp + torch.randn(4, 16, dtype=torch.float64) * 30).requires_grad_()  # |lp − old| up to ~100
    mask = _mask(4, 16, "cpu")
    for c in (3.0, 10.0):
        got = cv.compute_policy_loss(old, lp, adv, mask, cliprange=0.2, clip_ratio_c=c)
        lp64 = lp.detach().clone().requires_grad_()
        want = verl_compute_policy_loss(old, lp64, adv, mask.double(), cliprange=0.2, clip_ratio_c=c)
        for g, w in zip(got, want):
            _close(g, w, 2e-8)
        lp.grad = None
        got[0].backward()
        want[0].backward()
        _close(lp.grad, lp64.grad, 2e-8, "grad")


def test_compute_policy_loss_empty_batch_and_errors():
    old, lp, adv = _policy_inputs((2, 3), torch.float32, "cpu")
    empty = torch.zeros(2, 3)
    got = cv.compute_policy_loss(old, lp, adv, empty, cliprange=0.2)
    want = verl_compute_policy_loss(old, lp, adv, empty, cliprange=0.2)
    assert torch.isnan(got[0]) and torch.isnan(want[0])  # 0/0, as verl
    assert [g.item() for g in got[1:]] == [w.item() for w in want[1:]] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="clip_ratio_c"):
        cv.compute_policy_loss(old, lp, adv, empty, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(TypeError, match="cliprange"):
        cv.compute_policy_loss(old, lp, adv, empty)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_compute_value_loss(backend, device, mode, dtype):
    values = torch.randn(4, 23).to(dtype).to(device)
    vpreds = (values.float() + torch.randn(4, 23) * 0.6).to(dtype).requires_grad_()
    returns = torch.randn(4, 23).to(dtype).to(device)
    mask = _mask(4, 23, device)
    kwargs = dict(dp_size=2, batch_num_tokens=40, global_batch_size=6) if mode != "token-sum" else {}
    got = cv.compute_value_loss(vpreds, returns, values, mask, 0.2, mode, **kwargs)
    v64, r64, o64 = _upcast(vpreds, returns, values)
    want = verl_compute_value_loss(v64, r64, o64, mask.double().cpu(), 0.2, mode, **kwargs)
    _close(got[0], want[0], TOL[dtype], "vf_loss")
    _close(got[1], want[1], TOL[dtype], "vf_clipfrac")
    got[0].backward()
    want[0].backward()
    _close(vpreds.grad, v64.grad, GRAD_TOL[dtype], "grad")


KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+", "k2+"]


@pytest.mark.parametrize("name", KL_NAMES)
def test_kl_penalty(backend, device, name):
    lp = (-torch.rand(4, 9) * 4).to(device).requires_grad_()
    ref = (lp.detach() + torch.randn(4, 9) * 2).to(device).requires_grad_()
    ref.data[0, :3] += 30.0  # beyond k3's clamps
    got = cv.kl_penalty(lp, ref, name)
    lp64, ref64 = _upcast(lp, ref)
    want = verl_kl_penalty(lp64, ref64, name)
    _close(got, want, 2e-5, name)
    weights = torch.randn(4, 9, dtype=torch.float64)
    (got.double() * weights.to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(lp.grad, lp64.grad, 2e-5, f"{name} grad (logprob)")
    _close(ref.grad, ref64.grad, 2e-5, f"{name} grad (ref)")


def test_kl_penalty_unknown_names_raise_like_verl():
    lp, ref = torch.randn(3), torch.randn(3)
    for name in ("full", "k4", "kl++"):
        with pytest.raises(NotImplementedError):
            verl_kl_penalty(lp, ref, name)
        with pytest.raises(NotImplementedError):
            cv.kl_penalty(lp, ref, name)


# ---------------------------------------------------------------------------------------------------
# verl.utils.kernel.linear_cross_entropy
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy(backend, device, reduction):
    hidden = (torch.randn(2, 5, 16) * 0.5).to(device).requires_grad_()
    weight = (torch.randn(37, 16) * 0.5).to(device).requires_grad_()
    labels = torch.randint(0, 37, (2, 5)).to(device)
    got_lp, got_h = cv.linear_cross_entropy(hidden, weight, labels, 0.7, reduction)
    h64, w64 = _upcast(hidden, weight)
    want_lp, want_h = verl_linear_cross_entropy(h64, w64, labels.cpu(), 0.7, reduction)
    assert got_h.shape == (10,) and got_lp.shape == want_lp.shape
    _close(got_lp, want_lp, 1e-4, "logprobs")
    _close(got_h, want_h, 1e-4, "entropy")
    weights = torch.randn(10, dtype=torch.float64)
    loss = got_lp.double().sum() + (got_h.double() * weights.to(device)).sum()
    loss.backward()
    (want_lp.sum() + (want_h * weights).sum()).backward()
    _close(hidden.grad, h64.grad, 1e-4, "d hidden")
    _close(weight.grad, w64.grad, 1e-4, "d weight")


def test_linear_cross_entropy_defaults_and_errors():
    hidden, weight = torch.randn(6, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (6,))
    got = cv.linear_cross_entropy(hidden, weight, labels, None, None)
    want = verl_linear_cross_entropy(hidden.double(), weight.double(), labels)
    _close(got[0], want[0], 1e-4)
    with pytest.raises(ValueError, match="reduction"):
        cv.linear_cross_entropy(hidden, weight, labels, reduction="max")


# ---------------------------------------------------------------------------------------------------
# No host synchronisation: the shims trace into one graph (PyTorch path, CPU)
# ---------------------------------------------------------------------------------------------------
def test_compile_fullgraph_policy_and_value_loss():
    def step(old, lp, adv, mask, vpreds, returns, values):
        pg = cv.compute_policy_loss(old, lp, adv, mask, cliprange=0.2, loss_agg_mode="seq-mean-token-mean")
        vf = cv.compute_value_loss(vpreds, returns, values, mask, 0.5)
        return pg[0] + vf[0], pg[1], pg[2], vf[1]

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for shape in ((3, 11), (5, 20)):
            old, lp, adv = _policy_inputs(shape, torch.float32, "cpu")
            args = (old, lp.requires_grad_(), adv, _mask(*shape, "cpu"),
                    torch.randn(shape, requires_grad=True), torch.randn(shape), torch.randn(shape))
            eager = step(*args)
            grads = torch.autograd.grad(eager[0], (args[1], args[4]))
            traced = compiled(*args)
            traced_grads = torch.autograd.grad(traced[0], (args[1], args[4]))
            for g, w in zip(traced + traced_grads, eager + grads):
                _close(g, w, 1e-5)
