"""Loader of the C++ (CPU) and CUDA extensions built from the repository's ``csrc/``.

Nothing is built when ``rlhf_kernels`` is imported.  The first call that needs an extension (for
example ``compute_gae`` on a CPU tensor, whose "auto" backend is ``cpp``) builds it just in time with
``torch.utils.cpp_extension`` and ninja, into a cache folder keyed by a hash of the sources, the torch
and Python versions and (for CUDA) the GPU architecture:

    ${RLHF_KERNELS_CACHE:-~/.cache/rlhf_kernels}/<name>-<hash>/

Later calls in the same process cost a dictionary look-up; later processes import the cached shared
library directly (no compiler, no ninja), so only the first use on a machine pays for the build
(about 1.5 minutes on two cores for the CPU extension).  A module built at install time
(``RLHF_KERNELS_BUILD_EXT=1 pip install --no-build-isolation -e .``, see ``setup.py``) is used first
when it imports.

If an extension cannot be built or loaded, :func:`unavailable_reason` says why, ``warnings.warn`` is
issued once per extension, and the "auto" backend falls back to the next one (Triton or PyTorch);
nothing raises.  ``RLHF_KERNELS_EXT=0`` turns the extensions off without a warning.

Families with extension kernels: ``gae`` (``cpp`` and ``cuda``), ``policy_losses`` and ``ppo_losses``
(``cpp``: the token-level policy-loss core), ``advantages`` (``cpp``: the estimators' [B, T] passes).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

# backend -> (sources, module prebuilt by setup.py); headers are hashed too.
_SOURCES: dict[str, tuple[str, ...]] = {
    "cpp": ("cpu_bindings.cpp", "gae.cpp", "policy_losses.cpp", "policy_selection.cpp", "advantages.cpp"),
    "cuda": ("gae_cuda_binding.cpp", "gae_cuda.cu"),
}
_HEADERS = (
    "gae_common.h", "cpu_common.h", "cpu_lanes.h", "cephes.h", "gae.h", "policy_losses.h",
    "policy_losses_impl.h", "policy_selection.h", "advantages.h",
)
_PREBUILT = {"cpp": "rlhf_kernels._cpu_cpp", "cuda": "rlhf_kernels._gae_cuda"}
_FAMILIES: dict[str, tuple[str, ...]] = {
    "gae": ("cpp", "cuda"), "policy_losses": ("cpp",), "ppo_losses": ("cpp",), "advantages": ("cpp",),
}

# No -march=native: the cache folder may be shared by machines of different CPUs.  No fast-math: NaN
# must propagate.  -fopenmp makes at::parallel_for run in parallel (torch ships the OpenMP runtime).
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
CUDA_CFLAGS = ("-O3",)

_lock = threading.Lock()
_loaded: dict[str, tuple[ModuleType | None, str | None]] = {}


def csrc_dir() -> Path:
    """The C++/CUDA sources: ``$RLHF_KERNELS_CSRC`` or the repository's top-level ``csrc/``."""
    override = os.environ.get("RLHF_KERNELS_CSRC")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "csrc"


def cache_dir() -> Path:
    """Where JIT builds live: ``$RLHF_KERNELS_CACHE`` or ``~/.cache/rlhf_kernels``."""
    override = os.environ.get("RLHF_KERNELS_CACHE")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhf_kernels"


def _disabled() -> bool:
    return os.environ.get("RLHF_KERNELS_EXT", "1").strip().lower() in ("0", "false", "no", "off")


def _build_key(backend: str, sources: list[Path]) -> str:
    import torch

    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    flags = CFLAGS + LDFLAGS + (CUDA_CFLAGS if backend == "cuda" else ())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    digest.update(f"{sys.version_info[:2]}-{platform.machine()}-{sys.platform}".encode())
    if backend == "cuda":
        digest.update(str(torch.version.cuda).encode())
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or str(torch.cuda.get_device_capability())
        digest.update(arch.encode())
    return digest.hexdigest()[:16]


def _import_shared_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(backend: str) -> ModuleType:
    """Imports the prebuilt module, the cached JIT build, or builds it; raises on failure."""
    import torch

    if backend == "cuda" and (torch.version.cuda is None or not torch.cuda.is_available()):
        raise _Unavailable("torch has no CUDA device (the CUDA extension is built only where it runs)")
    try:
        return importlib.import_module(_PREBUILT[backend])
    except ImportError:
        pass
    root = csrc_dir()
    sources = [root / name for name in _SOURCES[backend]]
    headers = [root / name for name in _HEADERS]
    missing = [str(p) for p in sources + headers if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"C++/CUDA sources not found ({', '.join(missing)}); set RLHF_KERNELS_CSRC")
    name = f"rlhf_kernels_{backend}"
    key = _build_key(backend, sources + headers)
    build_dir = cache_dir() / f"{name}-{key}"
    suffixes = importlib.machinery.EXTENSION_SUFFIXES + [".so"]
    for suffix in suffixes:
        built = build_dir / f"{name}{suffix}"
        if built.is_file():
            try:
                return _import_shared_library(name, built)
            except ImportError:
                break  # e.g. a concurrent build still writing it: let the builder take its lock
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    if backend == "cuda":
        # torch resolved CUDA_HOME when cpp_extension was imported, from nvcc's folder; use the checked one
        cuda_home = str(find_cuda_home())
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
    return cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        extra_cuda_cflags=list(CUDA_CFLAGS),
        extra_include_paths=[str(root)],
        build_directory=str(build_dir),
        with_cuda=backend == "cuda",
        verbose=os.environ.get("RLHF_KERNELS_EXT_VERBOSE", "0") == "1",
    )


