"""The CUDA kernels executed as written on the CPU, against the float64 reference.

tests/cuda_emulation/run_kernels.cpp compiles the kernels of csrc/cuda/*.cuh (the same ones that nvcc compiles into
the extension) with the host compiler and tests/cuda_emulation/cuda_host_emulation.h: one CPU thread per CUDA thread,
``__syncthreads()`` a real barrier, shared memory filled with NaN and guarded past the launch's size, and the whole
thing built with ThreadSanitizer, which fails the run on any pair of accesses that the barriers do not order. The
shapes below take every shared-memory layout of the wavefront (ring + weight copy, ring, output in global memory),
k = 1…7, float32 and float64 (and float16/bfloat16 for the forward), strided inputs, thread counts that make each
thread loop over several items, and forward tiles/channel chunks/output groups that do not divide the image or the
channels.

tests/cuda_emulation/mutation_check.py deletes each ``__syncthreads()`` and mis-sizes each shared buffer in turn and
checks that this file fails.
"""
from __future__ import annotations

import itertools
import os
import platform
import shutil
import subprocess
import warnings
import zlib

import numpy as np
import pytest
import torch

from cinc_kernels import reference

from .cases import RTOL, assert_rel_close, make_image, make_weight, with_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")
# mutation_check.py points this at a mutated copy of csrc/.
CSRC = os.environ.get("CINC_EMULATION_CSRC", os.path.join(ROOT, "csrc"))
DTYPES = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
H200_SHARED = 232448
# A race fails the run at once, with its own exit status.
TSAN = "halt_on_error=1 exitcode=66 report_signal_unsafe=0"


def _compiler():
    for name in (os.environ.get("CXX"), "g++-12", "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(out_dir, sanitize):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler to build tests/cuda_emulation/run_kernels.cpp")
    exe = os.path.join(str(out_dir), "run_kernels" + ("_tsan" if sanitize else ""))
    flags = ["-std=c++20", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-fno-strict-aliasing",
             "-pthread"]
    flags += ["-O1", "-fsanitize=thread"] if sanitize else ["-O2"]
    # c10's header-only float16/bfloat16 types, for the forward's half instantiations.
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    done = subprocess.run([cxx, *flags, "-I", CSRC, "-isystem", torch_include, "-o", exe,
                           os.path.join(EMULATION, "run_kernels.cpp")], capture_output=True, text=True)
    if done.returncode != 0:
        if sanitize:
            return None
        raise AssertionError(f"building the emulated kernels failed:\n{done.stderr[-4000:]}")
    return exe


def _starts(command) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "math"], capture_output=True, text=True, env=dict(os.environ, TSAN_OPTIONS=TSAN))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The command that runs the emulated kernels: the ThreadSanitizer build, under `setarch -R` where the kernel's
    address-space randomisation is too wide for ThreadSanitizer's memory map; the plain build (NaN-filled and guarded
    shared memory still checked) where there is no working ThreadSanitizer."""
    out = tmp_path_factory.mktemp("cuda_emulation")
    exe = _build(out, sanitize=True)
    why = "the compiler cannot build it (no libtsan?)"
    if exe is not None:
        commands = [[exe]] + ([["setarch", platform.machine(), "-R", exe]] if shutil.which("setarch") else [])
        for command in commands:
            done = _starts(command)
            if done.returncode == 0:
                return command
        why = f"it does not start ({done.stderr.strip()[:200]})"
    warnings.warn(f"no ThreadSanitizer build of the emulated kernels: {why}; running the plain build, so races "
                  "between threads go unchecked")
    return [_build(out, sanitize=False)]


def _storage(t: torch.Tensor):
    """The whole storage behind a view (float64), with the view's strides and offset into it."""
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.as_strided(t, (n,), (1,), 0)
    return flat.double().numpy().tobytes(), n, t.stride(), t.storage_offset()


def _run(command, op, dtype, weight, *, x=None, bias=None, unit_diagonal=False, shared=H200_SHARED, threads=0,
         hw=None):
    """Runs one launch; returns (output as float64, the launch description) or raises on a refused launch."""
    C, k = weight.shape[0], weight.shape[-1]
    args = [*command, op, dtype, f"C={C}", f"k={k}", f"unit={int(unit_diagonal)}", f"bias={int(bias is not None)}",
            f"shared={shared}", f"threads={threads}"]
    payload = weight.double().contiguous().numpy().tobytes()
    if bias is not None:
        payload += bias.double().contiguous().numpy().tobytes()
    if x is not None:
        B, _, H, W = x.shape
        data, n, strides, offset = _storage(x)
        args += [f"B={B}", f"H={H}", f"W={W}", "strides=" + ",".join(map(str, strides)), f"offset={offset}",
                 f"storage={n}"]
        payload += data
        shape = tuple(x.shape)
    else:
        H, W = hw
        args += [f"H={H}", f"W={W}"]
        shape = ()
    env = dict(os.environ, TSAN_OPTIONS=TSAN)
    done = subprocess.run(args, input=payload, capture_output=True, env=env, timeout=600)
    if done.returncode == 3:
        raise RuntimeError(done.stderr.decode().strip())
    assert done.returncode == 0, (
        f"{' '.join(args[len(command):])} exited with {done.returncode}:\n"
        f"{done.stderr.decode(errors='replace')[-6000:]}"
    )
    head, _, body = done.stdout.partition(b"\n")
    launch = dict(item.split("=") for item in head.decode().split())
    out = torch.from_numpy(np.frombuffer(body, dtype=np.float64).copy()).view(shape)
    return out, {key: int(v) for key, v in launch.items()}


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _inputs(seed, B, C, H, W, k, dtype):
    """Fresh inputs, already rounded to `dtype` so that the float64 reference sees the values the kernel sees."""
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, generator=g).to(dtype).double()
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).double()
    x = make_image(B, C, H, W, generator=g).to(dtype).double()
    return w, bias, x


