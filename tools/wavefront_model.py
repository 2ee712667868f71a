"""The performance model of the CUDA wavefront on an H100 (docs/gpu-performance.md), before and after its redesign.

For each shape it asks the launch plan (csrc/cuda/cinc_wavefront_kernel.cuh) what it would launch on an H100, runs
one image of that launch in the CPU emulation with its shared-memory accesses counted
(tests/cuda_emulation/cuda_host_emulation.h: wavefronts per warp-wide access, accesses per thread and phase), and
turns the counts into a predicted time with the machine numbers and per-step costs below, beside a model of cuDNN's
forward. "Before" is the kernel this one replaced (one block per image, a residual then a solve step per diagonal),
counted by replaying its address arithmetic here (`before`). Nothing here is measured on a GPU: every number is a
prediction, to be checked against tools/gpu_check.sh.

    python tools/wavefront_model.py                 # writes tools/results/wavefront_model.{csv,md}
    python tools/wavefront_model.py --sizes 32      # 32×32 only
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An H100 SXM as the model sees it (the H200 has the same SMs and clocks; its HBM gives 4.8 TB/s).
SMS = 132
CLOCK = 1.7e9                 # Hz, sustained
FP32_PEAK = 50e12             # FLOP/s on CUDA cores
FMA_PER_CLOCK = FP32_PEAK / 2 / CLOCK / SMS  # per SM: ≈ 111 (128 lanes at a lower sustained clock)
HBM = 3.0e12                  # bytes/s
SHARED_PER_SM = 233472        # bytes (228 KB), 227 KB per block
SHARED_PER_BLOCK = 232448
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048

# Per-step costs in clocks (assumptions; each is one row of docs/gpu-performance.md's table of constants).
ISSUE_PER_ITERATION = 80      # instructions of one hot-loop iteration of one warp: 64 FFMA, 8 LDS.128, 8 others
ITERATION_LATENCY = 100       # one warp alone: 64 FFMA issued back to back after ~30 clocks of LDS latency
PHASE_FILL = 60               # first loads of a phase, last FFMA to the store
SYNCTHREADS = 30              # __syncthreads() with every warp arrived
CLUSTER_SYNC = 450            # the last distributed-shared-memory store landing, then barrier.cluster arrive/wait
REMOTE_BYTES_PER_CLOCK = 32   # distributed-shared-memory stores leaving one SM
MEMORY_LATENCY = 700          # an HBM load (L2 miss); the prefetch hides it behind phase B, a barrier and phase A
LAUNCH = 3e-6                 # per kernel launch in a stream (seconds)
CUDNN_EFFICIENCY = 0.75       # cuDNN's implicit GEMM, float32 (TF32 off), of FP32_PEAK: generous to cuDNN
CUDNN_FLOOR = 5e-6            # seconds: launch and one wave of the smallest problems

P, Q = 4, 4                   # pixels and output channels of a thread item (cinc_wavefront_block.h)


def _cxx():
    for name in (os.environ.get("CXX"), "g++-12", "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SystemExit("error: no C++ compiler to build tests/cuda_emulation/run_kernels.cpp")


def build_emulator(out_dir: str) -> str:
    import torch

    exe = os.path.join(out_dir, "run_kernels")
    cmd = [_cxx(), "-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread", "-Wno-unknown-pragmas",
           "-I", os.path.join(ROOT, "csrc"), "-isystem", os.path.join(os.path.dirname(torch.__file__), "include"),
           "-o", exe, os.path.join(ROOT, "tests", "cuda_emulation", "run_kernels.cpp")]
    subprocess.run(cmd, check=True)
    return exe


H100_ARGS = [f"sms={SMS}", "cluster=8", f"shared={SHARED_PER_BLOCK}", f"shared_sm={SHARED_PER_SM}"]


def plan(exe: str, B: int, C: int, S: int, k: int = 3) -> dict:
    out = subprocess.run([exe, "plan", "float", f"B={B}", f"C={C}", f"H={S}", f"W={S}", f"k={k}", *H100_ARGS],
                         capture_output=True, text=True, check=True).stdout
    return {key: float(v) if "." in v else int(v) for key, v in (item.split("=") for item in out.split())}


_COUNTED: dict[tuple, list[dict]] = {}


def count(exe: str, op: str, B: int, C: int, S: int, k: int, tmp: str) -> list[dict]:
    """One image of the launch planned for a batch of B, counted (the counts depend on the batch only through the
    plan: launches planned alike are counted once)."""
    p = plan(exe, B, C, S, k)
    key = (op, C, S, k, p["blocks_per_image"], p["threads"], p["weights_in_shared"], p["ring_in_shared"])
    if key not in _COUNTED:
        _COUNTED[key] = _count(exe, op, B, C, S, k, tmp)
    return _COUNTED[key]


def _count(exe: str, op: str, B: int, C: int, S: int, k: int, tmp: str) -> list[dict]:
    rng = np.random.default_rng(C * 1000 + S)
    w = rng.standard_normal((C, C, k, k)) * 0.3 / (k * math.sqrt(C))
    w[:, :, k - 1, k - 1] += np.diag(2.0 + rng.random(C))
    rhs = rng.standard_normal(C * S * S)
    path = os.path.join(tmp, "counters.json")
    args = [exe, op, "float", "B=1", f"C={C}", f"H={S}", f"W={S}", f"k={k}", f"plan_batch={B}", *H100_ARGS,
            f"strides={C * S * S},{S * S},{S},1", f"storage={C * S * S}", "bias=0", f"counters={path}"]
    subprocess.run(args, input=w.tobytes() + rhs.tobytes(), capture_output=True, check=True)
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class Step:
    """One diagonal of one block, from the counters: phase A (hot loop) and phase B (reduction, exchange)."""
    warp_iterations: float
    iterations: int       # rounds × iterations of the busiest thread
    wavefronts_a: int
    wavefronts_b: int
    remote_bytes: int
    phase_b_warp_accesses: int


def steps_of(phases: list[dict], block: int = 0) -> tuple[list[Step], str, str]:
    """The diagonal steps of `block`, in order; the labels of the mid and end barriers."""
    mine = [p for p in phases if p["block"] == block]
    ends = [p["end"] for p in mine]
    # Per step the kernel has two phases: A ends at the mid barrier, B at the end barrier. The two labels that occur
    # most often (H + W - 1 times each) are those; A is the one with the most loads.
    labels = sorted({e for e in ends if e != "exit"}, key=ends.count, reverse=True)[:2]
    loads = {label: sum(s["warp_accesses"] for p in mine if p["end"] == label for s in p["sites"] if not s["store"])
             for label in labels}
    mid = max(labels, key=loads.get)
    end = min(labels, key=loads.get)
    out = []
    a_phases = [p for p in mine if p["end"] == mid]
    b_phases = [p for p in mine if p["end"] == end][-len(a_phases):]
    for a, b in zip(a_phases, b_phases):
        hot = max((s for s in a["sites"] if not s["store"]), key=lambda s: s["warp_accesses"])
        out.append(Step(
            warp_iterations=hot["warp_accesses"] / P,
            iterations=hot["max_per_thread"] // P,
            wavefronts_a=sum(s["wavefronts"] for s in a["sites"]),
            wavefronts_b=sum(s["wavefronts"] for s in b["sites"] if not s["remote"]),
            remote_bytes=sum(s["accesses"] * s["bytes"] for s in b["sites"] if s["remote"]),
            phase_b_warp_accesses=sum(s["warp_accesses"] for s in b["sites"] if not s["remote"]),
        ))
    return out, mid, end


def step_clocks(s: Step, cluster: bool, coefficients_in_shared: bool, cluster_sync: float) -> tuple[float, float]:
    """(throughput-bound clocks, latency clocks) of one step: the first is what other blocks on the SM compete for."""
    issue_a = s.warp_iterations * ISSUE_PER_ITERATION / 4
    # Coefficients from L1 instead of shared memory: as many L1 wavefronts as the shared ones they replace.
    shared_a = s.wavefronts_a + (0 if coefficients_in_shared else s.warp_iterations * P)
    latency_a = s.iterations * ITERATION_LATENCY
    thr_a = max(issue_a, shared_a)
    issue_b = s.phase_b_warp_accesses * 3 / 4
    thr_b = max(issue_b, s.wavefronts_b, s.remote_bytes / REMOTE_BYTES_PER_CLOCK)
    latency = max(0.0, latency_a - thr_a) + PHASE_FILL + SYNCTHREADS + PHASE_FILL
    latency += cluster_sync if cluster else SYNCTHREADS
    return thr_a + thr_b, latency


def blocks_per_sm(p: dict) -> int:
    by_shared = SHARED_PER_SM // (p["shared"] + 1024)
    by_threads = THREADS_PER_SM // p["threads"]
    # tools/results/cuda_ptxas.csv: the float32 wavefront kernels take ≤ 128 registers
    by_registers = REGISTERS_PER_SM // (p["threads"] * 128)
    return max(1, min(by_shared, by_threads, by_registers))


def coefficient_seconds(C: int, k: int) -> float:
    """The coefficient kernel, after its launch: L⁻¹ one column per thread (C sequential steps of a division and an
    axpy), then its share of k² · C² dot products of length ≤ C per block (loads from L1 and shared memory, ~4 clocks
    each)."""
    chain = sum(40 + 2 * (C - j) for j in range(C))
    entries = 4 * (C / 2) * 4
    return (chain + entries + 2 * MEMORY_LATENCY) / CLOCK


@dataclasses.dataclass
class Prediction:
    seconds: float
    steps: int
    blocks_per_image: int
    threads: int
    sms_busy: int
    waves: int
    flop: float
    global_bytes: float
    wavefronts_per_step: float
    notes: str


def after(exe: str, op: str, B: int, C: int, S: int, tmp: str, k: int = 3,
          cluster_sync: float = CLUSTER_SYNC) -> Prediction:
    p = plan(exe, B, C, S, k)
    steps, _, _ = steps_of(count(exe, op, B, C, S, k, tmp))
    G = p["blocks_per_image"]
    per_sm = blocks_per_sm(p)
    blocks = B * G
    resident = min(blocks, SMS * per_sm)
    waves = math.ceil(blocks / resident)
    on_one_sm = math.ceil(resident / SMS)
    clocks = 0.0
    for s in steps:
        thr, lat = step_clocks(s, G > 1, bool(p["weights_in_shared"]), cluster_sync)
        clocks += max(on_one_sm * thr, thr + lat)
    # With programmatic dependent launch the wavefront kernel starts while the coefficient kernel runs: zeroing its
    # ring and staging the first diagonal overlap it; the coefficient copy and the steps follow it.
    overlapped = p["ring_elements"] * 4 / 128 + MEMORY_LATENCY
    after_coefficients = (p["weight_elements"] * 4 / 128 + MEMORY_LATENCY if p["weights_in_shared"] else 0)
    after_coefficients += cluster_sync if G > 1 else SYNCTHREADS
    first_wave = max(coefficient_seconds(C, k), overlapped / CLOCK) + (after_coefficients + clocks) / CLOCK
    later_waves = (waves - 1) * (overlapped + after_coefficients + clocks) / CLOCK
    seconds = LAUNCH + first_wave + later_waves
    flop = 2.0 * B * S * S * C * C * k * k
    global_bytes = 4.0 * (2 * B * C * S * S + G * B * (C * C * k * k if p["weights_in_shared"] else 0)
                          + 2 * C * C * k * k)
    return Prediction(seconds, len(steps), G, p["threads"], min(SMS, blocks), waves, flop, global_bytes,
                      sum(s.wavefronts_a + s.wavefronts_b for s in steps) / len(steps),
                      f"{per_sm} blocks/SM fit, {on_one_sm} resident; coefficients "
                      f"{'in shared memory' if p['weights_in_shared'] else 'from L1'}")


def explain(exe: str, op: str, B: int, C: int, S: int, tmp: str, k: int = 3) -> str:
    """The arithmetic of one prediction, as Markdown (docs/gpu-performance.md's worked example)."""
    p = plan(exe, B, C, S, k)
    steps, _, _ = steps_of(count(exe, op, B, C, S, k, tmp))
    G = p["blocks_per_image"]
    longest = S - 1  # the anti-diagonal through the corners: S pixels
    s = steps[longest]
    thr, lat = step_clocks(s, G > 1, bool(p["weights_in_shared"]), CLUSTER_SYNC)
    issue_a = s.warp_iterations * ISSUE_PER_ITERATION / 4  # as step_clocks counts it
    sums = [step_clocks(t, G > 1, bool(p["weights_in_shared"]), CLUSTER_SYNC) for t in steps]
    total_thr, total_lat = sum(t for t, _ in sums), sum(t for _, t in sums)
    new = after(exe, op, B, C, S, tmp, k)
    ref = cudnn_forward(B, C, S, k)
    macs = S * S * C * C * k * k / G
    lines = [
        (f"Plan ({'sm_90, ' if G > 1 else ''}H100): {G} block(s) per image, {p['threads']} threads each, "
        f"{B * G} blocks on {min(B * G, SMS)} SMs, {new.waves} wave(s); ring "
        f"{'and coefficient copy ' if p['weights_in_shared'] else ''}in shared memory: {p['shared']} bytes per block. "
        f"A block owns {min(C, p['groups_per_block'] * Q)} output channels: "
        f"{S}·{S}·{min(C, p['groups_per_block'] * Q)}·{k * k}·{C} = {macs / 1e6:.2f} M multiply-adds per image, "
        f"{macs / FMA_PER_CLOCK:,.0f} clocks at {FMA_PER_CLOCK:.0f} FMA per clock."),
        "",
        (f"The longest diagonal (step {longest}, {S} pixels): counted {s.warp_iterations:.0f} warp-iterations of the "
        f"hot loop, the busiest thread {s.iterations}; {s.wavefronts_a} shared wavefronts in phase A, "
        f"{s.wavefronts_b} in phase B, {s.remote_bytes} bytes into the other blocks."),
        (f"Phase A: max(instructions {s.warp_iterations:.0f} × {ISSUE_PER_ITERATION} / 4 schedulers = "
        f"{issue_a:.0f}, wavefronts "
        f"{s.wavefronts_a}{'' if p['weights_in_shared'] else f' + {s.warp_iterations * P:.0f} from L1'}, busiest "
        f"thread {s.iterations} × {ITERATION_LATENCY} = {s.iterations * ITERATION_LATENCY}) clocks; phase B and "
        f"the rest of the throughput {thr - max(issue_a, s.wavefronts_a):.0f}; fills, barriers and latency "
        f"{lat:.0f}: "
        f"{thr + lat:.0f} clocks = {(thr + lat) / CLOCK * 1e6:.2f} µs."),
        "",
        (f"All {len(steps)} steps: {total_thr:,.0f} clocks of instructions or wavefronts + {total_lat:,.0f} of fills, "
        f"barriers and latency = {(total_thr + total_lat) / CLOCK * 1e6:.1f} µs; one launch (the wavefront kernel's "
        f"hides behind the coefficient kernel: programmatic dependent launch) {LAUNCH * 1e6:.0f} µs; coefficient "
        f"kernel {coefficient_seconds(C, k) * 1e6:.1f} µs; total {new.seconds * 1e6:.1f} µs."),
        (f"cuDNN's forward: {2 * B * S * S * C * C * k * k / 1e9:.3f} GFLOP at {CUDNN_EFFICIENCY:.0%} of 50 TFLOP/s "
        f"+ 3 µs = {ref * 1e6:.1f} µs. Ratio {new.seconds / ref:.2f}×."),
    ]
    return "\n".join(lines)


def before(B: int, C: int, S: int, k: int = 3) -> Prediction:
    """The replaced kernel, replayed: one block per image, threads as its wavefront_threads chose them; per diagonal a
    residual step (items of 4 pixels × 4 output channels: per (tap, input channel) 4 ring loads, 4 weight loads —
    lanes of a warp span several channel groups whose weight words are 4·C·k² apart — and 16 FMA) and a solve step
    (one (pixel, channel) dot product with L⁻¹ per item, 2 loads per FMA), a __syncthreads() after each."""
    H = W = S
    n_max = min(H, W)
    most = 256 if B >= 2 * SMS else 512
    groups_max = math.ceil(n_max / 4)
    threads = min(most, max(32, math.ceil(max(groups_max * math.ceil(C / 4), n_max * C // 4) / 32) * 32))
    weight = C * C * k * k
    ring = 2 * (k - 1) * C * H
    shared = (C * C + max(C * C, ring + C * n_max) + weight) * 4
    in_shared = shared <= SHARED_PER_BLOCK
    if not in_shared:
        shared -= weight * 4
    per_sm = max(1, min(SHARED_PER_SM // (shared + 1024), THREADS_PER_SM // threads, 2))
    clocks = 0.0
    wavefronts_total = 0.0
    for d in range(H + W - 1):
        n = min(d, H - 1) - max(0, d - W + 1) + 1
        groups = math.ceil(n / 4)
        items = groups * math.ceil(C / 4)
        taps_c = (k * k - 1) * C
        # The weight loads of a warp: lanes t = 32w … 32w+31 take channel group t // groups; the words of one load
        # are ((4·cg + q)·C + c)·k² + tap: one bank for every channel group when C·k²·4 ≡ 0 (mod 32).
        warp_wavefronts = 0
        busy_warps = math.ceil(items / 32)
        for w in range(busy_warps):
            lanes = range(32 * w, min(items, 32 * w + 32))
            cgs = sorted({t // groups for t in lanes})
            banks = {}
            for cg in cgs:
                word = (4 * cg * C) * k * k
                banks.setdefault(word % 32, set()).add(word)
            per_load = max(len(v) for v in banks.values())
            warp_wavefronts += taps_c * (4 + 4 * per_load)   # 4 ring loads (conflict-free) + 4 weight loads
        loops = math.ceil(items / threads)
        issue_res = busy_warps * taps_c * 30 / 4
        latency_res = loops * taps_c * 30
        residual = max(issue_res, warp_wavefronts, latency_res)
        solve_items = n * C
        solve_warps = math.ceil(solve_items / 32)
        solve_wavefronts = solve_warps * (C / 2) * 2
        solve = max(solve_wavefronts, math.ceil(solve_items / threads) * (C / 2) * 8)
        thr = max(issue_res, warp_wavefronts) + solve_wavefronts
        lat = residual + solve - thr + 2 * (SYNCTHREADS + PHASE_FILL)
        wavefronts_total += warp_wavefronts + solve_wavefronts
        on_one_sm = min(per_sm, math.ceil(B / SMS))
        clocks += max(on_one_sm * thr, thr + lat)
    waves = math.ceil(B / (SMS * per_sm))
    prologue = C * C * 4 / 32 + C * 40 + C * C + 2 * MEMORY_LATENCY
    seconds = LAUNCH + waves * (prologue + clocks) / CLOCK
    flop = 2.0 * B * S * S * C * C * (k * k - 1) + B * S * S * C * C
    return Prediction(seconds, H + W - 1, 1, threads, min(SMS, B), waves, flop, 4.0 * (2 * B * C * S * S),
                      wavefronts_total / (H + W - 1),
                      f"weights {'in shared memory' if in_shared else 'through generic loads'}")


def cudnn_forward(B: int, C: int, S: int, k: int = 3) -> float:
    flop = 2.0 * B * S * S * C * C * k * k
    memory = 4.0 * (2 * B * C * S * S + C * C * k * k)
    return max(CUDNN_FLOOR, LAUNCH + max(flop / (CUDNN_EFFICIENCY * FP32_PEAK), memory / HBM))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--channels", type=int, nargs="+", default=[12, 48, 96])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 132, 256])
    parser.add_argument("--ops", nargs="+", default=["inverse", "inverse_transpose"])
    parser.add_argument("--out", default=os.path.join(ROOT, "tools", "results"))
    parser.add_argument("--cluster-sync", type=float, nargs="+", default=[300, 700],
                        help="other cluster-barrier costs (clocks) to show the B = 16 rows with")
    parser.add_argument("--explain", type=int, nargs=3, metavar=("B", "C", "SIZE"),
                        help="print the arithmetic of one inverse prediction and exit")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wavefront_model_") as tmp:
        exe = build_emulator(tmp)
        if args.explain:
            print(explain(exe, "inverse", *args.explain, tmp))
            return 0
        for op in args.ops:
            for S in args.sizes:
                for C in args.channels:
                    for B in args.batches:
                        new = after(exe, op, B, C, S, tmp)
                        others = {c: after(exe, op, B, C, S, tmp, cluster_sync=c).seconds for c in args.cluster_sync}
                        old = before(B, C, S)
                        ref = cudnn_forward(B, C, S)
                        rows.append(dict(
                            op=op, B=B, C=C, size=S, cudnn_us=ref * 1e6,
                            before_us=old.seconds * 1e6, before_ratio=old.seconds / ref,
                            before_threads=old.threads, before_sms=old.sms_busy,
                            before_wavefronts_per_step=old.wavefronts_per_step,
                            after_us=new.seconds * 1e6, after_ratio=new.seconds / ref,
                            blocks_per_image=new.blocks_per_image, threads=new.threads, sms_busy=new.sms_busy,
                            waves=new.waves, steps=new.steps, wavefronts_per_step=new.wavefronts_per_step,
                            gflop=new.flop / 1e9, global_mb=new.global_bytes / 1e6, notes=new.notes,
                            **{f"after_ratio_sync{int(c)}": t / ref for c, t in others.items()}))
                        r = rows[-1]
                        print(f"{op:17s} B={B:3d} C={C:2d} {S}²: cuDNN {r['cudnn_us']:8.1f} µs | before "
                              f"{r['before_us']:9.1f} µs ({r['before_ratio']:6.1f}×) | after {r['after_us']:8.1f} µs "
                              f"({r['after_ratio']:5.2f}×) G={new.blocks_per_image} T={new.threads} "
                              f"SMs={new.sms_busy} {new.notes}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wavefront_model.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "wavefront_model.md"), "w") as f:
        f.write("# The CUDA wavefront's performance model on an H100 (predictions, not measurements)\n\n"
                "`python tools/wavefront_model.py`; the method and its constants: docs/gpu-performance.md. float32, "
                "k = 3, square images. Ratios are to cuDNN's forward (modelled).\n\n"
                "| op | B | C | H=W | steps | FLOP (G) | global (MB) | cuDNN µs "
                "| before: threads, SMs, wavefronts/step | before µs | before / cuDNN "
                "| after: blocks/image, threads, SMs, waves | after wavefronts/step "
                "| after µs | after / cuDNN |\n|" + "---|" * 15 + "\n")
        for r in rows:
            f.write(f"| {r['op']} | {r['B']} | {r['C']} | {r['size']} | {r['steps']} | {r['gflop']:.3g} | "
                    f"{r['global_mb']:.3g} | {r['cudnn_us']:.1f} | {r['before_threads']}, {r['before_sms']}, "
                    f"{r['before_wavefronts_per_step']:.0f} | {r['before_us']:.0f} | {r['before_ratio']:.1f}× | "
                    f"{r['blocks_per_image']}, {r['threads']}, {r['sms_busy']}, {r['waves']} | "
                    f"{r['wavefronts_per_step']:.0f} | {r['after_us']:.1f} | {r['after_ratio']:.2f}× |\n")
    print(f"wrote {os.path.join(args.out, 'wavefront_model.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
