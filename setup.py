"""Build script.

The package itself is pure Python (Triton kernels are compiled at run time).  The C++/CUDA sources in
``csrc/`` are compiled just in time on first use (see ``rlhf_kernels/_ext.py``); nothing here imports
torch, so ``pip install -e .`` never pulls a torch build of its own.
"""

from setuptools import setup

setup()
