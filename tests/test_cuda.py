"""The CUDA kernels (csrc/cuda/) against the float64 reference.

Two kinds of tests (the kernels themselves, run on CPU threads, are tested on every machine by
test_cuda_emulated.py):
* on every machine: the build put a CUDA kernel behind each ``cinc`` op when it says it built the CUDA kernels;
* on a machine with a CUDA GPU: what only the CUDA kernels have (every shared-memory layout at full size, the
  current stream, the shared-memory limit); skipped with the reason otherwise. The properties every backend shares
  (values against the reference, layouts, dtypes, gradients, opcheck, compile, the singular-weight behaviour) run on
  CUDA from ``test_backend_contract.py``.
"""
from __future__ import annotations

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import reference
from cinc_kernels import build_info

from .cases import RTOL, assert_rel_close, make_image, make_weight

OPS = ("forward", "inverse", "inverse_transpose", "logdet")
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none is visible); run tools/gpu_check.sh on one")


def _cuda_built() -> bool:
    return bool(build_info().get("cuda_built"))


# --------------------------------------------------------------------------------------------------------------
# on every machine


def test_cuda_kernels_are_registered_when_built():
    if not _cuda_built():
        pytest.skip("the extension was built without its CUDA kernels (CINC_CUDA=0 or no toolkit)")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cinc::{op}", "CUDA")]
    assert not missing, f"built with CUDA but no CUDA kernel is registered for {missing}"
    why = ck.backends.get_backend("cuda").unavailable()
    if not HAS_GPU:
        assert why == "no CUDA GPU is visible"
    else:
        assert why is None


def test_cuda_backend_refuses_cpu_tensors():
    w = make_weight(3, 3, torch.float32)
    x = make_image(1, 3, 4, 4, torch.float32)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        ck.cinc_conv2d_inverse(x, w, backend="cuda")


# --------------------------------------------------------------------------------------------------------------
# on a GPU

DTYPES = (torch.float32, torch.float64)


def _cuda_case(B, C, H, W, k, dtype, seed, unit_diagonal=False):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, generator=g, unit_diagonal=unit_diagonal)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    x = make_image(B, C, H, W, generator=g)
    return x, w, bias, [t.to(device="cuda", dtype=dtype) for t in (x, w, bias)]


@needs_gpu
@pytest.mark.parametrize("B,C,H,W", [(2, 48, 64, 64), (2, 96, 32, 32), (2, 96, 8, 8), (2, 12, 64, 64),
                                     (1, 96, 128, 128)])
def test_large_shapes_every_shared_memory_layout(B, C, H, W):
    # The kernel's shared-memory layouts (csrc/cuda/cinc_wavefront_block.h) on an H200 (227 KiB per block):
    # weight copy + ring at C = 12 and C = 48 float32; ring without the weight copy at C = 96; at C = 96, 128×128
    # float64 no room for the ring: the global-memory path.
    for dtype in DTYPES:
        x, w, bias, (xc, wc, bc) = _cuda_case(B, C, H, W, 3, dtype, seed=C + H)
        yc = ck.cinc_conv2d(xc, wc, bc, backend="cuda")
        back = ck.cinc_conv2d_inverse(yc, wc, bc, backend="cuda")
        assert_rel_close(back, x, dtype, factor=10, what=f"inverse(forward(x)) C={C} {H}x{W} {dtype}")
        g = torch.randn_like(xc)
        u = ck.cinc_conv2d_inverse_transpose(g, wc, backend="cuda")
        # ⟨M⁻ᵀ g, M v⟩ = ⟨g, v⟩ for any v: checks the adjoint without the slow reference at this size.
        v = torch.randn_like(xc)
        lhs = (u.double() * ck.cinc_conv2d(v, wc, backend="cuda").double()).sum()
        rhs = (g.double() * v.double()).sum()
        scale = (g.double().norm() * v.double().norm()).item()
        assert abs(lhs - rhs).item() <= RTOL[dtype] * 10 * scale, f"adjoint identity C={C} {H}x{W} {dtype}"


@needs_gpu
def test_bad_input_names_the_argument():
    w = make_weight(4, 3, torch.float32, "cuda")
    y = torch.randn(1, 4, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="weight"):
        ck.cinc_conv2d_inverse(y, w.cpu(), backend="cuda")
    with pytest.raises(ValueError, match="float16"):
        ck.cinc_conv2d_inverse(y.half(), w.half(), backend="cuda")
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.cinc.inverse(y.half(), w.half(), None, False)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.cinc.forward(y, w[:3, :3], None, False)
    big = torch.randn(1, 512, 2, 2, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="shared memory"):
        ck.cinc_conv2d_inverse(big, make_weight(512, 3, torch.float64, "cuda"), backend="cuda")


@needs_gpu
def test_runs_on_the_current_stream():
    x, w, bias, (xc, wc, bc) = _cuda_case(4, 8, 16, 16, 3, torch.float32, seed=9)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = ck.cinc_conv2d(xc, wc, bc, backend="cuda")
        back = ck.cinc_conv2d_inverse(y, wc, bc, backend="cuda")
    stream.synchronize()
    assert_rel_close(back, x, torch.float32, factor=10, what="on a side stream")


@needs_gpu
def test_inverse_of_forward_well_conditioned_target_shape():
    # The target: relative error ≤ 1e-5 at B = 64, C = 48, 64×64, float32.
    x, w, bias, (xc, wc, bc) = _cuda_case(64, 48, 64, 64, 3, torch.float32, seed=11)
    back = ck.cinc_conv2d_inverse(ck.cinc_conv2d(xc, wc, bc, backend="cuda"), wc, bc, backend="cuda")
    err = ((back - xc).norm() / xc.norm()).item()
    assert err <= 1e-5, err


@needs_gpu
def test_too_many_channels_for_shared_memory_names_a_backend_that_works():
    """L⁻¹ and one diagonal must fit in shared memory (C up to ~170 in float32 on an H200); beyond, the error names
    a backend that takes the call, and the CPU backend does."""
    C = 400
    w = make_weight(C, 1, torch.float32, generator=torch.Generator().manual_seed(3))
    y = make_image(1, C, 2, 3, torch.float32, generator=torch.Generator().manual_seed(4))
    with pytest.raises((RuntimeError, ValueError), match='backend="torch"'):
        ck.cinc_conv2d_inverse(y.cuda(), w.cuda(), backend="cuda")
    got = ck.cinc_conv2d_inverse(y, w, backend="cpu")
    assert_rel_close(got, reference.inverse(y.double(), w.double()), torch.float32, factor=10, what="C = 400 on cpu")
