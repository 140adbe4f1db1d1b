# Two entry points do all set-up themselves (idempotently): `make demo` and `make test`.
# Everything installs into .venv; torch is pinned to the CPU build that this project's machines carry.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed-$(TORCH_VERSION)
# The frameworks whose functions rlhf_kernels.compat replaces, at the exact releases the peer-parity suite
# (tests/peers) checks against.  --no-deps: their runtime stacks are GPU-cluster software; the light
# packages their import chains need are the `peers` extra of pyproject.toml, installed with torch pinned.
PEERS  := verl==0.9.1 trl==1.16.0 openrlhf==0.11.2
PEERS_STAMP := $(VENV)/.peers-verl-0.9.1-trl-1.16.0-openrlhf-0.11.2

.PHONY: demo compare test peers fuzz bench bench-cpu lint clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]" pybind11 ninja matplotlib tqdm
	@touch $(STAMP)

$(PEERS_STAMP): $(STAMP) pyproject.toml
	@echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q --no-build-isolation -c $(VENV)/torch-constraint.txt -e ".[test,peers]"
	$(PY) -m pip install -q --no-deps $(PEERS)
	@touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

# The main job: the end-to-end RLHF demo (SFT -> reward model -> PPO) on the embedded task.
# Extra trainer flags: make demo ARGS="--overwrite" (a finished run is otherwise left as it is).
demo: $(STAMP)
	$(PY) -m rlhf_kernels.trainer $(ARGS)

# Every stage-3 algorithm (--algo) on the embedded task from one SFT model and one set of reward models,
# same seed and generated-token budget: runs/compare/compare.{md,json,png} (docs/trainer.md "Comparison").
# Then `$(PY) -m rlhf_kernels.trainer.results --compare runs/compare --write` puts the table in the README.
compare: $(STAMP)
	$(PY) -m rlhf_kernels.trainer compare $(ARGS)

# The test suite.  Without a CUDA device, Triton kernels run in Triton's interpreter on CPU tensors.
test: $(STAMP) $(PEERS_STAMP)
	$(PY) -m pytest -q --durations=15 tests

# The long property-based profile of the fuzz suite (CI runs its short deterministic profile in make test).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/fuzz tests/test_oob_guard.py

bench: $(STAMP)
	$(PY) -m bench

bench-cpu: $(STAMP)
	$(PY) -m bench --cpu
	$(PY) -m pytest -q bench/test_cpu_paths.py --benchmark-only

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check rlhf_kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
