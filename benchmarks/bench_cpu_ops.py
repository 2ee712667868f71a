"""The CPU kernels against ATen's own convolution, side by side in one process (docs/spec.md §1–§2).

    python benchmarks/bench_cpu_ops.py                 # everything below, ~2 min on a quiet 2-core CPU
    python benchmarks/bench_cpu_ops.py --quick         # a smoke run (nothing written unless --out is given)
    python benchmarks/bench_cpu_ops.py --no-write      # print only

Four parts, each checked for correctness (float64 reference) before it is timed:

1. **ops**: inverse and adjoint (``backend="cpu"``) and our C++ forward against ATen's ``conv2d`` forward on the
   masked weight (oneDNN, what ``backend="auto"`` runs), at the shapes of the targets below; float32, k = 3.
   Target: inverse and adjoint ≤ 2.0× ATen's forward (stretch 1.5×).
2. **schedules**: the per-pixel schedule (``CINC_CPU_SCHEDULE=direct``) against the tiled one, by channel count.
3. **training step**: ``CInCConv2d`` forward + log-determinant + backward against ``nn.Conv2d(C, C, 3, padding=1)``
   forward + backward, input requiring grad as in a flow, on 1 and 2 threads. Target ≤ 1.15×.
4. **flow**: ``CInCFlow`` (3 levels × 8 steps × 128 hidden, affine coupling, 3×32×32, B = 16) sampling time over
   density time, per convolution.

Providers are timed in interleaved rounds (one call of each per round; :func:`cinc_kernels.harness.measure_interleaved`)
so the machine's noise hits all of them alike; medians with 20th/80th percentiles. Rows are appended to
``<out>/cpu_ops.csv`` (the harness's schema) and the report replaces ``<out>/cpu_ops.md``; ``--out`` defaults to the
committed ``benchmarks/results``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # a checkout runs it without installing
import cinc_kernels as ck  # noqa: E402
from cinc_kernels import harness  # noqa: E402
from cinc_kernels.flow import CInCFlow  # noqa: E402
from cinc_kernels.reference import masked_weight as masked  # noqa: E402
from cinc_kernels.testing import make_image, make_weight  # noqa: E402
from cinc_kernels.testing import rel_error as rel  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OP_SHAPES = [(16, 12, 16, 16), (16, 12, 32, 32), (16, 48, 16, 16), (16, 48, 32, 32), (64, 12, 16, 16),
             (16, 4, 32, 32), (16, 24, 32, 32), (16, 96, 16, 16), (16, 12, 64, 64)]
STEP_SHAPES = [(16, 12, 32, 32), (16, 48, 16, 16), (16, 48, 32, 32)]
SCHEDULE_CHANNELS = [1, 2, 4, 8, 12, 16, 48]
FLOW_CONVS = ["cinc", "emerging", "autoregressive"]
INVERSE_TARGET, INVERSE_STRETCH, STEP_TARGET = 2.0, 1.5, 1.15


def problem(B, C, H, W, k=3, seed=0):
    """A well-conditioned float32 weight (:func:`cinc_kernels.testing.make_weight`), bias and image."""
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, torch.float32, generator=g)
    x = make_image(B, C, H, W, torch.float32, generator=g)
    b = torch.randn(C, generator=g)
    return x, w, b


def check_ops(x, w, b) -> None:
    """Every timed provider against float64 (forward: ATen on the masked weight; inverse: x itself)."""
    k = w.shape[-1]
    y64 = F.conv2d(F.pad(x.double(), (k - 1, 0, k - 1, 0)), masked(w).double(), b.double())
    y = y64.float()
    g = torch.randn_like(x)
    u = ck.cinc_conv2d_inverse_transpose(g, w, backend="cpu")
    # Mᵀu = g: the adjoint of the forward is the bottom-right padded correlation with the flipped, transposed taps.
    mt_u = F.conv2d(F.pad(u.double(), (0, k - 1, 0, k - 1)), masked(w).double().transpose(0, 1).flip(2, 3))
    errors = {
        "forward(cpu)": rel(ck.cinc_conv2d(x, w, b, backend="cpu"), y64),
        "forward(auto)": rel(ck.cinc_conv2d(x, w, b), y64),
        "inverse(cpu)": rel(ck.cinc_conv2d_inverse(y, w, b, backend="cpu"), x),
        "inverse_transpose(cpu)": rel(mt_u, g),
    }
    for name, e in errors.items():
        if not e < 1e-4:
            raise SystemExit(f"correctness check failed before timing: {name} relative error {e:.2e}")


def ops_part(shapes, rounds, rows, lines):
    machine = harness.machine("cpu")
    lines += [f"## Ops against ATen's conv2d forward ({machine['threads']} threads, float32, k = 3)", "",
              f"Target: inverse and adjoint ≤ {INVERSE_TARGET}× ATen's forward (stretch {INVERSE_STRETCH}×). "
              "Medians in ms; ratios to ATen in parentheses.", "",
              "| B×C×H×W | ATen conv2d | forward auto | forward cpu | inverse | adjoint | target met |",
              "|---|---:|---:|---:|---:|---:|---|"]
    verdicts = []
    for shape in shapes:
        x, w, b = problem(*shape)
        check_ops(x, w, b)
        wm, k = masked(w), w.shape[-1]
        fns = {
            ("forward", "aten"): lambda: F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), wm, b),
            ("forward", "auto"): lambda: ck.cinc_conv2d(x, w, b),
            ("forward", "cpu"): lambda: ck.cinc_conv2d(x, w, b, backend="cpu"),
            ("inverse", "cpu"): lambda: ck.cinc_conv2d_inverse(x, w, b, backend="cpu"),
            ("inverse_transpose", "cpu"): lambda: ck.cinc_conv2d_inverse_transpose(x, w, backend="cpu"),
        }
        with torch.no_grad():
            times = harness.measure_interleaved(fns, rounds=rounds)
        machine = harness.machine("cpu")
        med = {key: harness.quantiles(t)[0] for key, t in times.items()}
        base = med[("forward", "aten")]
        for (op, provider), t in times.items():
            rows.append(harness.record("cpu_ops", t, machine, shape=shape, suite="ops", op=op, provider=provider,
                                       mode="no_grad", k=k, dtype="float32", ratio=med[(op, provider)] / base))
        worst = max(med[("inverse", "cpu")], med[("inverse_transpose", "cpu")]) / base
        verdict = ("yes, stretch too" if worst <= INVERSE_STRETCH else "yes" if worst <= INVERSE_TARGET
                   else f"no ({worst:.2f}×)")
        verdicts.append(worst <= INVERSE_TARGET)
        cell = lambda key: f"{med[key]:.3f} ({med[key] / base:.2f}×)"  # noqa: E731
        lines.append(f"| {'×'.join(map(str, shape))} | {base:.3f} | {cell(('forward', 'auto'))} | "
                     f"{cell(('forward', 'cpu'))} | {cell(('inverse', 'cpu'))} | "
                     f"{cell(('inverse_transpose', 'cpu'))} | {verdict} |")
        print(lines[-1], flush=True)
    lines += ["", f"Inverse/adjoint target met at {sum(verdicts)} of {len(verdicts)} shapes "
                  f"(load average {harness.load_average()} at the end of this part).", ""]


def schedules_part(rounds, rows, lines):
    lines += ["## Schedules of the CPU inverse (B = 16, 16×16, k = 3), ms", "",
              "| C | per-pixel (`direct`) | tiled | tiled speed-up |", "|---|---:|---:|---:|"]
    previous = os.environ.get("CINC_CPU_SCHEDULE")
    try:
        for C in SCHEDULE_CHANNELS:
            x, w, b = problem(16, C, 16, 16)

            def run(schedule, x=x, w=w, b=b):
                os.environ["CINC_CPU_SCHEDULE"] = schedule
                return ck.cinc_conv2d_inverse(x, w, b, backend="cpu")

            if not torch.allclose(run("direct"), run("tiled"), rtol=1e-4, atol=1e-5):
                raise SystemExit(f"correctness check failed before timing: schedules disagree at C = {C}")
            with torch.no_grad():
                times = harness.measure_interleaved({"direct": lambda: run("direct"), "tiled": lambda: run("tiled")},
                                                    rounds=rounds)
            machine = harness.machine("cpu")
            med = {key: harness.quantiles(t)[0] for key, t in times.items()}
            for name, t in times.items():
                rows.append(harness.record("cpu_ops", t, machine, shape=(16, C, 16, 16), suite="schedules",
                                           op="inverse", provider=f"cpu:{name}", mode="no_grad", k=3,
                                           dtype="float32", ratio=med[name] / med["tiled"]))
            lines.append(f"| {C} | {med['direct']:.3f} | {med['tiled']:.3f} | {med['direct'] / med['tiled']:.2f}× |")
    finally:
        if previous is None:
            os.environ.pop("CINC_CPU_SCHEDULE", None)
        else:
            os.environ["CINC_CPU_SCHEDULE"] = previous
    lines.append("")


def step_part(shapes, thread_counts, rounds, rows, lines):
    lines += ["## Training step: `CInCConv2d` against `nn.Conv2d(C, C, 3, padding=1)`", "",
              f"Forward (+ log-determinant for CInC) + backward, input requiring grad; target ≤ {STEP_TARGET}×. "
              "Medians in ms.", "",
              "| threads | B×C×H×W | nn.Conv2d | CInCConv2d | ratio | target met |", "|---|---|---:|---:|---:|---|"]
    for n in thread_counts:
        with harness.num_threads(n):
            for shape in shapes:
                B, C, H, W = shape
                torch.manual_seed(0)
                conv, layer = torch.nn.Conv2d(C, C, 3, padding=1), ck.CInCConv2d(C)
                x = torch.randn(shape).requires_grad_()
                y, logdet = layer(x)
                want = F.conv2d(F.pad(x.detach().double(), (2, 0, 2, 0)), masked(layer.weight.detach()).double(),
                                layer.bias.detach().double())
                if rel(y, want) > 1e-5 or logdet.shape != (B,):
                    raise SystemExit(f"correctness check failed before timing: CInCConv2d at {shape}")

                def conv_step():
                    conv.zero_grad(set_to_none=True)
                    x.grad = None
                    conv(x).sum().backward()

                def cinc_step():
                    layer.zero_grad(set_to_none=True)
                    x.grad = None
                    out, ld = layer(x)
                    (out.sum() - ld.sum()).backward()

                times = harness.measure_interleaved({"conv2d": conv_step, "cinc": cinc_step}, rounds=rounds)
                machine = harness.machine("cpu")
                med = {key: harness.quantiles(t)[0] for key, t in times.items()}
                for name, t in times.items():
                    rows.append(harness.record("cpu_ops", t, machine, shape=shape, suite="training_step",
                                               op="fwd+bwd", layer="nn.Conv2d" if name == "conv2d" else "cinc",
                                               provider="aten" if name == "conv2d" else "auto", mode="fwd+bwd", k=3,
                                               dtype="float32", ratio=med[name] / med["conv2d"]))
                ratio = med["cinc"] / med["conv2d"]
                lines.append(f"| {n} | {'×'.join(map(str, shape))} | {med['conv2d']:.3f} | {med['cinc']:.3f} | "
                             f"{ratio:.2f}× | {'yes' if ratio <= STEP_TARGET else 'no'} |")
                print(lines[-1], flush=True)
    lines.append("")


def flow_part(convs, batch, size, levels, steps, hidden, rounds, rows, lines):
    lines += [f"## CInCFlow: sampling time / density time ({levels} levels × {steps} steps × {hidden} hidden, "
              f"affine coupling, 3×{size}×{size}, B = {batch}, no grad)", "",
              "| convolution | density ms | sampling ms | sampling / density |", "|---|---:|---:|---:|"]
    for conv in convs:
        torch.manual_seed(0)
        flow = CInCFlow(3, levels, steps, hidden, conv=conv, coupling="affine", image_size=size).eval()
        x = torch.rand(batch, 3, size, size)
        with torch.no_grad():
            z = flow.encode(x)
            if rel(flow.decode(z), x) > 1e-3:
                raise SystemExit(f"correctness check failed before timing: the {conv} flow does not invert")
            times = harness.measure_interleaved({"density": lambda: flow.log_prob(x),
                                                 "sampling": lambda: flow.sample(batch)},
                                                rounds=rounds, warmup=1)
        machine = harness.machine("cpu")
        med = {key: harness.quantiles(t)[0] for key, t in times.items()}
        for name, t in times.items():
            rows.append(harness.record("cpu_ops", t, machine, shape=(batch, 3, size, size), suite="flow",
                                       op=name, layer=conv, provider="auto", mode="no_grad", dtype="float32",
                                       ratio=med[name] / med["density"]))
        lines.append(f"| {conv} | {med['density']:.1f} | {med['sampling']:.1f} | "
                     f"{med['sampling'] / med['density']:.2f} |")
        print(lines[-1], flush=True)
    lines.append("")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="threads of the ops part, one table each (default 1 2; the schedules and flow parts use the "
                        "last)")
    p.add_argument("--step-threads", type=int, nargs="+", default=[1, 2], help="threads of the training-step part")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds per shape (default 30)")
    p.add_argument("--parts", nargs="+", default=["ops", "schedules", "step", "flow"],
                   choices=["ops", "schedules", "step", "flow"])
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds: checks that everything runs")
    p.add_argument("--out", default=None, help=f"folder for cpu_ops.csv/.md (default {RESULTS}; with --quick: none)")
    p.add_argument("--no-write", action="store_true", help="print the report only")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.threads + args.step_threads):
        p.error("--threads/--step-threads: must be >= 1")
    if args.rounds < 1:
        p.error("--rounds: must be >= 1")

    op_shapes, step_shapes, flow = OP_SHAPES, STEP_SHAPES, dict(batch=16, size=32, levels=3, steps=8, hidden=128)
    rounds = args.rounds
    if args.quick:
        op_shapes, step_shapes = [(2, 12, 5, 7), (3, 4, 6, 6)], [(2, 5, 6, 6)]
        flow, rounds = dict(batch=2, size=8, levels=2, steps=1, hidden=8), 3
    out = pathlib.Path(args.out) if args.out else (None if args.quick else RESULTS)

    rows, lines = [], []
    start = harness.machine("cpu")
    if "ops" in args.parts:
        for n in args.threads:
            with harness.num_threads(n):
                ops_part(op_shapes, rounds, rows, lines)
    torch.set_num_threads(args.threads[-1])
    if "schedules" in args.parts:
        schedules_part(rounds, rows, lines)
    if "step" in args.parts:
        step_part(step_shapes, args.step_threads, rounds, rows, lines)
    if "flow" in args.parts:
        flow_part(FLOW_CONVS, rounds=max(3, rounds // 10), rows=rows, lines=lines, **flow)
    command = "python benchmarks/bench_cpu_ops.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = "\n".join([
        "# CPU ops against ATen's convolution", "",
        f"{harness.describe_machine(start)} (at the start; each CSV row has its own load average).",
        f"Command: `{command.strip()}`. Timings on a machine shared with other jobs are noisy: the ratios come from "
        "providers interleaved call by call, so they hold up better than the absolute times. With more threads than "
        "idle cores, OpenMP's waits for descheduled threads cost milliseconds per call whatever the work, and "
        "multi-threaded medians measure the machine's load, not the kernels: read the 1-thread tables then.", "",
    ] + lines)
    print()
    print(report)
    if out is not None and not args.no_write:
        csv_path = harness.append_csv(out / "cpu_ops.csv", rows)
        md_path = harness.write_markdown(out / "cpu_ops.md", report)
        print(f"\nwrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
