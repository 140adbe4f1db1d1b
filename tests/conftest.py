"""Test set-up shared by every test file.

Without a CUDA device, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set before triton is imported, i.e. before rlhf_kernels is.  With a CUDA device they run natively.
"""

import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from gpu_smoke import mark_smoke  # noqa: E402

import rlhf_kernels  # noqa: E402,F401  (imported after TRITON_INTERPRET is decided)
from rlhf_kernels import _dispatch  # noqa: E402

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def backend_device(backend: str) -> str:
    """Where tensors live to exercise ``backend``: Triton on CUDA when present, else interpreted."""
    if backend in ("triton", "cuda"):
        return TRITON_DEVICE if backend == "triton" else "cuda"
    return "cpu"


def assert_compiles_for_sm90(script: str) -> None:
    """Runs ``script`` (kernels through ``triton.compile`` for sm_90 with Triton's bundled ptxas, then
    ``print("compiled")``) in a process without TRITON_INTERPRET: no device needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def assert_close(actual, expected, tol, what):
    """|actual − expected| ≤ tol·(1 + |expected|) elementwise, compared in float64 on the CPU."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    err = (actual - expected).abs()
    bound = tol * (1 + expected.abs())
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g} (tol {tol:g})"


def assert_grad_close(actual, expected, tol, what):
    """|actual − expected| ≤ tol·(|expected| + max|expected|): gradients relative to their scale."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert actual.shape == expected.shape, what
    scale = expected.abs().max() + 1e-30
    err = (actual - expected).abs()
    assert bool((err <= tol * (expected.abs() + scale)).all()), f"{what}: max error {err.max().item():.3g}"


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Runs the test once per backend, with that backend forced."""
    with _dispatch.use_backend(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """``pytest -m gpu_smoke``: the GPU smoke selection of tests/gpu_smoke.py (docs/gpu.md)."""
    mark_smoke(items)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(worker, world: int, what: str, monkeypatch, timeout_s: float = 240) -> None:
    """Runs ``worker(rank, world, port)`` in ``world`` spawned processes (gloo over loopback on a free
    port); a worker's exception fails the test, and so does not finishing within ``timeout_s``."""
    import time

    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    context = mp.spawn(worker, args=(world, _free_port()), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"{what} workers did not finish within {timeout_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, 9)
