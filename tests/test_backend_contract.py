"""What every backend must do, one test body per property, run on every backend × device × dtype that this process
has (``tests/conftest.py``): the four ops against the float64 reference over odd shapes, layouts and dtypes;
``opcheck``; gradcheck and the gradients against autograd through the reference; exactly zero gradient on masked
entries; forward-mode derivatives (gradcheck, ``torch.func.jvp`` against the reference, masked tangent entries);
``torch.compile``; empty batches and images; float64 accumulation; and one error contract for a singular
centre tap (docs/spec.md §1–2).

Backend-specific tests (CPU schedules, the CUDA block emulation and shared-memory layouts, Triton configurations)
live in ``test_cpu_kernels.py``, ``test_cuda.py`` and ``tests/triton/``.
"""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import cinc_kernels as ck
from cinc_kernels import reference
from cinc_kernels.backends import get_backend
from cinc_kernels.contract import OP_NAMES
from cinc_kernels.testing import op_arguments, op_function
from tests.cases import (BIAS_LAYOUTS, LAYOUTS, RTOL, adjoint_apply, assert_ops_match_reference, backend_case,
                         bias_with_layout, make_image, make_weight, rel_error, with_layout)

# (B, C, H, W, k, bias): odd and prime sizes, H ≠ W, 1×1 images, C = 1, k = 1…7; past the small shapes, C = 40 and
# 70 for the Triton kernels' chunk loops (two reduction chunks of 32 channels; a channel tile of 128). Small, because
# Triton's interpreter pays per operation.
CASES = [
    (2, 3, 5, 7, 3, True),
    (1, 12, 9, 9, 3, True),
    (3, 1, 1, 1, 2, False),
    (2, 4, 5, 4, 5, False),
    (1, 5, 7, 3, 1, True),
    (3, 7, 2, 9, 2, False),
    (1, 2, 9, 1, 5, True),
    (1, 1, 1, 1, 3, True),
    (1, 5, 17, 3, 2, True),
    (1, 3, 4, 5, 7, False),
    (1, 40, 3, 4, 2, True),
    (1, 70, 2, 3, 3, False),
]
# Full-size shapes, only where the kernels are compiled for a GPU (the reference is not among them: too slow).
GPU_CASES = [(3, 12, 9, 9, 3, True), (2, 8, 6, 4, 5, True), (1, 16, 13, 11, 7, False), (4, 48, 32, 32, 3, True),
             (2, 12, 31, 17, 5, False), (3, 96, 16, 16, 3, True)]



def _ids(case):
    B, C, H, W, k, bias = case
    return f"B{B}C{C}_{H}x{W}_k{k}{'_bias' if bias else ''}"


def _inputs(case, dtype, device, seed, requires_grad=False):
    B, C, H, W, k, bias = case
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, dtype, device, generator=g).requires_grad_(requires_grad)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) if bias else None
    if b is not None:
        b.requires_grad_(requires_grad)
    x = make_image(B, C, H, W, dtype, device, generator=g).requires_grad_(requires_grad)
    return w, b, x


