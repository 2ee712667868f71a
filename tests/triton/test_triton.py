"""What only the Triton backend has: diagonals longer than one pixel block, every forward configuration the
autotuner may pick, its dtype limits. The properties every backend shares (values, layouts, dtypes, gradients,
opcheck, compile, errors) run on Triton from ``tests/test_backend_contract.py``, and the layers from
``tests/test_layers.py``, collected by the same ``TRITON_INTERPRET=1`` process (``make test-triton``).

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on before ``triton``
is first imported: ``make test-triton`` sets TRITON_INTERPRET=1 for its own pytest process, and the guard below
does the same for a by-hand ``pytest tests/triton``. On a GPU, run ``python -m pytest tests/triton`` without
TRITON_INTERPRET: the kernels are compiled.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cinc_kernels as ck  # noqa: E402
import cinc_kernels.triton  # noqa: E402
from cinc_kernels import reference  # noqa: E402
from cinc_kernels.backends import get_backend  # noqa: E402
from tests.cases import RTOL, adjoint_apply, make_image, make_weight, rel_error  # noqa: E402

_WHY_NOT = get_backend("triton").unavailable()
if _WHY_NOT is None and not torch.cuda.is_available() and not cinc_kernels.triton.INTERPRETED:
    _WHY_NOT = "triton was imported before TRITON_INTERPRET=1 was set; run `make test-triton`"
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"Triton backend unavailable: {_WHY_NOT}")

# Compiled kernels run on the GPU at full sizes too; the interpreter (CI, or `make test-triton` on any machine) runs
# the small shapes on CPU tensors.
ON_GPU = torch.cuda.is_available() and not cinc_kernels.triton.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"


def _inputs(case, dtype, seed):
    B, C, H, W, k, bias, unit = case
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, dtype, DEVICE, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE) if bias else None
    x = make_image(B, C, H, W, dtype, DEVICE, generator=g)
    return w, b, x


def test_diagonals_longer_than_one_pixel_block():
    """min(H, W) = 65 > 64 pixels per block: each diagonal is solved in two chunks, one after the other."""
    w, b, x = _inputs((1, 1, 66, 65, 2, True, False), torch.float32, seed=5)
    y_ref = reference.forward(x.double(), w.double(), b.double())
    assert rel_error(ck.cinc_conv2d(x, w, b, backend="triton"), y_ref) <= RTOL[torch.float32]
    x_hat = ck.cinc_conv2d_inverse(y_ref.float(), w, b, backend="triton")
    assert rel_error(x_hat, x) <= 20 * RTOL[torch.float32]
    u = ck.cinc_conv2d_inverse_transpose(x, w, backend="triton")
    assert rel_error(adjoint_apply(u, w, False), x) <= 20 * RTOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_forward_config_matches_reference(dtype):
    """Each block-size configuration the GPU autotuner may choose, forced in turn: C = 20 is no multiple of any
    channel tile, so the channel and pixel masks of every tiling are exercised."""
    from cinc_kernels.triton import kernels, ops

    w, b, x = _inputs((2, 20, 5, 7, 3, True, False), dtype, seed=12)
    y_ref = reference.forward(x.double(), w.double(), b.double())
    for config in kernels.forward_configs():
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        y = ops.launch_forward(x, w, b, False, config=meta)
        assert rel_error(y, y_ref) <= RTOL[dtype], f"config {meta}"


def test_unsupported_dtype_names_the_argument():
    w = make_weight(3, 3, torch.float16, DEVICE)
    y = torch.randn(1, 3, 4, 4, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="y: backend 'triton' supports"):
        ck.cinc_conv2d_inverse(y, w, backend="triton")
