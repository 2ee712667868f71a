"""``backend="auto"`` checks a GPU kernel on first use before trusting it (``cinc_kernels/trust.py``).

No GPU is needed: a fake backend on the CPU, wrapping the C++ kernels, is made subject to the check (as the CUDA and
Triton backends are on CUDA tensors) and put first in ``auto``'s order; its inverse is wrong, or raises, or is right.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import _extension, backends, reference, trust
from cinc_kernels.backends import Backend, get_backend
from tests.cases import RTOL, make_image, make_weight, rel_error

FAKE = "untried"


@pytest.fixture
def calls():
    """How many times the fake backend's ops ran, by op."""
    return {}


def _install(monkeypatch, calls, inverse_error: str = "none"):
    """A backend named ``FAKE`` whose ops are the ``cpu`` ones except a faulty inverse, first in ``auto``'s CPU
    order for every op and subject to the first-use check."""
    cpu = get_backend("cpu")

    def counted(op):
        def run(*args):
            calls[op] = calls.get(op, 0) + 1
            out = cpu.ops[op](*args)
            if op == "inverse" and inverse_error == "wrong":
                return out + 0.1 * out.abs().mean()
            if op == "inverse" and inverse_error == "raises":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return out
        return run

    monkeypatch.setitem(backends._REGISTRY, FAKE, Backend(name=FAKE, ops={op: counted(op) for op in backends.OPS},
                                                         device_types=("cpu",)))
    for op in backends.OPS:
        monkeypatch.setitem(backends.AUTO_ORDER, ("cpu", op), [FAKE, *backends.AUTO_ORDER[("cpu", op)]])
    monkeypatch.setattr(trust, "CHECKED_BACKENDS", frozenset({FAKE}))
    monkeypatch.setattr(trust, "CHECKED_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(trust, "_verdicts", {})
    monkeypatch.setattr(_extension, "_warned", set())  # each test sees its own once-only warnings
    monkeypatch.delenv(trust.ENV, raising=False)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(6, 3, torch.float32, generator=g)
    b = torch.randn(6, generator=g)
    x = make_image(2, 6, 9, 8, torch.float32, generator=g)
    y = reference.forward(x.double(), w.double(), b.double()).float()
    return x, y, w, b


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_a_faulty_kernel_is_caught_once_and_auto_falls_back(monkeypatch, calls, fault):
    _install(monkeypatch, calls, inverse_error=fault)
    x, y, w, b = _problem()
    with pytest.warns(RuntimeWarning, match=rf"does not use '{FAKE}' for inverse in float32 on cpu.*"
                                            + ("relative error" if fault == "wrong" else "illegal memory access")):
        x_hat = ck.cinc_conv2d_inverse(y, w, b)
    assert rel_error(x_hat, x) <= 20 * RTOL[torch.float32]  # from the next backend of the order
    checked = calls["inverse"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert rel_error(ck.cinc_conv2d_inverse(y, w, b), x) <= 20 * RTOL[torch.float32]
    assert calls["inverse"] == checked  # decided once for (device, op, dtype): never run again
    # The verdict is per op and dtype: the fake's (right) forward is checked on its own and used.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_error(ck.cinc_conv2d(x, w, b), y) <= RTOL[torch.float32]
    assert calls["forward"] > 1
    # float64 gets its own check and its own warning.
    with pytest.warns(RuntimeWarning, match="for inverse in float64"):
        ck.cinc_conv2d_inverse(y.double(), w.double(), b.double())


def test_a_right_kernel_passes_and_is_used(monkeypatch, calls):
    _install(monkeypatch, calls)
    x, y, w, b = _problem(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for op in ("forward", "inverse", "inverse_transpose", "logdet"):
            fn = {"forward": lambda: ck.cinc_conv2d(x, w, b), "inverse": lambda: ck.cinc_conv2d_inverse(y, w, b),
                  "inverse_transpose": lambda: ck.cinc_conv2d_inverse_transpose(x, w),
                  "logdet": lambda: ck.cinc_logdet(w, 9, 8)}[op]
            fn()
            before = calls[op]
            fn()
            assert calls[op] == before + 1, f"{op}: the checked kernel runs the call itself"
    assert set(trust._verdicts.values()) == {True}


def test_opt_out_by_environment_variable(monkeypatch, calls):
    _install(monkeypatch, calls, inverse_error="wrong")
    monkeypatch.setenv(trust.ENV, "1")
    x, y, w, b = _problem(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_hat = ck.cinc_conv2d_inverse(y, w, b)
    assert calls["inverse"] == 1 and rel_error(x_hat, x) > 1e-2  # trusted as asked, wrong as it is


def test_explicit_backend_is_not_checked(monkeypatch, calls):
    _install(monkeypatch, calls, inverse_error="wrong")
    x, y, w, b = _problem(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.cinc_conv2d_inverse(y, w, b, backend=FAKE)
    assert calls["inverse"] == 1 and trust._verdicts == {}


def test_no_check_while_compiling(monkeypatch, calls):
    """Tracing cannot read a result: a kernel without a verdict is trusted there, one with a verdict keeps it."""
    _install(monkeypatch, calls, inverse_error="wrong")
    x, y, w, b = _problem(4)
    with pytest.warns(RuntimeWarning, match="does not use"):
        ck.cinc_conv2d_inverse(y, w, b)  # the eager warm-up decides
    torch._dynamo.reset()
    compiled = torch.compile(lambda y: ck.cinc_conv2d_inverse(y, w, b), fullgraph=True, backend="aot_eager")
    assert rel_error(compiled(y), x) <= 20 * RTOL[torch.float32]


def test_backends_subject_to_the_check():
    """The CUDA and Triton kernels on CUDA tensors; nothing on the CPU (its kernels are the ones CI runs)."""
    assert trust.CHECKED_BACKENDS == {"cuda", "triton"} and trust.CHECKED_DEVICE_TYPES == {"cuda"}
    assert trust.trusted(get_backend("cpu"), "inverse", torch.device("cpu"), torch.float32)
