"""The CUDA kernels executed as written on the CPU, against the float64 reference.

tests/cuda_emulation/run_kernels.cpp compiles the kernels of csrc/cuda/*.cuh (the same ones that nvcc compiles into
the extension) with the host compiler and tests/cuda_emulation/cuda_host_emulation.h: one CPU thread per CUDA thread
(of every block of a thread-block cluster), ``__syncthreads()`` and the cluster barrier real barriers, shared memory
filled with NaN and guarded past the launch's size, and the whole thing built with ThreadSanitizer, which fails the
run on any pair of accesses that the barriers do not order. The shapes below take every layout of the wavefront (ring
and coefficient copy in shared memory, ring only, ring in global memory; one block or a cluster per image), k = 1…7,
float32 and float64 (and float16/bfloat16 for the forward), strided inputs, thread counts that make each thread loop
over several items, and forward tiles/channel chunks/output groups that do not divide the image or the channels. The
wavefront's launch plan is tested for an H100 and an A100, and its shared-memory accesses are counted (bank
conflicts per warp-wide access, busy threads per phase) at the issue's target shapes.

tools/cuda_mutation_check.py deletes each barrier, mis-sizes each shared buffer and undoes each conflict-free layout in
turn and checks that this file fails.
"""
from __future__ import annotations

import itertools
import json
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
# tools/cuda_mutation_check.py points this at a mutated copy of csrc/.
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
                           os.path.join(EMULATION, "run_kernels.cpp")], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if sanitize:
            return None
        raise AssertionError(f"building the emulated kernels failed:\n{done.stderr[-4000:]}")
    return exe


def _starts(command) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "math"], capture_output=True, text=True,
                          env=dict(os.environ, TSAN_OPTIONS=TSAN), check=False)


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
         hw=None, blocks=0, extra=()):
    """Runs one launch; returns (output as float64, the launch description) or raises on a refused launch."""
    C, k = weight.shape[0], weight.shape[-1]
    args = [*command, op, dtype, f"C={C}", f"k={k}", f"unit={int(unit_diagonal)}", f"bias={int(bias is not None)}",
            f"shared={shared}", f"threads={threads}", f"blocks={blocks}", *extra]
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
    done = subprocess.run(args, input=payload, capture_output=True, env=env, timeout=600, check=False)
    if done.returncode == 3:
        raise RuntimeError(done.stderr.decode().strip())
    assert done.returncode == 0, (
        f"{' '.join(args[len(command):])} exited with {done.returncode}:\n"
        f"{done.stderr.decode(errors='replace')[-6000:]}"
    )
    head, _, body = done.stdout.partition(b"\n")
    launch = dict(item.split("=") for item in head.decode().split())
    out = torch.from_numpy(np.frombuffer(body, dtype=np.float64).copy()).view(shape)
    return out, {key: float(v) if "." in v else int(v) for key, v in launch.items()}


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _inputs(seed, B, C, H, W, k, dtype):
    """Fresh inputs, already rounded to `dtype` so that the float64 reference sees the values the kernel sees."""
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, generator=g).to(dtype).double()
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).double()
    x = make_image(B, C, H, W, generator=g).to(dtype).double()
    return w, bias, x


def _plan(command, dtype, B, C, H, W, k, **device):
    """The wavefront's launch plan (cinc_wavefront_kernel.cuh's plan_wavefront) for a device: shared, shared_sm, sms,
    cluster, threads, blocks as run_kernels takes them."""
    args = [*command, "plan", dtype, f"B={B}", f"C={C}", f"H={H}", f"W={W}", f"k={k}",
            *(f"{key}={v}" for key, v in device.items())]
    done = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, TSAN_OPTIONS=TSAN), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return {key: float(v) if "." in v else int(v) for key, v in (item.split("=") for item in done.stdout.split())}


