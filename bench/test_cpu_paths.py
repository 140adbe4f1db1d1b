"""CPU-path benchmarks through pytest-benchmark (not part of the test suite; `make bench-cpu`).

    python -m pytest bench/test_cpu_paths.py --benchmark-only

Each benchmark also records the peak resident-set rise of one call in ``extra_info`` (MiB).
"""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _dispatch

from .baselines import logprobs as peers
from .harness import cpu_peak_rss_rise

N, V = 2048, 151936


@pytest.fixture(scope="module")
def logits_labels():
    torch.manual_seed(0)
    return torch.randn(N, V), torch.randint(0, V, (N,))


def _fwd_bwd(fn, logits, labels):
    x = logits.detach().requires_grad_()

    def step():
        out = fn(x, labels)
        out.sum().backward()
        grad, x.grad = x.grad, None
        return grad

    return step


@pytest.mark.parametrize("impl", ["eager", "rlhf_kernels"])
def test_logprobs_fwd_bwd(benchmark, logits_labels, impl):
    logits, labels = logits_labels
    fn = peers.eager_logprobs if impl == "eager" else rk.logprobs_from_logits
    step = _fwd_bwd(fn, logits, labels)
    with _dispatch.use_backend("torch"):
        benchmark.extra_info["peak_rss_rise_mib"] = cpu_peak_rss_rise(step) / 2**20
        benchmark.extra_info["logits_mib"] = logits.numel() * 4 / 2**20
        benchmark.pedantic(step, rounds=3, iterations=1)
