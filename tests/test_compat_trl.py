"""rlhf_kernels.compat.trl against faithful re-implementations of TRL's functions (bench/baselines).

Values and gradients on random inputs and dtypes, on the PyTorch path and the Triton kernels
(interpreted on CPU).  For half-precision logits TRL runs log_softmax in that precision; the shim
computes in fp32 and rounds once, so it is compared with TRL run on the same values upcast, rounded to
the logits' dtype.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench/

from bench.baselines.logprobs import trl_entropy_from_logits, trl_selective_log_softmax  # noqa: E402
from bench.baselines.losses import trl_reward_loss  # noqa: E402
from rlhf_kernels import _dispatch  # noqa: E402
from rlhf_kernels.compat import trl as ct  # noqa: E402

OUT_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _close(actual, expected, tol, what=""):
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=tol, atol=tol, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def _logits(shape, dtype, device):
    return (torch.randn(shape) * 3).to(dtype).to(device).requires_grad_()


def _upcast(t):
    return t.detach().double().cpu().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 7, 45)])
def test_selective_log_softmax(backend, device, dtype, shape):
    logits = _logits(shape, dtype, device)
    index = torch.randint(0, shape[-1], shape[:-1]).to(device)
    got = ct.selective_log_softmax(logits, index)
    assert got.dtype == dtype and got.shape == index.shape
    x = _upcast(logits)
    want = trl_selective_log_softmax(x, index.cpu())
    _close(got, want.to(dtype), OUT_TOL[dtype], "logps")
    weights = torch.randn(shape[:-1], dtype=torch.float64)
    (got.double() * weights.to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(logits.grad, x.grad, GRAD_TOL[dtype], "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 4])
def test_selective_log_softmax_top_k_index(backend, device, dtype, k):
    """An index of shape (..., K) gathers K log-probs per position (e.g. for top-K distillation)."""
    logits = _logits((2, 5, 31), dtype, device)
    index = torch.randint(0, 31, (2, 5, k)).to(device)
    got = ct.selective_log_softmax(logits, index)
    assert got.dtype == dtype and got.shape == (2, 5, k)
    x = _upcast(logits)
    want = trl_selective_log_softmax(x, index.cpu())
    _close(got, want.to(dtype), OUT_TOL[dtype], "logps")
    weights = torch.randn(2, 5, k, dtype=torch.float64)
    (got.double() * weights.to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(logits.grad, x.grad, GRAD_TOL[dtype], "grad")


def test_selective_log_softmax_matches_trl_in_its_own_dtype():
    """Against TRL computed in bf16 itself (its per-row log_softmax path): within one bf16 rounding."""
    logits = (torch.randn(4, 6, 53) * 3).to(torch.bfloat16)
    index = torch.randint(0, 53, (4, 6))
    got = ct.selective_log_softmax(logits, index)
    want = trl_selective_log_softmax(logits, index)
    _close(got, want, 2**-6, "bf16 logps")


def test_selective_log_softmax_bad_index():
    logits = torch.randn(2, 3, 7)
    with pytest.raises(ValueError, match="labels must lie in"):
        ct.selective_log_softmax(logits, torch.full((2, 3), 7))
    with pytest.raises(ValueError, match="labels must lie in"):  # TRL's gather raises a RuntimeError
        ct.selective_log_softmax(logits, torch.full((2, 3, 2), 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_entropy_from_logits(backend, device, dtype):
    logits = _logits((3, 4, 57), dtype, device)
    got = ct.entropy_from_logits(logits, chunk_size=5)
    assert got.dtype == dtype and got.shape == (3, 4)
    x = _upcast(logits)
    want = trl_entropy_from_logits(x, chunk_size=5)
    _close(got, want.to(dtype), OUT_TOL[dtype], "entropy")
    weights = torch.randn(3, 4, dtype=torch.float64)
    (got.double() * weights.to(device)).sum().backward()
    (want * weights).sum().backward()
    _close(logits.grad, x.grad, GRAD_TOL[dtype], "grad")
    with pytest.raises(ValueError, match="chunk_size"):
        ct.entropy_from_logits(logits, chunk_size=0)


@pytest.mark.parametrize("margin", [None, "tensor", 0.5])
@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reward_trainer_loss(backend, device, margin, center, dtype):
    chosen = (torch.randn(13) * 2).to(dtype).to(device).requires_grad_()
    rejected = (torch.randn(13) * 2).to(dtype).to(device).requires_grad_()
    margin_value = torch.rand(13).to(device) if margin == "tensor" else margin
    got = ct.reward_trainer_loss(chosen, rejected, margin_value, center)
    c64, r64 = _upcast(chosen), _upcast(rejected)
    want_margin = margin_value.double().cpu() if isinstance(margin_value, torch.Tensor) else margin_value
    want = trl_reward_loss(c64, r64, want_margin, center)
    tol = 2e-5 if dtype != torch.float64 else 1e-12
    _close(got, want, tol, "loss")
    got.backward()
    want.backward()
    _close(chosen.grad, c64.grad, GRAD_TOL[dtype] if dtype != torch.float64 else tol, "d chosen")
    _close(rejected.grad, r64.grad, GRAD_TOL[dtype] if dtype != torch.float64 else tol, "d rejected")


def test_reward_trainer_loss_reward_head_shape_and_metrics():
    """[N, 1] reward-head outputs are squeezed (older TRL broadcast an [N] margin into [N, N])."""
    chosen, rejected, margin = torch.randn(9, 1), torch.randn(9, 1), torch.rand(9)
    loss, metrics = ct.reward_trainer_loss(chosen, rejected, margin, 0.1, return_metrics=True)
    want = trl_reward_loss(chosen.squeeze(-1), rejected.squeeze(-1), margin, 0.1)
    _close(loss, want, 2e-6)
    _close(metrics["accuracy"], (chosen > rejected).float().mean(), 0.0)
    _close(metrics["margin"], (chosen - rejected).mean(), 1e-6)
    with pytest.raises(ValueError, match="margin"):
        ct.reward_trainer_loss(chosen, rejected, torch.rand(4))


def test_reward_trainer_loss_large_gaps_stay_finite():
    chosen = torch.tensor([0.0, 200.0, -200.0], requires_grad=True)
    rejected = torch.zeros(3)
    loss = ct.reward_trainer_loss(chosen, rejected)
    _close(loss, torch.tensor([0.6931471805599453, 0.0, 200.0]).mean(), 1e-6)
    loss.backward()
    _close(chosen.grad, torch.tensor([-0.5, 0.0, -1.0]) / 3, 1e-6)


def test_compile_fullgraph_shims():
    def step(logits, index, top_k, chosen, rejected):
        logps = ct.selective_log_softmax(logits, index)
        topk = ct.selective_log_softmax(logits, top_k)
        entropy = ct.entropy_from_logits(logits)
        return logps.sum() + topk.sum() + entropy.sum() + ct.reward_trainer_loss(chosen, rejected, None, 0.01)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for rows in (3, 6):
            logits = torch.randn(2, rows, 19, requires_grad=True)
            args = (logits, torch.randint(0, 19, (2, rows)), torch.randint(0, 19, (2, rows, 3)),
                    torch.randn(rows, requires_grad=True), torch.randn(rows))
            eager = step(*args)
            eager_grads = torch.autograd.grad(eager, (args[0], args[3]))
            traced = compiled(*args)
            traced_grads = torch.autograd.grad(traced, (args[0], args[3]))
            for g, w in zip((traced,) + traced_grads, (eager,) + eager_grads):
                _close(g, w, 1e-5)