def _layout_limits(command, dtype, B, C, H, W, k, threads, blocks):
    """Shared memory per block (bytes) that makes the plan pick each of its layouts (cinc_wavefront_kernel.cuh): the
    ring and the coefficient copy in shared memory, the ring only, neither (the ring in a global workspace)."""
    itemsize = DTYPES[dtype].itemsize
    p = _plan(command, dtype, B, C, H, W, k, threads=threads, blocks=blocks)
    ring = (p["partial_elements"] + p["ring_elements"]) * itemsize
    return {
        "ring+weights": ring + p["weight_elements"] * itemsize,
        "ring": ring,
        "global": max(p["partial_elements"] * itemsize, p["coefficient_shared"]),
    }


# (B, C, H, W, k): k = 1…7; H ≠ W both ways; diagonals longer than one 4-pixel group; channel counts that leave a
# partial group of 4 (and a partial 16-byte vector in float64); one and several output groups (clusters of 2 and 3).
WAVEFRONT_SHAPES = [(2, 3, 5, 7, 3), (1, 1, 1, 1, 1), (1, 4, 1, 6, 2), (2, 5, 7, 3, 3), (1, 8, 6, 6, 5),
                    (1, 2, 3, 3, 7), (1, 6, 4, 9, 4), (1, 9, 13, 11, 3), (1, 3, 7, 8, 6)]


