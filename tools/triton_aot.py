"""Ahead-of-time compile of every Triton launch the launchers can choose, for sm_80 and sm_90, with no GPU.

For each launch of ``cinc_kernels/triton/kernels.py`` (forward: every autotune configuration each target keeps and
the fixed one; inverse, adjoint, their centre inverse, and log-determinant; the channel counts below; every dtype
each kernel accepts; k, the bias and the unit diagonal are run-time arguments, so one compiled kernel serves
k = 1…7 with and without them) it compiles the kernel with ``triton.compile`` down to a cubin and asserts that
(1) it compiles, (2) the compiler's shared memory fits the target's per-block limit and (3) the launcher's
shared-memory model is not below it. One CSV row per compiled launch (kernel, target, dtype, block sizes, warps,
stages, shared bytes, model, triton version); the committed table is ``tools/results/triton_aot.csv``.

Run as ``python tools/triton_aot.py --csv out.csv``: it loads the kernels module by path and imports triton and
nothing else (no torch, not the package, whose ``__init__`` imports torch), so an environment holding triton alone
(the oldest supported, 3.6) can run it. Set ``TRITON_CACHE_DIR`` to keep the compiled kernels between runs: a rerun
then only reads the cache.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from types import ModuleType
from typing import Any

import triton  # type: ignore[import-untyped, unused-ignore]
from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped, unused-ignore]
from triton.compiler import ASTSource  # type: ignore[import-untyped, unused-ignore]

KERNELS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "cinc_kernels", "triton",
                            "kernels.py")


def _load_kernels() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cinc_triton_kernels", KERNELS_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the Triton kernels from {KERNELS_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kernels: Any = _load_kernels()
TARGETS = tuple(sorted(kernels.SHARED_LIMIT))
# Channel counts that reach every distinct set of block sizes: 1 and each power of two ≥ 16 with its successor
# (the channel tile, the forward's pruning and the wavefront's pixel block change only there), up to the largest C
# the wavefront accepts and well past it for the forward and the log-determinant, which take any C.
CHANNELS = (1, 15, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 1024, 1025)
# (H, W) reaching each of the wavefront's pixel blocks (16, 32, 64).
IMAGES = ((1, 1), (17, 40), (64, 64))
_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


Job = tuple[int, str, Any]  # (target, dtype, kernels.Launch)
Row = dict[str, Any]


def forward_launches() -> set[Job]:
    """(target, dtype, launch) for every forward launch: autotuned for each target's limit, and the fixed one."""
    return {(target, dtype, launch)
            for target in TARGETS for dtype in kernels.FORWARD_DTYPES for C in CHANNELS
            for tf32 in ((False, True) if dtype == "float32" else (False,)) for autotune in (True, False)
            for launch in kernels.forward_launches(C, dtype, tf32, kernels.SHARED_LIMIT[target], autotune)}


def _wavefront_channels(target: int, dtype: str) -> list[int]:
    """The channel counts up to the largest the inverse and its adjoint accept on this target, that largest too."""
    limit = kernels.wavefront_max_channels(dtype, kernels.SHARED_LIMIT[target])
    return [c for c in CHANNELS if c <= limit] + [limit]


def wavefront_launches() -> set[Job]:
    """The inverse's and the adjoint's launches, with their centre inverse, for every C they accept."""
    out = set()
    for target in TARGETS:
        for dtype in kernels.WAVEFRONT_DTYPES:
            for C in _wavefront_channels(target, dtype):
                out.add((target, dtype, kernels.centre_inverse_launch(C)))
                for H, W in IMAGES:
                    for adjoint in (False, True):
                        out.add((target, dtype, kernels.wavefront_launch(C, H, W, dtype, adjoint)))
    return out


def logdet_launches() -> set[Job]:
    return {(target, dtype, kernels.logdet_launch(C, dtype))
            for target in TARGETS for dtype in kernels.WAVEFRONT_DTYPES for C in CHANNELS}


def all_launches() -> list[Job]:
    return sorted(forward_launches() | wavefront_launches() | logdet_launches(),
                  key=lambda t: (t[2].kernel.__name__, t[0], t[1], repr(t[2].constexprs), t[2].num_warps,
                                 t[2].num_stages))


def _pointer_dtype(launch: Any, name: str, dtype: str) -> str:
    """The pointed-to dtype: the tensors' own, except L⁻¹, which the launchers keep in the accumulation dtype."""
    holds_centre_inverse = name == "centre_inv_ptr" or (
        launch.kernel is kernels._cinc_centre_inverse_kernel and name == "out_ptr")
    if holds_centre_inverse:
        return "fp64" if dtype == "float64" else "fp32"
    return _TYPE[dtype]


