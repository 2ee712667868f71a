"""The inverse returns bitwise identical results run to run on one device (and, on the CPU, for any thread count
where the arithmetic order is fixed by construction).

A flow that samples a different image from the same latent on a rerun would make bugs irreproducible, and a wavefront
invites races: pixels of one anti-diagonal are solved in parallel and read their neighbours from earlier ones.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels.backends import get_backend

from .cases import make_image, make_weight

HAS_GPU = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none visible): GPU determinism is unverified here")


def fast_backends(device_type: str) -> list:
    return [b for b in ck.available_backends() if b != "reference" and get_backend(b).runs_on(device_type)]


def backend_params():
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in fast_backends("cpu")]
    gpu = fast_backends("cuda") if HAS_GPU else ["cuda"]
    params += [pytest.param("cuda", b, id=f"cuda-{b}", marks=NO_GPU) for b in gpu]
    return params


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inputs(C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # off_centre=1 makes the solve's error visible (κ ~ 10): a race would change the low bits.
    w = make_weight(C, 3, dtype, device, off_centre=1.0, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = make_image(3, C, 31, 26, dtype, device, generator=g)
    return w, b, y


# C = 3 takes the per-pixel ("direct") schedule of the CPU kernels, C = 12 the gathered-GEMM one.
@pytest.mark.parametrize("C", [3, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("device,backend", backend_params())
def test_inverse_is_bitwise_reproducible(device, backend, dtype, C):
    w, b, y = inputs(C, dtype, device)
    first = ck.cinc_conv2d_inverse(y, w, b, backend=backend)
    first_t = ck.cinc_conv2d_inverse_transpose(y, w, backend=backend)
    for _ in range(3):
        assert torch.equal(ck.cinc_conv2d_inverse(y, w, b, backend=backend), first)
        assert torch.equal(ck.cinc_conv2d_inverse_transpose(y, w, backend=backend), first_t)
    # A channels-last input is the same values: the same bits come out.
    y_cl = y.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ck.cinc_conv2d_inverse(y_cl, w, b, backend=backend), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("device,backend", backend_params())
def test_gradients_through_the_inverse_are_bitwise_reproducible(device, backend, dtype):
    w, b, y = inputs(5, dtype, device, seed=1)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(y)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (y, w, b)]
        ck.cinc_conv2d_inverse(*leaves, backend=backend).backward(grad_out)
        return [t.grad for t in leaves]

    if device == "cuda":
        # cuDNN's weight gradient (used by the backward) is only reproducible in deterministic mode.
        torch.use_deterministic_algorithms(True)
    try:
        first = grads()
        for _ in range(2):
            assert all(torch.equal(a, b) for a, b in zip(grads(), first))
    finally:
        if device == "cuda":
            torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", fast_backends("cpu"))
def test_cpu_inverse_does_not_depend_on_the_thread_count(backend, dtype):
    # With few channels each pixel's tap loop and substitution run inside one task in a fixed order, so the split of
    # a diagonal between threads cannot change a bit. (The GEMM schedule's BLAS call is only promised run-to-run.)
    w, b, y = inputs(3, dtype, "cpu", seed=3)
    with num_threads(1):
        want = ck.cinc_conv2d_inverse(y, w, b, backend=backend)
        want_t = ck.cinc_conv2d_inverse_transpose(y, w, backend=backend)
    for n in (2, 3):
        with num_threads(n):
            assert torch.equal(ck.cinc_conv2d_inverse(y, w, b, backend=backend), want), n
            assert torch.equal(ck.cinc_conv2d_inverse_transpose(y, w, backend=backend), want_t), n
