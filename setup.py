"""Build script.

The package itself is pure Python (Triton kernels are compiled at run time).  The C++/CUDA sources in
``csrc/`` are compiled just in time on first use (see ``rlhf_kernels/_ext.py``); nothing here imports
torch, so ``pip install -e .`` never pulls a torch build of its own.

Optionally, ``RLHF_KERNELS_BUILD_EXT=1 pip install --no-build-isolation -e .`` builds the extensions at
install time instead (against the torch already installed, hence ``--no-build-isolation``): the C++ CPU
kernel always, the CUDA kernel when that torch has CUDA (``RLHF_KERNELS_BUILD_CUDA=0`` skips it).  The
loader prefers these modules and falls back to the JIT build when they do not import (e.g. after a
torch upgrade).
"""

import os

from setuptools import setup

# The C++ CPU extension's sources: rlhf_kernels/_ext.py's _SOURCES["cpp"] (this file imports nothing of the
# package; tests/test_ext.py checks that the two lists agree).
_CPU_SOURCES = ("cpu_bindings.cpp", "gae.cpp", "policy_losses.cpp", "policy_selection.cpp", "advantages.cpp")


def _extensions() -> dict:
    if os.environ.get("RLHF_KERNELS_BUILD_EXT", "0").strip() != "1":
        return {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    modules = [
        CppExtension(
            "rlhf_kernels._cpu_cpp",
            [os.path.join("csrc", name) for name in _CPU_SOURCES],
            include_dirs=[csrc],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda and os.environ.get("RLHF_KERNELS_BUILD_CUDA", "1").strip() != "0":
        modules.append(
            CUDAExtension(
                "rlhf_kernels._gae_cuda",
                [os.path.join("csrc", "gae_cuda_binding.cpp"), os.path.join("csrc", "gae_cuda.cu")],
                include_dirs=[csrc],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    return {"ext_modules": modules, "cmdclass": {"build_ext": BuildExtension}}


setup(**_extensions())