def _seed(*parts) -> int:
    """A seed fixed by the test's parameters (``hash`` of a string changes from run to run)."""
    return zlib.crc32(repr(parts).encode())


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.fast_paths
@pytest.mark.parametrize("unit", [False, True], ids=["", "unit"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ops_match_reference(backend, device, dtype, case, unit):
    w, b, x = _inputs(case, dtype, device, seed=_seed(case, unit, dtype))
    assert_ops_match_reference(backend, x, w, b, unit, what=f"{backend} {_ids(case)} unit={unit}")


@pytest.mark.gpu_only
@pytest.mark.parametrize("unit", [False, True], ids=["", "unit"])
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_ops_match_reference_full_size(backend, device, dtype, case, unit):
    w, b, x = _inputs(case, dtype, device, seed=_seed(case, unit, dtype))
    assert_ops_match_reference(backend, x, w, b, unit, what=f"{backend} {_ids(case)} unit={unit}")


@pytest.mark.fast_paths
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case,unit", [(CASES[0], False), (CASES[3], True), ((2, 6, 7, 5, 3, True), False)],
                         ids=lambda v: _ids(v) if isinstance(v, tuple) else ("unit" if v else ""))
def test_layouts(backend, device, case, unit, layout):
    """The kernels read through the input's strides: a strided view and channels-last give the same values."""
    w, b, x = _inputs(case, torch.float32, device, seed=_seed(case, layout))
    assert_ops_match_reference(backend, x, w, b, unit, layout=layout, what=f"{backend} {layout}")


@pytest.mark.fast_paths
@pytest.mark.parametrize("bias_layout", BIAS_LAYOUTS)
@pytest.mark.parametrize("case", [CASES[0], (1, 6, 4, 5, 2, True), CASES[10]], ids=_ids)
def test_bias_layouts(backend, device, dtype, case, bias_layout):
    """The bias is read through its strides: a strided view (the padding between its elements is NaN, so reading
    it contiguously shows) and a stride-0 expansion of one value, in the forward and the inverse."""
    w, b, x = _inputs(case, dtype, device, seed=_seed(case, bias_layout, dtype))
    b = bias_with_layout(b, bias_layout)
    b64 = b.double()
    y = ck.cinc_conv2d(x, w, b, backend=backend)
    assert rel_error(y, reference.forward(x.double(), w.double(), b64)) <= RTOL[dtype], "forward"
    y_ref = reference.forward(x.double(), w.double(), b64).to(dtype)
    x_hat = ck.cinc_conv2d_inverse(y_ref, w, b, backend=backend)
    assert rel_error(x_hat, x) <= 20 * RTOL[dtype], "inverse"


@pytest.mark.fast_paths
def test_strided_bias_gradient_and_vmap(backend, device):
    """Gradients reach a strided bias's base exactly as through the reference, and ``torch.func.vmap`` over the
    second axis of a ``(C, N)`` stack of biases (which hands each call a strided ``(C,)`` slice) gives each one's
    result."""
    case = (2, 5, 4, 6, 3, True)
    w, _, x = _inputs(case, torch.float64, device, seed=_seed(case, "grad"))
    C = w.shape[0]
    base = torch.randn(2 * C, dtype=torch.float64, device=device, requires_grad=True)

    def loss(fwd, inv):
        b = base[::2]
        return (fwd(x, w, b) ** 2).sum() + (inv(x, w, b) ** 2).sum()

    (got,) = torch.autograd.grad(loss(lambda *a: ck.cinc_conv2d(*a, backend=backend),
                                      lambda *a: ck.cinc_conv2d_inverse(*a, backend=backend)), base)
    (want,) = torch.autograd.grad(loss(reference.forward, reference.inverse), base)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

    biases = torch.randn(C, 3, dtype=torch.float64, device=device)
    for op, ref in ((ck.cinc_conv2d, reference.forward), (ck.cinc_conv2d_inverse, reference.inverse)):
        out = torch.func.vmap(lambda b, op=op: op(x, w, b, backend=backend), in_dims=1)(biases)
        for i in range(biases.shape[1]):
            assert rel_error(out[i], ref(x, w, biases[:, i])) <= 20 * RTOL[torch.float64], op.__name__


@pytest.mark.fast_paths
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=_ids)
def test_forward_half_precision(backend, device, case, half):
    """float16 / bfloat16 in and out, float32 accumulation, where the backend declares it: compared with the
    reference on the same rounded inputs."""
    w, b, x = _inputs(case, half, device, seed=_seed(case, half))
    if half not in get_backend(backend).dtypes("forward", device):
        with pytest.raises(ValueError, match=f"x: backend '{backend}' supports float32, float64 for forward"):
            ck.cinc_conv2d(x, w, b, backend=backend)
        return
    y = ck.cinc_conv2d(x, w, b, backend=backend)
    assert y.dtype == half
    y_ref = reference.forward(x.double(), w.double(), None if b is None else b.double())
    assert rel_error(y, y_ref) <= RTOL[half]


