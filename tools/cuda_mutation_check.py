"""Does tests/test_cuda_emulated.py notice a broken CUDA kernel? Breaks csrc/cuda in a copy, one mutation at a time,
and runs the emulated tests against each copy.

Mutations: every ``__syncthreads()`` in csrc/cuda deleted in turn (found by scanning the sources, so a new barrier is
covered without editing this file), and every shared-memory buffer mis-sized (the list below: each shrinks one
region of the launch's shared memory or moves a region onto its neighbour). A mutation is "caught" when the tests
fail; the first failing test and its reason are printed.

    python tests/cuda_emulation/mutation_check.py              # all, a few minutes per mutation on a busy 2-core box
    python tests/cuda_emulation/mutation_check.py --list       # what would be tried
    python tests/cuda_emulation/mutation_check.py -m 3 -m 9    # some of them
    python tests/cuda_emulation/mutation_check.py --markdown benchmarks/results/cuda_mutations.md

Exit status 1 when any mutation goes unnoticed. Not part of `make test` (it rebuilds the emulator per mutation).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
TEST_FILE = os.path.join("tests", "test_cuda_emulated.py")


@dataclasses.dataclass
class Mutation:
    name: str
    path: str  # relative to csrc/
    old: str
    new: str
    occurrence: int = 0  # which match of `old` to replace
    tests: str = ""  # pytest -k expression: the tests of the kernel that the mutation touches

    def apply(self, csrc: str) -> None:
        path = os.path.join(csrc, self.path)
        text = open(path).read()
        starts = [m.start() for m in re.finditer(re.escape(self.old), text)]
        if len(starts) <= self.occurrence:
            raise SystemExit(f"mutation {self.name!r}: {self.old!r} not found in {self.path}; update mutation_check.py")
        at = starts[self.occurrence]
        with open(path, "w") as f:
            f.write(text[:at] + self.new + text[at + len(self.old):])


KERNEL_TESTS = {"forward_kernel": "forward", "logdet_kernel": "logdet", "wavefront_kernel": "wavefront"}


def barrier_mutations() -> list[Mutation]:
    out = []
    for name in sorted(os.listdir(CUDA_DIR)):
        path = os.path.join(CUDA_DIR, name)
        text = open(path).read()
        kernels = [(m.start(), m.group(1)) for m in re.finditer(r"__global__ void .*?(\w+_kernel)\(", text)]
        for n, m in enumerate(re.finditer(re.escape("__syncthreads();"), text)):
            line = text.count("\n", 0, m.start()) + 1
            enclosing = [k for start, k in kernels if start < m.start()]
            kernel = enclosing[-1] if enclosing else "?"
            out.append(Mutation(f"delete __syncthreads() at {name}:{line} ({kernel})", os.path.join("cuda", name),
                                "__syncthreads();", ";", n, KERNEL_TESTS.get(kernel, "")))
    return out


SIZING_MUTATIONS = [
    Mutation("wavefront: no room for the weight copy in the launch's shared memory", "cuda/cinc_wavefront_block.h",
             "l.total_elements = inverse + l.work_elements + (l.weight_in_shared ? weight : 0);",
             "l.total_elements = inverse + l.work_elements;", tests="wavefront"),
    Mutation("wavefront: work region not large enough for L's C² columns", "cuda/cinc_wavefront_block.h",
             "return need > C * C ? need : C * C;", "return need;", tests="wavefront"),
    Mutation("wavefront: residual buffer one pixel short", "cuda/cinc_wavefront_block.h",
             "residual = C * max_diagonal,", "residual = C * (max_diagonal - 1),", tests="wavefront"),
    Mutation("wavefront: ring one diagonal short", "cuda/cinc_wavefront_block.h",
             "return k > 1 ? 2 * (k - 1) : 1;", "return k > 1 ? 2 * (k - 1) - 1 : 1;", tests="wavefront"),
    Mutation("wavefront: L⁻¹ region one column short (work starts inside it)", "cuda/cinc_wavefront_block.h",
             "work(base + p.C * p.C)", "work(base + p.C * (p.C - 1))", tests="wavefront"),
    Mutation("wavefront: weight copy placed over the work region", "cuda/cinc_wavefront_block.h",
             "weight_copy(base + p.C * p.C + p.work_elements)", "weight_copy(base + p.C * p.C)", tests="wavefront"),
    Mutation("forward: input tile sized without its halo", "cuda/cinc_forward_kernel.cuh",
             "x_tile_elements(l.tile_h + p.k - 1, l.tile_w + p.k - 1)", "x_tile_elements(l.tile_h, l.tile_w)",
             tests="forward"),
    Mutation("forward: weight tile sized for one input channel", "cuda/cinc_forward_kernel.cuh",
             "static_cast<size_t>(kOutGroup) * kInChunk * p.k * p.k", "static_cast<size_t>(kOutGroup) * p.k * p.k",
             tests="forward"),
    Mutation("forward: input tile not rounded up (weight tile overlaps it)", "cuda/cinc_forward_kernel.cuh",
             "return (kInChunk * halo_h * halo_w + 3) / 4 * 4;", "return kInChunk * halo_h * halo_w - 1;",
             tests="forward"),
    Mutation("logdet: partial sums sized in floats", "cuda/cinc_forward_kernel.cuh",
             "kLogdetThreads * sizeof(double);", "kLogdetThreads * sizeof(float);", tests="logdet"),
]


def all_mutations() -> list[Mutation]:
    return barrier_mutations() + SIZING_MUTATIONS


def run_one(mutation: Mutation, timeout: int) -> tuple[bool, str, float]:
    """(caught, what happened, seconds)."""
    with tempfile.TemporaryDirectory(prefix="cinc_mutation_") as tmp:
        csrc = os.path.join(tmp, "csrc")
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
        mutation.apply(csrc)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TEST_FILE]
        if mutation.tests:
            cmd += ["-k", mutation.tests]
        t0 = time.time()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, CINC_EMULATION_CSRC=csrc))
        except subprocess.TimeoutExpired:
            return True, f"tests did not finish within {timeout} s (a hang counts as caught)", time.time() - t0
        seconds = time.time() - t0
        if done.returncode == 0:
            return False, "NOT CAUGHT: " + done.stdout.strip().splitlines()[-1], seconds
        return True, _first_failure(done.stdout, csrc), seconds


def _first_failure(log: str, csrc: str) -> str:
    """The first failing test and why: a ThreadSanitizer race if one was reported, else the assertion."""
    lines = log.splitlines()
    failed = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    failed = re.sub(r"^(FAILED|ERROR) tests/test_cuda_emulated.py::(\S+).*", r"\2", failed)
    reasons = [re.sub(r"^E\s+", "", line).replace(csrc + "/", "csrc/") for line in lines
               if "ThreadSanitizer: data race" in line or line.startswith("E ")]
    reason = next((r for r in reasons if "data race" in r), reasons[0] if reasons else "")
    return f"{failed} | {reason[:220]}".strip(" |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("-m", type=int, action="append", help="run only mutation number M (repeatable)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation (default 900)")
    parser.add_argument("--markdown", help="also write the results as a Markdown table to this file")
    args = parser.parse_args(argv)
    mutations = all_mutations()
    if args.list:
        for n, m in enumerate(mutations):
            print(f"{n:2d}  {m.name}")
        return 0
    chosen = [(n, mutations[n]) for n in args.m] if args.m else list(enumerate(mutations))
    rows = []
    for n, m in chosen:
        caught, what, seconds = run_one(m, args.timeout)
        rows.append((n, m.name, caught, what, seconds))
        print(f"{n:2d} {'caught' if caught else 'MISSED'} ({seconds:.0f} s)  {m.name}\n     {what}", flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Mutations of csrc/cuda and tests/test_cuda_emulated.py\n\n")
            f.write("`python tests/cuda_emulation/mutation_check.py`: each row breaks one thing in a copy of csrc/ "
                    "and runs the emulated tests of the kernel it touches.\n\n")
            f.write("| # | mutation | caught | first failing test / why |\n|---|---|---|---|\n")
            for n, name, caught, what, _ in rows:
                f.write(f"| {n} | {name} | {'yes' if caught else '**no**'} | {what.replace('|', '/')} |\n")
    missed = [r for r in rows if not r[2]]
    print(f"{len(rows) - len(missed)} of {len(rows)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