@pytest.mark.parametrize("op", ["inverse", "inverse_transpose"])
@pytest.mark.parametrize("B,C,H,W,k", WAVEFRONT_SHAPES, ids=lambda v: str(v))
def test_wavefront_kernel_every_layout(emulator, op, B, C, H, W, k):
    """Each shape in float32 and float64, each layout of the plan; the odd runs in a thread-block cluster (distributed
    shared memory, a cluster barrier per diagonal) where the shape has several output groups and the ring is in shared
    memory; every third run with 32 threads, so that a thread loops over several items. The coefficient kernel runs
    with its own 256 threads in one run of the six where k ≤ 3, and with 32 (each thread looping over several columns
    and entries) in the others: ThreadSanitizer makes every emulated thread expensive, and the coefficient kernel
    has k² blocks (49 blocks of 256 threads cost 9 s a run at k = 7)."""
    adjoint = op == "inverse_transpose"
    seed = _seed(op, B, C, H, W, k)
    layouts = ("contiguous", "channels_last", "noncontiguous")
    groups = -(-C // 4)
    for n, (dtype, layout_name) in enumerate(itertools.product(("float", "double"),
                                                                ("ring+weights", "ring", "global"))):
        torch_dtype = DTYPES[dtype]
        w, bias, rhs = _inputs(seed + n, B, C, H, W, k, torch_dtype)
        unit_diagonal = n % 2 == 1
        if adjoint:
            bias = None
            want = reference.inverse_transpose(rhs, w, unit_diagonal)
        else:
            want = reference.inverse(rhs, w, bias, unit_diagonal)
        threads = 32 if n % 3 == 0 else 0
        blocks = min(groups, 2 + n % 3) if n % 2 == 1 and groups > 1 and layout_name != "global" else 1
        limits = _layout_limits(emulator, dtype, B, C, H, W, k, threads, blocks)
        shared = limits[layout_name]
        coefficient_threads = 256 if n == 1 and k <= 3 else 32
        got, launch = _run(emulator, op, dtype, w, x=with_layout(rhs, layouts[n % 3]), bias=bias,
                           unit_diagonal=unit_diagonal, shared=shared, threads=threads, blocks=blocks,
                           extra=[f"coefficient_threads={coefficient_threads}"])
        what = f"{op} {dtype} {layout_name} {layouts[n % 3]} unit={unit_diagonal} {launch}"
        # (Two limits coincide on some shapes; the plan then takes the richer layout.)
        assert launch["ring_in_shared"] == (shared >= limits["ring"]), what
        assert launch["weights_in_shared"] == (shared >= limits["ring+weights"]), what
        assert launch["blocks_per_image"] == blocks, what
        assert launch["shared"] <= shared, what
        assert torch.isfinite(got).all(), f"{what}: non-finite output"
        assert_rel_close(got, want, torch_dtype, what=what)


def test_wavefront_kernel_many_threads_and_batch(emulator):
    """Clusters of 4 blocks, one after the other for two images, with the plan's threads: diagonals of more than one
    warp of items."""
    w, bias, y = _inputs(7, 2, 16, 12, 10, 2, torch.float32)
    got, launch = _run(emulator, "inverse", "float", w, x=y, bias=bias, blocks=4)
    assert launch["threads"] > 32 and launch["blocks_per_image"] == 4
    assert_rel_close(got, reference.inverse(y, w, bias, False), torch.float32, what=str(launch))


def test_wavefront_refuses_what_does_not_fit(emulator):
    C, H, W, k = 6, 5, 5, 3
    w, _, y = _inputs(3, 1, C, H, W, k, torch.float64)
    too_small = _layout_limits(emulator, "double", 1, C, H, W, k, 0, 1)["global"] - 8
    with pytest.raises(RuntimeError, match="do not fit"):
        _run(emulator, "inverse", "double", w, x=y, shared=too_small, blocks=1)


H100 = {"sms": 132, "cluster": 8, "shared": 232448, "shared_sm": 233472}
A100 = {"sms": 108, "cluster": 1, "shared": 166912, "shared_sm": 167936}


@pytest.mark.parametrize("B,C,H,W,blocks", [(1, 48, 32, 32, 6), (16, 48, 32, 32, 6), (16, 24, 32, 32, 6),
                                            (16, 96, 64, 64, 8), (132, 48, 32, 32, 1), (256, 48, 32, 32, 1),
                                            (16, 12, 32, 32, 1), (1, 12, 64, 64, 1)])
def test_wavefront_plan_fills_an_h100(emulator, B, C, H, W, blocks):
    """Blocks per image from the batch, the channels and the SM count: a batch that leaves SMs idle gets clusters of
    up to 8 blocks over equal shares of the output groups, without asking for more SMs than there are — unless the
    diagonals carry too little work for a cluster barrier to pay (C = 12: 108 multiply-adds per pixel and channel)."""
    p = _plan(emulator, "float", B, C, H, W, 3, **H100)
    assert p["fits"] == 1 and p["ring_in_shared"] == 1
    assert p["blocks_per_image"] == blocks, p
    groups = -(-C // 4)
    assert p["groups_per_block"] == -(-groups // blocks)
    assert B * blocks <= max(B, H100["sms"])
    assert p["threads"] % 32 == 0 and 32 <= p["threads"] <= 512
    assert p["shared"] <= H100["shared"]


def test_wavefront_plan_keeps_a_second_block_per_sm(emulator):
    """At B = 256, C = 48 every SM must hold two images: the coefficient copy goes (read from L1/L2 instead) when it is
    what keeps the second block off, and the block takes at most 256 threads; at B = 132 one image per SM keeps it."""
    many = _plan(emulator, "float", 256, 48, 32, 32, 3, **H100)
    assert many["blocks_per_image"] == 1 and many["threads"] <= 256
    assert many["weights_in_shared"] == 0
    assert 2 * (many["shared"] + 1024) <= H100["shared_sm"]
    one_each = _plan(emulator, "float", 132, 48, 32, 32, 3, **H100)
    assert one_each["weights_in_shared"] == 1 and one_each["threads"] > 256


def test_wavefront_plan_without_clusters(emulator):
    """sm_80 has no clusters: one block per image whatever the batch; a ring that does not fit in shared memory is
    kept in global memory rather than refused."""
    for B in (1, 16, 256):
        p = _plan(emulator, "float", B, 48, 32, 32, 3, **A100)
        assert p["blocks_per_image"] == 1 and p["fits"] == 1, (B, p)
    big = _plan(emulator, "double", 1, 96, 128, 128, 3, **A100)
    assert big["fits"] == 1 and big["ring_in_shared"] == 0 and big["weights_in_shared"] == 0
    assert big["shared"] <= A100["shared"]
    # A cluster needs the ring in shared memory: where it does not fit, one block per image even on sm_90.
    assert _plan(emulator, "double", 1, 96, 128, 128, 3, **H100)["blocks_per_image"] == 1


@pytest.mark.parametrize("B,C,H,W,k", [(3, 7, 9, 5, 3), (1, 160, 40, 40, 3), (7, 33, 2, 90, 5), (500, 20, 16, 16, 2)])
def test_wavefront_plan_is_consistent(emulator, B, C, H, W, k):
    """For any shape: the blocks of an image cover its output groups, none is empty, the launch fits the device."""
    for device in (H100, A100):
        for dtype in ("float", "double"):
            p = _plan(emulator, dtype, B, C, H, W, k, **device)
            if not p["fits"]:
                continue
            groups = -(-C // 4)
            blocks, per = p["blocks_per_image"], p["groups_per_block"]
            assert blocks <= device["cluster"] and (blocks - 1) * per < groups <= blocks * per, p
            assert p["shared"] <= device["shared"] and p["coefficient_shared"] <= device["shared"], p
            assert p["threads"] <= (512 if dtype == "float" else 384), p


@pytest.fixture(scope="module")
def counting_emulator(emulator, tmp_path_factory):
    """The plain (-O2) build: counting every shared-memory access of a 32×32 image is too slow under
    ThreadSanitizer, and races are the other tests' business."""
    if "_tsan" not in emulator[-1]:
        return emulator
    return [_build(tmp_path_factory.mktemp("cuda_emulation_plain"), sanitize=False)]


def _count(command, tmp_path, op, dtype, B, C, H, W, k, device):
    """One image of the launch the plan makes for a batch of B on `device`, its shared-memory accesses counted: (the
    plan, the phases of every block of the image as cuda_host_emulation.h counts them)."""
    plan = _plan(command, dtype, B, C, H, W, k, **device)
    w, bias, rhs = _inputs(_seed("count", op, dtype, B, C, H, W), 1, C, H, W, k, DTYPES[dtype])
    path = tmp_path / f"{op}_{dtype}_{B}_{C}_{H}.json"
    extra = [f"plan_batch={B}", f"sms={device['sms']}", f"cluster={device['cluster']}",
             f"shared_sm={device['shared_sm']}",
             f"counters={path}"]
    got, launch = _run(command, op, dtype, w, x=rhs, bias=None if op == "inverse_transpose" else bias,
                       shared=device["shared"], extra=extra)
    want = (reference.inverse_transpose(rhs, w, False) if op == "inverse_transpose"
            else reference.inverse(rhs, w, bias, False))
    assert_rel_close(got, want, DTYPES[dtype], what=f"counted {op} {launch}")
    assert launch["blocks_per_image"] == plan["blocks_per_image"] and launch["threads"] == plan["threads"]
    with open(path) as f:
        return plan, json.load(f)


def _by_site(phases, end=None):
    """Per site: warp-wide accesses, wavefronts, the fewest wavefronts they could take, the worst degree, and the
    thread utilisation (accesses over threads × the busiest thread's accesses, summed over phases)."""
    sites = {}
    for phase in phases:
        if end is not None and phase["end"] != end:
            continue
        for s in phase["sites"]:
            key = (s["site"], "store" if s["store"] else "load", s["remote"])
            t = sites.setdefault(key, {"warp_accesses": 0, "wavefronts": 0, "ideal": 0, "worst": 0.0, "accesses": 0,
                                   "offered": 0})
            for field in ("warp_accesses", "wavefronts", "ideal", "accesses"):
                t[field] += s[field]
            t["offered"] += phase["threads"] * s["max_per_thread"]
            t["worst"] = max(t["worst"], s["worst"])
    return sites


# The target shapes on an H100 (132 SMs, clusters of up to 8): B = 16 (a cluster of 6 blocks per image),
# B = 132 (one block per image, coefficients in shared memory), B = 256 (two blocks per SM, coefficients from L1),
# C = 96 in clusters of 8, float64.
COUNTED = [("inverse", "float", 16, 48, 32, 32), ("inverse", "float", 132, 48, 32, 32),
           ("inverse_transpose", "float", 256, 48, 32, 32), ("inverse", "float", 16, 96, 16, 16),
           ("inverse_transpose", "double", 16, 48, 16, 16)]


@pytest.mark.parametrize("op,dtype,B,C,H,W", COUNTED, ids=lambda v: str(v))
def test_wavefront_counts_no_bank_conflicts_and_busy_threads(counting_emulator, tmp_path, op, dtype, B, C, H, W):
    """The hot loop (the loads of the phase before the mid-diagonal barrier that make most of its accesses) costs at
    most twice the shared-memory wavefronts its words need on any warp-wide access, and 1.25× on average; no other
    shared access of the kernel is worse than 2×; and in the hot loop at least 90 % of the threads are busy (time-
    weighted over the diagonals, as the plan predicts it)."""
    plan, phases = _count(counting_emulator, tmp_path, op, dtype, B, C, H, W, 3, H100)
    everything = _by_site(phases)
    for key, t in everything.items():
        assert t["worst"] <= 2, f"{key}: a warp-wide access takes {t['worst']}× the wavefronts its words need"
    # The phase with the most shared loads ends at the mid-diagonal barrier: the hot loop's.
    loads_per_end = {}
    for phase in phases:
        loads = sum(s["warp_accesses"] for s in phase["sites"] if not s["store"])
        loads_per_end[phase["end"]] = loads_per_end.get(phase["end"], 0) + loads
    hot_end = max(loads_per_end, key=loads_per_end.get)
    residual = _by_site(phases, hot_end)
    loads = {key: t for key, t in residual.items() if key[1] == "load"}
    total = sum(t["warp_accesses"] for t in loads.values())
    hot = {key: t for key, t in loads.items() if t["warp_accesses"] >= 0.2 * total}
    assert hot, loads
    for key, t in hot.items():
        assert t["wavefronts"] <= 1.25 * t["ideal"], f"{key}: {t['wavefronts']} wavefronts for {t['ideal']}"
        utilisation = t["accesses"] / t["offered"]
        assert utilisation >= 0.9, f"{key}: {utilisation:.3f} of the threads busy in the hot loop"
        assert utilisation == pytest.approx(plan["utilisation"], abs=1e-6), (utilisation, plan)
    # The cluster's exchange: stores into the other blocks' shared memory, one per own vector per other block.
    remote = [t for key, t in everything.items() if key[2]]
    assert bool(remote) == (plan["blocks_per_image"] > 1)


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
    that reads a word another thread wrote with no barrier between is reported by ThreadSanitizer, within a block and
    across the blocks of a cluster (a write into another block's shared memory read there without a cluster barrier);
    with the cluster barrier the other block reads what was written."""
    guard = subprocess.run([*emulator, "selftest", "guard"], capture_output=True, text=True, check=False)
    assert guard.returncode == 3 and "past the 64 bytes" in guard.stderr, guard.stderr
    env = dict(os.environ, TSAN_OPTIONS=TSAN)
    ordered = subprocess.run([*emulator, "selftest", "cluster"], capture_output=True, text=True, env=env, check=False)
    assert ordered.returncode == 0 and ordered.stdout.split() == [str(v) for v in range(1, 33)], ordered.stderr
    race = subprocess.run([*emulator, "selftest", "race"], capture_output=True, text=True, env=env, check=False)
    cluster_race = subprocess.run([*emulator, "selftest", "cluster_race"], capture_output=True, text=True, env=env,
                                  check=False)
    if "_tsan" not in emulator[-1]:
        pytest.skip("no working ThreadSanitizer build on this machine (see the warning): no race check")
    assert race.returncode == 66 and "data race" in race.stderr, race.stderr[-2000:]
    assert cluster_race.returncode == 66 and "data race" in cluster_race.stderr, cluster_race.stderr[-2000:]
