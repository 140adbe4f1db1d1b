"""The C++/CUDA extension loader: lazy JIT build, cache, fallback with one warning, nvcc compile check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

from rlhf_kernels import _dispatch, _ext
from rlhf_kernels.ops.gae import compute_gae
from rlhf_kernels.reference import gae as ref

CSRC = Path(_ext.__file__).resolve().parent.parent / "csrc"


@pytest.fixture
def fresh_ext(monkeypatch):
    """Forget loaded extensions before and after (so later tests load the real build again)."""
    _ext._reset()
    yield monkeypatch
    monkeypatch.undo()
    _ext._reset()


def test_cpp_extension_builds_loads_and_is_cached():
    # Built on first use in this session when the cache is cold (about a minute); a failure fails here.
    reason = _ext.unavailable_reason("gae", "cpp")
    assert reason is None, reason
    module = _ext.load("cpp")
    assert hasattr(module, "gae_forward")
    start = time.perf_counter()
    for _ in range(1000):
        assert _ext.unavailable_reason("gae", "cpp") is None
        _dispatch.backend_for("gae", "cpu")
    assert time.perf_counter() - start < 0.5  # a dictionary look-up per call once loaded


def test_families_without_extension_kernels():
    assert "no cpp extension kernel" in _ext.unavailable_reason("logprobs", "cpp")
    assert "no cuda extension kernel" in _ext.unavailable_reason("kl", "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given where torch has no CUDA device")
def test_cuda_extension_unavailable_without_cuda():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an expected absence: no warning
        assert "CUDA" in _ext.unavailable_reason("gae", "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_extension_builds_and_matches_oracle():
    reason = _ext.unavailable_reason("gae", "cuda")
    assert reason is None, reason
    rewards = torch.randn(5, 3000, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(5, 3000, device="cuda")
    mask = torch.rand(5, 3000, device="cuda") < 0.8
    mask[1] = False
    for mode in ("carry", "zero"):
        with _dispatch.use_backend("cuda"):
            got = compute_gae(rewards, values, mask, 0.99, 0.95, mask_mode=mode)
        expected = ref.compute_gae(rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95, mask_mode=mode)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.cpu().double(), e, rtol=1e-4, atol=1e-4)


def test_no_build_or_load_at_import():
    code = (
        "import sys, rlhf_kernels\n"
        "from rlhf_kernels import _ext\n"
        "assert not _ext._loaded, _ext._loaded\n"
        "assert not any(name.startswith('rlhf_kernels_cpp') for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_failure_warns_once_and_falls_back(fresh_ext, tmp_path):
    broken = tmp_path / "csrc"
    broken.mkdir()
    for name in {name for names in _ext._SOURCES.values() for name in names} | set(_ext._HEADERS):
        (broken / name).write_text("#error deliberately broken source\n")
    fresh_ext.setenv("RLHF_KERNELS_CSRC", str(broken))
    fresh_ext.setenv("RLHF_KERNELS_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="could not be built or loaded") as record:
        reason = _ext.unavailable_reason("gae", "cpp")
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert reason is not None and "cpp extension could not be built" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second build, no second warning
        assert _ext.unavailable_reason("gae", "cpp") == reason
        assert _dispatch.backend_for("gae", "cpu") == "torch"
        rewards, values = torch.randn(3, 9), torch.randn(3, 9)
        mask = torch.rand(3, 9) < 0.7
        got = compute_gae(rewards, values, mask, 0.9, 0.9)
    expected = ref.compute_gae(rewards, values, mask, 0.9, 0.9)
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-5)
    with _dispatch.use_backend("cpp"), pytest.raises(RuntimeError, match="could not be built"):
        compute_gae(rewards, values, mask)


def test_missing_sources_warn_once(fresh_ext, tmp_path):
    fresh_ext.setenv("RLHF_KERNELS_CSRC", str(tmp_path / "nowhere"))
    with pytest.warns(RuntimeWarning, match="sources not found"):
        assert "sources not found" in _ext.unavailable_reason("gae", "cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.backend_for("gae", "cpu") == "torch"


def test_disabled_by_environment(fresh_ext):
    fresh_ext.setenv("RLHF_KERNELS_EXT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "disabled" in _ext.unavailable_reason("gae", "cpp")
        assert _dispatch.backend_for("gae", "cpu") == "torch"


def test_cpp_kernel_direct_call_checks_arguments():
    module = _ext.load("cpp")
    with pytest.raises(RuntimeError, match="rewards must be 2-D"):
        module.gae_forward(torch.randn(4), torch.randn(4), torch.ones(4), 1.0, 1.0, True)
    with pytest.raises(RuntimeError, match="one shape"):
        module.gae_forward(torch.randn(2, 4), torch.randn(2, 5), torch.ones(2, 4), 1.0, 1.0, True)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        module.gae_forward(torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4, dtype=torch.complex64), 1.0,
                           1.0, True)


def test_cpp_kernel_many_rows_in_parallel():
    """More rows than one group of 8 and one parallel grain: every row written, none mixed up."""
    rewards, values = torch.randn(203, 300), torch.randn(203, 300)
    mask = torch.rand(203, 300) < 0.8
    advantages, returns = _ext.load("cpp").gae_forward(rewards, values, mask, 0.99, 0.95, True)
    expected = ref.compute_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(advantages.double(), expected[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(returns.double(), expected[1], rtol=1e-5, atol=2e-5)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """The torch-independent CUDA kernel compiles with plain nvcc (no GPU needed), warnings as errors."""
    result = subprocess.run(
        ["nvcc", "-c", "-O3", "-arch=sm_90", "-std=c++17", "-Xcompiler", "-Wall,-Werror", f"-I{CSRC}",
         str(CSRC / "gae_cuda.cu"), "-o", str(tmp_path / "gae_cuda.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "gae_cuda.o").stat().st_size > 0


def test_find_cuda_home_follows_a_wrapper_script(tmp_path):
    """/usr/local/bin/nvcc as a wrapper script running the toolkit's nvcc: torch's guess (the folder above
    bin/, /usr/local) has no headers; the toolkit named in the script is found instead."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert _ext.find_cuda_home({}, which=lambda _: str(wrapper)) == toolkit
    assert _ext.find_cuda_home({"CUDA_HOME": str(toolkit)}, which=lambda _: None) == toolkit