def _layout_limits(C, H, W, k, itemsize):
    """Shared memory per block (bytes) that makes the wavefront pick each of its layouts (cinc_wavefront_block.h)."""
    inverse, residual, ring = C * C, C * min(H, W), max(1, 2 * (k - 1)) * C * H
    with_ring = inverse + max(C * C, ring + residual)
    return {
        "ring+weight": (with_ring + C * C * k * k) * itemsize,
        "ring": with_ring * itemsize,
        "global": (inverse + max(C * C, residual)) * itemsize,
    }


# (B, C, H, W, k): k = 1…7; H ≠ W both ways; diagonals longer than one 4-pixel block; channel counts that leave a
# partial 4-channel block; C² larger and smaller than the ring + residual.
WAVEFRONT_SHAPES = [(2, 3, 5, 7, 3), (1, 1, 1, 1, 1), (1, 4, 1, 6, 2), (2, 5, 7, 3, 3), (1, 8, 6, 6, 5),
                    (1, 2, 3, 3, 7), (1, 6, 4, 9, 4), (1, 9, 13, 11, 3), (1, 3, 7, 8, 6)]


@pytest.mark.parametrize("op", ["inverse", "inverse_transpose"])
@pytest.mark.parametrize("B,C,H,W,k", WAVEFRONT_SHAPES, ids=lambda v: str(v))
def test_wavefront_kernel_every_layout(emulator, op, B, C, H, W, k):
    adjoint = op == "inverse_transpose"
    seed = _seed(op, B, C, H, W, k)
    layouts = ("contiguous", "channels_last", "noncontiguous")
    for n, (dtype, layout_name) in enumerate(itertools.product(("float", "double"), ("ring+weight", "ring", "global"))):
        torch_dtype = DTYPES[dtype]
        w, bias, rhs = _inputs(seed + n, B, C, H, W, k, torch_dtype)
        unit_diagonal = n % 2 == 1
        if adjoint:
            bias = None
            want = reference.inverse_transpose(rhs, w, unit_diagonal)
        else:
            want = reference.inverse(rhs, w, bias, unit_diagonal)
        limits = _layout_limits(C, H, W, k, torch_dtype.itemsize)
        shared = limits[layout_name]
        # 32 threads (the fewest the kernel takes) make each thread loop over several items on the larger shapes.
        threads = 32 if n % 3 == 0 else 0
        got, launch = _run(emulator, op, dtype, w, x=with_layout(rhs, layouts[n % 3]), bias=bias,
                           unit_diagonal=unit_diagonal, shared=shared, threads=threads)
        what = f"{op} {dtype} {layout_name} {layouts[n % 3]} unit={unit_diagonal} {launch}"
        # (Two limits coincide on some shapes, e.g. H = 1; the kernel then takes the richer layout.)
        assert launch["use_ring"] == (shared >= limits["ring"]), what
        assert launch["weight_in_shared"] == (shared >= limits["ring+weight"]), what
        assert launch["shared"] <= shared, what
        assert torch.isfinite(got).all(), f"{what}: non-finite output"
        assert_rel_close(got, want, torch_dtype, what=what)


def test_wavefront_kernel_many_threads_and_batch(emulator):
    """The thread-count heuristic's widest block (512 threads, a batch smaller than the SM count) on a diagonal of
    more than one warp of items, and several images (one block each)."""
    w, bias, y = _inputs(7, 3, 16, 12, 10, 2, torch.float32)
    got, launch = _run(emulator, "inverse", "float", w, x=y, bias=bias)
    assert launch["threads"] > 32
    assert_rel_close(got, reference.inverse(y, w, bias, False), torch.float32, what=str(launch))


def test_wavefront_refuses_what_does_not_fit(emulator):
    C, H, W, k = 6, 5, 5, 3
    w, _, y = _inputs(3, 1, C, H, W, k, torch.float64)
    too_small = _layout_limits(C, H, W, k, 8)["global"] - 8
    with pytest.raises(RuntimeError, match="do not fit"):
        _run(emulator, "inverse", "double", w, x=y, shared=too_small)


