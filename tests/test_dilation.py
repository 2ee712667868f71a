"""Dilated CInC convolution: the public ops (space-to-batch over the d² interleaved sub-images) against the
reference's direct dilated implementation, and that one against the dense matrix (docs/spec.md §4)."""
from __future__ import annotations

import pytest
import torch

from cinc_kernels import (cinc_conv2d, cinc_conv2d_inverse, cinc_conv2d_inverse_transpose, cinc_logdet,
                          reference)
from cinc_kernels.flow import CInCFlow
from cinc_kernels.nn import CInCConv2d

from .cases import backends_on, make_weight

BACKENDS = backends_on("cpu")
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}
# (B, C, H, W, k, d): H, W not multiples of d, primes, H ≠ W, images smaller than d, batch 0.
CASES = [(2, 3, 5, 7, 3, 2), (1, 2, 7, 4, 2, 3), (2, 1, 1, 1, 3, 2), (1, 4, 2, 3, 3, 4), (0, 2, 5, 5, 3, 2),
         (1, 3, 6, 6, 1, 2), (2, 2, 5, 3, 3, 1)]


def _weight(C, k, seed, dtype=torch.float64):
    return make_weight(C, k, dtype, generator=torch.Generator().manual_seed(seed))


def _non_contiguous(t):
    return t.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("B,C,H,W,k,d", CASES)
def test_reference_dilated_matches_the_dense_matrix(B, C, H, W, k, d):
    w = _weight(C, k, 1)
    M = reference.dense_matrix(w, H, W, dilation=d)
    x = torch.randn(max(B, 1), C, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    n = C * H * W
    # Tap (a, b) reads the pixel ((k-1-a)·d, (k-1-b)·d) above and left.
    y = reference.forward(x, w, dilation=d)
    expected = torch.zeros_like(x)
    for a in range(k):
        for b in range(k):
            dy, dx = (k - 1 - a) * d, (k - 1 - b) * d
            shifted = torch.zeros_like(x)
            shifted[:, :, dy:, dx:] = x[:, :, :H - dy, :W - dx] if dy < H and dx < W else 0
            expected += torch.einsum("oc,bchw->bohw", reference.masked_weight(w)[:, :, a, b], shifted)
    assert torch.allclose(y, expected, atol=1e-12)
    assert torch.allclose((M @ x.reshape(-1, n).T).T.reshape(x.shape), y, atol=1e-12)
    assert torch.allclose(reference.inverse(y, w, dilation=d), x, atol=1e-10)
    g = torch.randn_like(x)
    u = reference.inverse_transpose(g, w, dilation=d)
    assert torch.allclose((M.T @ u.reshape(-1, n).T).T.reshape(x.shape), g, atol=1e-10)
    if n:
        assert torch.allclose(reference.logdet(w, H, W, dilation=d), torch.linalg.slogdet(M).logabsdet, atol=1e-9)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,C,H,W,k,d", CASES)
def test_public_ops_with_dilation_match_the_reference(B, C, H, W, k, d, backend, dtype):
    tol = TOL[dtype]
    w = _weight(C, k, 3 + d, dtype)
    bias = torch.randn(C, generator=torch.Generator().manual_seed(4), dtype=dtype)
    x = _non_contiguous(torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(5), dtype=dtype))
    y = cinc_conv2d(x, w, bias, backend=backend, dilation=d)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.allclose(y.double(), reference.forward(x, w, bias, dilation=d).double(), atol=tol, rtol=tol)
    x_back = cinc_conv2d_inverse(y, w, bias, backend=backend, dilation=d)
    assert torch.allclose(x_back.double(), reference.inverse(y, w, bias, dilation=d).double(), atol=tol, rtol=tol)
    assert torch.allclose(x_back, x, atol=tol * 10, rtol=tol * 10)
    g = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(6), dtype=dtype)
    u = cinc_conv2d_inverse_transpose(g, w, backend=backend, dilation=d)
    assert torch.allclose(u.double(), reference.inverse_transpose(g, w, dilation=d).double(), atol=tol, rtol=tol)
    assert torch.equal(cinc_logdet(w, H, W, backend=backend, dilation=d), cinc_logdet(w, H, W, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_and_unit_diagonal_with_dilation(backend):
    w = _weight(3, 3, 7, torch.float32)
    y = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(8))
    x = cinc_conv2d_inverse(y, w, backend=backend, accumulate=torch.float64, dilation=2)
    assert torch.allclose(x.double(), reference.inverse(y, w, dilation=2).double(), atol=1e-5)
    u = cinc_conv2d_inverse_transpose(y, w, backend=backend, accumulate=torch.float64, dilation=3,
                                      unit_diagonal=True)
    assert torch.allclose(u.double(), reference.inverse_transpose(y, w, True, dilation=3).double(), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_with_dilation_match_the_reference(backend):
    C, H, W, k, d = 2, 5, 4, 2, 2
    g = torch.Generator().manual_seed(9)
    w = _weight(C, k, 10).requires_grad_()
    bias = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(2, C, H, W, generator=g, dtype=torch.float64).requires_grad_()
    cot = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    for op, ref in ((lambda x_, w_, b_: cinc_conv2d(x_, w_, b_, backend=backend, dilation=d),
                     lambda x_, w_, b_: reference.forward(x_, w_, b_, dilation=d)),
                    (lambda x_, w_, b_: cinc_conv2d_inverse(x_, w_, b_, backend=backend, dilation=d),
                     lambda x_, w_, b_: reference.inverse(x_, w_, b_, dilation=d)),
                    (lambda x_, w_, b_: (cinc_conv2d_inverse_transpose(x_, w_, backend=backend, dilation=d)
                                         + b_[:, None, None]),
                     lambda x_, w_, b_: reference.inverse_transpose(x_, w_, dilation=d) + b_[:, None, None])):
        got = torch.autograd.grad((op(x, w, bias) * cot).sum(), (x, w, bias))
        want = torch.autograd.grad((ref(x, w, bias) * cot).sum(), (x, w, bias))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-9)
    assert torch.autograd.gradcheck(lambda x_, w_: cinc_conv2d_inverse(x_, w_, backend=backend, dilation=3),
                                    (x[:1, :, :4, :4].detach().requires_grad_(), w))


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_dilation_is_refused_by_name(bad, exc):
    w = _weight(2, 3, 0)
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    for call in (lambda: cinc_conv2d(x, w, dilation=bad), lambda: cinc_conv2d_inverse(x, w, dilation=bad),
                 lambda: cinc_conv2d_inverse_transpose(x, w, dilation=bad),
                 lambda: cinc_logdet(w, 3, 3, dilation=bad)):
        with pytest.raises(exc, match="dilation"):
            call()
    with pytest.raises(exc, match="dilation"):
        CInCConv2d(2, dilation=bad)


def test_layer_and_flow_take_dilation():
    torch.manual_seed(0)
    layer = CInCConv2d(3, dilation=2, init_scale=0.2).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    y, logdet = layer(x)
    assert torch.allclose(y, reference.forward(x, layer.weight, layer.bias, dilation=2), atol=1e-12)
    assert torch.allclose(logdet, reference.logdet(layer.weight, 5, 6).expand(2), atol=1e-12)
    assert torch.allclose(layer.inverse(y), x, atol=1e-10)
    assert "dilation=2" in repr(layer)
    model = CInCFlow(1, 2, 1, 4, image_size=8, conv_kwargs={"dilation": 2}).double()
    assert all(step.conv.dilation == 2 for level in model.levels for step in level.steps)
    model.train()(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    model.eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(model.decode(model.encode(x)), x, atol=1e-10)
