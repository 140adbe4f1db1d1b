#!/usr/bin/env bash
# GPU validation in one call, within a time budget (default 8 minutes), on a lent H100/H200:
#
#   bash bench/gpu_validate.sh [--budget SECONDS] [--with-ext]
#
# 1. checks its dependencies first (python, torch with CUDA, triton, pytest; ninja, nvcc and
#    matplotlib are optional) and records the environment;
# 2. runs the GPU smoke selection (tests/gpu_smoke.py: every kernel natively in every dtype and layout
#    family, opcheck, two torch.compile cases, the CUDA-graph step), at most SMOKE_SHARE (55) % of it;
# 3. runs the benchmark families in order of value, each under its own timeout: logprobs,
#    linear_logprobs, linear_policy_loss, gae, ppo_losses, then sampling_logprobs, kl, policy_losses,
#    linear_distill_loss and reward_losses if time is left.
#    torch.compile baselines are off below 15 minutes of budget (their compiles take minutes), verl's
#    GAE loop is compiled only up to T = 128 above it.  Rows are written as they are measured, so a
#    family stopped at its limit keeps what it measured.
#
# The repository is imported from this checkout (PYTHONPATH; no pip install), and everything written
# lands in $OUT (./gpu-out when OUT is unset): env.txt, smoke.log, smoke.xml, bench-<family>.log and
# the benchmark's <device>-<date>.{csv,md,png}.  The CUDA/C++ extension (csrc/, an nvcc build of 1-2
# minutes) is switched off (RLHF_KERNELS_EXT=0) unless --with-ext is given.  GPU_VALIDATE_ON_CPU=1
# rehearses the script on a CPU machine (interpreted kernels, `python -m bench --cpu --quick`).
set -uo pipefail

budget=480
with_ext=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget="$2"; shift 2 ;;
    --budget=*) budget="${1#*=}"; shift ;;
    --with-ext) with_ext=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

SMOKE_SHARE=${SMOKE_SHARE:-55}  # percent of the budget the smoke selection may use
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( budget - $(date +%s) + start )); }

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 2
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$root:$root/tests${PYTHONPATH:+:$PYTHONPATH}"  # the repo and tests/gpu_smoke.py
export PYTHONUNBUFFERED=1
export RLHF_KERNELS_CACHE="${RLHF_KERNELS_CACHE:-$(mktemp -d)}"  # extension builds: not in $OUT
[ "$with_ext" = 1 ] || export RLHF_KERNELS_EXT=0
status=0

# --- 1. dependencies ------------------------------------------------------------------------------
{
  echo "gpu_validate: budget ${budget} s, with_ext=${with_ext}, out=${out}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not found"
  "$py" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "pytest", "numpy", "matplotlib", "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PY
  for tool in ninja nvcc; do
    if command -v "$tool" >/dev/null; then echo "$tool: $("$tool" --version 2>&1 | tail -1)"; else echo "$tool: MISSING"; fi
  done
} 2>&1 | tee "$out/env.txt"

bench_flags=()
if [ "${GPU_VALIDATE_ON_CPU:-0}" = 1 ]; then  # a rehearsal of this script on a CPU machine
  bench_flags=(--cpu --quick)
elif ! "$py" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_validate: torch with CUDA and triton are required; nothing run" | tee -a "$out/env.txt"
  exit 2
fi
have_pytest=1; "$py" -c "import pytest" 2>/dev/null || have_pytest=0
if [ "$with_ext" = 1 ] && ! { command -v ninja >/dev/null && command -v nvcc >/dev/null; }; then
  echo "gpu_validate: --with-ext needs ninja and nvcc; extension off" | tee -a "$out/env.txt"
  export RLHF_KERNELS_EXT=0
fi
"$py" -c "import matplotlib" 2>/dev/null || echo "gpu_validate: no matplotlib, so no chart" | tee -a "$out/env.txt"

# --- 2. the smoke selection -----------------------------------------------------------------------
if [ "$have_pytest" = 1 ]; then
  smoke=$(( budget * SMOKE_SHARE / 100 ))
  [ "$smoke" -gt "$(left)" ] && smoke=$(left)
  echo "gpu_validate: smoke selection, at most ${smoke} s"
  # --continue-on-collection-errors: a test file that fails to import costs its own tests, not the run
  # -v: one line per test as it ends (and gpu_smoke prints each failure at once), so a run stopped at its
  # limit keeps every result so far.
  timeout -k 10 "$smoke" "$py" -m pytest -p gpu_smoke -m gpu_smoke -v -p no:cacheprovider \
    --continue-on-collection-errors --durations=15 --junitxml="$out/smoke.xml" tests 2>&1 \
    | tee "$out/smoke.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "gpu_validate: smoke selection stopped at ${smoke} s (see smoke.log)" | tee -a "$out/smoke.log"
  [ "$rc" = 0 ] || status=1
else
  echo "gpu_validate: pytest missing: smoke selection skipped" | tee "$out/smoke.log"
  status=1
fi

# --- 3. benchmarks, in order of value -------------------------------------------------------------
compile=none
[ "$budget" -ge 900 ] && compile=short
# family:weight, in order of value -- each family gets its weight's share of what is left among the
# families still to run, but at least MIN_FAMILY seconds while they last (value first, not fairness)
plan="logprobs:3 linear_logprobs:3 linear_policy_loss:2 gae:2 ppo_losses:2 sampling_logprobs:1 kl:1 policy_losses:1 linear_distill_loss:1 reward_losses:1"
MIN_FAMILY=${MIN_FAMILY:-40}
weights_left=0
for item in $plan; do weights_left=$(( weights_left + ${item#*:} )); done
for item in $plan; do
  family=${item%:*}; weight=${item#*:}
  remaining=$(( $(left) - 5 ))
  share=$(( remaining * weight / weights_left ))
  weights_left=$(( weights_left - weight ))
  [ "$share" -lt "$MIN_FAMILY" ] && share=$MIN_FAMILY
  [ "$share" -gt "$remaining" ] && share=$remaining
  if [ "$share" -lt 20 ]; then
    echo "gpu_validate: ${family}: skipped (${remaining} s left)" | tee -a "$out/bench-skipped.log"
    continue
  fi
  echo "gpu_validate: ${family}, at most ${share} s"
  # bench stops the family at --budget itself (rows kept); timeout is the hard stop behind it
  timeout -k 5 $(( share + 15 )) "$py" -m bench --families "$family" --budget "$share" --append \
    --out "$out" --compile-baselines "$compile" "${bench_flags[@]}" 2>&1 | tee "$out/bench-${family}.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done

echo "gpu_validate: done in $(elapsed) s (budget ${budget} s), status ${status}; files in ${out}:"
ls -l "$out"
exit "$status"