# (B, C, H, W, k): several tiles per image (W > 32, H·W > 256), several input-channel chunks of 8 and output groups
# of 8 with partial last ones, k = 1…7, 1×1 images.
FORWARD_SHAPES = [(2, 3, 5, 7, 3), (1, 1, 1, 1, 1), (1, 9, 6, 5, 2), (1, 17, 3, 35, 4), (1, 5, 19, 11, 5),
                  (1, 2, 4, 4, 6), (1, 3, 9, 3, 7), (2, 8, 8, 8, 1)]


@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("B,C,H,W,k", FORWARD_SHAPES, ids=lambda v: str(v))
def test_forward_kernel(emulator, dtype, B, C, H, W, k):
    torch_dtype = DTYPES[dtype]
    seed = _seed("forward", dtype, B, C, H, W, k)
    w, bias, x = _inputs(seed, B, C, H, W, k, torch_dtype)
    layout = ("contiguous", "channels_last", "noncontiguous")[seed % 3]
    unit_diagonal = seed % 2 == 1
    use_bias = bias if (seed // 2) % 2 == 0 else None
    got, launch = _run(emulator, "forward", dtype, w, x=with_layout(x, layout), bias=use_bias,
                       unit_diagonal=unit_diagonal)
    want = reference.forward(x, w, use_bias, unit_diagonal)
    assert torch.isfinite(got).all(), f"non-finite output, {launch}"
    assert_rel_close(got, want, torch_dtype, what=f"forward {dtype} {layout} {launch}")


@pytest.mark.parametrize("dtype", ["half", "bfloat16"])
@pytest.mark.parametrize("B,C,H,W,k", [(1, 9, 6, 5, 2), (1, 17, 3, 35, 4)], ids=lambda v: str(v))
def test_forward_kernel_half_types(emulator, dtype, B, C, H, W, k):
    """float16/bfloat16 load and store in their own type and accumulate in float32: the same float4 path as float32."""
    torch_dtype = DTYPES[dtype]
    w, bias, x = _inputs(_seed("forward", dtype, B, C, H, W, k), B, C, H, W, k, torch_dtype)
    got, launch = _run(emulator, "forward", dtype, w, x=with_layout(x, "channels_last"), bias=bias)
    want = reference.forward(x, w, bias, False)
    assert_rel_close(got, want, torch_dtype, what=f"forward {dtype} {launch}")


@pytest.mark.parametrize("dtype", ["float", "double"])
def test_forward_launch_fits_every_gpu(emulator, dtype):
    """The largest forward tile (32 × 8 pixels, k = 7) asks for no more shared memory than an A100 (sm_80, the smallest
    per-block limit of the GPUs built for) has; a batch of 0 configures the launch without running a block."""
    w, _, _ = _inputs(1, 1, 9, 1, 1, 7, DTYPES[dtype])
    x = torch.zeros(0, 9, 40, 70, dtype=torch.float64)
    _, launch = _run(emulator, "forward", dtype, w, x=x, shared=166912)
    assert (launch["tile_w"], launch["tile_h"]) == (32, 8)
    assert launch["shared"] <= 166912


@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.parametrize("C,k,H,W", [(1, 1, 1, 1), (5, 3, 7, 4), (300, 1, 3, 5)])
def test_logdet_kernel(emulator, dtype, C, k, H, W):
    """C = 300 > 256 threads: a thread sums several diagonal entries before the tree reduction."""
    torch_dtype = DTYPES[dtype]
    w, _, _ = _inputs(C * 10 + k, 1, C, 1, 1, k, torch_dtype)
    got, _ = _run(emulator, "logdet", dtype, w, hw=(H, W))
    want = reference.logdet(w, H, W, False)
    assert abs(got.item() - want.item()) <= RTOL[torch_dtype] * max(1.0, abs(want.item())) * 10


def test_logdet_kernel_zero_on_the_diagonal_is_minus_infinity(emulator):
    w, _, _ = _inputs(11, 1, 4, 1, 1, 2, torch.float64)
    w[2, 2, 1, 1] = 0.0
    got, _ = _run(emulator, "logdet", "double", w, hw=(3, 3))
    assert got.item() == float("-inf")


def test_cinc_math_block_substitutions(emulator):
    """The block substitutions of csrc/cinc_math.h, which the CPU kernels compile only off x86, are compiled here and
    give bitwise the one-pixel substitutions' results."""
    done = _starts(emulator)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_emulation_notices_a_stray_write_and_a_race(emulator):
    """The checks themselves work: a kernel that writes past its launch's shared memory fails the launch, and one
    that reads a word another thread wrote with no barrier between is reported by ThreadSanitizer."""
    guard = subprocess.run([*emulator, "selftest", "guard"], capture_output=True, text=True)
    assert guard.returncode == 3 and "past the 64 bytes" in guard.stderr, guard.stderr
    race = subprocess.run([*emulator, "selftest", "race"], capture_output=True, text=True,
                          env=dict(os.environ, TSAN_OPTIONS=TSAN))
    if "_tsan" not in emulator[-1]:
        pytest.skip("no working ThreadSanitizer build on this machine (see the warning): no race check")
    assert race.returncode == 66 and "data race" in race.stderr, race.stderr[-2000:]
