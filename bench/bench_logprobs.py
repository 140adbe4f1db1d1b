"""Per-token log-probs (and entropy) from logits: ours vs the textbook eager idiom (log_softmax of the fp32
logits, then gather; with verl's entropy_from_logits for "+entropy"), torch.compile of it, Liger.

Ours: the Triton kernels of ``rlhf_kernels/ops/logprobs.py`` on CUDA, the chunked PyTorch path of
``rlhf_kernels/ops/cpu/logprobs.py`` on CPU.  The eager idioms come from ``bench/baselines/logprobs.py``
(the tests import the same ones).  Each implementation is checked against eager before it is timed.

Minimal traffic: forward reads the logits once (N·V·b bytes); backward reads them once and writes the
gradient once (2·N·V·b); forward+backward 3·N·V·b.  O(N) terms are ignored.
"""

from __future__ import annotations

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.logprobs import logprobs_from_logits

from .baselines import logprobs as peers
from .harness import Bench

FAMILY = "logprobs"


def _shapes(bench: Bench) -> list[tuple[int, int, torch.dtype]]:
    if bench.device.type == "cuda":
        if bench.quick:
            return [(4096, 151936, torch.bfloat16)]
        return [
            (16384, 151936, torch.bfloat16),
            (16384, 128256, torch.bfloat16),
            (4096, 151936, torch.float32),
        ]
    if bench.quick:
        return [(512, 151936, torch.float32)]
    return [(2048, 151936, torch.float32), (2048, 151936, torch.bfloat16)]


def _liger_logprobs():
    """Liger's cross entropy with reduction='none' gives −log p[label]; None when not installed."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        return None
    return lambda logits, labels: -liger_cross_entropy(logits, labels, reduction="none")


def _eager_with_entropy(logits: torch.Tensor, labels: torch.Tensor):
    return peers.eager_logprobs(logits, labels), peers.verl_entropy_from_logits(logits.float())


def _ours_with_entropy(logits: torch.Tensor, labels: torch.Tensor):
    return logprobs_from_logits(logits, labels, return_entropy=True)


def _ours(logits: torch.Tensor, labels: torch.Tensor):
    return logprobs_from_logits(logits, labels)


def _check_against(reference, fn, logits: torch.Tensor, labels: torch.Tensor, impl: str) -> None:
    """Raises unless ``fn`` gives the reference's outputs: 1e-4 for fp32 results (a log-sum-exp over
    V ~ 1e5 terms), one half-precision rounding for outputs in bf16/fp16."""
    with torch.no_grad():
        got, want = fn(logits, labels), reference(logits, labels)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want, strict=True):
        tol = 1e-4 if g.dtype in (torch.float32, torch.float64) else 2**-7
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=lambda m: f"{impl}: {m}")


def _case(bench: Bench, case: str, impls: dict, logits: torch.Tensor, labels: torch.Tensor,
          bytes_per_pass: int) -> None:
    """Checks and times every implementation; the first is the case's baseline and reference."""
    baseline, reference = next(iter(impls.items()))
    for impl, fn in impls.items():
        _modes(bench, case, impl, fn, logits, labels, bytes_per_pass, None if impl == baseline else baseline,
               reference)


def _modes(bench: Bench, case: str, impl: str, fn, logits: torch.Tensor, labels: torch.Tensor,
           bytes_per_pass: int, baseline: str | None, reference) -> None:
    """Checks ``fn`` against ``reference``, then times its forward, backward (graph retained) and
    forward+backward."""
    _check_against(reference, fn, logits, labels, impl)
    x = logits.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(x, labels)

    def loss_of(out):
        return sum(o.float().sum() for o in out) if isinstance(out, tuple) else out.float().sum()

    def fwd_bwd():
        loss_of(fn(x, labels)).backward()
        grad, x.grad = x.grad, None
        return grad  # alive until the memory probe has read its peak

    bench.measure(FAMILY, case, impl, "fwd", forward, bytes_moved=bytes_per_pass, baseline=baseline)
    retained = loss_of(fn(x, labels))

    def backward():
        retained.backward(retain_graph=True)
        grad, x.grad = x.grad, None
        return grad

    bench.measure(FAMILY, case, impl, "bwd", backward, bytes_moved=2 * bytes_per_pass, baseline=baseline,
                  memory=False)
    retained = None  # frees the graph before the next measurement
    bench.measure(FAMILY, case, impl, "fwd+bwd", fwd_bwd, bytes_moved=3 * bytes_per_pass, baseline=baseline)


def run(bench: Bench) -> None:
    previous = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(False)  # the label range check syncs; timed code must not
    try:
        for n, vocab, dtype in _shapes(bench):
            logits = torch.randn(n, vocab, device=bench.device, dtype=torch.float32).mul_(2).to(dtype)
            labels = torch.randint(0, vocab, (n,), device=bench.device)
            bytes_per_pass = logits.numel() * logits.element_size()
            dtype_name = str(dtype).replace("torch.", "")
            case = f"N={n} V={vocab} {dtype_name}"
            impls = {"eager log_softmax+gather": peers.eager_logprobs}
            if bench.device.type == "cuda":
                if bench.compile_baselines:  # off with --compile-baselines none (bench/gpu_validate.sh)
                    impls["torch.compile(eager)"] = torch.compile(peers.eager_logprobs)
                liger = _liger_logprobs()
                if liger is not None:
                    impls["liger cross_entropy"] = liger
            impls["rlhf_kernels"] = _ours
            _case(bench, case, impls, logits, labels, bytes_per_pass)
            impls_h = {
                "eager log_softmax+gather + verl entropy_from_logits(fp32)": _eager_with_entropy,
                "rlhf_kernels": _ours_with_entropy,
            }
            _case(bench, case + " +entropy", impls_h, logits, labels, bytes_per_pass)
            del logits, labels
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        _dispatch.set_index_checks(previous)
