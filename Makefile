# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both install what they need and are safe to run again.
PYTHON ?= python3
export CINC_CUDA ?= auto

.PHONY: deps build demo test test-triton test-install typecheck bench clean triton-aot triton36-env

deps:
	$(PYTHON) -m pip install -q -r requirements.txt

# Incremental (ninja) in-place build of cinc_kernels._C: the commands below run from the repository root.
# To import cinc_kernels from anywhere, also run `pip install --no-build-isolation -e .` once (a full rebuild).
build: deps
	$(PYTHON) setup.py -q build_ext --inplace

# After the versions and the self-check: the layers side by side on this machine's default device (CUDA if present),
# ending with the table and the paths of the CSV and plots, written to runs/bench/ (untracked); the committed results
# in benchmarks/results/ change only by an explicit benchmark run (`make bench`). About 16 s with --threads 1 on the
# (busy) 2-core build machine; with 2 threads on a machine that other jobs load, OpenMP stalls stretch it to ~3 min.
demo: build
	$(PYTHON) -m cinc_kernels info
	$(PYTHON) -m cinc_kernels check
	$(PYTHON) -m cinc_kernels bench

# The Triton kernels run under Triton's CPU interpreter, which must be switched on before triton is imported:
# hence a second pytest process. It collects the whole suite but keeps only tests/triton and the shared bodies that
# run on every backend (tests taking `backend` and `device`, tests/conftest.py), now for the Triton backend.
test: build
	$(PYTHON) -m pytest -q tests --ignore=tests/triton
	$(MAKE) --no-print-directory test-triton
	$(MAKE) --no-print-directory triton-aot
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory test-install

# The committed CPU results: the CPU ops against ATen's convolution, training steps and the flow's sampling/density
# ratio (benchmarks/results/cpu_ops.*), then the layers side by side (benchmarks/results/layers.*).
bench: build
	$(PYTHON) benchmarks/bench_cpu_ops.py
	$(PYTHON) -m cinc_kernels bench --device cpu --out benchmarks/results

test-triton:
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests

# The sdist and the cp310-abi3 wheel, each installed into a fresh virtual environment (reusing the installed torch)
# and checked with `python -m cinc_kernels check` from outside the repository: two full CPU builds, a few minutes.
test-install:
	CINC_TEST_INSTALL=1 $(PYTHON) -m pytest -q tests/test_packaging.py -k venv

# The public modules, strictly typed (the package ships py.typed).
typecheck:
	$(PYTHON) -m mypy

# Every Triton launch the launchers can choose, compiled ahead of time for sm_80 and sm_90 (no GPU needed) and checked
# against the per-block shared-memory limits: with the installed triton and with 3.6, the oldest supported, from a
# side environment that holds triton alone. Compiled kernels are cached in .cache/triton-aot, so a rerun only reads
# the cache. One row per launch and version goes to $(TRITON_AOT_CSV): under .cache/ when `make test` runs it; the
# committed table changes only when asked: `make triton-aot TRITON_AOT_CSV=benchmarks/results/triton_aot.csv`.
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
	$(TRITON_AOT) $(PYTHON) cinc_kernels/triton/aot.py --csv $(TRITON_AOT_CSV)
	$(TRITON_AOT) $(TRITON36_ENV)/bin/python cinc_kernels/triton/aot.py --csv $(TRITON_AOT_CSV) --append

clean:
	rm -rf build dist *.egg-info cinc_kernels/*.so cinc_kernels/_build_info.json
