"""Sampling never waits for the device: ``CInCConv2d.inverse`` checks its result for inf/NaN without a
device → host synchronisation (``cinc_kernels/finite_check.py``), so a whole ``CInCFlow.sample`` keeps a CUDA stream
asynchronous and can be captured in a CUDA graph.

Without a GPU the CUDA path runs on CPU tensors (the CPU's own default reads the flag at once, which costs nothing
there): every call that would synchronise a GPU stream (``item``, ``bool``, ``tolist``, ``float``, ``int``,
``cpu``…) is counted during a sample and must not happen. With a GPU, ``torch.cuda.set_sync_debug_mode("error")``
and graph capture check the real thing.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import finite_check
from cinc_kernels.conditioning import NonFiniteInverseWarning
from cinc_kernels.flow.model import build_model
from tests.test_conditioning import _exploding_layer

SYNCHRONISING = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__", "cpu")


@pytest.fixture
def cpu_takes_the_cuda_path(monkeypatch):
    """CPU tensors checked the way CUDA tensors are: the flag mirrored asynchronously, never read on the spot."""
    monkeypatch.setattr(finite_check, "IMMEDIATE_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(finite_check, "MIRRORED_DEVICE_TYPES", frozenset({"cpu", "cuda"}))


@pytest.fixture
def synchronising_calls(monkeypatch):
    """A list that receives the name of every synchronising tensor method called while the test runs."""
    calls: list[str] = []
    for name in SYNCHRONISING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _model():
    torch.manual_seed(0)
    return build_model("digits-small").eval()


def test_sample_makes_no_synchronising_call(cpu_takes_the_cuda_path, synchronising_calls):
    """Every layer checks its inverse (``check_finite`` is on by default), yet nothing reads the device: the
    check formerly called ``bool()`` once per ``CInCConv2d`` per sample."""
    model = _model()
    convs = [m for m in model.modules() if isinstance(m, ck.CInCConv2d)]
    assert convs and all(m.check_finite for m in convs)
    images = model.sample(3)
    assert synchronising_calls == []
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_the_check_counts_what_it_should(synchronising_calls):
    """The counter itself: the CPU default reads each layer's flag at once (free on a CPU), one ``bool`` per layer."""
    model = _model()
    convs = [m for m in model.modules() if isinstance(m, ck.CInCConv2d)]
    model.sample(2)
    assert synchronising_calls.count("__bool__") == len(convs)


def test_deferred_check_warns_a_call_later(cpu_takes_the_cuda_path):
    """On the asynchronous path the failure reaches the host through the mirror: the warning comes at a later
    inverse of the same layer, once, naming the layer."""
    layer = _exploding_layer()
    layer.name = "level1.step2.conv"
    y = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = layer.inverse(y)  # the flag is on the device side; the mirror still says "all finite"
    assert not torch.isfinite(x).all()
    with pytest.warns(NonFiniteInverseWarning, match=r"level1\.step2\.conv.*inf/NaN"):
        layer.inverse(y[:, :, :4, :4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.inverse(y)  # once per layer


def test_deferred_check_stays_quiet_on_finite_results(cpu_takes_the_cuda_path):
    layer = ck.CInCConv2d(4)
    y = torch.randn(2, 4, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            layer.inverse(y)
        ck.CInCConv2d(4).inverse(torch.full((1, 4, 3, 3), float("nan")))  # a non-finite input is not the layer's


def test_copies_start_with_a_fresh_record(cpu_takes_the_cuda_path):
    layer = _exploding_layer()
    y = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    layer.inverse(y)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            twin.inverse(y[:, :, :2, :2])  # finite, and the original's failure is not the copy's
        twin.inverse(y)  # fails; the mirror tells the next call
        with pytest.warns(NonFiniteInverseWarning):
            twin.inverse(y)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")


def _warm_up(model, n):
    """First calls outside the measured region: allocations, the first-use kernel self-check, the flags' mirrors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.sample(n)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


@needs_gpu
def test_sample_does_not_synchronise_the_gpu():
    model = _model().cuda()
    _warm_up(model, 4)
    torch.cuda.set_sync_debug_mode("error")
    try:
        images = model.sample(4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(images).all()


@needs_gpu
def test_sample_is_captured_by_a_cuda_graph():
    model = _model().cuda()
    _warm_up(model, 4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        images = model.sample(4)
    graph.replay()
    first = images.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all() and torch.isfinite(first).all()
    assert not torch.equal(images, first)  # fresh noise on every replay
