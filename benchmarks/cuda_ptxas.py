"""Registers, spills and shared memory of every CUDA kernel specialisation, from ptxas, for sm_80 and sm_90.

Compiles the kernel headers of csrc/cuda (the code the extension's .cu files launch, with the extension's nvcc flags)
in one translation unit that instantiates each specialisation the launchers can pick, with ``nvcc --resource-usage``,
and writes one row per (kernel, arch) to ``cuda_ptxas.csv``, with the arch's per-block shared-memory limit beside the
static shared memory (the kernels' shared memory is dynamic: every launch's size is checked against the limit by the
emulated tests, tests/test_cuda_emulated.py). tests/test_cuda_ptxas.py fails on any spill. No GPU needed.

    python benchmarks/cuda_ptxas.py                       # writes benchmarks/results/cuda_ptxas.csv
    python benchmarks/cuda_ptxas.py --out /tmp/ptxas --arch 90
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Opt-in shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMIT = {"80": 166912, "90": 232448}
FORWARD_TYPES = [("float", "float"), ("double", "double"), ("c10::Half", "float"), ("c10::BFloat16", "float")]

# One instantiation per specialisation that csrc/cuda/*.cu launches.
INSTANCES = (
    [f"template __global__ void forward_kernel<{t}, {a}>(const ForwardParams<{t}>);" for t, a in FORWARD_TYPES]
    + [f"template __global__ void wavefront_kernel<{t}, {adj}, {ring}>(const WavefrontParams<{t}>);"
       for t in ("float", "double") for adj in ("false", "true") for ring in ("false", "true")]
    + [f"template __global__ void logdet_kernel<{t}>(const {t}*, int64_t, int, double, {t}*);"
       for t in ("float", "double")]
)

def nvcc_path() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = os.path.join(candidate, "bin", "nvcc") if candidate else ""
        if path and os.path.isfile(path):
            return path
    return shutil.which("nvcc")


def torch_include() -> str:
    import torch

    return os.path.join(os.path.dirname(torch.__file__), "include")


def translation_unit() -> str:
    return "\n".join([
        "#include <c10/util/BFloat16.h>",
        "#include <c10/util/Half.h>",
        '#include "cuda/cinc_forward_kernel.cuh"',
        '#include "cuda/cinc_wavefront_kernel.cuh"',
        "namespace cinc {",
        "namespace cuda {",
        *INSTANCES,
        "}  // namespace cuda",
        "}  // namespace cinc",
        "",
    ])


def run_ptxas(nvcc: str, arch: str, csrc: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "cinc_kernels_ptxas.cu")
        with open(src, "w") as f:
            f.write(translation_unit())
        # The extension's nvcc flags (setup.py and torch's defaults for CUDA extensions).
        cmd = [nvcc, "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
               "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "-I", csrc, "-I", torch_include(),
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "--resource-usage", "-c", src,
               "-o", os.path.join(tmp, "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{done.stderr[-4000:]}")
        return done.stdout + done.stderr


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    done = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, done.stdout.splitlines()))


def short_name(demangled: str) -> str:
    """cinc::cuda::wavefront_kernel<double, false, true>(...) → wavefront_kernel<double, inverse, ring>."""
    m = re.search(r"(\w+_kernel)<([^()]*)>", demangled)
    if not m:
        return demangled
    kernel, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    if kernel == "wavefront_kernel":
        args = [args[0], "inverse_transpose" if args[1] == "true" else "inverse",
                "ring" if args[2] == "true" else "global"]
    return f"{kernel}<{', '.join(a.replace('c10::', '') for a in args)}>"


def parse(log: str, arch: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": f"sm_{m.group(2)}"}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
    names = demangle([r["mangled"] for r in rows])
    out = []
    for r in rows:
        out.append({
            "kernel": short_name(names[r["mangled"]]), "arch": r["arch"], "registers": r.get("registers", -1),
            "stack_bytes": r.get("stack", 0),
            "spill_store_bytes": r.get("spill_stores", 0), "spill_load_bytes": r.get("spill_loads", 0),
            "static_smem_bytes": r.get("static_smem", 0), "smem_limit_bytes": SHARED_LIMIT[arch],
        })
    return sorted(out, key=lambda r: (r["arch"], r["kernel"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder of cuda_ptxas.csv")
    parser.add_argument("--arch", action="append", choices=sorted(SHARED_LIMIT), help="80 and/or 90 (default both)")
    parser.add_argument("--csrc", default=os.path.join(ROOT, "csrc"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    nvcc = nvcc_path()
    if nvcc is None:
        print("error: no nvcc found (set CUDA_HOME to the CUDA toolkit)", file=sys.stderr)
        return 2
    lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    version = next((line.strip() for line in lines if "release" in line), lines[-1] if lines else "nvcc")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for arch in args.arch or sorted(SHARED_LIMIT):
        for row in parse(run_ptxas(nvcc, arch, args.csrc), arch):
            rows.append({**row, "nvcc": version, "date": date})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cuda_ptxas.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        flag = "  SPILLS" if r["spill_store_bytes"] or r["spill_load_bytes"] else ""
        print(f"{r['arch']}  {r['kernel']:<52} {r['registers']:4d} regs  stack {r['stack_bytes']:4d} B  "
              f"spill {r['spill_store_bytes']}/{r['spill_load_bytes']} B{flag}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