def _has_toolkit(root: Path) -> bool:
    return (root / "include" / "cuda_runtime.h").is_file() and (root / "bin" / "nvcc").exists()


def find_cuda_home(
    environ: dict[str, str] | None = None,
    which=None,
    default_roots: tuple[Path, ...] = (Path("/usr/local/cuda"),),
) -> Path:
    """The CUDA toolkit root the CUDA extension builds against (the folder with ``bin/nvcc`` and
    ``include/cuda_runtime.h``), found the way ``torch.utils.cpp_extension`` looks for it, but checked.

    ``CUDA_HOME`` (or ``CUDA_PATH``) wins when set, and must be a toolkit.  Otherwise the ``nvcc`` on
    PATH: torch takes the folder above its ``bin/``, which is wrong when ``nvcc`` is a symlink or a
    wrapper script in another folder (e.g. ``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/
    nvcc``, where torch's guess ``/usr/local`` has no CUDA headers): the symlink's target, and a path
    named in a wrapper script, are tried too, then ``/usr/local/cuda``.  Raises ``RuntimeError`` naming
    what was tried.
    """
    import shutil

    environ = os.environ if environ is None else environ
    which = shutil.which if which is None else which
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        if _has_toolkit(Path(explicit)):
            return Path(explicit)
        raise RuntimeError(
            f"CUDA_HOME={explicit} is not a CUDA toolkit (it needs bin/nvcc and include/cuda_runtime.h); "
            "point CUDA_HOME at the toolkit root, e.g. /usr/local/cuda"
        )
    tried: list[Path] = []
    nvcc = which("nvcc")
    if nvcc is not None:
        nvcc_path = Path(nvcc)
        tried += [nvcc_path.parent.parent, nvcc_path.resolve().parent.parent]
        try:
            text = nvcc_path.read_text(errors="ignore")[:4096] if nvcc_path.stat().st_size < 4096 else ""
        except OSError:
            text = ""
        for word in text.split():  # a wrapper script: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            word = word.strip("'\"")
            if word.endswith("/bin/nvcc"):
                tried.append(Path(word).parent.parent)
    tried += default_roots
    for root in tried:
        if _has_toolkit(root):
            return root
    raise RuntimeError(
        "no CUDA toolkit found for the CUDA extension (tried "
        + (", ".join(str(p) for p in dict.fromkeys(tried)) or "nothing: no nvcc on PATH")
        + "); set CUDA_HOME to the toolkit root (the folder with bin/nvcc and include/)"
    )


class _Unavailable(RuntimeError):
    """An expected absence (no CUDA, extensions disabled): no warning."""


def _summary(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]


def load(backend: str) -> ModuleType | None:
    """The extension module for ``backend`` ("cpp" or "cuda"), built on first use; None when it is
    unavailable (see :func:`unavailable_reason`)."""
    return _get(backend)[0]


def _get(backend: str) -> tuple[ModuleType | None, str | None]:
    if backend not in _SOURCES:
        raise ValueError(f"backend must be one of {tuple(_SOURCES)}; got {backend!r}")
    cached = _loaded.get(backend)
    if cached is not None:
        return cached
    with _lock:
        cached = _loaded.get(backend)
        if cached is not None:
            return cached
        if _disabled():
            result: tuple[ModuleType | None, str | None] = (None, "disabled by RLHF_KERNELS_EXT=0")
        else:
            try:
                result = (_build(backend), None)
            except _Unavailable as exc:
                result = (None, str(exc))
            except Exception as exc:  # any build or import failure: fall back, never crash
                reason = f"the {backend} extension could not be built or loaded ({_summary(exc)})"
                warnings.warn(
                    f"rlhf_kernels: {reason}; falling back to the Triton/PyTorch kernels. "
                    "Set RLHF_KERNELS_EXT_VERBOSE=1 to see the build log, or RLHF_KERNELS_EXT=0 to silence "
                    "this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                result = (None, reason)
        _loaded[backend] = result
        return result


def unavailable_reason(family: str, backend: str) -> str | None:
    """Why the ``backend`` ("cpp" or "cuda") extension cannot run ``family``; None when it is built
    and loadable.  Builds the extension on first call; cached afterwards."""
    if backend not in _FAMILIES.get(family, ()):
        return f"{family!r} has no {backend} extension kernel"
    return _get(backend)[1]


def release_cpu_cache() -> int:
    """Frees the output blocks the C++ CPU kernels keep for reuse (large outputs come from recycled
    huge-page blocks, at most ``$RLHF_KERNELS_CPU_CACHE_MB`` MiB kept, default 256; see csrc/cpu_common.h);
    returns how many bytes were kept.  Builds nothing: 0 when the extension is not loaded."""
    module = _loaded.get("cpp", (None, None))[0]
    return 0 if module is None else int(module.release_cached_outputs())


def _reset() -> None:
    """Forgets loaded/failed extensions (tests), so that the next call tries again."""
    with _lock:
        _loaded.clear()
