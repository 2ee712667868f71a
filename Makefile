# `make demo` (the main job), `make test` (the quick, complete check a contributor runs) and `make check` (everything
# CI runs: `make test` plus the slower and wider checks). Each installs what it needs and is safe to run again.
#
# They use the Python that `python3` names: the active virtual environment or conda environment, else the system's.
# Another one: `make test PYTHON=path/to/venv/bin/python` (no need to activate it).
PYTHON ?= python3
# The targets build what this machine can run: the CUDA kernels only where a GPU is visible (compiling them for four
# GPU architectures costs a 2-core machine three minutes, for kernels nothing here can launch); `make check` compiles
# them anyway (cuda-compile). Setting CINC_CUDA yourself (auto, 0 or 1; setup.py's own default is auto: whenever a
# toolkit is found) decides instead.
ifeq ($(origin CINC_CUDA),undefined)
  GPU_VISIBLE := $(shell { nvidia-smi -L 2>/dev/null || ls /dev/nvidia[0-9]* 2>/dev/null; } | head -n 1)
  CINC_CUDA := $(if $(GPU_VISIBLE),auto,0)
endif
export CINC_CUDA
# Test processes run in parallel (pytest-xdist): `auto` is one per CPU core; JOBS=0 runs them in one process.
# pytest-benchmark's plugin stays off where it is installed: the suite has no benchmarks (benchmarks/ has), and it warns
# under xdist.
JOBS ?= auto
PYTEST := $(PYTHON) -m pytest -q -p no:cacheprovider -p no:benchmark -n $(JOBS)
BUILD_LOG := build/build.log
# One line per compiled file on the terminal; the compiler command lines go to $(BUILD_LOG).
export NO_MKDOCS_2_WARNING := 1

.PHONY: deps build demo test test-suite test-triton check lint typecheck test-install docs bench clean \
        triton-aot triton36-env cuda-compile

# What `deps` installs: requirements.txt for the demo and the build; under `make test` and `make check` (whose
# prerequisites see this value) also what the tests, lint, types and docs need.
REQUIREMENTS := requirements.txt
test check: REQUIREMENTS := requirements-test.txt

deps:
	@$(PYTHON) -m pip install -q -r $(REQUIREMENTS) || { \
	  echo "error: pip could not install $(REQUIREMENTS) into $(PYTHON) (see above). If it says" \
	    "externally-managed-environment, make a virtual environment that sees the system's packages and run make" \
	    "there: python3 -m venv --system-site-packages .venv && . .venv/bin/activate && make $(MAKECMDGOALS)" >&2; \
	  exit 1; }

# Incremental (ninja) in-place build of cinc_kernels._C: the commands below run from the repository root.
# To import cinc_kernels from anywhere, also run `pip install --no-build-isolation -e .` once (a full rebuild).
build: deps
	@echo "building cinc_kernels._C (CINC_CUDA=$(CINC_CUDA)); the compiler's output goes to $(BUILD_LOG)"
	@CINC_BUILD_LOG=$(BUILD_LOG) $(PYTHON) setup.py -q build_ext --inplace
	@echo "built: $$(ls cinc_kernels/_C*.so cinc_kernels/_C*.pyd 2>/dev/null | head -n 1)"

# After the versions and the self-check: the layers side by side on this machine's default device (CUDA if present),
# ending with the table and the paths of the CSV and plots, written to runs/bench/ (untracked); the committed results
# in benchmarks/results/ change only by an explicit benchmark run (`make bench`).
demo: build
	$(PYTHON) -m cinc_kernels info
	$(PYTHON) -m cinc_kernels check
	$(PYTHON) -m cinc_kernels bench
	@echo
	@echo "What next:"
	@echo "  - runs/bench/: this run's table (layers.md), its rows (layers.csv) and plots (layers_vs_*.png,"
	@echo "    inverse_algorithms.png)"
	@echo "  - train CInC Flow on the bundled digits (a few minutes on 2 CPU cores), then sample from it:"
	@echo "      $(PYTHON) -m cinc_kernels.flow train"
	@echo "      $(PYTHON) -m cinc_kernels.flow sample --checkpoint runs/digits/checkpoint.pt"
	@echo "    and look at runs/digits/loss.png and runs/digits/samples/"
	@echo "  - make test: the test suite; README.md and docs/ (make docs builds the site into site/) for the rest"

# The quick, complete check: the suite, its docstring examples and the Triton kernels under Triton's CPU interpreter.
test: build
	$(MAKE) --no-print-directory test-suite
	$(MAKE) --no-print-directory test-triton

# The whole suite but tests/triton, in parallel. The install tests (tests/test_packaging.py, full builds into fresh
# environments) skip here: `make test-install` runs them.
test-suite:
	$(PYTEST) tests --ignore=tests/triton

