"""The backend × device × dtype parametrisation of the shared test bodies.

A test that takes ``backend`` and ``device`` arguments (and does not parametrise them itself) runs once per backend
case of this process (:data:`tests.cases.MAIN_PROCESS_BACKENDS`, or :data:`tests.cases.INTERPRETER_PROCESS_BACKENDS`
when ``TRITON_INTERPRET=1``); one that also takes ``dtype`` without parametrising it runs for float32 and float64.
Markers narrow the cases: ``custom_ops`` (backends whose ops are ``torch.library`` custom ops), ``fast_paths``
(every backend but the reference, which the bodies compare with) and ``gpu_only`` (backends on CUDA tensors). The
interpreter process runs only those shared bodies and ``tests/triton``; everything else already ran in the main
process.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.cases import INTERPRETER_PROCESS_BACKENDS, MAIN_PROCESS_BACKENDS

DTYPES = (torch.float32, torch.float64)

if torch.cuda.is_available():
    # One fixed Triton forward configuration instead of autotuning each test shape (minutes of compiling);
    # tests/triton/test_triton.py runs every configuration the autotuner may pick.
    os.environ.setdefault("CINC_TRITON_AUTOTUNE", "0")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def one_thread():
    """One CPU thread for the test: OpenMP threads on a machine whose cores are already busy spin-wait for each
    other, which costs tiny models far more than the work (benchmarks/results/cpu_ops.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # pytest-xdist runs several test processes (`make test`: one per core). Each keeping PyTorch's default of one
        # thread per core would oversubscribe the cores, and OpenMP threads then spin on the tests' tiny ops: a
        # float64 gradcheck of the torch backend took minutes instead of seconds. Tests of thread counts set their own.
        torch.set_num_threads(max(1, _cores() // int(workers)))
    config.addinivalue_line("markers", "custom_ops: only backends whose ops are torch.library custom ops")
    config.addinivalue_line("markers", "fast_paths: every backend but the float64 reference")
    config.addinivalue_line("markers", "gpu_only: only backends on CUDA tensors (kernels compiled for a GPU)")
    config.addinivalue_line("markers", "every_backend: set on the cases this file generates")


def _backend_params(marks):
    from cinc_kernels.backends import get_backend

    params = []
    for case in INTERPRETER_PROCESS_BACKENDS if triton_interpreted() else MAIN_PROCESS_BACKENDS:
        if (("custom_ops" in marks and not case.custom_ops) or ("fast_paths" in marks and case.name == "reference")
                or ("gpu_only" in marks and case.device != "cuda")):
            continue
        skip = []
        if case.device == "cuda" and not torch.cuda.is_available():
            if case.name == "triton":
                continue  # the interpreter process runs the Triton kernels on CPU tensors instead
            skip = [pytest.mark.skip(reason=f"backend {case.name!r} needs a CUDA GPU (none is visible)")]
        else:
            why = get_backend(case.name).unavailable()
            if why is not None:
                skip = [pytest.mark.skip(reason=f"backend {case.name!r} is not available on this install: {why}")]
        params.append((case, skip))
    return params


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "backend" not in names or "device" not in names:
        return
    marks = {m.name for m in metafunc.definition.iter_markers()}
    own = {n.strip() for m in metafunc.definition.iter_markers("parametrize")
           for n in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])}
    if "backend" in own:
        return
    with_dtype = "dtype" in names and "dtype" not in own
    params = []
    for case, skip in _backend_params(marks):
        for dtype in DTYPES if with_dtype else (None,):
            values = (case.name, case.device) + ((dtype,) if with_dtype else ())
            ident = case.name + (f"-{str(dtype)[6:]}" if with_dtype else "")
            params.append(pytest.param(*values, id=ident, marks=[pytest.mark.every_backend, *skip]))
    metafunc.parametrize("backend,device,dtype" if with_dtype else "backend,device", params)


def pytest_collection_modifyitems(config, items):
    if not triton_interpreted():
        return
    triton_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton")
    keep, drop = [], []
    for item in items:
        shared = item.get_closest_marker("every_backend") is not None
        (keep if shared or str(item.path).startswith(triton_dir + os.sep) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
