"""Captured programs at image sizes other than the one they were captured at: ``torch.export`` with dynamic batch,
height and width, and ``torch.jit.trace``, for every layer on every backend of this process (``tests/conftest.py``).

The log-determinant scales with ``H·W`` (docs/spec.md §1), so a program that bakes in the size it was captured at
returns a wrong log-determinant everywhere else while the image itself stays right: each test compares both outputs
with eager execution at a second, odd size.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.export import Dim

import cinc_kernels as ck
from tests.cases import RTOL, rel_error

LAYER_NAMES = ("cinc", "emerging", "autoregressive", "1x1", "finc")
CHANNELS = 4
# Captured at the first size, run at the second: H ≠ W, primes, another batch.
CAPTURE_SHAPE = (2, CHANNELS, 6, 5)
RUN_SHAPE = (3, CHANNELS, 7, 11)


def _layer(name: str, backend: str, device: str) -> torch.nn.Module:
    """A layer moved away from its near-identity start, so that every tap and the log-determinant matter."""
    torch.manual_seed(3)
    layer = ck.LAYERS[name](CHANNELS, backend=backend).to(device).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return layer


def _image(shape, device: str, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _assert_same_as_eager(run, layer, device: str, what: str) -> None:
    x = _image(RUN_SHAPE, device, seed=7)
    y, logdet = run(x)
    with torch.no_grad():
        y_eager, logdet_eager = layer(x)
    assert y.shape == x.shape and logdet.shape == (x.shape[0],), what
    assert rel_error(y, y_eager) <= RTOL[torch.float32], f"{what}: image"
    assert rel_error(logdet, logdet_eager) <= RTOL[torch.float32], f"{what}: log-determinant {logdet} != {logdet_eager}"


def _dynamic_image():
    return ({0: Dim("batch", min=1, max=64), 2: Dim("height", min=2, max=64), 3: Dim("width", min=2, max=64)},)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_export_with_dynamic_sizes(backend, device, name):
    """``torch.export`` keeps B, H and W symbolic: the C++ log-determinant takes ``SymInt`` sizes and the layers
    scale by ``H·W`` without converting it to a Python number."""
    layer = _layer(name, backend, device)
    program = torch.export.export(layer, (_image(CAPTURE_SHAPE, device, seed=5),), dynamic_shapes=_dynamic_image())
    _assert_same_as_eager(program.module(), layer, device, f"export {name} {backend}")


class _Inverse(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer.inverse(y)


@pytest.mark.custom_ops
def test_export_inverse_with_dynamic_sizes(backend, device):
    layer = _layer("cinc", backend, device)
    program = torch.export.export(_Inverse(layer), (_image(CAPTURE_SHAPE, device, seed=5),),
                                  dynamic_shapes=_dynamic_image())
    y = _image(RUN_SHAPE, device, seed=8)
    with torch.no_grad():
        assert rel_error(program.module()(y), layer.inverse(y)) <= RTOL[torch.float32]


def test_export_log_determinant_op_keeps_sizes_symbolic(backend, device):
    """The op itself, called with the sizes of a dynamic image (the schema's ``SymInt``; an ``int`` would
    specialise them and the export would fail its constraints)."""
    w = _layer("cinc", backend, device).weight.detach()

    class LogDet(torch.nn.Module):
        def forward(self, x):
            return ck.cinc_logdet(w, x.shape[2], x.shape[3], backend=backend)

    program = torch.export.export(LogDet(), (_image(CAPTURE_SHAPE, device, seed=5),), dynamic_shapes=_dynamic_image())
    got = program.module()(_image(RUN_SHAPE, device, seed=6))
    want = ck.cinc_logdet(w, RUN_SHAPE[2], RUN_SHAPE[3], backend=backend)
    assert rel_error(got, want) <= RTOL[torch.float32]


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_jit_trace_is_right_at_other_sizes(backend, device, name):
    """``torch.jit.trace`` records ``x.shape`` as traced tensors: the log-determinant is scaled by them, so the
    trace is right at other sizes instead of repeating the captured ``H·W``."""
    layer = _layer(name, backend, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated in newer torch
        traced = torch.jit.trace(layer, (_image(CAPTURE_SHAPE, device, seed=5),), check_trace=False)
    _assert_same_as_eager(traced, layer, device, f"trace {name} {backend}")


def test_traced_log_determinant_of_an_empty_image_is_zero(backend, device):
    """The traced product ``H·W · (one-pixel log-determinant)`` keeps the contract at ``H·W = 0`` with a singular
    weight (``0 · -inf`` would be NaN)."""
    w = _layer("cinc", backend, device).weight.detach().clone()
    w[1, 1, 2, 2] = 0

    def logdet(x):
        return ck.cinc_logdet(w, x.shape[2], x.shape[3], backend=backend)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(logdet, (_image(CAPTURE_SHAPE, device, seed=5),), check_trace=False)
    assert traced(_image((1, CHANNELS, 0, 3), device, seed=1)).item() == 0.0
    assert traced(_image((1, CHANNELS, 2, 3), device, seed=1)).item() == float("-inf")


@pytest.mark.parametrize("capture", ["export", "trace"])
def test_default_layer_captured_at_one_size_runs_at_another(capture):
    """``CInCConv2d()`` as users make it (``backend="auto"``: on the CPU its forward is ATen's convolution on the
    masked weight, with the log-determinant read off the weight)."""
    layer = _layer("cinc", "auto", "cpu")
    x = _image(CAPTURE_SHAPE, "cpu", seed=5)
    if capture == "export":
        run = torch.export.export(layer, (x,), dynamic_shapes=_dynamic_image()).module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            run = torch.jit.trace(layer, (x,), check_trace=False)
    _assert_same_as_eager(run, layer, "cpu", f"{capture} CInCConv2d(backend='auto')")
