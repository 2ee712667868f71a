"""Micro-benchmarks for pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Not part of the test command (``python -m pytest tests``). One small shape per layer, on the CPU (and on CUDA when
present): forward, inverse and forward+backward. The comparison across shapes is ``python -m cinc_kernels bench``.
"""
import pytest
import torch

import cinc_kernels as ck

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPE = (8, 12, 16, 16)


def _layer_and_input(name, device):
    torch.manual_seed(0)
    layer = ck.LAYERS[name](SHAPE[1]).to(device)
    return layer, torch.randn(SHAPE, device=device)


def _synced(fn, device):
    if device == "cuda":
        def call():
            out = fn()
            torch.cuda.synchronize()
            return out
        return call
    return fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ck.LAYERS))
def test_forward(benchmark, name, device):
    layer, x = _layer_and_input(name, device)
    with torch.no_grad():
        y, logdet = benchmark(_synced(lambda: layer(x), device))
    assert y.shape == x.shape and logdet.shape == (SHAPE[0],)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ck.LAYERS))
def test_inverse(benchmark, name, device):
    layer, x = _layer_and_input(name, device)
    with torch.no_grad():
        y, _ = layer(x)
        x_back = benchmark(_synced(lambda: layer.inverse(y), device))
    assert (x_back - x).norm() <= 1e-4 * x.norm()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ck.LAYERS))
def test_forward_backward(benchmark, name, device):
    layer, x = _layer_and_input(name, device)

    def step():
        layer.zero_grad(set_to_none=True)
        y, logdet = layer(x.requires_grad_())
        (0.5 * y.square().mean() - logdet.mean()).backward()

    benchmark(_synced(step, device))
    assert all(p.grad is not None for p in layer.parameters())
