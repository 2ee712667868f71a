"""The ops and the layer under ``torch.autocast`` on every backend of this process (``tests/conftest.py``): CPU
autocast to bfloat16, CUDA autocast to float16 where a GPU is present.

Inside an autocast region every CInC op runs in float32 (docs/spec.md §2; ``cinc_kernels/autocast.py``): the result
is float32 and as accurate as outside the region, whether the inputs are float32 or come from an earlier autocast
op in half precision; float64 inputs stay float64; eager and compiled agree; gradients reach the inputs in their own
dtypes; and the layer's inverse takes its own autocast output.
"""
from __future__ import annotations

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import reference
from cinc_kernels.backends import get_backend
from tests.cases import RTOL, adjoint_apply, backend_case, make_image, make_weight, rel_error

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}
SHAPE = (2, 5, 6, 7)


def _autocast(device: str):
    return torch.autocast(device, dtype=AUTOCAST_DTYPE[device])


def _inputs(device: str, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = SHAPE
    w = make_weight(C, 3, dtype, device, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    x = make_image(B, C, H, W, dtype, device, generator=g)
    return x, w, b


def _ops(backend: str):
    return {
        "forward": lambda x, w, b: ck.cinc_conv2d(x, w, b, backend=backend),
        "inverse": lambda y, w, b: ck.cinc_conv2d_inverse(y, w, b, backend=backend),
        "inverse_transpose": lambda g, w, b: ck.cinc_conv2d_inverse_transpose(g, w, backend=backend),
        "logdet": lambda x, w, b: ck.cinc_logdet(w, x.shape[2], x.shape[3], backend=backend),
    }


def _check_against_reference(op: str, out, x, w, b, tol: float) -> None:
    x64, w64, b64 = x.double(), w.double(), b.double()
    if op == "forward":
        want = reference.forward(x64, w64, b64)
    elif op == "inverse":
        want = reference.inverse(x64, w64, b64)
    elif op == "inverse_transpose":
        assert rel_error(adjoint_apply(out, w64, False), x64) <= tol, op
        return
    else:
        want = reference.logdet(w64, x.shape[2], x.shape[3])
    assert rel_error(out, want) <= tol, f"{op}: {rel_error(out, want):.2e} > {tol:.1e}"


@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose", "logdet"])
def test_ops_run_in_float32_under_autocast(backend, device, op):
    """float32 in, float32 out, as accurate as without autocast (the ``torch`` backend solved in bfloat16 before:
    errors of 1e-3)."""
    x, w, b = _inputs(device)
    with _autocast(device):
        out = _ops(backend)[op](x, w, b)
    assert out.dtype == torch.float32
    _check_against_reference(op, out, x, w, b, 20 * RTOL[torch.float32])


@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose"])
def test_half_precision_image_from_an_earlier_autocast_op(backend, device, op):
    """The mix autocast produces (a half-precision image, a float32 weight) is taken, not refused: the image is cast
    up and the op runs in float32, exactly as on the cast image outside autocast."""
    x, w, b = _inputs(device, seed=1)
    half = x.to(AUTOCAST_DTYPE[device])
    with _autocast(device):
        out = _ops(backend)[op](half, w, b)
    want = _ops(backend)[op](half.float(), w, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_float64_stays_float64_under_autocast(backend, device):
    x, w, b = _inputs(device, torch.float64, seed=2)
    with _autocast(device):
        y = ck.cinc_conv2d(x, w, b, backend=backend)
        x_hat = ck.cinc_conv2d_inverse(y, w, b, backend=backend)
    assert y.dtype == x_hat.dtype == torch.float64
    assert rel_error(x_hat, x) <= 20 * RTOL[torch.float64]


@pytest.mark.custom_ops
@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose", "logdet"])
def test_custom_ops_under_autocast(backend, device, op):
    """The registered ops themselves (a direct ``torch.ops`` call): a half-precision argument is cast up, the result
    is float32, and ``opcheck`` (fake tensors, autograd registration, AOT dispatch) holds inside the region."""
    x, w, b = _inputs(device, seed=3)
    fn = get_backend(backend).ops[op]
    args = {"forward": (x, w, b, False), "inverse": (x, w, b, False), "inverse_transpose": (x, w, False),
            "logdet": (w, x.shape[2], x.shape[3], False)}[op]
    half_args = tuple(a.to(AUTOCAST_DTYPE[device]) if isinstance(a, torch.Tensor) else a for a in args)
    with _autocast(device):
        out = fn(*half_args)
        assert out.dtype == torch.float32
        if not backend_case(backend, device).interpreted:
            torch.library.opcheck(fn, args)


@pytest.mark.custom_ops
def test_compiled_matches_eager_under_autocast(backend, device):
    """Eager and ``torch.compile(fullgraph=True)`` agree on dtype and values inside an autocast region (the fake
    implementation said float32 while the ``torch`` backend's eager forward returned bfloat16)."""
    x, w, b = _inputs(device, seed=4)

    def roundtrip(x, w, b):
        with _autocast(device):
            y = ck.cinc_conv2d(x, w, b, backend=backend)
            return y, ck.cinc_conv2d_inverse(y, w, b, backend=backend)

    want = roundtrip(x, w, b)
    torch._dynamo.reset()
    got = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(x, w, b)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("inside", [True, False], ids=["backward_inside", "backward_outside"])
def test_backward_under_autocast(backend, device, inside):
    """Gradients (formerly a oneDNN crash on mixed dtypes) equal those of the same float32 computation without
    autocast, and reach a half-precision input in its own dtype."""
    x, w, b = _inputs(device, seed=5)

    def loss_of(x, w, b):
        y = ck.cinc_conv2d(x, w, b, backend=backend)
        x_hat = ck.cinc_conv2d_inverse(y * 1.25, w, b, backend=backend)
        return (y ** 2).sum() + (x_hat ** 2).sum() + ck.cinc_logdet(w, x.shape[2], x.shape[3], backend=backend)

    leaves = [t.clone().requires_grad_() for t in (x.to(AUTOCAST_DTYPE[device]), w, b)]
    with _autocast(device):
        loss = loss_of(*leaves)
        if inside:
            loss.backward()
    if not inside:
        loss.backward()
    plain = [t.detach().float().requires_grad_() for t in leaves]
    loss_of(*plain).backward()
    for leaf, want in zip(leaves, plain):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype
        tol = 20 * RTOL[leaf.dtype] if leaf.dtype != torch.float32 else 20 * RTOL[torch.float32]
        assert rel_error(leaf.grad, want.grad) <= tol


@pytest.mark.parametrize("start", ["float32", "half"])
def test_layer_inverts_its_own_autocast_output(backend, device, start):
    """``CInCConv2d`` under autocast: forward in float32 (also from a half-precision image), log-determinant in
    float32, and ``inverse`` of that output, in the same region, gives the input back to float32 accuracy (it
    raised a dtype error about the weight before)."""
    torch.manual_seed(6)
    layer = ck.CInCConv2d(SHAPE[1], backend=backend).to(device)
    with torch.no_grad():
        layer.weight.copy_(make_weight(SHAPE[1], 3, torch.float32, device, generator=torch.Generator().manual_seed(6)))
    x, _, _ = _inputs(device, seed=7)
    if start == "half":
        x = x.to(AUTOCAST_DTYPE[device])
    with _autocast(device):
        y, logdet = layer(x)
        x_hat = layer.inverse(y)
    assert y.dtype == logdet.dtype == x_hat.dtype == torch.float32
    assert rel_error(x_hat, x.float()) <= 20 * RTOL[torch.float32]
    with torch.no_grad():
        y_plain, logdet_plain = layer(x.float())
    assert rel_error(y, y_plain) <= RTOL[torch.float32]
    assert rel_error(logdet, logdet_plain) <= RTOL[torch.float32]


def test_default_layer_under_autocast():
    """``CInCConv2d()`` with ``backend="auto"`` (on the CPU its forward is otherwise ATen's convolution, which
    autocast would run in bfloat16)."""
    layer = ck.CInCConv2d(SHAPE[1])
    x, _, _ = _inputs("cpu", seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = layer(x.bfloat16())
        x_hat = layer.inverse(y)
    assert y.dtype == x_hat.dtype == logdet.dtype == torch.float32
    assert rel_error(x_hat, x.bfloat16().float()) <= 20 * RTOL[torch.float32]
