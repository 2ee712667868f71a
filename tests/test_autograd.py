"""Gradients, torch.library registration and torch.compile for the C++ ops."""
import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import reference
from tests.cases import make_image, make_weight, with_layout

OPS = [torch.ops.cinc.forward.default, torch.ops.cinc.inverse.default, torch.ops.cinc.inverse_transpose.default,
       torch.ops.cinc.logdet.default]


def sample_inputs(device="cpu", dtype=torch.float64, requires_grad=False):
    """(op, args) pairs covering bias / no bias, unit diagonal, k = 1…3, odd sizes."""
    g = torch.Generator().manual_seed(11)
    out = []
    for B, C, H, W, k, bias, unit in [(2, 3, 4, 5, 3, True, False), (1, 2, 3, 2, 2, False, True),
                                      (2, 9, 3, 3, 3, True, True), (1, 4, 2, 3, 1, True, False)]:
        def fresh():
            w = make_weight(C, k, dtype, device, generator=g).requires_grad_(requires_grad)
            b = torch.randn(C, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad) if bias else None
            x = make_image(B, C, H, W, dtype, device, generator=g).requires_grad_(requires_grad)
            return w, b, x
        w, b, x = fresh()
        out.append((OPS[0], (x, w, b, unit)))
        w, b, x = fresh()
        out.append((OPS[1], (x, w, b, unit)))
        w, b, x = fresh()
        out.append((OPS[2], (x, w, unit)))
        w, b, x = fresh()
        out.append((OPS[3], (w, H, W, unit)))
    return out


@pytest.mark.parametrize("op,args", sample_inputs(), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("op,args", sample_inputs(requires_grad=True), ids=lambda v: getattr(v, "__name__", ""))
def test_gradcheck_float64(op, args):
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def _grads(fn, tensors):
    out = fn(*tensors)
    g = torch.Generator().manual_seed(5)
    gout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, tensors, gout)


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("which", ["forward", "inverse", "inverse_transpose", "logdet"])
def test_gradients_match_reference_autograd(which, unit):
    """The hand-written backward formulas against autograd through the plain float64 reference."""
    g = torch.Generator().manual_seed(21)
    C, H, W, k = 3, 4, 3, 3
    w = make_weight(C, k, generator=g).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    x = make_image(2, C, H, W, generator=g).requires_grad_()
    if which == "forward":
        fast = lambda x, w, b: ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend="cpu")  # noqa: E731
        slow = lambda x, w, b: reference.forward(x, w, b, unit)  # noqa: E731
        args = (x, w, b)
    elif which == "inverse":
        fast = lambda y, w, b: ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend="cpu")  # noqa: E731
        slow = lambda y, w, b: reference.inverse(y, w, b, unit)  # noqa: E731
        args = (x, w, b)
    elif which == "inverse_transpose":
        fast = lambda g_, w: ck.cinc_conv2d_inverse_transpose(g_, w, unit_diagonal=unit, backend="cpu")  # noqa: E731
        slow = lambda g_, w: reference.inverse_transpose(g_, w, unit)  # noqa: E731
        args = (x, w)
    else:
        fast = lambda w: ck.cinc_logdet(w, H, W, unit_diagonal=unit, backend="cpu")  # noqa: E731
        slow = lambda w: reference.logdet(w, H, W, unit)  # noqa: E731
        args = (w,)
    for got, want in zip(_grads(fast, args), _grads(slow, args)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("unit", [False, True])
def test_masked_weight_entries_get_exactly_zero_gradient(unit):
    g = torch.Generator().manual_seed(2)
    C, k = 5, 3
    w = make_weight(C, k, generator=g).requires_grad_()
    x = make_image(2, C, 6, 5, generator=g)
    mask = reference.weight_mask(C, k, unit)
    loss = (ck.cinc_conv2d(x, w, unit_diagonal=unit, backend="cpu") ** 2).sum()
    loss = loss + (ck.cinc_conv2d_inverse(x, w, unit_diagonal=unit, backend="cpu") ** 2).sum()
    loss = loss + ck.cinc_logdet(w, 6, 5, unit_diagonal=unit, backend="cpu")
    (gw,) = torch.autograd.grad(loss, w)
    assert torch.all(gw[mask == 0] == 0)
    assert torch.all(gw[mask == 1] != 0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_compile_fullgraph_matches_eager(layout):
    g = torch.Generator().manual_seed(4)
    w = make_weight(6, 3, torch.float32, generator=g)
    b = torch.randn(6, generator=g)
    x = with_layout(make_image(2, 6, 7, 5, torch.float32, generator=g), layout)

    def roundtrip(x, w, b):
        y = ck.cinc_conv2d(x, w, b, backend="cpu")
        return y, ck.cinc_conv2d_inverse(y * 1.5, w, b, backend="cpu"), ck.cinc_logdet(w, 7, 5, backend="cpu")

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w, b), roundtrip(x, w, b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