# The Triton kernels run under Triton's CPU interpreter, which must be switched on before triton is imported:
# hence a second pytest process. It collects the whole suite but keeps only tests/triton and the shared bodies that
# run on every backend (tests taking `backend` and `device`, tests/conftest.py), now for the Triton backend.
test-triton:
	TRITON_INTERPRET=1 $(PYTEST) tests

# Everything CI runs (.ci/run), in order of cost: stops at the first failure.
check: test
	$(MAKE) --no-print-directory cuda-compile
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory docs
	$(MAKE) --no-print-directory triton-aot
	$(MAKE) --no-print-directory test-install

# The CUDA kernels compiled for every GPU architecture the package ships for (setup.py's default list), out of place
# into build/cuda-compile/ (the in-place build is left as it is): compile errors show without a GPU. Skipped where no
# CUDA toolkit is found, and where the in-place build already has the CUDA kernels (a GPU is visible).
CUDA_COMPILE_LOG := build/cuda-compile.log
cuda-compile:
	@if $(PYTHON) -c "import json, sys; sys.exit(not json.load(open('cinc_kernels/_build_info.json'))['cuda_built'])" \
	    2>/dev/null; then \
	  echo "cuda-compile: the in-place build already has the CUDA kernels"; \
	elif [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || command -v nvcc > /dev/null; then \
	  echo "cuda-compile: compiling the CUDA kernels into build/cuda-compile/; the compiler's output goes to $(CUDA_COMPILE_LOG)"; \
	  CINC_CUDA=1 CINC_BUILD_LOG=$(CUDA_COMPILE_LOG) $(PYTHON) setup.py -q build_ext \
	    --build-temp build/cuda-compile/temp --build-lib build/cuda-compile/lib; \
	else \
	  echo "cuda-compile: skipped, no CUDA toolkit (nvcc) found"; \
	fi

# lint, typecheck and docs use the tools `make test` installs (requirements-test.txt).
lint:
	$(PYTHON) -m ruff check .

# The package, strictly typed (it ships py.typed); which files and how strictly: [tool.mypy] in pyproject.toml.
typecheck:
	$(PYTHON) -m mypy

# The documentation site (mkdocs.yml: docs/ and the API reference from the docstrings) into site/ (untracked);
# --strict: a broken link or a docstring the reference cannot read fails it. Read it with `mkdocs serve`.
docs:
	$(PYTHON) -m mkdocs build --strict -q

# The sdist and the cp310-abi3 wheel, each installed into a fresh virtual environment that sees this Python's
# packages (torch), and checked with `python -m cinc_kernels check` from outside the repository; then the same check
# run through this Makefile from inside a virtual environment, reusing the wheel. Two full CPU builds: minutes.
# INSTALL_TESTS narrows them (a pytest -k expression).
INSTALL_TESTS ?= venv
test-install:
	CINC_TEST_INSTALL=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_packaging.py -k "$(INSTALL_TESTS)"

# The committed CPU results: the CPU ops against ATen's convolution, training steps and the flow's sampling/density
# ratio (benchmarks/results/cpu_ops.*), then the layers side by side (benchmarks/results/layers.*).
bench: build
	$(PYTHON) benchmarks/bench_cpu_ops.py
	$(PYTHON) -m cinc_kernels bench --device cpu --out benchmarks/results

# Every Triton launch the launchers can choose, compiled ahead of time for sm_80 and sm_90 (no GPU needed) and checked
# against the per-block shared-memory limits: with the installed triton and with 3.6, the oldest supported, from a
# side environment that holds triton alone. Compiled kernels are cached in .cache/triton-aot, so a rerun only reads
# the cache. One row per launch and version goes to $(TRITON_AOT_CSV): under .cache/ when `make check` runs it; the
# committed table changes only when asked: `make triton-aot TRITON_AOT_CSV=tools/results/triton_aot.csv`.
TRITON36_ENV := .cache/triton36
TRITON_AOT_CSV ?= .cache/triton_aot.csv
TRITON_AOT := env -u TRITON_INTERPRET TRITON_CACHE_DIR=$(CURDIR)/.cache/triton-aot

triton36-env: $(TRITON36_ENV)/.installed

$(TRITON36_ENV)/.installed:
	$(PYTHON) -m venv $(TRITON36_ENV)
	$(TRITON36_ENV)/bin/python -m pip install -q 'triton==3.6.*'
	touch $@

triton-aot: triton36-env
	mkdir -p $(dir $(TRITON_AOT_CSV))
	$(TRITON_AOT) $(PYTHON) tools/triton_aot.py --csv $(TRITON_AOT_CSV)
	$(TRITON_AOT) $(TRITON36_ENV)/bin/python tools/triton_aot.py --csv $(TRITON_AOT_CSV) --append

clean:
	rm -rf build dist site *.egg-info cinc_kernels/*.so cinc_kernels/_build_info.json
