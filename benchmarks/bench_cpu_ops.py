"""CPU ops against ATen's own convolution, side by side in one run (the targets of the foundation issue).

    python benchmarks/bench_cpu_ops.py                # B=16, k=3, C ∈ {12, 48}, H=W ∈ {16, 32}, 2 threads, float32
    python benchmarks/bench_cpu_ops.py --schedules    # also: per-pixel vs gathered-GEMM schedule by channel count

Providers are timed in interleaved rounds (one call of each per round), so the machine's noise hits all of them
alike; medians with the 20th/80th percentiles. Correctness against the float64 reference is checked before timing.
Writes long-format CSV rows (appended) to results/cpu_ops.csv and the latest table to results/cpu_ops.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cinc_kernels as ck  # noqa: E402
from cinc_kernels import reference  # noqa: E402
from _results import write_results  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Targets of the foundation issue: inverse time / ATen conv2d forward time.
INVERSE_TARGET = {48: 4.0, 12: 8.0}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quantiles(ts):
    ts = sorted(ts)
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return statistics.median(ts), q(0.2), q(0.8)


def time_interleaved(providers: dict, rounds: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: quantiles(ts) for name, ts in times.items()}


def make_problem(B, C, H, W, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 0.3 * torch.randn(C, C, k, k, generator=g) / (k * C**0.5)
    w[:, :, k - 1, k - 1] += torch.eye(C) * 2
    x = torch.randn(B, C, H, W, generator=g)
    return x.to(dtype), w.to(dtype), torch.randn(C, generator=g).to(dtype)


def check(x, w, b):
    y_ref = reference.forward(x.double(), w.double(), b.double())
    errs = {
        "forward(cpu)": (ck.cinc_conv2d(x, w, b, backend="cpu").double() - y_ref).norm() / y_ref.norm(),
        "forward(auto)": (ck.cinc_conv2d(x, w, b).double() - y_ref).norm() / y_ref.norm(),
        "inverse(cpu)": (ck.cinc_conv2d_inverse(y_ref.to(x.dtype), w, b, backend="cpu").double() - x.double()).norm()
        / x.double().norm(),
    }
    for name, e in errs.items():
        if not e < 1e-4:
            raise SystemExit(f"correctness check failed before timing: {name} relative error {e:.2e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, nargs="+", default=[12, 48])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--schedules", action="store_true", help="also compare the per-pixel and GEMM schedules")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype, k, B = torch.float32, args.kernel_size, args.batch
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cpu_name()}, {args.threads} threads"
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    rows, table = [], []
    for C in args.channels:
        for S in args.sizes:
            x, w, b = make_problem(B, C, S, S, k, dtype)
            check(x, w, b)
            wm = reference.masked_weight(w)
            providers = {
                "aten_conv2d": lambda: F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), wm, b),
                "forward_auto": lambda: ck.cinc_conv2d(x, w, b),
                "forward_cpu": lambda: ck.cinc_conv2d(x, w, b, backend="cpu"),
                "inverse_cpu": lambda: ck.cinc_conv2d_inverse(x, w, b, backend="cpu"),
                "inverse_transpose_cpu": lambda: ck.cinc_conv2d_inverse_transpose(x, w, backend="cpu"),
            }
            res = time_interleaved(providers, args.rounds)
            base = res["aten_conv2d"][0]
            for name, (med, p20, p80) in res.items():
                rows.append(dict(op=name, provider=name.split("_")[-1], shape=f"{B}x{C}x{S}x{S}", k=k,
                                 dtype="float32", median_ms=f"{med:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                                 ratio_to_aten=f"{med / base:.3f}", device=machine, versions=versions, date=stamp))
            inv_ratio = res["inverse_cpu"][0] / base
            target = INVERSE_TARGET.get(C)
            table.append((C, S, base, res["forward_auto"][0], res["forward_cpu"][0], res["inverse_cpu"][0],
                          res["inverse_transpose_cpu"][0], inv_ratio, target))

    lines = [
        f"CPU ops vs ATen conv2d forward — B={B}, k={k}, float32; {machine}; {versions}; {stamp}",
        "",
        "| C | H=W | ATen conv2d ms | forward auto ms | forward cpu ms | inverse ms | inverse_transpose ms |"
        " inverse / ATen | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for C, S, base, fa, fc, inv, invt, ratio, target in table:
        met = "—" if target is None else ("yes" if ratio <= target else "no")
        lines.append(f"| {C} | {S} | {base:.3f} | {fa:.3f} | {fc:.3f} | {inv:.3f} | {invt:.3f} | {ratio:.2f}× |"
                     f" {'—' if target is None else f'≤ {target:.0f}×'} | {met} |")

    if args.schedules:
        lines += ["", f"Schedules of the CPU inverse (B={B}, 16×16, k={k}): per-pixel tap loop vs gathered GEMM, ms", "",
                  "| C | per-pixel | GEMM | faster |", "|---|---|---|---|"]
        for C in [1, 2, 4, 6, 8, 12, 16]:
            x, w, b = make_problem(B, C, 16, 16, k, dtype)
            def run(threshold):
                os.environ["CINC_CPU_GEMM_MIN_CHANNELS"] = threshold
                return ck.cinc_conv2d_inverse(x, w, b, backend="cpu")
            res = time_interleaved({"direct": lambda: run("1000000"), "gemm": lambda: run("1")}, args.rounds)
            os.environ.pop("CINC_CPU_GEMM_MIN_CHANNELS")
            d, g_ = res["direct"][0], res["gemm"][0]
            lines.append(f"| {C} | {d:.3f} | {g_:.3f} | {'per-pixel' if d < g_ else 'GEMM'} |")
            for name, (med, p20, p80) in res.items():
                rows.append(dict(op="inverse_schedule", provider=name, shape=f"{B}x{C}x16x16", k=k, dtype="float32",
                                 median_ms=f"{med:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}", ratio_to_aten="",
                                 device=machine, versions=versions, date=stamp))

    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        write_results(args.out, "cpu_ops", rows, report)

if __name__ == "__main__":
    main()
