"""Forward-mode derivatives beyond the shared contract bodies (``tests/test_backend_contract.py``, "forward mode",
which run on every backend of ``tests/cases.py``): the same bodies through ``backend="auto"`` (ATen's forward and
log-determinant, the compiled solves), and on the C++ backend ``jacfwd``, the Hessian, nested forward mode, ``vmap``
and the self-check's tangent column (docs/spec.md §1).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import cinc_kernels as ck
import tests.test_backend_contract as contract
from cinc_kernels.contract import OP_NAMES
from cinc_kernels.testing import op_arguments, op_function

from .cases import LAYOUTS, make_image, make_weight


def small_case(seed, B=2, C=3, H=3, W=4, k=2):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    x = make_image(B, C, H, W, generator=g)
    return w, b, x, g


@pytest.mark.parametrize("unit", [False, True], ids=["free", "unit"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_auto_forward_mode_gradcheck(op, unit):
    contract.test_forward_mode_gradcheck(backend="auto", device="cpu", op=op, unit=unit)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OP_NAMES)
def test_auto_jvp_matches_the_reference(op, layout):
    contract.test_jvp_matches_the_reference(backend="auto", device="cpu", op=op, layout=layout)


def test_auto_inverse_tangent_is_the_inverse_of_the_tangent():
    contract.test_inverse_tangent_is_the_inverse_of_the_tangent(backend="auto", device="cpu")


@pytest.mark.parametrize("unit", [False, True], ids=["free", "unit"])
def test_auto_masked_entries_of_the_weight_tangent_do_not_contribute(unit):
    contract.test_masked_entries_of_the_weight_tangent_do_not_contribute(backend="auto", device="cpu", unit=unit)


def test_jacfwd_matches_the_reference_jacobian():
    w, b, x, _ = small_case(5, B=1, C=2, H=2, W=3, k=2)
    for op in OP_NAMES[:3]:
        for argnum in (0, 1):
            got = torch.func.jacfwd(op_function(op, "cpu", False), argnums=argnum)(*op_arguments(op, w, b, x))
            want = torch.func.jacrev(op_function(op, "reference", False), argnums=argnum)(*op_arguments(op, w, b, x))
            assert got.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", OP_NAMES)
def test_hessian_matches_double_backward_through_the_reference(op):
    w, b, x, _ = small_case(6, B=1, C=2, H=2, W=3, k=2)
    args = op_arguments(op, w, b, x)

    def loss(backend):
        def f(ww):
            out = op_function(op, backend, False)(*[ww if t is w else t for t in args])
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


@pytest.mark.parametrize("op", OP_NAMES[:3])
def test_vmap_over_images_and_weights_matches_a_loop(op):
    w, b, x, g = small_case(8, B=2, C=3, H=3, W=2, k=2)
    images = torch.randn((4,) + tuple(x.shape), generator=g, dtype=torch.float64).movedim(0, 1)
    weights = w + 0.01 * torch.randn((4,) + tuple(w.shape), generator=g, dtype=torch.float64)
    f = op_function(op, "cpu", False)
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
