"""GAE: ours vs verl's and OpenRLHF's eager loops and torch.compile of verl's loop.

Minimal traffic (fp32 rewards and values, bool mask): read B·T·(4 + 4 + 1) bytes, write the fp32
advantages and returns, 2·B·T·4 bytes.

On CPU the C++ kernel (csrc/gae.cpp, the default there) and the PyTorch scan run; on CUDA the Triton
scan (the default), the CUDA kernel (csrc/gae_cuda.cu) and the PyTorch scan.  torch.compile of the
loop unrolls T iterations into one graph; its compile time grows with T, so it is measured only up to
``RLHF_KERNELS_BENCH_COMPILE_MAX_T`` (default 128 on CPU, where compiling the 128-step loop took
160 s on the 2-core machine, and 1024 on CUDA).
"""

from __future__ import annotations

import os

import torch

from rlhf_kernels import _dispatch, _ext
from rlhf_kernels.ops.gae import compute_gae

from .baselines import gae as peers
from .harness import Bench

FAMILY = "gae"
GAMMA, LAM = 0.99, 0.95


def shapes(bench: Bench) -> list[tuple[int, int]]:
    """[B, T] cases, shared with the whitening and token-reward benchmarks."""
    if bench.device.type == "cpu" and bench.quick:
        return [(8, 128), (64, 1024)]
    return [(8, 128), (64, 1024), (256, 4096), (1024, 8192)]


def inputs(B: int, T: int, device: torch.device):
    """fp32 rewards and values, a bool mask with right padding of random lengths (≥ 1 valid token)."""
    gen = torch.Generator().manual_seed(B * 100003 + T)
    rewards = torch.randn(B, T, generator=gen).to(device)
    values = torch.randn(B, T, generator=gen).to(device)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return rewards, values, mask


def _with_backend(backend: str, fn):
    def run():
        with _dispatch.use_backend(backend):
            return fn()

    return run


def _our_backends(device: torch.device) -> list[str]:
    if device.type == "cuda":
        names = ["triton"]
        if _ext.unavailable_reason(FAMILY, "cuda") is None:
            names.append("cuda")
        return names + ["torch"]
    names = ["cpp"] if _ext.unavailable_reason(FAMILY, "cpp") is None else []
    return names + ["torch"]


def _compile_max_t(device: torch.device) -> int:
    default = 1024 if device.type == "cuda" else 128
    return int(os.environ.get("RLHF_KERNELS_BENCH_COMPILE_MAX_T", default))


def _bench_gae(bench: Bench, B: int, T: int) -> None:
    rewards, values, mask = inputs(B, T, bench.device)
    case = f"gae B={B} T={T}"
    traffic = B * T * (4 + 4 + 1) + 2 * B * T * 4
    bench.measure(FAMILY, case, "verl_loop", "fwd", lambda: peers.verl_gae(rewards, values, mask, GAMMA, LAM),
                  bytes_moved=traffic)
    bench.measure(FAMILY, case, "openrlhf_loop", "fwd",
                  lambda: peers.openrlhf_get_advantages_and_returns(values, rewards, mask, GAMMA, LAM),
                  bytes_moved=traffic,
                  baseline="verl_loop")
    if T <= _compile_max_t(bench.device):
        compiled = torch.compile(peers.verl_gae)
        bench.measure(FAMILY, case, "torch.compile(verl_loop)", "fwd",
                      lambda: compiled(rewards, values, mask, GAMMA, LAM), bytes_moved=traffic,
                      baseline="verl_loop")
    backends = _our_backends(bench.device)
    for backend in backends:
        impl = "rlhf_kernels" if backend == backends[0] else f"rlhf_kernels[{backend}]"
        fn = _with_backend(backend, lambda: compute_gae(rewards, values, mask, GAMMA, LAM))
        bench.measure(FAMILY, case, impl, "fwd", fn, bytes_moved=traffic, baseline="verl_loop",
                      note=f"backend {backend}")


def run(bench: Bench) -> None:
    for B, T in shapes(bench):
        _bench_gae(bench, B, T)
