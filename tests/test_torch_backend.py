"""``backend="torch"`` (plain PyTorch, any device) held to the checks of the C++ CPU backend: the float64 reference
over shapes, dtypes, layouts, bias and unit diagonal; empty batches and images; opcheck, gradcheck and the gradient
formulas; masked entries; torch.compile; singular weights; and where ``auto`` puts it.

Runs on the CPU, and on CUDA / MPS too when this machine has them.
"""
import pytest
import torch

from cinc_kernels.backends import get_backend

import cinc_kernels as ck
from cinc_kernels import backends, reference, torch_backend
from tests.cases import RTOL, make_image, make_weight, rel_error, with_layout
from tests.test_cpu_kernels import CASES, _ids, _inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if torch.backends.mps.is_available() else [])
OPS = [torch_backend.forward, torch_backend.inverse, torch_backend.inverse_transpose, torch_backend.logdet]

# Every seventh case of the CPU kernels' grid (a step prime to the grid's cycles of 2, 3, 6 and 12, so layouts, dtypes,
# bias and unit diagonal still vary): the same sizes, channels and kernel sizes, in a fraction of the time.
TORCH_CASES = CASES[::7]


def _dtype_on(device, dtype):
    if device == "mps" and dtype == torch.float64:
        pytest.skip("MPS has no float64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TORCH_CASES, ids=[_ids(c) for c in TORCH_CASES])
def test_torch_backend_matches_reference(case, device):
    B, C, H, W, k, dtype, layout, bias, unit = case
    _dtype_on(device, dtype)
    w, b, x = _inputs(case, seed=hash(_ids(case)) % 2**31)
    tol = RTOL[dtype]
    b64 = None if b is None else b.double()
    wd, bd = w.to(device), None if b is None else b.to(device)

    y = ck.cinc_conv2d(with_layout(x.to(device), layout), wd, bd, unit_diagonal=unit, backend="torch")
    y_ref = reference.forward(x.double(), w.double(), b64, unit)
    assert y.dtype == dtype and y.shape == x.shape and y.device.type == device
    assert rel_error(y, y_ref) <= tol

    y_in = with_layout(y_ref.to(dtype).to(device), layout)
    x_hat = ck.cinc_conv2d_inverse(y_in, wd, bd, unit_diagonal=unit, backend="torch")
    assert x_hat.dtype == dtype and x_hat.device.type == device
    assert rel_error(x_hat, x) <= 20 * tol

    u = ck.cinc_conv2d_inverse_transpose(with_layout(x.to(device), layout), wd, unit_diagonal=unit, backend="torch")
    u64 = u.double().cpu()
    # Mᵀ u, as the reference forward's vector-Jacobian product, must give back g = x.
    zeros = torch.zeros_like(u64, requires_grad=True)
    (mt_u,) = torch.autograd.grad(reference.forward(zeros, w.double(), None, unit), zeros, grad_outputs=u64)
    assert rel_error(mt_u, x) <= 20 * tol

    ld = ck.cinc_logdet(wd, H, W, unit_diagonal=unit, backend="torch")
    assert ld.dtype == dtype and ld.dim() == 0
    torch.testing.assert_close(ld.double().cpu(), reference.logdet(w.double(), H, W, unit), rtol=tol,
                               atol=tol * H * W)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C,k", [(1, 3), (5, 2), (12, 3), (7, 7)])
def test_inverse_of_forward_is_identity(C, k, device):
    g = torch.Generator().manual_seed(C * 10 + k)
    w = make_weight(C, k, torch.float32, device, generator=g)
    b = torch.randn(C, generator=g).to(device)
    x = make_image(2, C, 11, 13, torch.float32, device, generator=g)
    x_hat = ck.cinc_conv2d_inverse(ck.cinc_conv2d(x, w, b, backend="torch"), w, b, backend="torch")
    assert rel_error(x_hat, x) <= 20 * RTOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose"])
def test_batch_zero_and_empty_images(op, device):
    w = make_weight(4, 3, torch.float32, device)
    fn = {"forward": ck.cinc_conv2d, "inverse": ck.cinc_conv2d_inverse,
          "inverse_transpose": ck.cinc_conv2d_inverse_transpose}[op]
    for shape in [(0, 4, 5, 4), (2, 4, 0, 3), (2, 4, 3, 0)]:
        t = torch.randn(shape, device=device)
        out = fn(t, w, backend="torch")
        assert out.shape == t.shape and out.dtype == t.dtype and out.device == t.device


def test_singular_weight_is_refused_and_its_logdet_is_minus_infinity():
    w = make_weight(3, 3, torch.float32)
    w[1, 1, 2, 2] = 0
    y = torch.randn(1, 3, 4, 4)
    for solve in (lambda: ck.cinc_conv2d_inverse(y, w, backend="torch"),
                  lambda: ck.cinc_conv2d_inverse_transpose(y, w, backend="torch")):
        with pytest.raises(ValueError, match="weight"):
            solve()
    assert ck.cinc_logdet(w, 4, 4, backend="torch").item() == float("-inf")


def sample_inputs(requires_grad=False):
    """(op, args) pairs covering bias / no bias, unit diagonal, k = 1…3, odd sizes (as for the C++ ops)."""
    g = torch.Generator().manual_seed(13)
    out = []
    for B, C, H, W, k, bias, unit in [(2, 3, 4, 5, 3, True, False), (1, 2, 3, 2, 2, False, True),
                                      (2, 5, 3, 3, 3, True, True), (1, 4, 2, 3, 1, True, False)]:
        for op in OPS:
            w = make_weight(C, k, generator=g).requires_grad_(requires_grad)
            b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_(requires_grad) if bias else None
            x = make_image(B, C, H, W, generator=g).requires_grad_(requires_grad)
            if op is torch_backend.logdet:
                out.append((op, (w, H, W, unit)))
            elif op is torch_backend.inverse_transpose:
                out.append((op, (x, w, unit)))
            else:
                out.append((op, (x, w, b, unit)))
    return out


def _op_id(value):
    return getattr(value, "_name", "")


@pytest.mark.parametrize("op,args", sample_inputs(), ids=_op_id)
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("op,args", sample_inputs(requires_grad=True), ids=_op_id)
def test_gradcheck_float64(op, args):
    # Fast mode (a random projection of the Jacobian) costs a few solves instead of two per input element: the
    # Python wavefront is slow per call, and the full Jacobian of these formulas is checked on the C++ ops.
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("which", ["forward", "inverse", "inverse_transpose", "logdet"])
def test_gradients_match_the_c_plus_plus_backend(which, unit):
    """The same backward formulas as the C++ ops, so the same gradients (float64, to rounding)."""
    if "cpu" not in ck.available_backends():
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(23)
    C, H, W, k = 4, 5, 3, 3
    w = make_weight(C, k, generator=g).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    x = make_image(2, C, H, W, generator=g).requires_grad_()
    call = {
        "forward": (lambda be: ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend=be), (x, w, b)),
        "inverse": (lambda be: ck.cinc_conv2d_inverse(x, w, b, unit_diagonal=unit, backend=be), (x, w, b)),
        "inverse_transpose": (lambda be: ck.cinc_conv2d_inverse_transpose(x, w, unit_diagonal=unit, backend=be),
                              (x, w)),
        "logdet": (lambda be: ck.cinc_logdet(w, H, W, unit_diagonal=unit, backend=be), (w,)),
    }[which]
    fn, inputs = call
    grads = {}
    for be in ("torch", "cpu"):
        out = fn(be)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        grads[be] = torch.autograd.grad(out, inputs, gout)
    for got, want in zip(grads["torch"], grads["cpu"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("unit", [False, True])
def test_masked_weight_entries_get_exactly_zero_gradient(unit):
    g = torch.Generator().manual_seed(2)
    C, k = 5, 3
    w = make_weight(C, k, generator=g).requires_grad_()
    x = make_image(2, C, 6, 5, generator=g)
    mask = reference.weight_mask(C, k, unit)
    loss = (ck.cinc_conv2d(x, w, unit_diagonal=unit, backend="torch") ** 2).sum()
    loss = loss + (ck.cinc_conv2d_inverse(x, w, unit_diagonal=unit, backend="torch") ** 2).sum()
    loss = loss + ck.cinc_logdet(w, 6, 5, unit_diagonal=unit, backend="torch")
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
        y = ck.cinc_conv2d(x, w, b, backend="torch")
        return y, ck.cinc_conv2d_inverse(y * 1.5, w, b, backend="torch"), ck.cinc_logdet(w, 7, 5, backend="torch")

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w, b), roundtrip(x, w, b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_accumulate_float64_solves_in_float64():
    g = torch.Generator().manual_seed(6)
    w = make_weight(5, 3, torch.float32, generator=g)
    y = make_image(2, 5, 9, 8, torch.float32, generator=g)
    got = ck.cinc_conv2d_inverse(y, w, accumulate=torch.float64, backend="torch")
    want = reference.inverse(y.double(), w.double())
    assert got.dtype == torch.float32
    assert rel_error(got, want) <= RTOL[torch.float32]


def test_dtypes_per_device():
    assert get_backend("torch").dtypes("inverse", "mps") == (torch.float32,)
    assert torch.float64 not in get_backend("torch").dtypes("forward", "mps")
    assert get_backend("torch").dtypes("inverse", "cpu") == (torch.float32, torch.float64)
    assert torch.bfloat16 in get_backend("torch").dtypes("forward", "cuda")
    assert torch.float16 not in get_backend("torch").dtypes("inverse", "cuda")


def test_auto_order_puts_torch_after_the_compiled_backends():
    for (device_type, op), order in backends.AUTO_ORDER.items():
        assert "torch" in order, (device_type, op)
        if "reference" in order:
            assert order.index("torch") < order.index("reference")
        for compiled in ("cpu", "cuda", "triton"):
            if compiled in order:
                assert order.index(compiled) < order.index("torch")
    for op in ("forward", "inverse", "inverse_transpose", "logdet"):
        assert backends.AUTO_ORDER[("mps", op)][0] == "torch"
    assert "torch" in ck.available_backends()