def model_bytes(launch: Any, dtype: str) -> int:
    meta = launch.meta
    if launch.kernel is kernels._cinc_forward_gemm_kernel:
        return int(kernels.forward_shared_bytes(
            meta["BLOCK_P"], meta["BLOCK_O"], meta["BLOCK_C"], launch.num_stages,
            "float32" if meta["DOT_DTYPE"] == kernels._TL_DTYPE["float32"] else dtype))
    if launch.kernel is kernels._cinc_inverse_wavefront_kernel:
        return int(kernels.wavefront_shared_bytes(meta["BLOCK_P"], meta["BLOCK_C"], meta["BLOCK_K"], dtype))
    if launch.kernel is kernels._cinc_centre_inverse_kernel:
        return int(kernels.centre_inverse_shared_bytes(meta["BLOCK_C"], launch.num_warps))
    return int(kernels.logdet_shared_bytes(meta["BLOCK_C"], dtype))


def compile_one(job: Job) -> Row:
    """Compile one launch for one target; returns its CSV row (``error`` set if it failed to compile)."""
    target, dtype, launch = job
    fn = launch.kernel
    meta = launch.meta
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + _pointer_dtype(launch, name, dtype)
            attrs[(index,)] = [["tt.divisibility", 16]]  # what the runtime sees for a fresh torch allocation
        else:
            signature[name] = "i32"
    row: Row = {"kernel": fn.__name__, "target": f"sm_{target}", "dtype": dtype,
                "constexprs": " ".join(f"{n}={_short(v)}" for n, v in launch.constexprs),
                "num_warps": launch.num_warps, "num_stages": launch.num_stages, "shared_bytes": "",
                "model_bytes": model_bytes(launch, dtype), "limit_bytes": kernels.SHARED_LIMIT[target],
                "triton": triton.__version__, "seconds": "", "cpu_seconds": "", "error": ""}
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=dict(meta), attrs=attrs),
                                  target=GPUTarget("cuda", target, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        row["shared_bytes"] = int(compiled.metadata.shared)
    except Exception as exc:  # noqa: BLE001 -- any compiler failure is a finding, reported per launch
        message = str(exc).strip()
        row["error"] = f"{type(exc).__name__}: {message.splitlines()[0][:300] if message else ''}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 2)
    return row


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): on a shared machine the wall time says little."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_JOBS: list[Job] = []


def _compile_index(index: int) -> Row:
    return compile_one(_JOBS[index])


def _short(value: Any) -> Any:
    return getattr(value, "name", value) if not isinstance(value, (bool, int, str)) else value


def problems(row: Row) -> list[str]:
    """Why a compiled launch fails the check, or an empty list."""
    if row["error"]:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["shared_bytes"] > row["limit_bytes"]:
        out.append(f"needs {row['shared_bytes']} B of shared memory, over the {row['limit_bytes']} B limit")
    if row["shared_bytes"] > row["model_bytes"]:
        out.append(f"the model says {row['model_bytes']} B, below the compiler's {row['shared_bytes']} B")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--csv", help="write one row per compiled launch to this file")
    parser.add_argument("--append", action="store_true", help="add the rows to --csv instead of replacing it")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if kernels.INTERPRETED:
        print("error: TRITON_INTERPRET is set; the ahead-of-time compile needs the real compiler", file=sys.stderr)
        return 2
    if args.jobs < 1:
        parser.error(f"--jobs: must be at least 1; got {args.jobs}")

    _JOBS[:] = [j for j in all_launches() if args.kernel in j[2].kernel.__name__]
    if not _JOBS:
        parser.error(f"--kernel: no kernel name contains {args.kernel!r}")
    start = time.perf_counter()
    if args.jobs > 1:
        # Forked workers inherit _JOBS and receive indices: a kernel loaded by path does not pickle.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_index, range(len(_JOBS))))
    else:
        rows = [compile_one(j) for j in _JOBS]
    elapsed = time.perf_counter() - start

    failed = 0
    for row in rows:
        for problem in problems(row):
            failed += 1
            print(f"FAIL {row['kernel']} {row['target']} {row['dtype']} {row['constexprs']} "
                  f"warps={row['num_warps']} stages={row['num_stages']}: {problem}")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        header = not (args.append and os.path.exists(args.csv) and os.path.getsize(args.csv) > 0)
        with open(args.csv, "a" if args.append else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if header:
                writer.writeheader()
            writer.writerows(rows)
    worst: dict[tuple[str, str], int] = {}
    for row in rows:
        if not row["error"]:
            key = (row["kernel"], row["target"])
            worst[key] = max(worst.get(key, 0), row["shared_bytes"])
    for (kernel, target), shared in sorted(worst.items()):
        print(f"{kernel} {target}: at most {shared} B of shared memory (limit {kernels.SHARED_LIMIT[int(target[3:])]})")
    cpu = sum(row["cpu_seconds"] for row in rows)
    print(f"triton {triton.__version__}: {len(rows)} launches compiled for {', '.join(f'sm_{t}' for t in TARGETS)} "
          f"in {elapsed:.0f} s with {args.jobs} processes ({cpu:.0f} s of CPU), {failed} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
