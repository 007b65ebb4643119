# Quick start: `make demo` (set up, build, run the default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The package index here serves torch 2.14.1 (CUDA 13.0 build, runs on CPU too).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MAX_JOBS ?= 2
export HF_HUB_OFFLINE := 1
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

DEPS_STAMP := $(VENV)/.deps-installed

.PHONY: demo test test-python test-cpp build bench clean

$(DEPS_STAMP): pyproject.toml requirements.txt requirements-bundled.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -r requirements.txt -r requirements-bundled.txt
	# animal-mnist ships the silhouettes; its own loader would pull tensorflow, so no deps.
	$(BIN)/pip install -q --no-deps animal-mnist==0.4
	HIPRO_SKIP_EXT=1 $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental in-place build of hipro_fast._C (FORCE_CUDA=1 adds the CUDA kernels).
# The sources are listed in csrc/sources.txt; a CUDA_HOME from the environment
# or the command line reaches setup.py as is, else scripts/find_cuda_home.py
# finds the toolkit.
build: $(DEPS_STAMP)
	MAX_JOBS=$(MAX_JOBS) $(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -c "import hipro_fast; print('hipro_fast build:', hipro_fast.build_info())"

test: build
	HIPRO_REQUIRE_CTEST=1 $(BIN)/python -m pytest -q tests

bench: build
	$(BIN)/hipro bench

# One process per CPU core, at most the demo's 9 (shots, seed) draws; one on a
# CUDA machine (the draws would need a GPU each). DEMO_NPROC=N overrides.
DEMO_NPROC_AUTO := import os, torch; n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1); print(1 if torch.cuda.is_available() else max(1, min(9, n)))

demo: build
	n=$${DEMO_NPROC:-$$($(BIN)/python -c '$(DEMO_NPROC_AUTO)')}; \
	if [ "$$n" -gt 1 ]; then $(BIN)/hipro demo --nproc "$$n"; else $(BIN)/hipro demo; fi

clean:
	rm -rf build build-cmake hipro_fast/_C*.so *.egg-info