@pytest.mark.fast_paths
@pytest.mark.parametrize("C,k", [(1, 3), (5, 2), (12, 3), (4, 5), (48, 1)])
def test_inverse_of_forward_is_identity(backend, device, dtype, C, k):
    """Through the backend's own forward, not the reference's."""
    g = torch.Generator().manual_seed(C * 10 + k)
    w = make_weight(C, k, dtype, device, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    x = make_image(2, C, 7, 13, dtype, device, generator=g)
    for unit in (False, True):
        y = ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend=backend)
        x_hat = ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend=backend)
        assert rel_error(x_hat, x) <= 20 * RTOL[dtype]


@pytest.mark.fast_paths
def test_float64_accumulation(backend, device):
    """``accumulate=torch.float64`` runs the float64 kernels on float32 tensors and returns float32."""
    w, b, x = _inputs(CASES[0], torch.float32, device, seed=9)
    y = reference.forward(x.double(), w.double(), b.double()).to(device)
    x_hat = ck.cinc_conv2d_inverse(y.float(), w, b, backend=backend, accumulate=torch.float64)
    assert x_hat.dtype == torch.float32
    assert rel_error(x_hat, x) <= 2 * RTOL[torch.float32]
    u = ck.cinc_conv2d_inverse_transpose(x, w, backend=backend, accumulate=torch.float64)
    assert u.dtype == torch.float32
    assert rel_error(adjoint_apply(u, w, False), x) <= 2 * RTOL[torch.float32]


@pytest.mark.fast_paths
@pytest.mark.parametrize("C", [1, 5, 12])
@pytest.mark.parametrize("op", OP_NAMES)
def test_empty_batch_and_images(backend, device, op, C):
    w = make_weight(C, 3, torch.float32, device)
    for shape in [(0, C, 4, 3), (2, C, 0, 3), (2, C, 3, 0)]:
        x = torch.randn(shape, device=device)
        if op == "logdet":
            # The centre tap's diagonal is 1.5…2.5 in magnitude: the log-determinant is 0 exactly when H·W is.
            out = ck.cinc_logdet(w, shape[2], shape[3], backend=backend)
            assert torch.isfinite(out) and (out.item() == 0.0) == (shape[2] * shape[3] == 0)
            continue
        fn = {"forward": ck.cinc_conv2d, "inverse": ck.cinc_conv2d_inverse,
              "inverse_transpose": ck.cinc_conv2d_inverse_transpose}[op]
        out = fn(x, w, backend=backend)
        assert out.shape == shape and out.dtype == torch.float32 and out.device.type == device


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the Triton interpreter's numpy log(0)
def test_singular_centre_tap(backend, device):
    """A zero on L's diagonal: the inverse and its adjoint raise ValueError naming ``weight`` where the backend can
    check; the CUDA kernels cannot without a device-to-host sync, so there the output holds inf/NaN. The
    log-determinant is -inf everywhere, and with a unit diagonal the same raw weight is fine."""
    w = make_weight(4, 3, torch.float32, device)
    w[2, 2, 2, 2] = 0
    y = torch.randn(1, 4, 3, 5, device=device)
    solves = [lambda: ck.cinc_conv2d_inverse(y, w, backend=backend),
              lambda: ck.cinc_conv2d_inverse_transpose(y, w, backend=backend)]
    for solve in solves:
        if backend_case(backend, device).refuses_singular:
            with pytest.raises(ValueError, match="weight.*zero on its diagonal") as raised:
                solve()
            assert raised.type is ValueError
        else:
            assert not torch.isfinite(solve()).all()
    assert ck.cinc_logdet(w, 3, 5, backend=backend).item() == float("-inf")
    # An image without pixels has the empty map, log-determinant 0, whatever the weight (H·W · -inf is NaN).
    for H, W in [(0, 5), (3, 0), (0, 0)]:
        assert ck.cinc_logdet(w, H, W, backend=backend).item() == 0.0, (H, W)
    x = ck.cinc_conv2d_inverse(y, w, unit_diagonal=True, backend=backend)
    assert rel_error(ck.cinc_conv2d(x, w, unit_diagonal=True, backend=backend), y) <= 20 * RTOL[torch.float32]
    assert ck.cinc_logdet(w, 3, 5, unit_diagonal=True, backend=backend).item() == 0.0


