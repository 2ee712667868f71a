"""Forward-mode derivatives of every op on every CPU backend (docs/spec.md §1): the tangent formulas against numerical
differences (``gradcheck(check_forward_ad=True)``) and against the float64 reference through ``torch.func``.

The Triton backend's tangents are checked under the interpreter in ``tests/triton/test_triton_forward_ad.py``; the
CUDA backend shares the C++ ops' formulas, so only its kernels differ.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import cinc_kernels as ck
from cinc_kernels import reference

from .cases import make_image, make_weight, rel_error, with_layout

BACKENDS = ["auto", "cpu", "reference"]


def small_case(seed, B=2, C=3, H=3, W=4, k=2):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    x = make_image(B, C, H, W, generator=g)
    return w, b, x, g


def call(op, backend, unit):
    """The public function ``op`` as a function of its tensors only."""
    if op == "forward":
        return lambda x, w, b: ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend=backend)
    if op == "inverse":
        return lambda y, w, b: ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend=backend)
    if op == "inverse_transpose":
        return lambda g, w: ck.cinc_conv2d_inverse_transpose(g, w, unit_diagonal=unit, backend=backend)
    return lambda w: ck.cinc_logdet(w, 5, 3, unit_diagonal=unit, backend=backend)


def primals(op, w, b, x):
    return {"forward": (x, w, b), "inverse": (x, w, b), "inverse_transpose": (x, w), "logdet": (w,)}[op]


OPS = ["forward", "inverse", "inverse_transpose", "logdet"]


@pytest.mark.parametrize("unit", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_forward_and_reverse_mode(backend, op, unit):
    # With the unit diagonal, k = 3 and H = 1: the image is thinner than the kernel, most taps fall into the padding.
    shape = dict(B=1, C=2, H=1, W=5, k=3) if unit else dict(B=2, C=3, H=3, W=4, k=2)
    w, b, x, _ = small_case(1, **shape)
    args = tuple(t.requires_grad_() for t in primals(op, w, b, x))
    assert torch.autograd.gradcheck(call(op, backend, unit), args, check_forward_ad=True,
                                    check_batched_forward_grad=False, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_func_jvp_matches_the_reference(backend, op, layout):
    w, b, x, g = small_case(3, B=2, C=5, H=7, W=3, k=3)
    x = with_layout(x, layout)
    unit = op == "inverse_transpose"
    args = primals(op, w, b, x)
    tangents = tuple(with_layout(torch.randn(t.shape, generator=g, dtype=t.dtype), layout) if t.dim() == 4
                     else torch.randn(t.shape, generator=g, dtype=t.dtype) for t in args)
    out, tangent = torch.func.jvp(call(op, backend, unit), args, tangents)
    out_ref, tangent_ref = torch.func.jvp(call(op, "reference", unit), args, tangents)
    assert rel_error(out, out_ref) < 1e-12
    assert tangent.abs().max() > 0
    assert rel_error(tangent, tangent_ref) < 1e-12


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_issue_repro_inverse_tangent_is_not_zero(backend):
    w = 0.1 * torch.randn(3, 3, 3, 3, dtype=torch.float64)
    w[:, :, 2, 2] += torch.eye(3, dtype=torch.float64)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    v = torch.randn_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old silent path only warned
        _, t = torch.func.jvp(lambda a: ck.cinc_conv2d_inverse(a, w, backend=backend), (x,), (v,))
    # The inverse is linear in y: its tangent is the inverse applied to the tangent.
    torch.testing.assert_close(t, reference.inverse(v, w), rtol=1e-12, atol=1e-12)
    with fwAD.dual_level():
        dual = ck.cinc_conv2d_inverse(fwAD.make_dual(x, v), w, backend=backend)
        tangent = fwAD.unpack_dual(dual).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, t, rtol=0, atol=0)


@pytest.mark.parametrize("unit", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_masked_entries_of_the_weight_tangent_do_not_contribute(backend, unit):
    w, b, x, g = small_case(4, C=3, k=2)
    mask = reference.weight_mask(3, 2, unit, dtype=torch.bool)
    dw = torch.randn(w.shape, generator=g, dtype=torch.float64)
    dw_nan = torch.where(mask, dw, torch.tensor(float("nan"), dtype=torch.float64))
    dw_zero = torch.where(mask, dw, torch.zeros((), dtype=torch.float64))
    for op in OPS:
        args = primals(op, w, b, x)

        def of_weight(ww, args=args, op=op):
            return call(op, backend, unit)(*[ww if t is w else t for t in args])

        _, t_nan = torch.func.jvp(of_weight, (w,), (dw_nan,))
        _, t_zero = torch.func.jvp(of_weight, (w,), (dw_zero,))
        assert torch.isfinite(t_nan).all(), op
        torch.testing.assert_close(t_nan, t_zero, rtol=0, atol=0)


def test_jacfwd_matches_the_reference_jacobian():
    w, b, x, _ = small_case(5, B=1, C=2, H=2, W=3, k=2)
    for op in ["forward", "inverse", "inverse_transpose"]:
        for argnum in (0, 1):
            got = torch.func.jacfwd(call(op, "cpu", False), argnums=argnum)(*primals(op, w, b, x))
            want = torch.func.jacrev(call(op, "reference", False), argnums=argnum)(*primals(op, w, b, x))
            assert got.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_hessian_matches_double_backward_through_the_reference(op):
    w, b, x, _ = small_case(6, B=1, C=2, H=2, W=3, k=2)
    args = primals(op, w, b, x)

    def loss(backend):
        def f(ww):
            out = call(op, backend, False)(*[ww if t is w else t for t in args])
            return out.pow(2).sum() if out.dim() else out
        return f

    got = torch.func.hessian(loss("cpu"))(w)
    want = torch.autograd.functional.hessian(loss("reference"), w)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # Reverse over forward agrees as well.
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacfwd(loss("cpu")))(w), want, rtol=1e-9, atol=1e-10)


def test_forward_over_forward_is_refused_not_wrong():
    w, b, x, _ = small_case(7, B=1, C=2, H=2, W=2, k=2)
    with pytest.raises(NotImplementedError, match="forward-mode AD nested inside forward-mode AD"):
        torch.func.jacfwd(torch.func.jacfwd(lambda ww: ck.cinc_logdet(ww, 2, 2, backend="cpu")))(w)


@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose"])
def test_vmap_over_images_and_weights_matches_a_loop(op):
    w, b, x, g = small_case(8, B=2, C=3, H=3, W=2, k=2)
    images = torch.randn((4,) + tuple(x.shape), generator=g, dtype=torch.float64).movedim(0, 1)
    weights = w + 0.01 * torch.randn((4,) + tuple(w.shape), generator=g, dtype=torch.float64)
    f = call(op, "cpu", False)
    rest = (b,) if op != "inverse_transpose" else ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow per-sample fallback
        by_image = torch.func.vmap(lambda t: f(t, w, *rest), in_dims=1)(images)
        by_weight = torch.func.vmap(lambda ww: f(x, ww, *rest))(weights)
    torch.testing.assert_close(by_image, torch.stack([f(images[:, i], w, *rest) for i in range(4)]), rtol=0, atol=0)
    torch.testing.assert_close(by_weight, torch.stack([f(x, weights[i], *rest) for i in range(4)]), rtol=0, atol=0)


def test_check_command_catches_a_backend_that_drops_tangents(monkeypatch, capsys):
    from cinc_kernels import backends, selfcheck

    def detached(fn):
        return lambda *args: fn(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

    ref = backends.get_backend("reference").ops
    dropping = backends.Backend(name="dropping", ops={**ref, "inverse": detached(ref["inverse"])})
    monkeypatch.setitem(backends._REGISTRY, "dropping", dropping)
    assert not selfcheck.run(verbose=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if " dropping " in line and "jvp" in line]
    assert any(line.split()[0] == "FAIL" and "inverse " in line for line in lines), lines
    assert any(line.split()[0] == "ok" and "forward" in line for line in lines), lines
