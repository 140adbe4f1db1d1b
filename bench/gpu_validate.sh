#!/usr/bin/env bash
# GPU validation in one call on a lent H100/H200 (see the device tool's README): installs the project
# against the machine's own torch/triton, runs the whole test suite natively, builds the CUDA extension
# (through the tests that use it), and runs the full benchmark.  Everything lands under $OUT (or
# ./gpu-out when OUT is unset): the test log, the benchmark log and bench/results files.
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tee "$out/tests.log"
python3 -m bench --out "$out" 2>&1 | tee "$out/bench.log"
