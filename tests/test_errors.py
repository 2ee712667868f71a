"""Bad input gets a clear error that names the argument; nothing crashes and nothing is half-written."""
import pytest
import torch

import cinc_kernels as ck
from cinc_kernels.backends import all_backends
from tests.cases import backends_on, make_weight

FUNCS = {
    "forward": lambda x, w, b=None, **kw: ck.cinc_conv2d(x, w, b, **kw),
    "inverse": lambda x, w, b=None, **kw: ck.cinc_conv2d_inverse(x, w, b, **kw),
    "inverse_transpose": lambda x, w, b=None, **kw: ck.cinc_conv2d_inverse_transpose(x, w, **kw),
}
ARG = {"forward": "x", "inverse": "y", "inverse_transpose": "g"}
BACKENDS = backends_on("cpu", auto=True)


@pytest.fixture
def w():
    return make_weight(3, 3, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", FUNCS)
def test_wrong_rank(op, backend, w):
    with pytest.raises(ValueError, match=rf"{ARG[op]} must be 4-D"):
        FUNCS[op](torch.randn(3, 4, 4), w, backend=backend)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        FUNCS[op](torch.randn(1, 3, 4, 4), w[0], backend=backend)


@pytest.mark.parametrize("op", FUNCS)
def test_mismatched_and_malformed_weights(op, w):
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=rf"weight has 3 channels but {ARG[op]} has 4"):
        FUNCS[op](torch.randn(1, 4, 4, 4), w)
    with pytest.raises(ValueError, match="weight must be square over channels"):
        FUNCS[op](x, torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="square k×k kernel"):
        FUNCS[op](x, torch.randn(3, 3, 3, 2))
    for k in (0, 8):
        with pytest.raises(ValueError, match=rf"kernel size k must be in 1…7, got {k}"):
            FUNCS[op](x, torch.randn(3, 3, k, k))


@pytest.mark.parametrize("op", FUNCS)
def test_dtypes(op, w):
    with pytest.raises(ValueError, match=rf"{ARG[op]} must have a floating-point dtype"):
        FUNCS[op](torch.ones(1, 3, 4, 4, dtype=torch.int64), w)
    with pytest.raises(ValueError, match="weight has dtype torch.float64"):
        FUNCS[op](torch.randn(1, 3, 4, 4), w.double())
    with pytest.raises(ValueError, match=rf"{ARG[op]}: backend 'cpu' supports float32, float64"):
        FUNCS[op](torch.randn(1, 3, 4, 4, dtype=torch.float16), w.half(), backend="cpu")
    with pytest.raises(TypeError, match=rf"{ARG[op]} must be a torch.Tensor"):
        FUNCS[op]([[1.0]], w)


@pytest.mark.parametrize("op", ["forward", "inverse"])
def test_bias_checked(op, w):
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        FUNCS[op](x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="bias has dtype"):
        FUNCS[op](x, w, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("op", FUNCS)
def test_tensors_on_different_devices(op, w):
    # The meta device stands in for a second device on a machine without a GPU: the check runs before any kernel.
    with pytest.raises(ValueError, match=rf"weight is on meta but {ARG[op]} is on cpu"):
        FUNCS[op](torch.randn(1, 3, 4, 4), w.to("meta"))


def test_direct_op_call_checks_in_cpp_too(w):
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.cinc.forward(torch.randn(1, 4, 4, 4), w, None, False)
    with pytest.raises(RuntimeError, match="kernel size k must be in 1…7"):
        torch.ops.cinc.inverse(torch.randn(1, 3, 4, 4), torch.randn(3, 3, 8, 8), None, False)


def test_logdet_arguments(w):
    with pytest.raises(ValueError, match="height must be an integer >= 0, got -1"):
        ck.cinc_logdet(w, -1, 3)
    with pytest.raises(TypeError, match="width must be an integer >= 0, got 2.5"):
        ck.cinc_logdet(w, 3, 2.5)


def test_unknown_and_unavailable_backends(w):
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="backend must be one of auto, .*cpu.*got 'tpu'"):
        ck.cinc_conv2d(x, w, backend="tpu")
    if "cuda" not in ck.available_backends():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available on this install: "):
            ck.cinc_conv2d(x, w, backend="cuda")


def test_available_backends_lists_what_works():
    names = ck.available_backends()
    assert names[0] == "reference"  # registered first: the oracle is always there
    assert names == [b.name for b in all_backends() if b.public and b.unavailable() is None]
    assert all(not n.startswith("_") for n in names)
