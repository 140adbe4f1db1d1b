"""Per-token statistics from logits: the cost of each extra output of ``token_stats_from_logits`` over
plain log-probs (``logprobs_from_logits``, the baseline of every row), forward and forward+backward.

Ours: the Triton kernels of ``rlhf_kernels/ops/token_stats.py`` on CUDA, the chunked PyTorch path of
``rlhf_kernels/ops/cpu/token_stats.py`` on CPU.  Each variant's log-probs are checked against the
baseline's before it is timed.

Minimal traffic, every variant: forward reads the logits once (N·V·b bytes); backward reads them once
and writes the gradient once (2·N·V·b).  O(N·k) terms are ignored.
"""

from __future__ import annotations

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels.ops.logprobs import logprobs_from_logits
from rlhf_kernels.ops.token_stats import token_stats_from_logits

from .harness import Bench

FAMILY = "token_stats"
BASELINE = "logprobs_from_logits"
# variant name -> options of token_stats_from_logits
VARIANTS = {
    "logprobs only": {},
    "+sum_sq_probs": {"sum_sq_probs": True},
    "+top1_match +mean_logit": {"top1_match": True, "mean_logit": True},
    "+softcap 30": {"softcap": 30.0},
    "+top_k 8": {"top_k": 8},
    "+top_k 64": {"top_k": 64},
    "everything (entropy, softcap, k=64)": {
        "entropy": True, "sum_sq_probs": True, "top1_match": True, "mean_logit": True, "softcap": 30.0,
        "top_k": 64,
    },
}


def _shapes(bench: Bench) -> list[tuple[int, int, torch.dtype]]:
    if bench.device.type == "cuda":
        return [(4096, 151936, torch.bfloat16)] if bench.quick else [(16384, 151936, torch.bfloat16)]
    return [(256, 151936, torch.float32)] if bench.quick else [(1024, 151936, torch.float32)]


def _differentiable_sum(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.sum()
    fields = (out.logprobs, out.entropy, out.sum_sq_probs, out.mean_logit, out.topk_logprobs)
    return sum(f.sum() for f in fields if f is not None)


def _time(bench: Bench, case: str, impl: str, fn, logits: torch.Tensor, bytes_per_pass: int) -> None:
    x = logits.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(x)

    def fwd_bwd():
        _differentiable_sum(fn(x)).backward()
        grad, x.grad = x.grad, None
        return grad

    baseline = None if impl == BASELINE else BASELINE
    bench.measure(FAMILY, case, impl, "fwd", forward, bytes_moved=bytes_per_pass, baseline=baseline)
    bench.measure(FAMILY, case, impl, "fwd+bwd", fwd_bwd, bytes_moved=3 * bytes_per_pass, baseline=baseline)


def run(bench: Bench) -> None:
    previous = _dispatch.index_checks_enabled()
    _dispatch.set_index_checks(False)  # the label range check syncs; timed code must not
    try:
        for n, vocab, dtype in _shapes(bench):
            logits = torch.randn(n, vocab, device=bench.device).mul_(2).to(dtype)
            labels = torch.randint(0, vocab, (n,), device=bench.device)
            case = f"N={n} V={vocab} {str(dtype).replace('torch.', '')}"
            bytes_per_pass = logits.numel() * logits.element_size()
            plain = logprobs_from_logits(logits, labels)
            # the closures bind this iteration's labels / name / options as defaults: they must not see
            # the loop's later rebinding, nor the ``del`` below
            _time(
                bench, case, BASELINE, lambda x, y=labels: logprobs_from_logits(x, y), logits, bytes_per_pass
            )
            for name, options in VARIANTS.items():
                if "softcap" not in options:  # the soft cap changes the log-probs themselves
                    got = token_stats_from_logits(logits, labels, **options).logprobs
                    torch.testing.assert_close(
                        got, plain, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
                    )
                _time(
                    bench, case, name,
                    lambda x, y=labels, o=options: token_stats_from_logits(x, y, **o),
                    logits, bytes_per_pass,
                )
            del logits, labels, plain
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        _dispatch.set_index_checks(previous)
