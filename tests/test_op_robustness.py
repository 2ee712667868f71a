"""Inputs at the edges (docs/spec.md §1–§2): registered ops called directly with bad arguments, huge image sizes in the
log-determinant, NaN/Inf in masked weight entries, images without pixels or channels, and a non-bool
``unit_diagonal``. One behaviour on every backend."""
from __future__ import annotations

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import nn as cnn
from cinc_kernels import reference

from .cases import backends_on, make_image, make_weight, rel_error

BACKENDS = backends_on("cpu", auto=True)


def f64(*shape):
    return torch.zeros(shape, dtype=torch.float64)


BAD_WEIGHTS = {
    "k=0": f64(3, 3, 0, 0),
    "k=8": f64(3, 3, 8, 8),
    "not square over channels": f64(3, 2, 3, 3),
    "not a square kernel": f64(3, 3, 2, 3),
    "3-D": f64(3, 3, 3),
    "integer dtype": torch.zeros(3, 3, 3, 3, dtype=torch.int32),
}


@pytest.mark.parametrize("why", list(BAD_WEIGHTS))
def test_registered_ops_refuse_a_bad_weight_before_reading_it(why):
    w = BAD_WEIGHTS[why]
    x = f64(1, 3, 4, 4)
    calls = [
        lambda: torch.ops.cinc.logdet(w, 4, 4, False),
        lambda: torch.ops.cinc.forward(x, w, None, False),
        lambda: torch.ops.cinc.inverse(x, w, None, False),
        lambda: torch.ops.cinc.inverse_transpose(x, w, False),
    ]
    for op in calls:
        with pytest.raises(RuntimeError, match="weight"):
            op()


@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose"])
def test_registered_image_ops_refuse_bad_images_and_biases(op):
    w = make_weight(3, 2)
    good = make_image(1, 3, 4, 4)
    fn = getattr(torch.ops.cinc, op)

    def run(x, bias=None):
        return fn(x, w, False) if op == "inverse_transpose" else fn(x, w, bias, False)

    for x in [f64(3, 4, 4), f64(1, 2, 4, 4), good.float(), good.to(torch.int64)]:
        with pytest.raises(RuntimeError):
            run(x)
    if op != "inverse_transpose":
        for bias in [f64(2), f64(3, 1), torch.zeros(3)]:
            with pytest.raises(RuntimeError, match="bias"):
                run(good, bias)


