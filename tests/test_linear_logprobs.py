"""linear_logprobs (fused lm_head + log-softmax) against the float64 oracle, on every backend."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE

import rlhf_kernels as rk  # noqa: F401  (registers every family)
from rlhf_kernels import _dispatch, modules
from rlhf_kernels.ops import linear_logprobs as ops
from rlhf_kernels.ops.cpu import linear_logprobs as cpu_ops
from rlhf_kernels.ops.linear_logprobs import LinearLogprobs, linear_logprobs
from rlhf_kernels.reference import linear_logprobs as ref

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


def _assert_grad_close(actual, expected, rtol, what):
    """Error relative to the tensor's largest gradient entry (gradients are sums of signed terms)."""
    assert actual is not None, f"{what}: no gradient"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, what
    scale = expected.abs().max() + 1e-30
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
    monkeypatch.setattr(ops, "_BWD_BUFFER_BYTES", n * 4 * 128)  # 128-column chunks: 3 passes
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
    lp, ent, _ = ops.linear_logprobs_fwd(h, weight, b, labels, 1.0, -100, True)
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
    lp, ent, _ = ops.linear_logprobs_fwd(*leaves, labels, 1 / temperature, -100, True)
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
    monkeypatch.setattr(ops, "_BWD_BUFFER_BYTES", 0)  # the smallest chunk: one vocabulary tile
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
@pytest.mark.parametrize("with_entropy", [True, False])
def test_stats_launcher_writes_every_output(with_entropy):
    """(m, s, t, z_label) of every vocabulary split and row, for a weight slice starting at vocab_start."""
    n, hidden_size, vocab, vocab_start, inv_t = 150, 24, 300, 7, 0.8
    hidden, weight, b, _ = _inputs((n,), hidden_size, vocab, torch.float32, TRITON_DEVICE)
    labels = torch.randint(0, vocab + 2 * vocab_start, (n,), device=TRITON_DEVICE)  # some off this slice
    cfg = ops._launch_config(n, vocab, hidden_size, torch.float32, hidden.device)
    assert cfg.vocab_splits > 1 and n > cfg.block_n  # several splits and row blocks
    partials = torch.full((4, cfg.vocab_splits, n), float("nan"), device=TRITON_DEVICE)
    ops._launch_stats_out(partials, hidden, weight, b, labels, inv_t, vocab_start, with_entropy)

    z = (hidden.double() @ weight.double().T + b.double()).cpu() * inv_t
    local = labels.cpu() - vocab_start
    span = cfg.tiles_per_split * cfg.block_v
    for split in range(cfg.vocab_splits):
        zk = z[:, split * span : (split + 1) * span]
        m = zk.amax(dim=1)
        e = (zk - m[:, None]).exp()
        t = (e * (zk - m[:, None])).sum(dim=1) if with_entropy else torch.zeros(n, dtype=torch.float64)
        col = local - split * span
        hit = (col >= 0) & (col < zk.shape[1])
        z_label = torch.where(hit, zk.gather(1, col.clamp(0, zk.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        for got, want, name in zip(partials[:, split], (m, e.sum(dim=1), t, z_label), "mstz", strict=True):
            assert not bool(got.isnan().any()), f"split {split}: {name} not written everywhere"
            _assert_close(got, want, 2e-5, f"split {split} {name}")


@pytest.mark.parametrize("with_grad_entropy", [True, False])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_bwd_launcher_writes_every_output(monkeypatch, needs, with_grad_entropy):
    """d_hidden, d_weight and d_bias over three vocabulary chunks and two row blocks, against G in float64."""
    n, hidden_size, vocab, inv_t = 150, 24, 300, 1.25
    monkeypatch.setattr(ops, "_BWD_BUFFER_BYTES", 0)
    cfg = ops._launch_config(n, vocab, hidden_size, torch.float32, torch.device(TRITON_DEVICE))
    assert cfg.bwd_chunk_v < vocab and n > cfg.block_n  # several chunks and row blocks
    hidden, weight, b, labels = _inputs((n,), hidden_size, vocab, torch.float32, TRITON_DEVICE)
    h64, w64, labels_cpu = hidden.double().cpu(), weight.double().cpu(), labels.cpu()
    z = (h64 @ w64.T + b.double().cpu()) * inv_t
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=-1)
    g = torch.randn(n, dtype=torch.float64)
    eta = torch.randn(n, dtype=torch.float64) if with_grad_entropy else torch.zeros(n, dtype=torch.float64)
    ignored = labels_cpu == -100
    onehot = torch.nn.functional.one_hot(labels_cpu.clamp(min=0), vocab).double()
    G = inv_t * (g[:, None] * (onehot - p) - eta[:, None] * p * (log_p + entropy[:, None]))
    G[ignored] = 0.0

    grads = cpu_ops.empty_grads(hidden, weight, b, *needs)
    for out in grads:
        out.fill_(float("nan"))
    to = lambda t: t.float().to(TRITON_DEVICE)  # noqa: E731
    grad_entropy = to(eta) if with_grad_entropy else hidden.new_empty(0)
    ops._launch_bwd_out(*grads, to(g), grad_entropy, hidden, weight, b, labels, to(torch.logsumexp(z, -1)),
                        to(entropy), inv_t, -100, 0)
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
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(change, error, message):
    args = _good()
    args.update(change)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=message):
        linear_logprobs(hidden, weight, labels, **args)


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
            lp, ent, _ = ops.linear_logprobs_fwd(h, w, b, labels, 1.25, -100, True)
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
        _, ent, lse = ops.linear_logprobs_fwd(h, w, b, labels, 1.0, -100, True)
        for needs in ((True, True, True), (False, True, False)):
            args = (torch.randn(6), torch.randn(6), h, w, b, labels, lse, ent, 1.0, -100, 0, 13, *needs)
            torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd.default, args)
            torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd_torch.default,
                                  args[:10] + (0,) + needs)


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

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fixed mmap threshold makes glibc return every freed chunk at once (no dynamic threshold, no page
    # reuse hidden inside the heap), so the resident-set rise is the live memory's peak.
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_two_processes(monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    context = mp.spawn(_tp_worker, args=(2, _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail("vocabulary-parallel workers did not finish within 240 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, 9)


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
