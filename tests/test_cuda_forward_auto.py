"""Which forward ``backend="auto"`` runs on CUDA (cinc_kernels/backends.py): cuDNN on the masked weight where it has
faster arithmetic than our direct kernel (float16/bfloat16, and float32 while TF32 is allowed), ours elsewhere.
Checked without a GPU: the "cuda" backend is made to look runnable, and only the choice is tested."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cinc_kernels import backends

CUDA = torch.device("cuda", 0)
# Where the float32 precision of cuDNN convolutions is set, most specific first (torch ≥ 2.9).
SETTINGS = ((torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cudnn, "fp32_precision"),
            (torch.backends, "fp32_precision"))


@pytest.fixture
def runnable_cuda(monkeypatch):
    stubs = {op: (lambda *args: None) for op in backends.OPS}  # never called: only the choice is tested
    fake = dataclasses.replace(backends.get_backend("cuda"), ops=stubs, unavailable=lambda: None,
                               device_unsupported=lambda device: None)
    monkeypatch.setitem(backends._REGISTRY, "cuda", fake)
    # The stubs compute nothing, so the first-use self-check (tests/test_trust.py) would run CUDA on a machine without
    # one; only the auto policy is tested here.
    monkeypatch.setenv("CINC_TRUST_KERNELS", "1")


@pytest.fixture
def precision():
    """Sets the three precision settings (conv, cuDNN, every backend) for one test and restores them after."""
    saved = [getattr(owner, name) for owner, name in SETTINGS]

    def set_precision(conv: str, cudnn: str = "none", every_backend: str = "none") -> None:
        for (owner, name), value in zip(reversed(SETTINGS), (every_backend, cudnn, conv), strict=True):
            setattr(owner, name, value)

    yield set_precision
    for (owner, name), value in zip(reversed(SETTINGS), reversed(saved), strict=True):
        setattr(owner, name, value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_go_to_cudnn(runnable_cuda, precision, dtype):
    for conv in ("tf32", "ieee"):
        precision(conv)
        assert backends.select("auto", "forward", CUDA, dtype).name == "_aten"


def test_float64_runs_our_kernel(runnable_cuda, precision):
    precision("tf32")
    assert backends.select("auto", "forward", CUDA, torch.float64).name == "cuda"


@pytest.mark.parametrize("conv,cudnn,every_backend,tf32", [
    ("tf32", "none", "none", True),    # torch's default
    ("ieee", "none", "none", False),
    ("none", "tf32", "none", True),    # inherited from cuDNN's setting
    ("none", "none", "tf32", True),    # ... or from every backend's
    ("ieee", "tf32", "tf32", False),   # the most specific one wins
    ("none", "none", "none", False),   # what torch.backends.cudnn.allow_tf32 = False leaves
])
def test_float32_goes_to_cudnn_only_while_tf32_is_allowed(runnable_cuda, precision, conv, cudnn, every_backend,
                                                            tf32):
    precision(conv, cudnn, every_backend)
    assert backends.select("auto", "forward", CUDA, torch.float32).name == ("_aten" if tf32 else "cuda")


def test_the_legacy_tf32_switch_is_followed(runnable_cuda, precision):
    precision("tf32")
    torch.backends.cudnn.allow_tf32 = False
    assert backends.select("auto", "forward", CUDA, torch.float32).name == "cuda"
    torch.backends.cudnn.allow_tf32 = True
    assert backends.select("auto", "forward", CUDA, torch.float32).name == "_aten"


def test_only_the_forward_is_declined(runnable_cuda, precision):
    for op in ("inverse", "inverse_transpose"):
        precision("tf32")
        assert backends.select("auto", op, CUDA, torch.float32).name == "cuda", op
    # The log-determinant goes to ATen's (autograd-differentiated) ops first, whatever TF32 says.
    chosen = {}
    for conv in ("tf32", "ieee"):
        precision(conv)
        chosen[conv] = backends.select("auto", "logdet", CUDA, torch.float32).name
    assert chosen["tf32"] == chosen["ieee"] == backends.AUTO_ORDER["cuda", "logdet"][0]


def test_without_the_cuda_kernels_cudnn_runs_every_dtype(monkeypatch, precision):
    monkeypatch.setitem(backends._REGISTRY, "cuda", dataclasses.replace(
        backends.get_backend("cuda"), unavailable=lambda: "not in this test"))
    precision("ieee")
    for dtype in (torch.float32, torch.float64, torch.float16):
        assert backends.select("auto", "forward", CUDA, dtype).name == "_aten", dtype