def test_registered_logdet_refuses_negative_sizes():
    w = make_weight(2, 3)
    for h, wd in [(-1, 4), (4, -1)]:
        with pytest.raises(RuntimeError, match="must be >= 0"):
            torch.ops.cinc.logdet(w, h, wd, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logdet_of_a_huge_image_does_not_overflow(backend, dtype):
    w = make_weight(3, 3, dtype, generator=torch.Generator().manual_seed(0))
    size = 2**32  # height * width = 2^64 wraps to 0 in int64
    got = ck.cinc_logdet(w, size, size, backend=backend)
    want = float(size) * float(size) * torch.log(w[:, :, 2, 2].double().diagonal().abs()).sum()
    assert got.dtype == dtype and torch.isfinite(got)
    assert rel_error(got, want) < (1e-6 if dtype == torch.float32 else 1e-12)
    assert ck.cinc_logdet(w, 0, size, backend=backend).item() == 0.0


def masked_positions(C, k, unit):
    keep = reference.weight_mask(C, k, unit, dtype=torch.bool)
    return ~keep


@pytest.mark.parametrize("unit", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_or_inf_in_masked_weight_entries_changes_nothing(backend, poison, unit):
    g = torch.Generator().manual_seed(1)
    C, k = 4, 3
    w = make_weight(C, k, generator=g)
    poisoned = torch.where(masked_positions(C, k, unit), torch.tensor(poison, dtype=torch.float64), w)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    x = make_image(2, C, 5, 3, generator=g)
    y = ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend=backend)
    y_p = ck.cinc_conv2d(x, poisoned, b, unit_diagonal=unit, backend=backend)
    assert torch.isfinite(y_p).all()
    torch.testing.assert_close(y_p, y, rtol=0, atol=0)
    torch.testing.assert_close(ck.cinc_conv2d_inverse(y, poisoned, b, unit_diagonal=unit, backend=backend),
                               ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(ck.cinc_conv2d_inverse_transpose(x, poisoned, unit_diagonal=unit, backend=backend),
                               ck.cinc_conv2d_inverse_transpose(x, w, unit_diagonal=unit, backend=backend),
                               rtol=0, atol=0)
    assert ck.cinc_logdet(poisoned, 5, 3, unit_diagonal=unit, backend=backend) == ck.cinc_logdet(
        w, 5, 3, unit_diagonal=unit, backend=backend)
    # Gradients: finite, and exactly zero on the masked entries.
    leaf = poisoned.clone().requires_grad_()
    loss = (ck.cinc_conv2d(x, leaf, b, unit_diagonal=unit, backend=backend).sum()
            + ck.cinc_conv2d_inverse(y, leaf, b, unit_diagonal=unit, backend=backend).sum()
            + ck.cinc_logdet(leaf, 5, 3, unit_diagonal=unit, backend=backend))
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[masked_positions(C, k, unit)] == 0)


EMPTY_SHAPES = [(2, 3, 0, 4), (2, 3, 4, 0), (0, 3, 4, 4), (2, 0, 4, 4)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_images_give_empty_results_and_zero_gradients(backend, shape):
    C = shape[1]
    w = make_weight(C, 3, generator=torch.Generator().manual_seed(2)) if C else f64(0, 0, 3, 3)
    b = torch.zeros(C, dtype=torch.float64)
    x = torch.zeros(shape, dtype=torch.float64)
    leaves = [w.clone().requires_grad_(), b.clone().requires_grad_(), x.clone().requires_grad_()]
    wl, bl, xl = leaves
    outs = [
        ck.cinc_conv2d(xl, wl, bl, backend=backend),
        ck.cinc_conv2d_inverse(xl, wl, bl, backend=backend),
        ck.cinc_conv2d_inverse_transpose(xl, wl, backend=backend),
    ]
    for out in outs:
        assert out.shape == shape and out.dtype == torch.float64
    if C == 0 or 0 in shape[2:]:
        assert ck.cinc_logdet(wl, shape[2], shape[3], backend=backend).item() == 0.0
    grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves, allow_unused=True)
    for g, leaf in zip(grads, leaves):
        assert g is None or (g.shape == leaf.shape and torch.all(g == 0))


@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0), (0, 3, 4, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layer", ["cinc", "emerging", "finc", "autoregressive", "1x1"])
def test_layers_take_empty_images(layer, shape):
    torch.manual_seed(3)
    module = {"cinc": lambda: cnn.CInCConv2d(3), "emerging": lambda: cnn.EmergingConv2d(3),
              "finc": lambda: cnn.FInCConv2d(3), "autoregressive": lambda: cnn.AutoregressiveConv2d(3),
              "1x1": lambda: cnn.InvConv1x1(3)}[layer]().double()
    x = torch.zeros(shape, dtype=torch.float64)
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    assert y.shape == shape
    assert module.inverse(y).shape == shape


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, torch.tensor(True)], ids=repr)
def test_unit_diagonal_must_be_a_bool_everywhere(bad):
    w = make_weight(2, 2)
    x = make_image(1, 2, 3, 3)
    calls = [
        lambda: ck.cinc_conv2d(x, w, unit_diagonal=bad),
        lambda: ck.cinc_conv2d_inverse(x, w, unit_diagonal=bad),
        lambda: ck.cinc_conv2d_inverse_transpose(x, w, unit_diagonal=bad),
        lambda: ck.cinc_logdet(w, 3, 3, unit_diagonal=bad),
        lambda: cnn.CInCConv2d(2, unit_diagonal=bad),
        lambda: cnn.EmergingConv2d(2, unit_diagonal=bad),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="unit_diagonal must be a bool"):
            call()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("C", [3, 12], ids=["direct", "gemm"])
def test_cpu_inverse_is_bitwise_deterministic_at_a_fixed_thread_count(C, threads):
    g = torch.Generator().manual_seed(4)
    w = make_weight(C, 3, torch.float32, off_centre=1.0, generator=g)
    y = make_image(2, C, 17, 13, torch.float32, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = ck.cinc_conv2d_inverse(y, w, backend="cpu")
        for _ in range(3):
            assert torch.equal(ck.cinc_conv2d_inverse(y, w, backend="cpu"), first)
    finally:
        torch.set_num_threads(before)
