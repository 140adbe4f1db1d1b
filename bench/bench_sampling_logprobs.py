"""Log-probs renormalised over the sampler's kept set (top-k / top-p): ours vs vLLM's sort-based idiom
(sort the row, mask top-k and top-p on the sorted copy, scatter back, log_softmax, gather), the one
definition in ``bench/baselines/sampling_logprobs.py`` that the tests also check the kept set against.

Ours: the Triton kernels of ``rlhf_kernels/ops/sampling_logprobs.py`` on CUDA (a radix search over the
row, no sort), the PyTorch path of ``rlhf_kernels/ops/cpu/sampling_logprobs.py`` on CPU (torch.topk
leaders, then a mass histogram for a wide nucleus).  Labels are drawn from vLLM's masked
distribution, as a rollout's tokens are, and each implementation is checked against the baseline
before it is timed.

Minimal traffic: forward reads the logits once (N·V·b bytes); backward reads them once and writes the
gradient once (2·N·V·b).  The kernels' forward reads the row at most 2 + 8·[top-k] + 8·[top-p] times
(``python -m bench.sampling_logprobs_passes`` counts them on these logits).
"""

from __future__ import annotations

import itertools

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.sampling_logprobs import sampling_logprobs

from .baselines.sampling_logprobs import vllm_masked_logits, vllm_sampling_logprobs
from .harness import Bench

FAMILY = "sampling_logprobs"
TEMPERATURE = 0.8
SETTINGS = {"top_p=0.9": (0, 0.9), "top_k=50 top_p=0.9": (50, 0.9), "top_k=50": (50, 1.0)}


def _shapes(bench: Bench) -> list[tuple[int, int, torch.dtype]]:
    if bench.device.type == "cuda":
        if bench.quick:
            return [(4096, 151936, torch.bfloat16)]
        return [(16384, 151936, torch.bfloat16), (4096, 151936, torch.float32)]
    # a CPU sort of a 151936-entry row takes milliseconds: few rows keep the run short
    return [(16 if bench.quick else 64, 151936, torch.float32)]


def _logits(n: int, vocab: int, dtype: torch.dtype, device: torch.device, peaked: bool) -> torch.Tensor:
    """N(0, 2²) logits (a wide nucleus: top-p 0.9 keeps ~17k of 151936 tokens at τ = 0.8), or peaked
    ones, closer to a language model's next-token distribution: N(0, 1.5²) plus 10 + U(0, 8) on 32
    random tokens per row (the other 151904 tokens hold ~1% of the mass; top-p 0.9 keeps a few)."""
    logits = torch.randn(n, vocab, device=device, dtype=torch.float32).mul_(1.5 if peaked else 2.0)
    if peaked:
        favourites = torch.randint(0, vocab, (n, 32), device=device)
        logits.scatter_add_(1, favourites, torch.rand(n, 32, device=device).mul_(8).add_(10))
    return logits.to(dtype)


def _check(logits: torch.Tensor, labels: torch.Tensor, top_k: int, top_p: float) -> None:
    """Ours equals vLLM's processed log-probs (fp32 logits: no ties, so the sort order cannot matter)."""
    with torch.no_grad():
        ours = sampling_logprobs(logits, labels, temperature=TEMPERATURE, top_k=top_k, top_p=top_p)
        want = vllm_sampling_logprobs(logits, labels, TEMPERATURE, top_k, top_p)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"sampling_logprobs: {m}")


def _modes(bench: Bench, case: str, impl: str, fn, logits: torch.Tensor, bytes_per_pass: int,
           baseline: str | None) -> None:
    x = logits.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(x)

    def fwd_bwd():
        fn(x).sum().backward()
        grad, x.grad = x.grad, None
        return grad

    bench.measure(FAMILY, case, impl, "fwd", forward, bytes_moved=bytes_per_pass, baseline=baseline)
    bench.measure(FAMILY, case, impl, "fwd+bwd", fwd_bwd, bytes_moved=3 * bytes_per_pass, baseline=baseline)


def run(bench: Bench) -> None:
    previous = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(False)  # the label range check syncs; timed code must not
    try:
        for (n, vocab, dtype), peaked, (setting, (top_k, top_p)) in itertools.product(
            _shapes(bench), (True, False), SETTINGS.items()
        ):
            logits = _logits(n, vocab, dtype, bench.device, peaked)
            bytes_per_pass = logits.numel() * logits.element_size()
            probs = vllm_masked_logits(logits, TEMPERATURE, top_k, top_p).softmax(-1)
            labels = torch.multinomial(probs, 1).squeeze(-1)
            del probs
            if dtype == torch.float32:
                _check(logits, labels, top_k, top_p)
            kind = "peaked" if peaked else "randn"
            case = f"N={n} V={vocab} {str(dtype).replace('torch.', '')} {kind} {setting}"
            base = "vLLM sort + mask + log_softmax"
            impls = {
                base: lambda x, k=top_k, p=top_p, y=labels: vllm_sampling_logprobs(x, y, TEMPERATURE, k, p),
                "rlhf_kernels": lambda x, k=top_k, p=top_p, y=labels: sampling_logprobs(
                    x, y, temperature=TEMPERATURE, top_k=k, top_p=p
                ),
            }
            for impl, fn in impls.items():
                _modes(bench, case, impl, fn, logits, bytes_per_pass, None if impl == base else base)
            del logits
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        _dispatch.set_index_checks(previous)
