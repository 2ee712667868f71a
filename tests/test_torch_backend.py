"""``backend="torch"`` (plain PyTorch, any device) beyond the shared contract (``tests/test_backend_contract.py``,
which runs opcheck, gradcheck, layouts, empty inputs, masked entries, torch.compile and singular weights on it like on
every backend): the C++ CPU kernels' grid of shapes, gradients equal to the C++ backend's, dtypes per device, and where
``auto`` puts it.

Runs on the CPU, and on CUDA / MPS too when this machine has them.
"""
import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import backends, reference
from cinc_kernels.contract import OP_NAMES
from tests.cases import RTOL, make_image, make_weight, rel_error, with_layout
from tests.test_cpu_kernels import CASES, _ids, _inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if torch.backends.mps.is_available() else [])

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


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("which", OP_NAMES)
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

    def grads(backend):
        out = fn(backend)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        return torch.autograd.grad(out, inputs, gout)

    for got, want in zip(grads("torch"), grads("cpu")):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_dtypes_per_device():
    assert backends.get_backend("torch").dtypes("inverse", "mps") == (torch.float32,)
    assert torch.float64 not in backends.get_backend("torch").dtypes("forward", "mps")
    assert backends.get_backend("torch").dtypes("inverse", "cpu") == (torch.float32, torch.float64)
    assert torch.bfloat16 in backends.get_backend("torch").dtypes("forward", "cuda")
    assert torch.float16 not in backends.get_backend("torch").dtypes("inverse", "cuda")


def test_auto_order_puts_torch_after_the_compiled_backends():
    """The compiled backends first (faster where they exist), then torch, then only the float64 reference; on
    devices no compiled backend serves, torch first."""
    for (device_type, op), order in backends.AUTO_ORDER.items():
        assert order[-1] == "reference" and order[-2] == "torch", (device_type, op, order)
    for op in OP_NAMES:
        assert backends.AUTO_ORDER[("mps", op)][0] == "torch"
        assert backends.AUTO_ORDER[("xpu", op)][0] == "torch"
    assert "torch" in ck.available_backends()
