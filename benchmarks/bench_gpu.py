"""The CUDA kernels against cuDNN, nn.Conv2d and a FInC-style inverse, side by side in one run.

    python benchmarks/bench_gpu.py --out DIR          # on a GPU: float32, k = 3, the issue's shapes (~2-4 min)
    python benchmarks/bench_gpu.py --dry-run          # on the CPU: tiny shapes, the CPU backend and Triton's
                                                      # interpreter stand in, to check the program runs

Measured (float32, k = 3, B = 64, C ∈ {12, 48, 96}, H = W ∈ {8, 16, 32, 64} unless said):
  inverse      cinc inverse (and inverse_transpose) vs cuDNN's forward F.conv2d on the already padded input
               (target ≤ 3×) and vs the FInC-style baseline of finc_baseline.py, replayed from a CUDA graph
               (target ≥ 50× faster); Triton's inverse too when that backend is installed;
  batch1       B = 1, 64×64, C = 48: time and ratio to the B = 64 time per image; threads-per-block sweep;
  forward      cinc forward vs cuDNN on the padded input (target ≤ 1.1×), and the `_aten` path (pad + mask +
               cuDNN each call, what backend="auto" uses); float16/bfloat16 at C = 48;
  fwd+bwd      forward + backward (x, weight, bias) of the cinc op vs nn.Conv2d(C, C, 3, padding=1) (target ≤ 1.3×);
  error        ‖inverse(forward(x)) − x‖/‖x‖ with well-conditioned weights (target ≤ 1e-5).
Timing: triton.testing.do_bench (CUDA events; median, 20th and 80th percentiles), correctness checked first.
Writes DIR/gpu_bench.csv (long format: one row per op/provider/shape), DIR/gpu_bench.md and DIR/summary.txt.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    # Triton's interpreter must be chosen before triton is imported (it runs the FInC baseline on the CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import cinc_kernels as ck  # noqa: E402
from cinc_kernels import harness, reference  # noqa: E402

try:
    import finc_baseline  # noqa: E402
except Exception as exc:  # pragma: no cover
    finc_baseline = None
    print(f"FInC baseline unavailable: {exc}")

TARGETS = {"inverse_vs_cudnn": 3.0, "finc_speedup": 50.0, "forward_vs_cudnn": 1.1, "fwdbwd_vs_conv2d": 1.3,
           "roundtrip_error": 1e-5}
# Above this many launches per call the FInC baseline's capture and timing would not fit the run's time budget.
FINC_MAX_LAUNCHES = 13000


def quantile_times(fn, device, grad_to_none=None):
    """(median, p20, p80) in ms of ``fn()`` by the harness's timer (CUDA events on a GPU); the ``.grad`` of the
    tensors in ``grad_to_none`` is cleared before every call so backward does not accumulate."""
    def call():
        for t in grad_to_none or ():
            t.grad = None
        fn()

    if device.type == "cuda":
        times = harness.measure(call, device, warmup=10, min_reps=20, max_reps=200, min_time=0.06)
    else:
        times = harness.measure(call, device, warmup=1, min_reps=3, max_reps=3, min_time=0.0)
    return harness.quantiles(times)


def make_weight(C, k, generator):
    """A well-conditioned ``(C, C, k, k)`` float64 weight: centre diagonal ±(1.5…2.5), other entries
    ``0.3 / (k·√C)``-scaled normals."""
    w = torch.randn(C, C, k, k, generator=generator, dtype=torch.float64) * 0.3 / (k * C**0.5)
    sign = torch.randint(0, 2, (C,), generator=generator).double() * 2 - 1
    w[:, :, k - 1, k - 1] += torch.diag(sign * (1.5 + torch.rand(C, generator=generator, dtype=torch.float64)))
    return w


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


class Recorder:
    def __init__(self, device_name, versions, stamp):
        self.rows, self.meta = [], dict(device=device_name, versions=versions, date=stamp)

    def add(self, op, provider, shape, times=None, dtype="float32", **extra):
        row = dict(op=op, provider=provider, B=shape[0], C=shape[1], H=shape[2], W=shape[3], k=3, dtype=dtype)
        if times is not None:
            row.update(median_ms=f"{times[0]:.5f}", p20_ms=f"{times[1]:.5f}", p80_ms=f"{times[2]:.5f}")
        row.update({key: (f"{v:.4g}" if isinstance(v, float) else v) for key, v in extra.items()})
        row.update(self.meta)
        self.rows.append(row)
        return times


def problem(B, C, H, W, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, 3, generator=g)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for the CSV/Markdown (default: benchmarks/results)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the program, times nothing")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, nargs="+", default=[12, 48, 96])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--skip", nargs="*", default=[], choices=["inverse", "batch1", "forward", "fwdbwd", "finc"])
    args = p.parse_args(argv)

    if args.dry_run:
        device, impl = torch.device("cpu"), "cpu"
        args.batch, args.channels, args.sizes = 2, [3], [5]
        out = args.out or tempfile.mkdtemp(prefix="bench_gpu_dry_")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU is visible; use --dry-run to check the program on the CPU")
        why = ck.backends.get_backend("cuda").unavailable()
        if why:
            raise SystemExit(f"the cuda backend is unavailable: {why}")
        device, impl = torch.device("cuda"), "cuda"
        torch.backends.cudnn.benchmark = True
        # TF32 would make cuDNN faster and less exact than the float32 kernels it is compared with.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        out = args.out or os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)

    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.machine()}, dry run)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}, "
                f"python {platform.python_version()}, cinc build {json.dumps(ck.build_info())}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rec = Recorder(device_name, versions, stamp)
    has_triton_backend = "triton" in ck.available_backends() and device.type == "cuda"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B, k = args.batch, 3
    table = []  # one line per (C, S) for the Markdown table
    per_image_b64 = None

    for C in args.channels:
        for S in args.sizes:
            shape = (B, C, S, S)
            x, w, b = problem(B, C, S, S, device)
            wm = reference.masked_weight(w)
            xp = F.pad(x, (k - 1, 0, k - 1, 0))
            y = ck.cinc_conv2d(x, w, b, backend=impl)
            line = dict(C=C, S=S)

            # correctness first (also the round-trip error target)
            x_back = ck.cinc_conv2d_inverse(y, w, b, backend=impl)
            err = rel_err(x_back, x)
            y_cudnn = F.conv2d(xp, wm, b)
            fwd_err = rel_err(y, y_cudnn)
            # A wrong kernel is reported (and its rows flagged in the CSV), not fatal: the other timings still count.
            if fwd_err > 1e-4:
                print(f"WRONG: cinc forward disagrees with cuDNN at {shape}: relative error {fwd_err:.2e}")
            rec.add("forward_error", impl, shape, error=fwd_err)
            rec.add("roundtrip_error", impl, shape, error=err, target=TARGETS["roundtrip_error"])
            line["error"] = err

            cudnn = rec.add("conv2d_padded", "cudnn", shape, quantile_times(lambda: F.conv2d(xp, wm, b), device))
            line["cudnn"] = cudnn[0]
            if "inverse" not in args.skip:
                inv = rec.add("inverse", impl, shape, quantile_times(lambda: ck.cinc_conv2d_inverse(y, w, b, backend=impl), device),
                              ratio_to_cudnn=0.0)
                rec.rows[-1]["ratio_to_cudnn"] = f"{inv[0] / cudnn[0]:.4g}"
                line["inverse"] = inv[0]
                invt = rec.add("inverse_transpose", impl, shape,
                               quantile_times(lambda: ck.cinc_conv2d_inverse_transpose(y, w, backend=impl), device))
                line["inverse_transpose"] = invt[0]
                if has_triton_backend:
                    tri = rec.add("inverse", "triton", shape,
                                  quantile_times(lambda: ck.cinc_conv2d_inverse(y, w, b, backend="triton"), device))
                    line["triton"] = tri[0]
                launches = (2 * S - 1) * C
                if "finc" not in args.skip and finc_baseline is not None and launches <= FINC_MAX_LAUNCHES:
                    if device.type == "cuda":
                        run = finc_baseline.finc_inverse_graph(y, w, b)
                    else:
                        run = lambda: finc_baseline.finc_inverse(y, w, b)  # noqa: E731
                    finc_err = rel_err(run(), x)
                    if finc_err > 1e-3:
                        print(f"WRONG: FInC baseline at {shape}: relative error {finc_err:.2e}")
                    finc = rec.add("inverse", "finc_baseline", shape, quantile_times(run, device), launches=launches,
                                   error=finc_err)
                    line["finc"] = finc[0]
                    del run
                if C == 48 and S == 64:
                    per_image_b64 = inv[0] / B

            if "forward" not in args.skip:
                fwd = rec.add("forward", impl, shape, quantile_times(lambda: ck.cinc_conv2d(x, w, b, backend=impl), device))
                aten = rec.add("forward", "_aten", shape, quantile_times(lambda: ck.cinc_conv2d(x, w, b, backend="_aten"), device))
                line["forward"], line["forward_aten"] = fwd[0], aten[0]

            if "fwdbwd" not in args.skip:
                xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
                grad = torch.randn_like(x)
                conv = torch.nn.Conv2d(C, C, 3, padding=1).to(device)

                def cinc_step(backend):
                    ck.cinc_conv2d(xg, wg, bg, backend=backend).backward(grad)

                def conv_step():
                    conv(xg).backward(grad)

                fb = rec.add("fwd+bwd", impl, shape, quantile_times(lambda: cinc_step(impl), device, [xg, wg, bg]))
                fb_aten = rec.add("fwd+bwd", "_aten", shape,
                                  quantile_times(lambda: cinc_step("_aten"), device, [xg, wg, bg]))
                ref = rec.add("fwd+bwd", "nn.Conv2d", shape,
                              quantile_times(conv_step, device, [xg, conv.weight, conv.bias]))
                line["fwdbwd"], line["fwdbwd_aten"], line["fwdbwd_conv2d"] = fb[0], fb_aten[0], ref[0]
            sync()
            table.append(line)
            print(" ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in line.items()),
                  flush=True)

    # half precision forward at C = 48 (C = channels[-1] in a dry run), two sizes
    half_lines = []
    if "forward" not in args.skip and device.type == "cuda":
        for dtype in (torch.float16, torch.bfloat16):
            for S in (32, 64):
                shape = (B, 48, S, S)
                x, w, b = problem(B, 48, S, S, device, dtype)
                wm = reference.masked_weight(w)
                xp = F.pad(x, (2, 0, 2, 0))
                got = ck.cinc_conv2d(x, w, b, backend=impl)
                err = rel_err(got, reference.forward(x.double(), w.double(), b.double()))
                dt = str(dtype).replace("torch.", "")
                mine = rec.add("forward", impl, shape, quantile_times(lambda: ck.cinc_conv2d(x, w, b, backend=impl), device),
                               dtype=dt, error=err)
                cud = rec.add("conv2d_padded", "cudnn", shape, quantile_times(lambda: F.conv2d(xp, wm, b), device), dtype=dt)
                half_lines.append((dt, S, mine[0], cud[0], err))

    # batch = 1: the sampling case
    b1_lines = []
    if "batch1" not in args.skip:
        C1, S1 = (48, 64) if not args.dry_run else (args.channels[0], args.sizes[0])
        x, w, b = problem(1, C1, S1, S1, device)
        y = ck.cinc_conv2d(x, w, b, backend=impl)
        b1 = rec.add("inverse_batch1", impl, (1, C1, S1, S1),
                     quantile_times(lambda: ck.cinc_conv2d_inverse(y, w, b, backend=impl), device))
        b64 = per_image_b64 * B if per_image_b64 else float("nan")
        b1_lines.append(("default", b1[0], b64))
        if device.type == "cuda":
            xb, wb, bb = problem(B, C1, S1, S1, device)
            yb = ck.cinc_conv2d(xb, wb, bb, backend=impl)
            for threads in (64, 128, 256, 512):
                os.environ["CINC_CUDA_WAVEFRONT_THREADS"] = str(threads)
                t1 = rec.add("inverse_batch1", f"{impl}_threads{threads}", (1, C1, S1, S1),
                             quantile_times(lambda: ck.cinc_conv2d_inverse(y, w, b, backend=impl), device))
                tb = rec.add("inverse", f"{impl}_threads{threads}", (B, C1, S1, S1),
                             quantile_times(lambda: ck.cinc_conv2d_inverse(yb, wb, bb, backend=impl), device))
                b1_lines.append((f"{threads} threads", t1[0], tb[0]))
            os.environ.pop("CINC_CUDA_WAVEFRONT_THREADS", None)

    write_outputs(out, rec, table, half_lines, b1_lines, B, device_name, versions, stamp, args.dry_run)


def _fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def _verdict(value, target, smaller_is_better=True):
    if value is None:
        return "—"
    return "met" if (value <= target if smaller_is_better else value >= target) else "missed"


def write_outputs(out, rec, table, half_lines, b1_lines, B, device_name, versions, stamp, dry_run):
    csv_path = os.path.join(out, "gpu_bench.csv")
    fields = []
    for row in rec.rows:
        fields += [f for f in row if f not in fields]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rec.rows)

    md = [f"# CUDA kernels vs cuDNN / nn.Conv2d / FInC-style baseline{' (DRY RUN: CPU, no GPU timing)' if dry_run else ''}",
          "", f"{device_name}; {stamp}", "", f"{versions}", "",
          f"float32, k = 3, B = {B}; times are medians in ms (CSV has p20/p80). Targets: inverse ≤ 3× cuDNN forward, "
          "≥ 50× faster than FInC-style; forward ≤ 1.1× cuDNN; forward+backward ≤ 1.3× nn.Conv2d; "
          "round-trip error ≤ 1e-5.", "",
          "| C | H=W | cuDNN fwd | inverse | inv/cuDNN | inverse_T | FInC-style | FInC/inverse | triton inv |"
          " forward | fwd/cuDNN | _aten fwd | fwd+bwd | _aten fwd+bwd | nn.Conv2d fwd+bwd | fb/Conv2d | error |",
          "|" + "---|" * 17]
    summary = {"inverse_vs_cudnn": [], "finc_speedup": [], "forward_vs_cudnn": [], "fwdbwd_vs_conv2d": [],
               "roundtrip_error": []}
    for line in table:
        g = line.get
        inv_ratio = g("inverse") / g("cudnn") if g("inverse") else None
        finc_speedup = g("finc") / g("inverse") if g("finc") and g("inverse") else None
        fwd_ratio = g("forward") / g("cudnn") if g("forward") else None
        best_fb = min(v for v in (g("fwdbwd"), g("fwdbwd_aten")) if v is not None) if g("fwdbwd") else None
        fb_ratio = best_fb / g("fwdbwd_conv2d") if best_fb else None
        for key, v in (("inverse_vs_cudnn", inv_ratio), ("finc_speedup", finc_speedup), ("forward_vs_cudnn", fwd_ratio),
                       ("fwdbwd_vs_conv2d", fb_ratio), ("roundtrip_error", g("error"))):
            if v is not None:
                summary[key].append((line["C"], line["S"], v))
        md.append(f"| {line['C']} | {line['S']} | {_fmt(g('cudnn'))} | {_fmt(g('inverse'))} | {_fmt(inv_ratio, '.2f')}× |"
                  f" {_fmt(g('inverse_transpose'))} | {_fmt(g('finc'))} | {_fmt(finc_speedup, '.1f')}× |"
                  f" {_fmt(g('triton'))} | {_fmt(g('forward'))} | {_fmt(fwd_ratio, '.2f')}× | {_fmt(g('forward_aten'))} |"
                  f" {_fmt(g('fwdbwd'))} | {_fmt(g('fwdbwd_aten'))} | {_fmt(g('fwdbwd_conv2d'))} |"
                  f" {_fmt(fb_ratio, '.2f')}× | {_fmt(g('error'), '.1e')} |")
    if half_lines:
        md += ["", "Half precision forward (C = 48), ms:", "", "| dtype | H=W | cinc forward | cuDNN | ratio | error |",
               "|---|---|---|---|---|---|"]
        md += [f"| {dt} | {S} | {m:.3f} | {c:.3f} | {m / c:.2f}× | {e:.1e} |" for dt, S, m, c, e in half_lines]
    if b1_lines:
        md += ["", f"Batch 1 (sampling), 64×64, C = 48, inverse, ms: the default launch, then a threads-per-block sweep "
               "(CINC_CUDA_WAVEFRONT_THREADS)", "",
               f"| launch | B = 1 | B = {B} | B = 1 / (B = {B} per image) |", "|---|---|---|---|"]
        md += [f"| {name} | {t1:.3f} | {tb:.3f} | {t1 / (tb / B):.3g}× |" for name, t1, tb in b1_lines]

    lines = [f"bench_gpu summary — {device_name} — {stamp}"]
    spec = [("inverse_vs_cudnn", "inverse / cuDNN forward", "≤", True),
            ("finc_speedup", "FInC-style / inverse", "≥", False),
            ("forward_vs_cudnn", "forward / cuDNN", "≤", True),
            ("fwdbwd_vs_conv2d", "best fwd+bwd / nn.Conv2d", "≤", True),
            ("roundtrip_error", "inverse(forward(x)) rel. error", "≤", True)]
    for key, label, sign, smaller in spec:
        vals = summary[key]
        if not vals:
            continue
        met = sum(1 for _, _, v in vals if _verdict(v, TARGETS[key], smaller) == "met")
        worst = max(vals, key=lambda t: t[2]) if smaller else min(vals, key=lambda t: t[2])
        lines.append(f"  {label}: target {sign} {TARGETS[key]:g}: met at {met}/{len(vals)} shapes; "
                     f"worst {worst[2]:.3g} at C={worst[0]} {worst[1]}x{worst[1]}")
    # What backend="auto" should prefer on CUDA for the forward (cinc_kernels/backends.py AUTO_ORDER).
    pairs = [(g["forward"], g["forward_aten"]) for g in table if g.get("forward") and g.get("forward_aten")]
    if pairs:
        wins = sum(1 for mine, aten in pairs if mine < aten)
        lines.append(f"  forward, cuda kernel vs _aten (pad + mask + cuDNN, auto's current pick): cuda faster at "
                     f"{wins}/{len(pairs)} shapes -> AUTO_ORDER forward should start with "
                     f"{'cuda' if wins > len(pairs) / 2 else '_aten'}")
    if b1_lines:
        name, t1, tb = b1_lines[0]
        lines.append(f"  batch 1 inverse (64x64, C=48): {t1:.3f} ms, {t1 / (tb / B):.3g}x the B={B} time per image")
    md += ["", "```", *lines, "```"]
    with open(os.path.join(out, "gpu_bench.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(md))
    print(f"\nwrote {csv_path}, gpu_bench.md and summary.txt in {out}")


if __name__ == "__main__":
    main()
