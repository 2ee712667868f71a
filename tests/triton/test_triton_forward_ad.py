"""Forward-mode derivatives of the Triton backend's ops (docs/spec.md §1), against numerical differences and the
float64 reference. Without a GPU the kernels run in Triton's interpreter (set before ``triton`` is imported), so the
shapes are tiny."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cinc_kernels as ck  # noqa: E402
from cinc_kernels.backends import get_backend  # noqa: E402
from tests.cases import make_image, make_weight, rel_error  # noqa: E402

_WHY_NOT = get_backend("triton").unavailable()
if _WHY_NOT is None and not torch.cuda.is_available() and not ck.triton.INTERPRETED:
    _WHY_NOT = "triton was imported before TRITON_INTERPRET=1 was set; run `make test-triton`"
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"Triton backend unavailable: {_WHY_NOT}")

DEVICE = "cuda" if torch.cuda.is_available() and not ck.triton.INTERPRETED else "cpu"


def case(seed, unit):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(2, 2, generator=g).to(DEVICE)
    b = torch.randn(2, generator=g, dtype=torch.float64).to(DEVICE)
    x = make_image(1, 2, 2, 3, generator=g).to(DEVICE)

    def fns(backend):
        return {
            "forward": (lambda x, w, b: ck.cinc_conv2d(x, w, b, unit_diagonal=unit, backend=backend), (x, w, b)),
            "inverse": (lambda y, w, b: ck.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit, backend=backend),
                        (x, w, b)),
            "inverse_transpose": (lambda g, w: ck.cinc_conv2d_inverse_transpose(g, w, unit_diagonal=unit,
                                                                                backend=backend), (x, w)),
            "logdet": (lambda w: ck.cinc_logdet(w, 2, 3, unit_diagonal=unit, backend=backend), (w,)),
        }
    return fns, g


# The interpreter pays per Triton operation: tangents only (the reverse mode is gradchecked in test_triton.py), and
# the unit-diagonal mask only once.
@pytest.mark.parametrize("op,unit", [("forward", False), ("inverse", False), ("inverse_transpose", True),
                                     ("logdet", False)])
def test_triton_gradcheck_forward_ad(op, unit):
    fns, _ = case(1, unit)
    f, args = fns("triton")[op]
    args = tuple(t.clone().requires_grad_() for t in args)
    assert torch.autograd.gradcheck(f, args, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_forward_grad=False,
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("op", ["forward", "inverse", "inverse_transpose", "logdet"])
def test_triton_jvp_matches_the_reference(op):
    fns, g = case(2, False)
    f, args = fns("triton")[op]
    f_ref, _ = fns("reference")[op]
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype).to(DEVICE) for t in args)
    _, got = torch.func.jvp(f, args, tangents)
    _, want = torch.func.jvp(f_ref, args, tangents)
    assert want.abs().max() > 0
    assert rel_error(got, want) < 1e-12
