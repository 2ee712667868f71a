"""The inverse returns bitwise identical results run to run on one device (and, on the CPU, for any thread count
where the arithmetic order is fixed by construction).

A flow that samples a different image from the same latent on a rerun would make bugs irreproducible, and a wavefront
invites races: pixels of one anti-diagonal are solved in parallel and read their neighbours from earlier ones.
"""
from __future__ import annotations


import pytest
import torch

import cinc_kernels as ck
from cinc_kernels.harness import num_threads
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


def inputs(C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # off_centre=1 makes the solve's error visible (κ ~ 10): a race would change the low bits.
    w = make_weight(C, 3, dtype, device, off_centre=1.0, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    y = make_image(3, C, 31, 26, dtype, device, generator=g)
    return w, b, y


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


# (B, C, H, W): several images (threads split the batch) and one image large enough that threads split each
# anti-diagonal.
THREAD_SHAPES = [(3, 3, 31, 26), (3, 12, 31, 26), (1, 48, 52, 53)]


@pytest.mark.parametrize("schedule", ["direct", "tiled"])
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=["x".join(map(str, s)) for s in THREAD_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cpu_inverse_does_not_depend_on_the_thread_count(shape, dtype, schedule, monkeypatch):
    # Each pixel's tap sums and substitution run inside one task in an order fixed by construction (the tiled
    # schedule's short blocks repeat a pixel in lanes that are thrown away), so neither the split of the batch nor of
    # a diagonal between threads can change a bit.
    monkeypatch.setenv("CINC_CPU_SCHEDULE", schedule)
    B, C, H, W = shape
    g = torch.Generator().manual_seed(3)
    w = make_weight(C, 3, dtype, off_centre=1.0, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    y = make_image(B, C, H, W, dtype, generator=g)
    with num_threads(1):
        want = ck.cinc_conv2d_inverse(y, w, b, backend="cpu")
        want_t = ck.cinc_conv2d_inverse_transpose(y, w, backend="cpu")
    for n in (2, 3):
        with num_threads(n):
            assert torch.equal(ck.cinc_conv2d_inverse(y, w, b, backend="cpu"), want), n
            assert torch.equal(ck.cinc_conv2d_inverse_transpose(y, w, backend="cpu"), want_t), n