def test_find_cuda_home_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(RuntimeError, match="is not a CUDA toolkit"):
        _ext.find_cuda_home({"CUDA_HOME": str(tmp_path)}, which=lambda _: None)
    lonely = tmp_path / "bin" / "nvcc"
    lonely.parent.mkdir()
    lonely.write_text("")
    with pytest.raises(RuntimeError, match="set CUDA_HOME"):
        _ext.find_cuda_home({}, which=lambda _: str(lonely), default_roots=())


def test_setup_builds_the_sources_the_loader_builds():
    """setup.py (which imports nothing of the package) lists the C++ CPU sources again: the same ones."""
    import ast

    tree = ast.parse((CSRC.parent / "setup.py").read_text())
    listed = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_CPU_SOURCES"
    )
    assert tuple(listed) == _ext._SOURCES["cpp"]
    assert all((CSRC / name).is_file() for names in _ext._SOURCES.values() for name in names)


def test_large_outputs_recycle_their_blocks_and_release_frees_them():
    """csrc/cpu_common.h: a freed output of >= 4 MiB is kept and reused for the next one of that size (no
    page faults from the second training step on); release_cpu_cache() frees what is kept."""
    module = _ext.load("cpp")
    assert module is not None
    from rlhf_kernels.ops.cpu.policy_losses import _cpp_bwd

    lp, old, adv = torch.randn(512, 2048), torch.randn(512, 2048), torch.randn(512, 2048)  # 4 MiB gradient
    mask = torch.ones(512, 2048, dtype=torch.bool)
    g = torch.ones(512, 1)
    _ext.release_cpu_cache()
    first = _cpp_bwd(g, lp, old, adv, mask, None, None, "gpg", [])
    address = first.data_ptr()
    assert address % (1 << 21) == 0  # huge-page aligned
    torch.testing.assert_close(first, -adv)
    del first
    assert module.cached_output_bytes() == 4 << 20
    second = _cpp_bwd(g, lp, old, adv, mask, None, None, "gpg", [])
    assert second.data_ptr() == address and module.cached_output_bytes() == 0
    torch.testing.assert_close(second, -adv)  # fully rewritten: nothing of the old contents survives
    second.resize_(2, 3)  # an ordinary CPU tensor
    del second
    assert _ext.release_cpu_cache() == 4 << 20 and module.cached_output_bytes() == 0


def test_output_cache_can_be_turned_off(tmp_path):
    code = (
        "import torch\n"
        "from rlhf_kernels import _ext\n"
        "from rlhf_kernels.ops.cpu.policy_losses import _cpp_bwd\n"
        "x = torch.randn(512, 2048)\n"
        "g = _cpp_bwd(torch.ones(512, 1), x, x, x, x > 0, None, None, 'gpg', [])\n"
        "del g\n"
        "assert _ext.load('cpp').cached_output_bytes() == 0\n"
    )
    env = dict(os.environ, RLHF_KERNELS_CPU_CACHE_MB="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
