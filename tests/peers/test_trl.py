"""rlhf_kernels.compat.trl against the real TRL 1.16.0: the fused LM head function every TRL trainer calls
(``_ChunkedLogProbFunction``) and the log-softmax helpers, values and gradients, on the PyTorch path and
the Triton kernels (interpreted on CPU).  Intended differences are asserted as such (docs/compat-trl.md)."""

from __future__ import annotations

import pytest
import torch

from peers.cases import HALF, HALF_TOL, TOL, close, grad_close, leaf, upcast
from rlhf_kernels.compat import trl as ct

V = 67
FP32 = TOL[torch.float32]


def _row_mask(shape):
    row_mask = torch.rand(shape) < 0.75
    row_mask.view(-1)[0] = False
    return row_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index_shape", ["(...)", "(..., K)"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_row_mask", [False, True], ids=["all_rows", "row_mask"])
def test_selective_log_softmax(trl_peer, backend, dtype, index_shape, temperature, with_row_mask):
    logits = (torch.randn(3, 5, V) * 4).to(dtype)
    index = torch.randint(0, V, (3, 5) if index_shape == "(...)" else (3, 5, 4))
    row_mask = _row_mask(index.shape) if with_row_mask else None
    results = []
    for fn, values in ((ct.selective_log_softmax, logits), (trl_peer.selective_log_softmax, upcast(logits))):
        x = leaf(values)
        out = fn(x, index, temperature, row_mask)
        results.append((out, torch.autograd.grad(out.sum(), x)[0]))
    assert results[0][0].dtype == dtype  # TRL's dtype
    tol = 4e-3 if dtype in HALF else TOL[dtype]  # ours rounds the fp32 result once to the logits' dtype
    close(results[0][0], results[1][0], tol, "log-probs vs TRL on the upcast logits")
    grad_close(results[0][1], results[1][1], 1e-2 if dtype in HALF else TOL[dtype], "gradient")
    if dtype in HALF:
        close(
            results[0][0],
            trl_peer.selective_log_softmax(logits, index, temperature, row_mask),
            HALF_TOL[dtype],
            "vs TRL's half-precision log_softmax",
        )
    if row_mask is not None:
        assert bool((results[0][0][~row_mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
@pytest.mark.parametrize("with_row_mask", [False, True], ids=["all_rows", "row_mask"])
def test_selective_log_softmax_and_entropy(trl_peer, backend, dtype, entropy_requires_grad, with_row_mask):
    logits = (torch.randn(4, 6, V) * 3).to(dtype)
    index = torch.randint(0, V, (4, 6))
    row_mask = _row_mask(index.shape) if with_row_mask else None
    results = []
    for fn, values in (
        (ct.selective_log_softmax_and_entropy, logits),
        (trl_peer.selective_log_softmax_and_entropy, upcast(logits)),
    ):
        x = leaf(values)
        logprobs, entropy = fn(x, index, entropy_requires_grad, 0.8, row_mask)
        total = logprobs.sum() + (entropy.sum() if entropy.requires_grad else 0)
        results.append((logprobs, entropy, torch.autograd.grad(total, x)[0]))
    assert results[0][1].requires_grad == results[1][1].requires_grad == entropy_requires_grad
    tol = 1e-2 if dtype in HALF else FP32
    close(results[0][0], results[1][0], tol, "log-probs")
    close(results[0][1], results[1][1], tol, "entropy")
    grad_close(results[0][2], results[1][2], tol, "gradient")


def test_selective_log_softmax_and_entropy_k_index(trl_peer):
    with pytest.raises(NotImplementedError, match=r"\(\.\.\., K\)"):
        ct.selective_log_softmax_and_entropy(torch.randn(2, 3, V), torch.randint(0, V, (2, 3, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(trl_peer, backend, dtype):
    logits = (torch.randn(4, 9, V) * 3).to(dtype)
    ours, peer = ct.entropy_from_logits(logits, chunk_size=7), trl_peer.entropy_from_logits(upcast(logits), 7)
    assert ours.dtype == dtype
    close(ours, peer, 1e-2 if dtype in HALF else FP32, "entropy")


def test_temperature_must_be_positive(trl_peer):
    for fn in (ct.selective_log_softmax, trl_peer.selective_log_softmax):
        with pytest.raises(ValueError, match="temperature must be positive"):
            fn(torch.randn(2, V), torch.randint(0, V, (2,)), 0.0)


# ---------------------------------------------------------------------------------------------------
# The fused LM head function
# ---------------------------------------------------------------------------------------------------
ALL_OUTPUTS = ("log_probs",) + ct.OPTIONAL_OUTPUTS


def _head(fn, hidden, weight, bias, targets, temperature, logit_scale, outputs, chunk_size=16):
    leaves = [leaf(hidden), leaf(weight)] + ([leaf(bias)] if bias is not None else [])
    result = fn.apply(
        leaves[0],
        leaves[1],
        leaves[2] if bias is not None else None,
        targets,
        temperature,
        chunk_size,
        None,
        logit_scale,
        outputs,
    )
    differentiable = [x for x in result[:2] if x is not None]
    loss = sum(x.sum() * weight_ for x, weight_ in zip(differentiable, (1.0, 0.3)))
    return result, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "outputs", [("log_probs",), ("log_probs", "entropy"), ALL_OUTPUTS], ids=["log_probs", "entropy", "all"]
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(("temperature", "logit_scale"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.5)])
def test_chunked_logprob_function(trl_peer, backend, outputs, with_bias, temperature, logit_scale):
    n, h = 19, 12
    hidden, weight = torch.randn(n, h), torch.randn(V, h) * 0.5
    bias = torch.randn(V) if with_bias else None
    targets = torch.randint(0, V, (n,))
    targets[3] = int((hidden[3] @ weight.T + (0 if bias is None else bias)).argmax())  # a top-1 hit
    ours, ours_grads = _head(
        ct.ChunkedLogProbFunction, hidden, weight, bias, targets, temperature, logit_scale, outputs
    )
    peer, peer_grads = _head(
        trl_peer.ChunkedLogProbFunction, hidden, weight, bias, targets, temperature, logit_scale, outputs
    )
    for name, a, b in zip(ALL_OUTPUTS, ours, peer):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if name == "is_top1":
            assert torch.equal(a, b) and bool(a[3])
        else:
            close(a, b, FP32, name)
    for a, b, name in zip(ours_grads, peer_grads, ("hidden", "weight", "bias")):
        grad_close(a, b, FP32, f"d/d {name}")


def test_chunked_logprob_function_autocast(trl_peer):
    """Under CPU autocast to bf16 the projection runs in bf16, as TRL's; statistics in fp32.  The backward
    runs after the autocast region, as in HF/TRL training loops."""
    hidden, weight, targets = torch.randn(9, 16), torch.randn(V, 16) * 0.5, torch.randint(0, V, (9,))
    results = []
    for fn in (ct.ChunkedLogProbFunction, trl_peer.ChunkedLogProbFunction):
        h, w = leaf(hidden), leaf(weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = fn.apply(h, w, None, targets, 1.0, 16, None, 1.0, ALL_OUTPUTS)
        grads = torch.autograd.grad(outputs[0].sum() + 0.3 * outputs[1].sum(), (h, w))
        results.append((outputs, grads))
    for name, a, b in zip(ALL_OUTPUTS[:4], results[0][0], results[1][0]):
        close(a, b, 2e-2, name)
    for a, b in zip(results[0][1], results[1][1]):
        grad_close(a, b, 5e-2, "gradient")


def test_chunked_logprob_function_not_implemented(trl_peer):
    hidden, weight, targets = torch.randn(3, 4), torch.randn(V, 4), torch.randint(0, V, (3,))
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        ct.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, 30.0, 1.0, ALL_OUTPUTS)
    with pytest.raises(NotImplementedError, match="logit_scale"):
        ct.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, None, 0.0, ALL_OUTPUTS)
