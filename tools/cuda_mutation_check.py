"""Does tests/test_cuda_emulated.py notice a broken CUDA kernel? Breaks csrc/cuda in a copy, one mutation at a time,
and runs the emulated tests against each copy.

Mutations: every ``__syncthreads()`` and ``cluster_barrier()`` in csrc/cuda deleted in turn (found by scanning the
sources, so a new barrier is covered without editing this file); every shared-memory buffer mis-sized or moved onto
its neighbour; and the layouts that keep the wavefront's shared-memory accesses free of bank conflicts undone (the
list below). A mutation is "caught" when the tests fail; the first failing test and its reason are printed.

    python tools/cuda_mutation_check.py              # all, a few minutes per mutation on a busy 2-core box
    python tools/cuda_mutation_check.py --list       # what would be tried
    python tools/cuda_mutation_check.py -m 3 -m 9    # some of them
    python tools/cuda_mutation_check.py --markdown tools/results/cuda_mutations.md

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
# The emulated tests: the kernels' own, and the forward's k = 3 path (which builds through the first file's helpers,
# so it sees the mutated copy too).
TEST_FILES = [os.path.join("tests", "test_cuda_emulated.py"), os.path.join("tests", "test_cuda_forward_emulated.py")]


@dataclasses.dataclass
class Mutation:
    name: str
    path: str  # relative to csrc/
    old: str
    new: str
    occurrence: int = 0  # which match of `old` to replace
    tests: str = ""  # pytest -k expression: the tests of the kernel that the mutation touches
    # Why the tests cannot catch it, where the mutated code is correct by construction (then a miss is expected and
    # reported, not counted as a gap in the tests).
    survives: str = ""

    def apply(self, csrc: str) -> None:
        path = os.path.join(csrc, self.path)
        with open(path) as f:
            text = f.read()
        starts = [m.start() for m in re.finditer(re.escape(self.old), text)]
        if len(starts) <= self.occurrence:
            raise SystemExit(f"mutation {self.name!r}: {self.old!r} not found in {self.path}; "
                             "update tools/cuda_mutation_check.py")
        at = starts[self.occurrence]
        with open(path, "w") as f:
            f.write(text[:at] + self.new + text[at + len(self.old):])


KERNEL_TESTS = {"forward_kernel": "forward", "logdet_kernel": "logdet", "wavefront_kernel": "wavefront",
                "wavefront_coefficients_kernel": "wavefront"}
BARRIERS = ("__syncthreads();", "cluster_barrier();")


def barrier_mutations() -> list[Mutation]:
    out = []
    for name in sorted(os.listdir(CUDA_DIR)):
        with open(os.path.join(CUDA_DIR, name)) as f:
            text = f.read()
        kernels = [(m.start(), m.group(1)) for m in
                   re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+_kernel)\(", text)]
        for barrier in BARRIERS:
            for n, m in enumerate(re.finditer(re.escape(barrier), text)):
                line = text.count("\n", 0, m.start()) + 1
                enclosing = [k for start, k in kernels if start < m.start()]
                kernel = enclosing[-1] if enclosing else "?"
                out.append(Mutation(f"delete {barrier[:-1]} at {name}:{line} ({kernel})", os.path.join("cuda", name),
                                    barrier, ";", n, KERNEL_TESTS.get(kernel, "")))
    return out


WAVEFRONT = "cuda/cinc_wavefront_block.h"
PLAN = "cuda/cinc_wavefront_kernel.cuh"
SIZING_MUTATIONS = [
    Mutation("wavefront: ring one slot short (a cluster peer writes a slot still being read)", WAVEFRONT,
             "const int neighbours = 2 * k - 1;", "const int neighbours = 2 * k - 2;", tests="wavefront"),
    Mutation("wavefront: ring without room for its second staging slot", PLAN,
             "p.ring_elements = static_cast<int64_t>(p.ring_slots + 2)",
             "p.ring_elements = static_cast<int64_t>(p.ring_slots + 1)", tests="wavefront"),
    Mutation("wavefront: one staging slot for this diagonal and the next", WAVEFRONT,
             "((p.ring_slots + (step & 1)) * p.ring_rows", "((p.ring_slots + 0 * (step & 1)) * p.ring_rows",
             tests="wavefront"),
    Mutation("wavefront: ring not zeroed at the start", PLAN,
             "for (int64_t e = tid; e < ring_vectors; e += threads)",
             "for (int64_t e = tid; e < 0 * ring_vectors; e += threads)",
             tests="wavefront"),
    Mutation("wavefront: a diagonal's guard rows not zeroed", WAVEFRONT,
             "return 2 * static_cast<int64_t>(p.k - 1) * (p.padded_channels / kVec<T>);",
             "return 0 * static_cast<int64_t>(p.k - 1) * (p.padded_channels / kVec<T>);",
             tests="wavefront",
             survives="the zeroing is redundant: the ring starts zeroed, the guard rows after a diagonal's last row "
                      "are never written by an earlier diagonal of the slot (its rows end lower), and the rows "
                      "before its first row, which do hold an earlier diagonal's values, are never read (a "
                      "neighbour outside the image lies past the last row). Correct without it on every emulated "
                      "shape, k = 2…7, H ≠ W both ways; to be removed once a GPU has timed it"),
    Mutation("wavefront: partial sums sized for one slice", WAVEFRONT,
             "const int64_t need = w.splits * partial_rows(w)", "const int64_t need = partial_rows(w)",
             tests="wavefront"),
    Mutation("wavefront: ring placed over the partial sums", WAVEFRONT,
             "b.ring = kRingShared ? base + p.partial_elements :",
             "b.ring = kRingShared ? base + p.partial_elements / 2 :",
             tests="wavefront"),
    Mutation("wavefront: coefficient copy placed over the ring", WAVEFRONT,
             "b.weights = base + p.partial_elements + p.ring_elements;", "b.weights = base + p.partial_elements;",
             tests="wavefront"),
    Mutation("wavefront: no room for the coefficient copy in the launch's shared memory", PLAN,
             "plan.shared_bytes = (plan.weights_in_shared ? with : without) * elem;",
             "plan.shared_bytes = without * elem;", tests="wavefront"),
    Mutation("wavefront: coefficient kernel's L⁻¹ placed over L's last row", PLAN,
             "T* inverse = centre + C * stride;", "T* inverse = centre + (C - 1) * stride;", tests="wavefront"),
    Mutation("wavefront: coefficient kernel's shared memory sized for L alone", PLAN,
             "const int64_t coefficient_elements = 2 * p.C * odd_stride(p.C);",
             "const int64_t coefficient_elements = p.C * odd_stride(p.C);", tests="wavefront"),
    Mutation("wavefront (bank conflicts): ring rows not padded", WAVEFRONT,
             "while (tight ? vectors % 2 == 0 : vectors % 8 != 3 && vectors % 8 != 5) ++vectors;",
             "while (tight && vectors % 2 == 0) ++vectors;", tests="counts"),
    Mutation("wavefront (bank conflicts): coefficient chunks not padded", WAVEFRONT,
             "const int pad = ((groups - chunk) % 8 + 8) % 8;", "const int pad = 0 * groups;", tests="counts"),
    Mutation("wavefront (bank conflicts): partial sums an even number of pixels per vector", WAVEFRONT,
             "return static_cast<int64_t>(w.groups) * kPixelBlock + 1;",
             "return static_cast<int64_t>(w.groups) * kPixelBlock;", tests="counts"),
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
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TEST_FILES]
        if mutation.tests:
            cmd += ["-k", mutation.tests]
        t0 = time.time()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, CINC_EMULATION_CSRC=csrc), check=False)
        except subprocess.TimeoutExpired:
            return True, f"tests did not finish within {timeout} s (a hang counts as caught)", time.time() - t0
        seconds = time.time() - t0
        if done.returncode == 0:
            return False, "NOT CAUGHT: " + done.stdout.strip().splitlines()[-1], seconds
        if "building the emulated kernels failed" in done.stdout:
            return False, "NOT CAUGHT: the mutated kernels do not compile (the mutation proves nothing)", seconds
        return True, _first_failure(done.stdout, csrc), seconds


def _first_failure(log: str, csrc: str) -> str:
    """The first failing test and why: a ThreadSanitizer race if one was reported, else the assertion."""
    lines = log.splitlines()
    failed = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    failed = re.sub(r"^(FAILED|ERROR) tests/test_cuda_emulated.py::(\S+).*", r"\2", failed)
    reasons = [re.sub(r"^E\s+", "", line).replace(csrc + "/", "csrc/") for line in lines
               if "ThreadSanitizer: data race" in line or line.startswith("E ")]
    reason = next((r for r in reasons if "data race" in r), reasons[0] if reasons else "")
    if "data race" in reason:
        # The race's first frame in the kernels (the emulation's ld()/st() are the frames above it).
        frame = next((m.group(1) for line in lines
                      for m in [re.search(re.escape(csrc) + r"/(\S+:\d+)", line)] if m), None)
        if frame:
            reason = f"ThreadSanitizer: data race at csrc/{frame}"
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
        if not caught and m.survives:
            what = f"{what}; expected: {m.survives}"
        rows.append((n, m.name, caught, what, seconds, bool(m.survives)))
        print(f"{n:2d} {'caught' if caught else 'MISSED'} ({seconds:.0f} s)  {m.name}\n     {what}", flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Mutations of csrc/cuda and the emulated tests (tests/test_cuda_emulated.py, "
                    "tests/test_cuda_forward_emulated.py)\n\n")
            f.write("`python tools/cuda_mutation_check.py`: each row breaks one thing in a copy of csrc/ "
                    "and runs the emulated tests of the kernel it touches.\n\n")
            f.write("| # | mutation | caught | first failing test / why |\n|---|---|---|---|\n")
            for n, name, caught, what, _, expected in rows:
                verdict = "yes" if caught else ("no (expected)" if expected else "**no**")
                f.write(f"| {n} | {name} | {verdict} | {what.replace('|', '/')} |\n")
    missed = [r for r in rows if not r[2]]
    unexpected = [r for r in missed if not r[5]]
    print(f"{len(rows) - len(missed)} of {len(rows)} mutations caught; {len(missed) - len(unexpected)} missed as "
          f"expected, {len(unexpected)} unexpectedly")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
