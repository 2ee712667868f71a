# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both install what they need and are safe to run again.
PYTHON ?= python3
export CINC_CUDA ?= auto

.PHONY: deps build demo test test-triton test-install typecheck bench clean

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
	$(MAKE) --no-print-directory typecheck
	$(MAKE) --no-print-directory test-install

test-triton:
	@if [ -d tests/triton ]; then TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests/triton; fi

# The sdist and the cp310-abi3 wheel, each installed into a fresh virtual environment (reusing the installed torch)
# and checked with `python -m cinc_kernels check` from outside the repository: two full CPU builds, a few minutes.
test-install:
	CINC_TEST_INSTALL=1 $(PYTHON) -m pytest -q tests/test_packaging.py -k venv

# The public modules, strictly typed (the package ships py.typed).
typecheck:
	$(PYTHON) -m mypy

clean:
	rm -rf build dist *.egg-info cinc_kernels/*.so cinc_kernels/_build_info.json
