"""Log-probs (and entropy) from hidden states: ours vs the eager lm_head + log_softmax idiom, torch.compile
of it, and Liger's fused linear cross entropy where installed.

Work: the forward is one [N, H] x [H, V] product (2·N·H·V flop); forward+backward needs three (6·N·H·V:
logits, d_hidden = G·W, d_weight = Gᵀ·h).  TFLOP/s are reported against those counts ("effective": our
backward also recomputes the logits, 8·N·H·V in all).  On CUDA the three bf16 products themselves are
timed in the same run (cuBLAS, on a materialised [N, V] G), and each fwd+bwd row's note gives its time as
a multiple of theirs, and its peak memory as a fraction of eager's.  Before a shape is timed, ours is
checked against the float64 oracle (rlhf_kernels.reference) on its first rows.

Issue 15 cases, ours against ours: the extra statistics of ``linear_token_stats`` (Σp², top-1 match, mean
logit; target ≤ 10% over plain log-probs; the top-8 log-probs and tokens), labelled rows only (half the
labels ``ignore_index``: the time
should roughly halve) and ``batch_invariant=True``, each with plain ``linear_logprobs`` as the baseline.
"""

from __future__ import annotations

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.linear_logprobs import linear_logprobs, linear_token_stats
from rlhf_kernels.reference import linear_logprobs as reference

from .baselines import linear_logprobs as peers
from .harness import Bench

FAMILY = "linear_logprobs"


def _shapes(bench: Bench) -> list[tuple[int, int, int, torch.dtype]]:
    """(N tokens, H, V, dtype)."""
    if bench.device.type == "cuda":
        if bench.quick:
            return [(4096, 4096, 151936, torch.bfloat16)]
        return [(16384, 4096, 151936, torch.bfloat16)]
    if bench.quick:
        return [(256, 256, 32000, torch.float32)]
    return [(1024, 512, 32000, torch.float32)]  # CPU bf16 products are emulated on most CPUs: fp32 only


def _ours(with_entropy: bool):
    return lambda hidden, weight, labels: linear_logprobs(hidden, weight, labels, return_entropy=with_entropy)


def _eager(with_entropy: bool):
    return lambda hidden, weight, labels: peers.eager_linear_logprobs(
        hidden, weight, labels, return_entropy=with_entropy
    )


def _stats(hidden, weight, labels):
    """Log-probs plus the three statistics of issue 15 item 1 in the same pass."""
    out = linear_token_stats(hidden, weight, labels, sum_sq_probs=True, top1_match=True, mean_logit=True)
    return out.logprobs, out.sum_sq_probs, out.mean_logit


def _topk(hidden, weight, labels):
    """Log-probs plus the 8 most likely tokens' log-probs (differentiable) and ids (issue 15 item 1)."""
    out = linear_token_stats(hidden, weight, labels, top_k=8)
    return out.logprobs, out.topk_logprobs


def _invariant(hidden, weight, labels):
    return linear_logprobs(hidden, weight, labels, batch_invariant=True)


def _issue15_cases(bench: Bench, hidden, weight, labels, flops_fwd: int, name: str) -> None:
    """Ours with the issue 15 options against plain ours: extra statistics, labelled rows only,
    batch_invariant; each row's speedup is plain time / option time (below 1: the option costs)."""
    case = f"{name} issue-15 options"
    plain = "rlhf_kernels logprobs"
    _modes(bench, case, plain, _ours(False), hidden, weight, labels, flops_fwd, None)
    _modes(bench, case, "+ Σp², top-1, mean logit", _stats, hidden, weight, labels, flops_fwd, plain)
    _modes(bench, case, "+ top-8", _topk, hidden, weight, labels, flops_fwd, plain)
    _modes(bench, case, "batch_invariant", _invariant, hidden, weight, labels, flops_fwd, plain)
    half = labels.clone()
    half[::2] = -100
    _modes(bench, case, "half the labels ignored", _ours(False), hidden, weight, half, flops_fwd, plain)


def _check_against_oracle(hidden, weight, labels, rows: int = 32) -> None:
    """Raises unless ours matches the float64 oracle on the first ``rows`` tokens (values and d_hidden):
    a wrong kernel is never timed.  fp32 accumulation over H and V: 1e-4; d_hidden in the input dtype:
    one bf16 rounding at the gradient's scale (2⁻⁸) plus fp32 noise."""
    h = hidden[:rows].detach().requires_grad_()
    got = linear_logprobs(h, weight, labels[:rows], return_entropy=True)
    _loss(got).backward()
    h64 = hidden[:rows].detach().double().requires_grad_()
    want = reference.linear_logprobs(h64, weight.double(), labels[:rows], return_entropy=True)
    _loss(want).backward()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.detach(), rtol=1e-4, atol=1e-4)
    scale = h64.grad.abs().max().item()
    err = (h.grad.double() - h64.grad).abs().max().item()
    if err > 2 * 2**-8 * scale:
        raise AssertionError(f"linear_logprobs d_hidden: error {err:.3g} at gradient scale {scale:.3g}")


def _loss(out) -> torch.Tensor:
    return sum(o.float().sum() for o in out) if isinstance(out, tuple) else out.float().sum()


