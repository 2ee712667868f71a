"""The CUDA kernels (csrc/cuda/) against the float64 reference.

Three kinds of tests:
* on every machine: the build put a CUDA kernel behind each ``cinc`` op when it says it built the CUDA kernels;
* on every machine with a C++ compiler: the wavefront's block schedule (csrc/cuda/cinc_wavefront_block.h, the code
  each thread block of the CUDA inverse runs) executed on the CPU by tests/cuda_wavefront_emulator.cpp, in every
  shared-memory layout the kernel can pick;
* on a machine with a CUDA GPU: what only the CUDA kernels have (every shared-memory layout at full size, the
  current stream, the shared-memory limit); skipped with the reason otherwise. The properties every backend shares
  (values against the reference, layouts, dtypes, gradients, opcheck, compile, the singular-weight behaviour) run on
  CUDA from ``test_backend_contract.py``.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import reference
from cinc_kernels import build_info

from .cases import RTOL, assert_rel_close, make_image, make_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("forward", "inverse", "inverse_transpose", "logdet")
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none is visible); run benchmarks/gpu_check.sh on one")


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
# the block schedule, emulated on the CPU


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build tests/cuda_wavefront_emulator.cpp")
    exe = str(tmp_path_factory.mktemp("emulator") / "cuda_wavefront_emulator")
    subprocess.run(
        [cxx, "-O1", "-std=c++17", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"), "-o", exe,
         os.path.join(ROOT, "tests", "cuda_wavefront_emulator.cpp")],
        check=True, capture_output=True, text=True,
    )
    return exe


def _emulate(exe, dtype, rhs, weight, bias, unit_diagonal, adjoint, limit, channels_last):
    B, C, H, W = rhs.shape
    k = weight.shape[-1]
    args = [exe, dtype, *map(str, (B, C, H, W, k, int(unit_diagonal), int(adjoint), int(bias is not None), limit,
                                   int(channels_last)))]
    payload = b"".join(t.double().contiguous().numpy().tobytes() for t in (weight, bias, rhs) if t is not None)
    done = subprocess.run(args, input=payload, capture_output=True, check=True)
    header = np.frombuffer(done.stdout[:24], dtype=np.int64)
    out = torch.from_numpy(np.frombuffer(done.stdout[24:], dtype=np.float64).copy()).view(B, C, H, W)
    return out, {"use_ring": bool(header[0]), "weight_in_shared": bool(header[1])}


def _limits(C, H, W, k):
    """Shared-memory sizes (elements) that make the kernel pick each of its layouts."""
    inverse, residual, ring = C * C, C * min(H, W), max(1, 2 * (k - 1)) * C * H
    with_ring = inverse + max(C * C, ring + residual)
    return {
        "ring+weight": with_ring + C * C * k * k,
        "ring": with_ring,
        "global": inverse + max(C * C, residual),
    }


# Odd sizes; diagonals longer than one 4-pixel block and channel counts that leave a partial 4-channel block.
EMULATED_SHAPES = [(2, 3, 5, 7, 3), (1, 1, 1, 1, 1), (1, 4, 1, 6, 2), (2, 5, 7, 3, 3), (1, 8, 6, 6, 5),
                   (1, 2, 3, 3, 7), (1, 6, 4, 9, 4), (1, 9, 13, 11, 3)]


@pytest.mark.parametrize("adjoint", [False, True], ids=["inverse", "inverse_transpose"])
@pytest.mark.parametrize("B,C,H,W,k", EMULATED_SHAPES)
def test_wavefront_block_schedule_on_cpu(emulator, B, C, H, W, k, adjoint):
    g = torch.Generator().manual_seed(B * 1000 + C * 100 + H * 10 + W + k)
    for unit_diagonal in (False, True):
        w = make_weight(C, k, generator=g)
        bias = None if adjoint else torch.randn(C, generator=g, dtype=torch.float64)
        rhs = make_image(B, C, H, W, generator=g)
        if adjoint:
            want = reference.inverse_transpose(rhs, w, unit_diagonal)
        else:
            want = reference.inverse(rhs, w, bias, unit_diagonal)
        for (layout, limit), dtype, channels_last in itertools.product(
            _limits(C, H, W, k).items(), ("float", "double"), (False, True)
        ):
            got, chosen = _emulate(emulator, dtype, rhs, w, bias, unit_diagonal, adjoint, limit, channels_last)
            assert chosen["weight_in_shared"] == (layout == "ring+weight")
            if layout != "global":
                assert chosen["use_ring"]
            torch_dtype = torch.float32 if dtype == "float" else torch.float64
            assert_rel_close(got, want, torch_dtype, factor=10,
                             what=f"{layout} {dtype} unit={unit_diagonal} channels_last={channels_last}")


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