# ------------------------------------------------------------------------------------------------ gradients

# (B, C, H, W, k, bias, unit_diagonal): bias / no bias, unit diagonal, k = 1…3, odd sizes.
GRAD_CASES = [(2, 3, 4, 5, 3, True, False), (1, 2, 3, 2, 2, False, True), (2, 9, 3, 3, 3, True, True),
              (1, 4, 2, 3, 1, True, False)]


def _op_args(backend, device, op, case, dtype, requires_grad):
    """``(custom op, args)`` of ``backend``'s ``op`` on a fresh draw of ``case``."""
    B, C, H, W, k, bias, unit = case
    w, b, x = _inputs((B, C, H, W, k, bias), dtype, device, _seed(backend, op, case, dtype), requires_grad)
    fn = get_backend(backend).ops[op]
    args = {"forward": (x, w, b, unit), "inverse": (x, w, b, unit), "inverse_transpose": (x, w, unit),
            "logdet": (w, H, W, unit)}[op]
    return fn, args


def _case_id(case):
    B, C, H, W, k, bias, unit = case
    return f"B{B}C{C}_{H}x{W}_k{k}{'_bias' if bias else ''}{'_unit' if unit else ''}"


@pytest.mark.custom_ops
@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck(backend, device, op, case):
    """Schema, fake (meta) implementation, autograd registration: torch.library's own consistency checks."""
    fn, args = _op_args(backend, device, op, case, torch.float64, requires_grad=False)
    torch.library.opcheck(fn, args)


@pytest.mark.fast_paths
@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
@pytest.mark.parametrize("op", OP_NAMES)
def test_gradcheck_float64(backend, device, op, case):
    fn, args = _op_args(backend, device, op, case, torch.float64, requires_grad=True)
    # The full numerical Jacobian costs two solves per input entry, minutes in Triton's interpreter for the larger
    # shapes: there gradcheck's fast mode (random projections of the Jacobian) checks the same formulas.
    fast = backend_case(backend, device).interpreted and args[0].numel() > 12
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


def _grads(fn, tensors, seed=5):
    out = fn(*tensors)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype=out.dtype, device=out.device)
    return torch.autograd.grad(out, tensors, gout)


