"""Sampling and density time of CInC Flow for every invertible convolution, each with its own flow step.

    python benchmarks/bench_flow_sampling.py              # the committed table, a few minutes on a quiet 2-core CPU
    python benchmarks/bench_flow_sampling.py --quick      # a smoke run (nothing written unless --out is given)

The paper's second claim is speed of sampling: a CInC step inverts with one wavefront solve, Emerging's with two
triangular solves plus its 1×1, an autoregressive 3×3 with a raster-order solve. This program measures whether that
shows in a whole flow: ``levels × steps`` flows of ``width``-channel quad couplings on 3×32×32 images, untrained but
with data-initialised ActNorm and random weights of the layers' own initialisation, for batch 16 and 1 on 1 and 2
threads, and for two coupling widths (the couplings' convolutions dominate a sample on a CPU; a narrow coupling shows
the invertible convolutions' own share). For each setting every convolution is timed in interleaved rounds (one
sample and one density call of each per round, :func:`cinc_kernels.harness.measure_interleaved`); medians with
20th/80th percentiles. A separate, instrumented pass attributes each sample's time to the invertible layers'
inverses (the convolution and the step's 1×1), so the table shows why the ratios are what they are.

Every flow is first checked to reconstruct its input (``decode(encode(x))``) before it is timed. Rows go to
``<out>/flow_sampling.csv`` (the harness's schema), the report replaces ``<out>/flow_sampling.md`` and the plot
``<out>/flow_sampling.png``; ``--out`` defaults to the committed ``benchmarks/results``.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # a checkout runs it without installing
from cinc_kernels import harness  # noqa: E402
from cinc_kernels.flow import CInCFlow  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# Each convolution with the step its own flow uses (as in experiments/compare_convs.py).
CONVS = [("cinc", "reverse"), ("emerging", "none"), ("autoregressive", "reverse"), ("1x1", "none"),
         ("finc", "1x1")]


def build(conv: str, permutation: str, levels: int, steps: int, width: int, size: int) -> CInCFlow:
    torch.manual_seed(0)
    flow = CInCFlow(3, levels, steps, width, conv=conv, coupling="quad", image_size=size, permutation=permutation)
    with torch.no_grad():
        flow.train()(torch.rand(16, 3, size, size))  # ActNorm's data-dependent initialisation
    return flow.eval()


@contextlib.contextmanager
def inverse_timer(flow: CInCFlow, total: list):
    """Adds to ``total[0]`` the seconds spent in the steps' invertible linear layers' ``inverse``."""
    patched = []
    for level in flow.levels:
        for step in level.steps:
            for layer in (step.mix, step.conv):
                if layer is None:
                    continue
                original = layer.inverse

                def timed(*args, _original=original, **kwargs):
                    tic = time.perf_counter()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        total[0] += time.perf_counter() - tic

                layer.inverse = timed
                patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.inverse


def conv_share(flow: CInCFlow, batch: int, repeats: int) -> float:
    """Fraction of a sample's wall time spent inverting the convolutions (and the steps' 1×1s)."""
    total, shares = [0.0], []
    with torch.no_grad(), inverse_timer(flow, total):
        flow.sample(batch)
        for _ in range(repeats):
            total[0] = 0.0
            tic = time.perf_counter()
            flow.sample(batch)
            shares.append(total[0] / (time.perf_counter() - tic))
    shares.sort()
    return shares[len(shares) // 2]


def setting(args, width: int, batch: int, threads: int, rows: list, lines: list, summary: list) -> None:
    flows = {conv: build(conv, perm, args.levels, args.steps, width, args.size) for conv, perm in CONVS}
    x = torch.rand(batch, 3, args.size, args.size)
    with torch.no_grad():
        for conv, flow in flows.items():
            err = (flow.decode(flow.encode(x)) - x).abs().max().item()
            if not err < 1e-3:
                raise SystemExit(f"correctness check failed before timing: the {conv} flow reconstructs with "
                                 f"error {err:.2e}")
    fns = {}
    for conv, flow in flows.items():
        fns[f"{conv}:sample"] = lambda flow=flow: flow.sample(batch)
        fns[f"{conv}:density"] = lambda flow=flow: flow.log_prob(x)
    rounds = args.rounds if batch > 1 else 3 * args.rounds
    with harness.num_threads(threads), torch.no_grad():
        load_before = harness.load_average()
        times = harness.measure_interleaved(fns, rounds=rounds, warmup=1)
        shares = {conv: conv_share(flow, batch, max(3, rounds // 2)) for conv, flow in flows.items()}
        load_after = harness.load_average()
        machine = harness.machine("cpu")
    med = {name: harness.quantiles(t) for name, t in times.items()}
    cinc_sample = med["cinc:sample"][0]
    lines.append(f"### width {width}, batch {batch}, {threads} thread{'s' if threads > 1 else ''} "
                 f"({rounds} rounds; load {load_before} before, {load_after} after)")
    lines += ["", "| convolution (step) | sampling ms (p20–p80) | density ms | sampling / density | "
                  "sampling / CInC's | share of sampling in conv inverses |",
              "|---|---:|---:|---:|---:|---:|"]
    for conv, perm in CONVS:
        s, d = med[f"{conv}:sample"], med[f"{conv}:density"]
        for op in ("sample", "density"):
            rows.append(harness.record("flow_sampling", times[f"{conv}:{op}"], machine,
                                       shape=(batch, 3, args.size, args.size), suite=f"width{width}", op=op,
                                       layer=conv, provider=f"quad+{perm}", mode="no_grad", dtype="float32",
                                       ratio=med[f"{conv}:{op}"][0] / cinc_sample))
        lines.append(f"| {conv} ({perm}) | {s[0]:.1f} ({s[1]:.1f}–{s[2]:.1f}) | {d[0]:.1f} | {s[0] / d[0]:.2f} | "
                     f"{s[0] / cinc_sample:.2f} | {100 * shares[conv]:.0f} % |")
        summary.append(dict(width=width, batch=batch, threads=threads, conv=conv, sample=s[0],
                            relative=s[0] / cinc_sample, share=shares[conv]))
    lines.append("")
    print("\n".join(lines[-len(CONVS) - 4:]), flush=True)


def plot(summary: list, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(s["width"], s["batch"], s["threads"]) for s in summary})
    convs = [c for c, _ in CONVS]
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(settings)), 4.5))
    bar = 0.8 / len(convs)
    for i, conv in enumerate(convs):
        values = [next(s["relative"] for s in summary if (s["width"], s["batch"], s["threads"]) == st
                       and s["conv"] == conv) for st in settings]
        ax.bar([j + (i - (len(convs) - 1) / 2) * bar for j in range(len(settings))], values, width=bar, label=conv)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(settings)), [f"width {w}\nB={b}, {t} thr" for w, b, t in settings], fontsize=8)
    ax.set_ylabel("sampling time / CInC's (lower is faster)")
    ax.set_title("CInC Flow sampling time per convolution (3×32×32, quad coupling)")
    ax.legend(fontsize=8, ncol=len(convs))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 32], help="coupling widths (default 128 32)")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 1], help="batch sizes (default 16 1)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="flow steps per level (default 8)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds at batch > 1; 3× that at batch 1")
    p.add_argument("--quick", action="store_true", help="a tiny flow, 1 round: checks that everything runs")
    p.add_argument("--out", default=None, help=f"folder for flow_sampling.* (default {RESULTS}; --quick: none)")
    args = p.parse_args(argv)
    for name in ("widths", "batches", "threads"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name}: every value must be >= 1")
    for name in ("levels", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: must be >= 1")
    if args.size % (2 ** args.levels):
        p.error(f"--size: must be a multiple of 2**levels = {2 ** args.levels}")
    if args.quick:
        args.widths, args.batches, args.threads = [8], [2], [1]
        args.levels, args.steps, args.size, args.rounds = 2, 1, 8, 1
    out = pathlib.Path(args.out) if args.out else (None if args.quick else RESULTS)

    start = harness.machine("cpu")
    rows, lines, summary = [], [], []
    for width in args.widths:
        for batch in args.batches:
            for threads in args.threads:
                setting(args, width, batch, threads, rows, lines, summary)
    command = "python benchmarks/bench_flow_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = "\n".join([
        "# CInC Flow: sampling and density time per convolution", "",
        f"{harness.describe_machine(start)} (at the start; each section has its load before and after).",
        f"Command: `{command.strip()}`. Flows: {args.levels} levels × {args.steps} steps, quad coupling, "
        f"3×{args.size}×{args.size}, float32, no grad; each convolution with its own step (in brackets: the "
        "permutation beside it). Medians over interleaved rounds; the last column is the median share of a sample's "
        "wall time spent in the invertible layers' inverses (an instrumented pass).", "",
    ] + lines)
    print(report)
    if out is not None:
        csv_path = harness.append_csv(out / "flow_sampling.csv", rows)
        md_path = harness.write_markdown(out / "flow_sampling.md", report)
        plot(summary, out / "flow_sampling.png")
        print(f"\nwrote {csv_path}, {md_path} and {out / 'flow_sampling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
