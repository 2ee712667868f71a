"""The CUDA forward's k = 3 path (csrc/cuda/cinc_forward_kernel.cuh, ``forward_tile_k3``) executed as written on CPU
threads, against the float64 reference.

The emulation of tests/test_cuda_emulated.py runs it: one CPU thread per CUDA thread, ``__syncthreads()`` a real
barrier, shared memory filled with NaN and guarded past the launch's size, ThreadSanitizer. The shapes here take the
double-buffered path through several channel chunks (so both buffers are filled, read and refilled, with a partial
last chunk), every tile shape that qualifies for it (32×8, 16×16, 8×8, 8×4 threads, with partial edge tiles and halo
slots that some threads leave empty), and the tiles that do not (which keep the general path); each launch reports its
shared memory, which says which path ran.
"""
from __future__ import annotations

import pytest
import torch

from cinc_kernels import reference

from . import test_cuda_emulated as emulated
from .cases import assert_rel_close, with_layout

emulator = emulated.emulator  # the emulated kernels' build, shared with tests/test_cuda_emulated.py

# The forward's launch constants (cinc_forward_kernel.cuh).
OUT_GROUP, IN_CHUNK, MAX_TILE_THREADS, HALO_SLOTS = 8, 8, 256, 2
A100_SHARED = 166912  # the smallest per-block opt-in limit of the GPUs the extension is built for (sm_80)
ACC_ITEMSIZE = {"float": 4, "double": 8, "half": 4, "bfloat16": 4}  # float16/bfloat16 stage float32


def _next_power_of_two(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def expected_launch(H: int, W: int, k: int, dtype: str) -> dict:
    """The tile and shared memory that configure_forward should choose, and whether the k = 3 path runs."""
    tile_w = min(32, _next_power_of_two(W))
    tile_h = min(_next_power_of_two(H), MAX_TILE_THREADS // tile_w)
    halo = (tile_h + k - 1) * (tile_w + k - 1)
    pipelined = k == 3 and halo <= HALO_SLOTS * tile_h * tile_w
    x_tile = (IN_CHUNK * halo + 3) // 4 * 4
    buffer = (x_tile + OUT_GROUP * IN_CHUNK * k * k) * ACC_ITEMSIZE[dtype]
    return {"tile_w": tile_w, "tile_h": tile_h, "shared": (2 if pipelined else 1) * buffer, "pipelined": pipelined}


def _check(command, dtype, B, C, H, W, k, layout, unit_diagonal, with_bias, seed):
    """Runs one forward and checks its launch and its values; returns (whether the k = 3 path ran, got, want)."""
    torch_dtype = emulated.DTYPES[dtype]
    w, bias, x = emulated._inputs(seed, B, C, H, W, k, torch_dtype)
    use_bias = bias if with_bias else None
    got, launch = emulated._run(command, "forward", dtype, w, x=with_layout(x, layout), bias=use_bias,
                                unit_diagonal=unit_diagonal)
    want = reference.forward(x, w, use_bias, unit_diagonal)
    what = f"forward {dtype} {(B, C, H, W, k)} {layout} unit={unit_diagonal} bias={with_bias} {launch}"
    expected = expected_launch(H, W, k, dtype)
    assert (launch["tile_w"], launch["tile_h"], launch["shared"]) == (
        expected["tile_w"], expected["tile_h"], expected["shared"]), f"{what}: expected {expected}"
    assert torch.isfinite(got).all(), f"{what}: non-finite output (a read of shared memory nobody wrote?)"
    assert_rel_close(got, want, torch_dtype, what=what)
    return expected["pipelined"], got, want


# (B, C, H, W): tiles of 16×16 (one per image, two images), 32×8 (2 × 3 tiles, partial at the right and bottom
# edges), 8×4 (the smallest that qualifies: 28 of its 32 threads stage a second halo pixel), 8×8 (three images);
# C = 17, 12, 9, 40 and 8: three chunks with a partial last one, two, two with a last chunk of one channel, five (the
# buffers alternate twice), exactly one; output groups of 8 with a partial last one.
K3_SHAPES = [(2, 17, 9, 12), (1, 12, 19, 37), (1, 9, 4, 8), (3, 8, 8, 8), (1, 40, 7, 6)]


@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("B,C,H,W", K3_SHAPES, ids=lambda v: str(v))
def test_forward_k3_double_buffered_path(emulator, dtype, B, C, H, W):
    seed = emulated._seed("forward_k3", dtype, B, C, H, W)
    layout = ("contiguous", "channels_last", "noncontiguous")[seed % 3]
    pipelined, _, _ = _check(emulator, dtype, B, C, H, W, 3, layout, seed % 2 == 1, (seed // 2) % 2 == 0, seed)
    assert pipelined, "these shapes are meant to take the k = 3 path"


@pytest.mark.parametrize("dtype", ["half", "bfloat16"])
def test_forward_k3_half_types_accumulate_in_float32(emulator, dtype):
    """float16/bfloat16 are staged and summed in float32 and rounded once, when stored: every output is within one
    unit in the last place of the exact sum (a sum kept in the half type would be off by many)."""
    pipelined, got, want = _check(emulator, dtype, 1, 17, 19, 37, 3, "channels_last", False, True,
                                  emulated._seed("forward_k3", dtype))
    assert pipelined
    mantissa_bits = {"half": 10, "bfloat16": 7}[dtype]
    ulp = want.to(emulated.DTYPES[dtype]).double().abs() * 2.0**-mantissa_bits + 1e-6
    assert ((got - want).abs() <= ulp).all(), f"{dtype}: worst error {((got - want).abs() / ulp).max():.2f} ulp"


# (B, C, H, W): 4×4, 32×1 and 32×2 tiles, 1×1 images: the halo is most of the input, so they keep the general path.
SMALL_TILE_SHAPES = [(1, 10, 4, 4), (1, 9, 1, 40), (2, 11, 2, 33), (2, 3, 1, 1)]


@pytest.mark.parametrize("B,C,H,W", SMALL_TILE_SHAPES, ids=lambda v: str(v))
def test_forward_k3_small_tiles_keep_the_general_path(emulator, B, C, H, W):
    seed = emulated._seed("forward_k3_small", B, C, H, W)
    pipelined, _, _ = _check(emulator, "float", B, C, H, W, 3, "noncontiguous", False, True, seed)
    assert not pipelined


@pytest.mark.parametrize("dtype", ["float", "double"])
def test_forward_k3_launch_fits_every_gpu(emulator, dtype):
    """The k = 3 path's largest launch (32 × 8 threads, two buffers) fits an A100's per-block shared memory; a batch
    of 0 configures the launch without running a block."""
    w, _, _ = emulated._inputs(1, 1, 9, 1, 1, 3, emulated.DTYPES[dtype])
    x = torch.zeros(0, 9, 40, 70, dtype=torch.float64)
    _, launch = emulated._run(emulator, "forward", dtype, w, x=x, shared=A100_SHARED)
    expected = expected_launch(40, 70, 3, dtype)
    assert expected["pipelined"] and (launch["tile_w"], launch["tile_h"]) == (32, 8)
    assert launch["shared"] == expected["shared"] <= A100_SHARED
