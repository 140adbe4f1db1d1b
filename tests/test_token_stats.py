"""token_stats_from_logits against the float64 oracle (values, and gradients by autograd on the oracle),
on every backend.

Kernels, launchers and routing: rlhf_kernels/ops/token_stats.py; PyTorch path:
rlhf_kernels/ops/cpu/token_stats.py; oracle: rlhf_kernels/reference/token_stats.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, assert_close
from fuzz.oracles import logprobs_grad_oracle

from rlhf_kernels import _dispatch
from rlhf_kernels.ops import token_stats as ops
from rlhf_kernels.ops.cpu import logprobs as cpu_logprobs
from rlhf_kernels.ops.cpu import token_stats as cpu
from rlhf_kernels.ops.token_stats import token_stats_from_logits
from rlhf_kernels.reference import token_stats as ref

FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-12}
DIFFERENTIABLE = ("logprobs", "entropy", "sum_sq_probs", "mean_logit", "topk_logprobs")
ALL = dict(entropy=True, sum_sq_probs=True, top1_match=True, mean_logit=True)


def _logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(dtype).to(device)


def _distinct_top(logits, k):
    """Puts k + 1 distinct values above every random logit at random positions of each row: ties at the
    top-k boundary would make the selected set (and so the gradient) implementation-defined in bf16.
    16 + j/4 is exact in bf16 and fp16 for j ≤ 64."""
    rows = logits.reshape(-1, logits.shape[-1])
    for row in rows:
        positions = torch.randperm(rows.shape[-1])[: k + 1]
        row[positions.to(row.device)] = (16 + torch.arange(len(positions)) / 4).to(row.dtype).to(row.device)
    return logits


def _labels(shape, vocab, device, ignore_frac=0.25):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    return labels.to(device)


def _assert_grad_close(got, want, rtol, what="grad"):
    """Per row, |got − want| ≤ rtol·max_j |want_j| (+1e-6 absolute)."""
    assert got.shape == want.shape, what
    scale = want.abs().amax(-1, keepdim=True) + 1e-30
    err = (got.double().cpu() - want).abs() / scale
    assert bool((err <= rtol + 1e-6).all()), f"{what}: max scaled error {err.max().item():.3g}"


def _transform_options(options):
    return {k: options[k] for k in ("temperature", "logit_scale", "softcap") if k in options}


def _check(logits, labels, *, grad=True, **options):
    """Every requested output against the oracle, then the gradient of a random weighting of the
    differentiable ones against autograd on the oracle."""
    dtype = logits.dtype
    x = logits.clone().requires_grad_()
    got = token_stats_from_logits(x, labels, **options)
    xr = logits.detach().cpu().double().requires_grad_()
    want = ref.token_stats_from_logits(xr, labels.cpu(), **options)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, g, w in zip(got._fields, got, want, strict=True):
        assert (g is None) == (w is None), name
        if g is None:
            continue
        if name == "topk_indices":
            # the same tokens up to ties: distinct, in range, and the oracle's x' there is the same
            assert g.dtype == torch.int64 and g.shape == w.shape
            g = g.cpu()
            assert bool(((g >= 0) & (g < logits.shape[-1])).all())
            kept = labels.cpu() != options.get("ignore_index", -100)
            assert bool((g[kept].sort(-1).values.diff(dim=-1) != 0).all()), "repeated top-k index"
            xt = ref.transformed_logits(logits.detach().cpu(), **_transform_options(options))
            assert torch.equal(xt.gather(-1, g), xt.gather(-1, w)), name
            continue
        assert g.dtype == out_dtype, name
        assert torch.equal(torch.isnan(g).cpu(), torch.isnan(w)), f"{name}: NaN positions"
        assert torch.equal(torch.isinf(g).cpu(), torch.isinf(w)), f"{name}: inf positions"
        finite = torch.isfinite(w)
        assert_close(g.detach().cpu()[finite], w.detach()[finite], FWD_TOL[dtype], name)
    if not grad:
        return got
    loss, loss_ref = 0.0, 0.0
    for name in DIFFERENTIABLE:
        g, w = getattr(got, name), getattr(want, name)
        if g is None:
            continue
        weight = torch.rand(w.shape, dtype=torch.float64) - 0.3
        usable = torch.isfinite(w)  # −inf log-probs of masked entries carry no gradient to compare
        loss = loss + (weight.to(g.device, g.dtype) * torch.where(usable.to(g.device), g, 0.0)).sum()
        loss_ref = loss_ref + (weight * torch.where(usable, w, 0.0)).sum()
    loss.backward()
    loss_ref.backward()
    assert x.grad.dtype == dtype
    assert torch.equal(x.detach(), logits), "the logits were modified"
    _assert_grad_close(x.grad, xr.grad, GRAD_RTOL[dtype] * 2)
    return got


# --------------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, softcap",
    [(torch.float32, None), (torch.float32, 4.0), (torch.bfloat16, 4.0), (torch.float16, None)],
)
@pytest.mark.parametrize("shape", [(1, 1), (4, 17), (3, 1100), (2, 3, 33)])
def test_matches_oracle(backend, device, dtype, softcap, shape):
    logits = _distinct_top(_logits(shape, dtype, device), min(5, shape[-1]))
    labels = _labels(shape[:-1], shape[-1], device)
    _check(logits, labels, temperature=0.8, logit_scale=1.25, softcap=softcap, top_k=min(5, shape[-1]), **ALL)


@pytest.mark.parametrize("output", ["entropy", "sum_sq_probs", "top1_match", "mean_logit", "top_k"])
def test_each_output_alone(backend, device, output):
    # every constexpr selection on its own (the kernels compile only what is asked for)
    logits = _logits((5, 300), torch.float32, device)
    labels = _labels((5,), 300, device)
    options = {"top_k": 64} if output == "top_k" else {output: True}
    _check(logits, labels, **options)


def test_logprobs_only_equals_logprobs_from_logits(backend, device):
    import rlhf_kernels as rk

    logits = _logits((6, 129), torch.bfloat16, device)
    labels = _labels((6,), 129, device)
    got = _check(logits, labels, temperature=0.6)
    assert_close(got.logprobs, rk.logprobs_from_logits(logits, labels, temperature=0.6), 2e-6, "logprobs")


# Rows whose label holds all the probability but 4.5e-5 … 2e-9 of it (the float64 autograd oracle keeps
# ≥ 6 digits of 1 − p_y there): the label column's g·(1 − p_y), read as g − g·p_y, was 0 or kept few
# digits (ops/logprobs.py's backward, found by the long fuzz profile).  With the top-k the label is one
# of the k (its w·(1 − p_y) as well); the mean logit's r/V would hide the tiny terms, so it is left out.
TRANSFORMS = {"softcap": 30.0, "logit_scale": 1.25, "temperature": 1.1}  # the gap of [3, -18]: 21 → 20.7


@pytest.mark.parametrize(
    "options", [{}, TRANSFORMS, {"top_k": 2, "entropy": True, "sum_sq_probs": True}], ids=["", "softcap", "k"]
)
def test_label_gradient_exact_where_its_probability_rounds_to_one(backend, device, options):
    rows = [[5.0, -5.0], [3.0, -18.0], [-20.0, -41.0], [40.0, 20.0], [-5.0, 5.0]]
    logits = torch.tensor(rows, device=device)
    _check(logits, torch.tensor([0, 0, 0, 0, 1], device=device), **options)
    # beyond float64's rounding of p_y: the oracle's label column as minus the sum of the others
    logits = torch.tensor([[0.0, -37.0], [50.0, -10.0], [-90.0, 0.0]], device=device, requires_grad=True)
    labels = torch.tensor([0, 0, 1], device=device)
    g = torch.rand(3, device=device) + 0.5
    (grad,) = torch.autograd.grad(token_stats_from_logits(logits, labels).logprobs, logits, g)
    want = logprobs_grad_oracle(logits.detach().cpu(), labels.cpu(), g.cpu(), None, temperature=1.0,
                                ignore_index=-100)
    _assert_grad_close(grad, want, GRAD_RTOL[torch.float32] * 2)


@pytest.mark.parametrize("vocab", [50257])
def test_odd_real_vocabulary(backend, device, vocab):
    top_k = 64 if backend == "torch" else 16  # k = 64 on the interpreted kernels: test_each_output_alone
    logits = _distinct_top(_logits((2, vocab), torch.bfloat16, device), top_k)
    labels = torch.tensor([7, vocab - 1], device=device)
    _check(logits, labels, softcap=30.0, top_k=top_k, **ALL)


def test_vocab_151936_torch_path():
    with _dispatch.use_backend("torch"):
        logits = _distinct_top(_logits((2, 151936), torch.bfloat16, "cpu"), 64)
        _check(logits, torch.tensor([3, 151935]), temperature=0.9, top_k=64, **ALL)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fp64_scalars_not_representable_in_fp32(backend_name):
    # 0.7, 1/3 and 7.3 are not fp32 numbers: rounded to fp32 they would err by ~1e-8 relative
    device = TRITON_DEVICE if backend_name == "triton" else "cpu"
    with _dispatch.use_backend(backend_name):
        logits = _logits((4, 2, 45), torch.float64, device, scale=4.0)
        labels = _labels((4, 2), 45, device)
        _check(logits, labels, temperature=0.7, logit_scale=1 / 3, softcap=7.3, top_k=6, **ALL)


def test_gradcheck_float64(backend, device):
    logits = torch.randn(2, 7, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([1, -100], device=device)

    def fn(x):
        out = token_stats_from_logits(
            x, labels, temperature=0.8, logit_scale=1.5, softcap=2.0, top_k=3, **ALL
        )
        return tuple(getattr(out, name) for name in DIFFERENTIABLE)

    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


# --------------------------------------------------------------------------------------------------
# Masked entries, ties, NaN, ignored positions
# --------------------------------------------------------------------------------------------------
def test_masked_vocabulary_entries(backend, device):
    logits = _logits((4, 40), torch.float32, device)
    logits[:, ::3] = float("-inf")
    logits[3, 4:] = float("-inf")  # four entries left, fewer than k: the top-k ends in masked entries
    labels = torch.tensor([1, 2, -100, 1], device=device)
    for softcap in (None, 3.0):
        got = _check(logits, labels, softcap=softcap, top_k=6, **ALL)
        assert bool(torch.isinf(got.mean_logit[[0, 1, 3]]).all())
        assert sorted(got.topk_indices[3, :2].tolist()) == [1, 2]  # the finite entries first
    x = logits.clone().requires_grad_()
    out = token_stats_from_logits(x, labels, entropy=True, sum_sq_probs=True)
    (out.logprobs.sum() + out.entropy.sum() + out.sum_sq_probs.sum()).backward()
    assert bool((x.grad[:, ::3] == 0).all())


def test_ties(backend, device):
    # the label among tied maxima counts as a match; tied top-k values go to the smaller index
    logits = torch.tensor([[1.0, 3.0, 0.5, 3.0, 3.0, -2.0]], device=device)
    got = token_stats_from_logits(logits, torch.tensor([4], device=device), top1_match=True, top_k=4)
    assert got.top1_match.item() == 1.0
    values = got.topk_logprobs[0].cpu()
    assert_close(values[:3], values[:1].expand(3), 1e-7, "tied values")
    indices = got.topk_indices[0].tolist()
    assert sorted(indices[:3]) == [1, 3, 4] and indices[3] == 0
    if backend == "triton":
        assert indices == [1, 3, 4, 0]


def test_nan_row_gives_nan_and_ignored_row_gives_zero(backend, device):
    logits = _logits((3, 20), torch.float32, device)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("nan")
    x = logits.clone().requires_grad_()
    labels = torch.tensor([0, 1, -100], device=device)
    got = token_stats_from_logits(x, labels, top_k=3, **ALL)
    for name in ("logprobs", "entropy", "sum_sq_probs", "top1_match", "mean_logit", "topk_logprobs"):
        value = getattr(got, name)
        assert bool(torch.isfinite(value[0]).all()), name
        assert bool(torch.isnan(value[1]).all()), name
        assert bool((value[2] == 0).all()), name
    assert bool(((got.topk_indices >= 0) & (got.topk_indices < 20)).all())
    assert bool((got.topk_indices[2] == 0).all())
    loss = sum(getattr(got, name).sum() for name in DIFFERENTIABLE)
    loss.backward()
    assert bool(torch.isfinite(x.grad[0]).all())
    assert bool(torch.isnan(x.grad[1]).all())
    assert bool((x.grad[2] == 0).all())


def test_unchecked_out_of_range_label_gives_nan(backend, device):
    logits = _logits((3, 9), torch.float32, device)
    labels = torch.tensor([0, 9, -100], device=device)
    previous = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(False)
    try:
        x = logits.clone().requires_grad_()
        got = token_stats_from_logits(x, labels, top1_match=True, entropy=True)
    finally:
        _dispatch.set_index_checks(previous)
    assert torch.isnan(got.logprobs[1]).item() and torch.isnan(got.top1_match[1]).item()
    assert torch.isfinite(got.entropy[1]).item()
    got.logprobs.sum().backward()
    assert bool(torch.isnan(x.grad[1]).all()) and bool(torch.isfinite(x.grad[0]).all())


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    logits, labels = torch.randn(4, 7), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"top_k must be 0 \(off\) or in \[1, min\(64, V = 7\)\]; got 8"):
        token_stats_from_logits(logits, labels, top_k=8)
    with pytest.raises(ValueError, match=r"top_k must be .*; got -1"):
        token_stats_from_logits(logits, labels, top_k=-1)
    with pytest.raises(ValueError, match=r"min\(64, V = 100\)\]; got 65"):
        token_stats_from_logits(torch.randn(4, 100), labels, top_k=65)
    with pytest.raises(TypeError, match="top_k must be a Python int"):
        token_stats_from_logits(logits, labels, top_k=2.0)
    with pytest.raises(ValueError, match="softcap must be > 0; got 0.0"):
        token_stats_from_logits(logits, labels, softcap=0.0)
    with pytest.raises(ValueError, match="softcap must be > 0; got -1.0"):
        token_stats_from_logits(logits, labels, softcap=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        token_stats_from_logits(logits, labels, logit_scale=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_stats_from_logits(logits, labels, temperature=-2.0)
    with pytest.raises(ValueError, match=r"labels must have shape logits.shape\[:-1\]"):
        token_stats_from_logits(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        token_stats_from_logits(logits, torch.full((4,), 7))
    with pytest.raises(ValueError, match="non-empty last"):
        token_stats_from_logits(torch.randn(4, 0), labels)


@pytest.mark.parametrize("shape", [(0, 11), (2, 0, 5)])
def test_empty_inputs(backend, device, shape):
    logits = _logits(shape, torch.float32, device).requires_grad_()
    labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    got = token_stats_from_logits(logits, labels, top_k=3, **ALL)
    assert got.logprobs.shape == got.mean_logit.shape == shape[:-1]
    assert got.topk_logprobs.shape == got.topk_indices.shape == (*shape[:-1], 3)
    (got.logprobs.sum() + got.topk_logprobs.sum()).backward()
    assert logits.grad.shape == shape


# --------------------------------------------------------------------------------------------------
# Launchers write every element of the outputs the caller allocated
# --------------------------------------------------------------------------------------------------
def _poisoned(outputs):
    for t in outputs:
        t.fill_(-7 if t.dtype == torch.int64 else float("nan"))
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwd_launcher_writes_every_output(dtype):
    device = TRITON_DEVICE
    logits = _logits((5, 3, 37), dtype, device)[:, 1:]  # [5, 2, 37], rows strided
    labels = _labels((5, 2), 37, device).reshape(-1)
    outputs = _poisoned(cpu.empty_outputs(logits, 10, True, True, True, True, 5))
    ops._launch_fwd(outputs, logits, labels, 1.25, 4.0, 1 / 0.7, -100, 5)
    want = ref.token_stats_from_logits(
        logits.cpu(), labels.view(5, 2).cpu(), temperature=0.7, logit_scale=1.25, softcap=4.0, top_k=5, **ALL
    )
    for name, got, w in zip(want._fields, outputs, want, strict=False):
        assert_close(got, w.reshape(got.shape), FWD_TOL[dtype], name)
    x = ref.transformed_logits(logits.cpu(), temperature=0.7, logit_scale=1.25, softcap=4.0)
    assert_close(outputs[-1], torch.logsumexp(x, -1).reshape(-1), FWD_TOL[dtype], "lse")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("which", ["all", "logprobs"])
def test_bwd_launcher_writes_every_element(impl, which):
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    launch = ops._launch_bwd if impl == "triton" else cpu.token_stats_bwd_out
    logits = _logits((6, 2, 45), torch.float32, device)[:, 1]
    labels = _labels((6,), 45, device)
    scalars = (1.25, 4.0, 1 / 0.7)
    fwd = [t.to(device) for t in cpu.token_stats_fwd_torch.body(
        logits.cpu(), labels.cpu(), *scalars, -100, True, True, False, True, 4
    )]
    _, entropy, sum_sq, _, _, _, topk_indices, lse = fwd
    empty = lse.new_empty(0)
    grads = [torch.randn(6, device=device)] + (
        [torch.randn(6, device=device) for _ in range(3)] + [torch.randn(6, 4, device=device)]
        if which == "all" else [empty] * 4
    )
    grad = torch.full((6, 45), float("nan"), device=device)
    launch(grad, tuple(grads), logits, labels, (lse, entropy, sum_sq, topk_indices), *scalars, -100)

    xr = logits.detach().cpu().double().requires_grad_()
    want = ref.token_stats_from_logits(
        xr, labels.cpu(), temperature=0.7, logit_scale=1.25, softcap=4.0, entropy=True, sum_sq_probs=True,
        mean_logit=True, top_k=4,
    )
    outs = (want.logprobs, want.entropy, want.sum_sq_probs, want.mean_logit, want.topk_logprobs)
    sum(((g.cpu().double() * o).sum() for g, o in zip(grads, outs) if g.numel())).backward()
    _assert_grad_close(grad, xr.grad, 4e-5)


# --------------------------------------------------------------------------------------------------
# Registration and compile
# --------------------------------------------------------------------------------------------------
def test_opcheck_torch_path():
    logits = torch.randn(5, 13, requires_grad=True)
    labels = torch.tensor([0, 12, -100, 3, 3])
    with _dispatch.use_backend("torch"):
        for args in [
            (logits, labels, 1.0, 0.0, 1.0, -100, False, False, False, False, 0),
            (logits, labels, 1.5, 3.0, 1 / 0.7, -100, True, True, True, True, 4),
        ]:
            torch.library.opcheck(torch.ops.rlhf_kernels.token_stats_fwd.default, args)
            torch.library.opcheck(torch.ops.rlhf_kernels.token_stats_fwd_torch.default,
                                  (logits.detach(), *args[1:]))
        out = torch.ops.rlhf_kernels.token_stats_fwd(logits.detach(), labels, 1.5, 3.0, 1.0, -100,
                                                     True, True, True, True, 4)
        _, ent, sq, _, _, _, idx, lse = out
        bwd = (torch.randn(5), torch.randn(5), torch.randn(5), torch.randn(5), torch.randn(5, 4),
               logits.detach(), labels, lse, ent, sq, idx, 1.5, 3.0, 1.0, -100)
        torch.library.opcheck(torch.ops.rlhf_kernels.token_stats_bwd.default, bwd)
        torch.library.opcheck(torch.ops.rlhf_kernels.token_stats_bwd_torch.default, bwd)
        # a vocabulary shard (parallel.py): columns [3, 16) of 20
        torch.library.opcheck(torch.ops.rlhf_kernels.token_stats_bwd.default, (*bwd, 3, 20))


def test_compile_fullgraph_dynamic_torch_path():
    def step(logits, labels):
        out = token_stats_from_logits(logits, labels, temperature=0.9, softcap=5.0, top_k=3, **ALL)
        return out.logprobs.sum() - 0.1 * out.entropy.sum() + out.sum_sq_probs.sum() + out.topk_logprobs.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with _dispatch.use_backend("torch"):
        for n in (6, 9):
            logits = torch.randn(n, 2, 31)
            labels = torch.randint(0, 31, (n, 2))
            x_eager, x_comp = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            eager = step(x_eager, labels)
            eager.backward()
            got = compiled(x_comp, labels)
            got.backward()
            torch.testing.assert_close(got, eager)
            torch.testing.assert_close(x_comp.grad, x_eager.grad)


@pytest.mark.skipif(not HAS_CUDA, reason="host-sync detection needs CUDA")
def test_no_host_sync_on_cuda():
    logits = torch.randn(32, 5000, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5000, (32,), device="cuda")
    _dispatch.set_index_checks(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = token_stats_from_logits(logits, labels, softcap=30.0, top_k=16, **ALL)
        sum(getattr(out, name).sum() for name in DIFFERENTIABLE).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _dispatch.set_index_checks(True)


# --------------------------------------------------------------------------------------------------
# Batch invariance (issue 15): as tests/test_logprobs.py::test_batch_invariant_bitwise, every output
# --------------------------------------------------------------------------------------------------
def _row_outputs(base, labels, row):
    """Every output of flattened row ``row`` and its gradient row, for constant upstream gradients."""
    got = token_stats_from_logits(base, labels, softcap=20.0, temperature=0.7, top_k=3, batch_invariant=True,
                                  **ALL)
    loss = sum(c * getattr(got, name).sum() for c, name in zip((0.75, -0.3, 1.3, 0.2, 0.4), DIFFERENTIABLE))
    loss.backward()
    vocab = base.shape[-1]
    return [field.reshape(labels.numel(), -1)[row] for field in got] + [base.grad.reshape(-1, vocab)[row]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_bitwise(backend, device, dtype, monkeypatch):
    """A row alone and inside batches of several sizes and positions: every output and the gradient
    bitwise equal (the torch path's V = 40000 made ATen split a lone row's sums over threads)."""
    if backend == "triton":
        monkeypatch.setattr(ops, "_launch_config", lambda v, k: ops._LaunchConfig(block_v=256, block_k=4,
                                                                                  num_warps=4))
    vocab, sizes = (40000, (2, 9)) if backend == "torch" else (300, (2, 3))
    monkeypatch.setattr(cpu_logprobs, "CHUNK_BYTES", 4 * 4 * vocab)  # chunks of 4 rows: 9 = 4 + 4 + 1
    row = _logits((1, vocab), dtype, device)
    label = torch.randint(0, vocab, (1,), device=device)
    want = _row_outputs(row.clone().requires_grad_(), label, 0)
    for n in sizes:
        for position in sorted({0, n // 2, n - 1}):
            batch = _logits((n, vocab), dtype, device)
            labels = _labels((n,), vocab, device)
            batch[position], labels[position] = row[0], label[0]
            got = _row_outputs(batch.requires_grad_(), labels, position)
            for name, g, w in zip(list(ops.TokenStats._fields) + ["gradient"], got, want):
                assert torch.equal(g, w), f"{n} rows, row {position}: {name} differs from the row alone"
