# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both install what they need and are safe to run again.
PYTHON ?= python3
export CINC_CUDA ?= auto

.PHONY: deps build demo test test-triton bench clean
.PHONY: triton-aot triton36-env

deps:
	$(PYTHON) -m pip install -q -r requirements.txt

# Incremental (ninja) in-place build of cinc_kernels._C: the commands below run from the repository root.
# To import cinc_kernels from anywhere, also run `pip install --no-build-isolation -e .` once (a full rebuild).
build: deps
	$(PYTHON) setup.py -q build_ext --inplace

# After the versions and the self-check: the layers side by side on this machine's default device (CUDA if present),
# ending with the table and the paths of the CSV and plots (benchmarks/results/). About 16 s with --threads 1 on the
# (busy) 2-core build machine; with 2 threads on a machine that other jobs load, OpenMP stalls stretch it to ~3 min.
demo: build
	$(PYTHON) -m cinc_kernels info
	$(PYTHON) -m cinc_kernels check
	$(PYTHON) -m cinc_kernels bench

# The Triton kernels run under Triton's CPU interpreter, which must be switched on before triton is imported:
# hence a second pytest process.
test: build
	$(PYTHON) -m pytest -q tests --ignore=tests/triton
	$(MAKE) --no-print-directory test-triton
	$(MAKE) --no-print-directory triton-aot

test-triton:
	@if [ -d tests/triton ]; then TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests/triton; fi

# Every Triton launch the launchers can choose, compiled ahead of time for sm_80 and sm_90 (no GPU needed) and checked
# against the per-block shared-memory limits: with the installed triton and with 3.6, the oldest supported, from a
# side environment that holds triton alone. Compiled kernels are cached in .cache/triton-aot, so a rerun only reads
# the cache; one row per launch and version goes to benchmarks/results/triton_aot.csv.
TRITON36_ENV := .cache/triton36
TRITON_AOT := env -u TRITON_INTERPRET TRITON_CACHE_DIR=$(CURDIR)/.cache/triton-aot

triton36-env: $(TRITON36_ENV)/.installed

$(TRITON36_ENV)/.installed:
	$(PYTHON) -m venv $(TRITON36_ENV)
	$(TRITON36_ENV)/bin/python -m pip install -q 'triton==3.6.*'
	touch $@

triton-aot: triton36-env
	$(TRITON_AOT) $(PYTHON) cinc_kernels/triton/aot.py --csv benchmarks/results/triton_aot.csv
	$(TRITON_AOT) $(TRITON36_ENV)/bin/python cinc_kernels/triton/aot.py --csv benchmarks/results/triton_aot.csv --append

clean:
	rm -rf build cinc_kernels/*.so cinc_kernels/_build_info.json