def _modes(bench: Bench, case: str, impl: str, fn, hidden, weight, labels, flops_fwd: int,
           baseline: str | None, fwd: bool = True):
    """Times forward (no grad) and forward+backward of ``fn``; returns the fwd+bwd row."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(h, w, labels)

    def fwd_bwd():
        h.grad = w.grad = None
        _loss(fn(h, w, labels)).backward()

    if fwd:
        bench.measure(FAMILY, case, impl, "fwd", forward, flops=flops_fwd, baseline=baseline)
    row = bench.measure(FAMILY, case, impl, "fwd+bwd", fwd_bwd, flops=3 * flops_fwd, baseline=baseline)
    h.grad = w.grad = None
    return row


def _three_products(bench: Bench, case: str, hidden, weight, flops_fwd: int):
    """The three bf16 products of forward+backward, cuBLAS, G materialised: the time to beat."""
    grad_logits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)

    def products():
        torch.mm(hidden, weight.T)
        torch.mm(grad_logits, weight)
        torch.mm(grad_logits.T, hidden)

    return bench.measure(FAMILY, case, "3 products (cuBLAS)", "fwd+bwd", products, flops=3 * flops_fwd,
                         memory=False, note="logits, d_hidden, d_weight")


def run(bench: Bench) -> None:
    _dispatch.set_index_checks(False)  # the label range check syncs; timed code must not
    try:
        for n, hidden_size, vocab, dtype in _shapes(bench):
            hidden = torch.randn(n, hidden_size, device=bench.device, dtype=dtype)
            weight = (torch.randn(vocab, hidden_size, device=bench.device) / hidden_size**0.5).to(dtype)
            labels = torch.randint(0, vocab, (n,), device=bench.device)
            flops_fwd = 2 * n * hidden_size * vocab
            dtype_name = str(dtype).replace("torch.", "")
            _check_against_oracle(hidden, weight, labels)
            on_cuda = bench.device.type == "cuda"
            for with_entropy in (False, True):
                case = f"N={n} H={hidden_size} V={vocab} {dtype_name}" + (" +entropy" if with_entropy else "")
                inputs = (hidden, weight, labels, flops_fwd)
                products = _three_products(bench, case, hidden, weight, flops_fwd) if on_cuda else None
                eager = "eager linear+log_softmax"
                eager_row = _modes(bench, case, eager, _eager(with_entropy), *inputs, None)
                if on_cuda and not with_entropy:
                    if bench.compile_baselines:  # off with --compile-baselines none
                        compiled = torch.compile(_eager(with_entropy))
                        _modes(bench, case, "torch.compile(eager)", compiled, *inputs, eager)
                    liger = peers.liger_fused_linear_cross_entropy()
                    if liger is not None:
                        _modes(bench, case, "liger fused linear CE", liger, *inputs, eager, fwd=False)
                ours = _modes(bench, case, "rlhf_kernels", _ours(with_entropy), *inputs, eager)
                notes = []
                if products is not None:
                    notes.append(f"{ours.median_ms / products.median_ms:.2f}x the 3 products")
                if ours.peak_mem_mb is not None and eager_row.peak_mem_mb:
                    notes.append(f"peak {ours.peak_mem_mb / eager_row.peak_mem_mb:.1%} of eager's")
                ours.note = "; ".join(notes)
                print(f"{'':>10} {case}: rlhf_kernels fwd+bwd {ours.note}", flush=True)
            shape = f"N={n} H={hidden_size} V={vocab} {dtype_name}"
            _issue15_cases(bench, hidden, weight, labels, flops_fwd, shape)
            del hidden, weight, labels
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        _dispatch.set_index_checks(True)


def issue15_ratios(n: int = 256, hidden_size: int = 256, vocab: int = 32000, repeats: int = 9) -> dict:
    """Median time of each issue-15 option over plain log-probs, forward and forward+backward, on the CPU
    path, the calls interleaved round-robin so that a machine shared with other jobs slows all alike
    (``python -m bench.bench_linear_logprobs``)."""
    import statistics
    import time

    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    half = labels.clone()
    half[::2] = -100
    options = {
        "plain": lambda: linear_logprobs(hidden, weight, labels),
        "+ Σp², top-1, mean": lambda: _stats(hidden, weight, labels),
        "entropy": lambda: linear_logprobs(hidden, weight, labels, return_entropy=True),
        "entropy + Σp², top-1, mean": lambda: tuple(o for o in linear_token_stats(
            hidden, weight, labels, entropy=True, sum_sq_probs=True, top1_match=True, mean_logit=True
        ) if o is not None),
        "top_k=8": lambda: _topk(hidden, weight, labels),
        "half the labels ignored": lambda: linear_logprobs(hidden, weight, half),
        "batch_invariant": lambda: _invariant(hidden, weight, labels),
    }
    times = {(name, mode): [] for name in options for mode in ("fwd", "fwd+bwd")}
    _dispatch.set_index_checks(False)
    try:
        with _dispatch.use_backend("torch"):
            for step in range(repeats + 1):
                for name, fn in options.items():
                    start = time.perf_counter()
                    with torch.no_grad():
                        fn()
                    middle = time.perf_counter()
                    _loss(fn()).backward()
                    end = time.perf_counter()
                    if step:  # the first round warms up
                        times[name, "fwd"].append(middle - start)
                        times[name, "fwd+bwd"].append(end - middle)
    finally:
        _dispatch.set_index_checks(True)
    medians = {key: statistics.median(value) for key, value in times.items()}
    return {key: (medians[key] * 1e3, medians[key] / medians["plain", key[1]]) for key in medians}


if __name__ == "__main__":
    for (name, mode), (ms, ratio) in issue15_ratios().items():
        print(f"{name:28s} {mode:8s} {ms:9.1f} ms  {ratio:5.2f}x plain")
