"""Registers, spills, shared memory and the memory instructions of every CUDA kernel specialisation, for sm_80 and
sm_90, from ptxas and the machine code.

Compiles the kernel headers of csrc/cuda (the code the extension's .cu files launch, with the extension's nvcc flags)
in one translation unit that instantiates each specialisation the launchers can pick, with ``nvcc --resource-usage``,
disassembles it (``cuobjdump -sass``: the CUDA toolkit's, or the copy that ships with triton) and writes one row per
(kernel, arch) to ``cuda_ptxas.csv``: registers, spills, static shared memory beside the arch's per-block limit (the
kernels' shared memory is dynamic: every launch's size is checked against the limit by the emulated tests,
tests/test_cuda_emulated.py), and counts of SASS load and store instructions by address space:

  ``generic_loads``   LD: a load through a generic address, which the hardware resolves to shared, global or local
                      memory at run time (slower than LDS/LDG, and the sign that the compiler could not tell a
                      shared-memory pointer from a global one);
  ``shared_loads``    LDS (``shared_vector_loads``: LDS.128 of them), ``global_loads`` LDG, ``local_loads`` LDL;
  ``generic_stores``  ST (the wavefront's cluster kernels store into the other blocks' shared memory this way), and
                      ``shared_stores`` STS, ``global_stores`` STG.

tests/test_cuda_ptxas.py fails on any spill and on any generic load in a wavefront kernel. No GPU needed.

    python tools/cuda_ptxas.py                       # writes tools/results/cuda_ptxas.csv
    python tools/cuda_ptxas.py --out /tmp/ptxas --arch 90
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

# The (ring in shared memory, coefficients in shared memory, cluster) combinations the wavefront launcher picks.
WAVEFRONT_LAYOUTS = [("true", "true", "false"), ("true", "false", "false"), ("false", "false", "false"),
                     ("true", "true", "true"), ("true", "false", "true")]

# One instantiation per specialisation that csrc/cuda/*.cu launches.
INSTANCES = (
    [f"template __global__ void forward_kernel<{t}, {a}>(const ForwardParams<{t}>);" for t, a in FORWARD_TYPES]
    + [f"template __global__ void wavefront_kernel<{t}, {adj}, {ring}, {weights}, {cluster}>"
       f"(const WavefrontParams<{t}>);"
       for t in ("float", "double") for adj in ("false", "true") for ring, weights, cluster in WAVEFRONT_LAYOUTS]
    + [f"template __global__ void wavefront_coefficients_kernel<{t}, {adj}>(const {t}*, int64_t, int, bool, int, {t}*);"
       for t in ("float", "double") for adj in ("false", "true")]
    + [f"template __global__ void logdet_kernel<{t}>(const {t}*, int64_t, int, double, {t}*);"
       for t in ("float", "double")]
)

# SASS opcodes by memory space (the mnemonic before the first dot).
LOADS = {"LD": "generic_loads", "LDS": "shared_loads", "LDG": "global_loads", "LDL": "local_loads"}
STORES = {"ST": "generic_stores", "STS": "shared_stores", "STG": "global_stores", "STL": "local_stores"}
SASS_COLUMNS = [*LOADS.values(), "shared_vector_loads", *STORES.values()]

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


def cuobjdump_path(nvcc: str) -> str | None:
    """The toolkit's cuobjdump, else the one triton ships, else one on PATH."""
    candidates = [os.path.join(os.path.dirname(nvcc), "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("cuobjdump")


def run_ptxas(nvcc: str, arch: str, csrc: str) -> tuple[str, str | None]:
    """(ptxas's resource report, the SASS listing or None without cuobjdump)."""
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
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{done.stderr[-4000:]}")
        cuobjdump = cuobjdump_path(nvcc)
        sass = None
        if cuobjdump is not None:
            listing = subprocess.run([cuobjdump, "-sass", os.path.join(tmp, "k.o")], capture_output=True, text=True,
                                     check=False)
            if listing.returncode != 0:
                raise RuntimeError(f"cuobjdump failed for sm_{arch}:\n{listing.stderr[-4000:]}")
            sass = listing.stdout
        return done.stdout + done.stderr, sass


def sass_counts(sass: str) -> dict[str, dict[str, int]]:
    """Per mangled function name: the SASS_COLUMNS counts of its listing."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), dict.fromkeys(SASS_COLUMNS, 0))
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)((?:\.[A-Z0-9_]+)*)", line)
        if current is None or not m:
            continue
        opcode, modifiers = m.group(1), m.group(2)
        column = LOADS.get(opcode) or STORES.get(opcode)
        if column:
            current[column] += 1
        if opcode == "LDS" and ".128" in modifiers:
            current["shared_vector_loads"] += 1
    return out


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    done = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
    return dict(zip(names, done.stdout.splitlines()))


def short_name(demangled: str) -> str:
    """cinc::cuda::wavefront_kernel<double, false, true, false, false>(...) →
    wavefront_kernel<double, inverse, shared_ring, global_coefficients, block>."""
    m = re.search(r"(\w+_kernel)<([^()]*)>", demangled)
    if not m:
        return demangled
    kernel, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    if kernel in ("wavefront_kernel", "wavefront_coefficients_kernel"):
        args[1] = "inverse_transpose" if args[1] == "true" else "inverse"
    if kernel == "wavefront_kernel":
        args[2:] = ["shared_ring" if args[2] == "true" else "global_ring",
                    "shared_coefficients" if args[3] == "true" else "global_coefficients",
                    "cluster" if args[4] == "true" else "block"]
    return f"{kernel}<{', '.join(a.replace('c10::', '') for a in args)}>"


def parse(log: str, arch: str, sass: dict[str, dict[str, int]] | None) -> list[dict]:
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
            **{c: (sass[r["mangled"]][c] if sass is not None and r["mangled"] in sass else -1) for c in SASS_COLUMNS},
        })
    return sorted(out, key=lambda r: (r["arch"], r["kernel"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tools", "results"), help="folder of cuda_ptxas.csv")
    parser.add_argument("--arch", action="append", choices=sorted(SHARED_LIMIT), help="80 and/or 90 (default both)")
    parser.add_argument("--csrc", default=os.path.join(ROOT, "csrc"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    nvcc = nvcc_path()
    if nvcc is None:
        print("error: no nvcc found (set CUDA_HOME to the CUDA toolkit)", file=sys.stderr)
        return 2
    lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip().splitlines()
    version = next((line.strip() for line in lines if "release" in line), lines[-1] if lines else "nvcc")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for arch in args.arch or sorted(SHARED_LIMIT):
        log, sass = run_ptxas(nvcc, arch, args.csrc)
        for row in parse(log, arch, sass_counts(sass) if sass is not None else None):
            rows.append({**row, "nvcc": version, "date": date})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cuda_ptxas.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        flag = "  SPILLS" if r["spill_store_bytes"] or r["spill_load_bytes"] else ""
        print(f"{r['arch']}  {r['kernel']:<88} {r['registers']:4d} regs  stack {r['stack_bytes']:4d} B  "
              f"spill {r['spill_store_bytes']}/{r['spill_load_bytes']} B  LD {r['generic_loads']} "
              f"LDS {r['shared_loads']} (.128 {r['shared_vector_loads']}){flag}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