@pytest.mark.fast_paths
@pytest.mark.parametrize("unit", [False, True], ids=["", "unit"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_gradients_match_reference_autograd(backend, device, dtype, op, unit):
    """The hand-written backward formulas against autograd through the plain float64 reference."""
    g = torch.Generator().manual_seed(21)
    C, H, W, k = 5, 4, 3, 3
    w = make_weight(C, k, dtype, device, generator=g).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
    x = make_image(2, C, H, W, dtype, device, generator=g).requires_grad_()
    fast, slow = {
        "forward": (lambda x, w, b: ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend=backend),
                    lambda x, w, b: reference.forward(x.double(), w.double(), b.double(), unit)),
        "inverse": (lambda y, w, b: ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend=backend),
                    lambda y, w, b: reference.inverse(y.double(), w.double(), b.double(), unit)),
        "inverse_transpose": (lambda g_, w: ck.cinc_conv2d_inverse_transpose(g_, w, unit_diagonal=unit,
                                                                             backend=backend),
                              lambda g_, w: reference.inverse_transpose(g_.double(), w.double(), unit)),
        "logdet": (lambda w: ck.cinc_logdet(w, H, W, unit_diagonal=unit, backend=backend),
                   lambda w: reference.logdet(w.double(), H, W, unit)),
    }[op]
    args = {"forward": (x, w, b), "inverse": (x, w, b), "inverse_transpose": (x, w), "logdet": (w,)}[op]
    for got, want in zip(_grads(fast, args), _grads(slow, args)):
        assert got.dtype == dtype
        assert rel_error(got, want) <= 20 * RTOL[dtype]
        if dtype == torch.float64:
            torch.testing.assert_close(got, want.to(got.device), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("unit", [False, True], ids=["", "unit"])
def test_masked_weight_entries_get_exactly_zero_gradient(backend, device, unit):
    g = torch.Generator().manual_seed(2)
    C, k = 5, 3
    w = make_weight(C, k, torch.float64, device, generator=g).requires_grad_()
    x = make_image(2, C, 6, 5, torch.float64, device, generator=g)
    mask = reference.weight_mask(C, k, unit, device=device)
    loss = (ck.cinc_conv2d(x, w, unit_diagonal=unit, backend=backend) ** 2).sum()
    loss = loss + (ck.cinc_conv2d_inverse(x, w, unit_diagonal=unit, backend=backend) ** 2).sum()
    loss = loss + ck.cinc_logdet(w, 6, 5, unit_diagonal=unit, backend=backend)
    (gw,) = torch.autograd.grad(loss, w)
    assert torch.all(gw[mask == 0] == 0)
    assert torch.all(gw[mask == 1] != 0)


# ------------------------------------------------------------------------------------------------ forward mode


def _tangent_inputs(backend, device, seed, shape):
    """float64 ``(w, b, x, generator)`` of ``shape = (B, C, H, W, k)``; the tiniest shape in Triton's interpreter,
    which pays per operation."""
    if backend_case(backend, device).interpreted:
        shape = (1, 2, 2, 3, 2)
    B, C, H, W, k = shape
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, torch.float64, device, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(device)
    x = make_image(B, C, H, W, torch.float64, device, generator=g)
    return w, b, x, g


@pytest.mark.parametrize("unit", [False, True], ids=["", "unit"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_forward_mode_gradcheck(backend, device, op, unit):
    """The tangent formulas against numerical differences (the reverse mode: ``test_gradcheck_float64``). With the
    unit diagonal the image is thinner than the kernel, so most taps fall into the padding."""
    w, b, x, _ = _tangent_inputs(backend, device, 1, (1, 2, 1, 5, 3) if unit else (2, 3, 3, 4, 2))
    args = tuple(t.requires_grad_() for t in op_arguments(op, w, b, x))
    assert torch.autograd.gradcheck(op_function(op, backend, unit), args, check_forward_ad=True,
                                    check_backward_ad=False, check_undefined_grad=False,
                                    check_batched_forward_grad=False, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.fast_paths
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OP_NAMES)
def test_jvp_matches_the_reference(backend, device, op, layout):
    """``torch.func.jvp`` with a tangent on every tensor argument, against the reference's, in every layout."""
    w, b, x, g = _tangent_inputs(backend, device, 3, (2, 5, 7, 3, 3))
    x = with_layout(x, layout)
    unit = op == "inverse_transpose"
    args = op_arguments(op, w, b, x)
    tangents = tuple(with_layout(torch.randn(t.shape, generator=g, dtype=t.dtype).to(device), layout)
                     if t.dim() == 4 else torch.randn(t.shape, generator=g, dtype=t.dtype).to(device) for t in args)
    out, tangent = torch.func.jvp(op_function(op, backend, unit), args, tangents)
    out_ref, tangent_ref = torch.func.jvp(op_function(op, "reference", unit), tuple(t.cpu() for t in args),
                                          tuple(t.cpu() for t in tangents))
    assert rel_error(out, out_ref) < 1e-12
    assert tangent.abs().max() > 0
    assert rel_error(tangent, tangent_ref) < 1e-12


@pytest.mark.fast_paths
def test_inverse_tangent_is_the_inverse_of_the_tangent(backend, device):
    """The inverse is linear in ``y``: its tangent is the inverse applied to the tangent, through ``torch.func`` and
    through ``torch.autograd.forward_ad`` alike, without a warning of a silently dropped tangent."""
    w, _, x, g = _tangent_inputs(backend, device, 11, (1, 3, 4, 4, 3))
    v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, t = torch.func.jvp(lambda a: ck.cinc_conv2d_inverse(a, w, backend=backend), (x,), (v,))
    assert rel_error(t, reference.inverse(v.cpu(), w.cpu())) < 1e-12
    with fwAD.dual_level():
        dual = ck.cinc_conv2d_inverse(fwAD.make_dual(x, v), w, backend=backend)
        tangent = fwAD.unpack_dual(dual).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, t, rtol=0, atol=0)


@pytest.mark.parametrize("unit", [False, True], ids=["", "unit"])
def test_masked_entries_of_the_weight_tangent_do_not_contribute(backend, device, unit):
    """NaN in the masked entries of a weight tangent changes no op's tangent."""
    w, b, x, g = _tangent_inputs(backend, device, 4, (2, 3, 3, 4, 2))
    mask = reference.weight_mask(w.shape[0], w.shape[-1], unit, dtype=torch.bool).to(device)
    dw = torch.randn(w.shape, generator=g, dtype=torch.float64).to(device)
    dw_nan = torch.where(mask, dw, torch.tensor(float("nan"), dtype=torch.float64, device=device))
    dw_zero = torch.where(mask, dw, torch.zeros((), dtype=torch.float64, device=device))
    for op in OP_NAMES:
        args = op_arguments(op, w, b, x)

        def of_weight(ww, args=args, op=op):
            return op_function(op, backend, unit)(*[ww if t is w else t for t in args])

        _, t_nan = torch.func.jvp(of_weight, (w,), (dw_nan,))
        _, t_zero = torch.func.jvp(of_weight, (w,), (dw_zero,))
        assert torch.isfinite(t_nan).all(), op
        torch.testing.assert_close(t_nan, t_zero, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.custom_ops
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_compile_fullgraph_matches_eager(backend, device, layout):
    """The ops are opaque custom ops with fake implementations, so compile traces them in one graph, gradients
    included: bit-identical to eager under ``aot_eager``; and, on a GPU, within rounding under Inductor."""
    g = torch.Generator().manual_seed(4)
    w = make_weight(6, 3, torch.float32, device, generator=g).requires_grad_()
    b = torch.randn(6, generator=g).to(device)
    x = with_layout(make_image(2, 6, 7, 5, torch.float32, device, generator=g), layout)

    def roundtrip(x, w, b):
        y = ck.cinc_conv2d(x, w, b, backend=backend)
        x_hat = ck.cinc_conv2d_inverse(y * 1.5, w, b, backend=backend)
        return y, x_hat, ck.cinc_logdet(w, 7, 5, backend=backend)

    def loss_and_grad(fn):
        outs = fn(x, w, b)
        loss = sum((o.double() ** 2).sum() for o in outs)
        return outs, torch.autograd.grad(loss, w)

    (want, want_gw) = loss_and_grad(roundtrip)
    compilers = ["aot_eager"] + (["inductor"] if device == "cuda" else [])
    for compiler in compilers:
        torch._dynamo.reset()
        got, got_gw = loss_and_grad(torch.compile(roundtrip, fullgraph=True, backend=compiler))
        for a, e in zip(got + got_gw, want + want_gw):
            if compiler == "aot_eager":
                torch.testing.assert_close(a, e, rtol=0, atol=0)
            else:
                assert rel_error(a, e) <= 10 * RTOL[torch.float32], compiler
