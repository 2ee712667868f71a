"""The CUDA kernels against cuDNN on a GPU, in parts that tools/gpu_check.sh runs as separate stages.

    python benchmarks/bench_gpu.py PART --out DIR       # on a GPU; the defaults are the first GPU run's shapes
    python benchmarks/bench_gpu.py PART --dry-run       # on the CPU, tiny shapes: checks the program, times nothing
                                                        # worth reading (the cpu backend stands in for cuda)

Parts (float32, k = 3 unless said; cuDNN is ``F.conv2d`` on the top-left padded input with the masked weight):
  correctness  forward, inverse, adjoint and log-determinant of the cuda backend against the float64 reference:
               (16, {12, 48}, 32, 32) float32, (4, 12, 17, 23) float64, (2, 96, 64, 64) float32. Exit status 1
               when any is outside its tolerance.
  ops          inverse, adjoint and forward of the cuda backend and ATen's forward on the masked weight (``_aten``),
               beside cuDNN, with TF32 off and on, and which forward ``backend="auto"`` picks: B = 16,
               C ∈ {12, 48}, 32×32. ``--kernel-sizes 1`` gives the same at k = 1 (the barrier and latency floor of
               the wavefront without the tap cost).
  sweep        the inverse at C = 48, 32×32 for B ∈ {1, 16, 132, 264}: the default launch, then each thread count
               (CINC_CUDA_WAVEFRONT_THREADS) and each number of blocks per image (CINC_CUDA_WAVEFRONT_BLOCKS),
               beside cuDNN at that B; every setting's result is compared with the default launch's.
  finc         the FInC-algorithm baseline (finc_baseline.py: (H + W - 1)·⌈C/4⌉ launches replayed from a CUDA
               graph) against our inverse of the same layer (FInC's block-diagonal weight, unit diagonal), and our
               inverse of the full CInC layer: B = 16, C = 12, 32×32.
  half         the forward in float16/bfloat16 against cuDNN (which backend="auto" runs for them): B = 16, C = 48.
  fwdbwd       forward + backward (x, weight, bias) of the cinc op against nn.Conv2d(C, C, 3, padding=1).
  profile      one inverse and one adjoint at (16, 48, 32, 32) and nothing else, for a profiler (ncu) to catch.

The Triton backend has its own benchmark, benchmarks/bench_triton.py (beside the CUDA backend and cuDNN).
Timing: cinc_kernels.harness (CUDA events; median and 20th/80th percentiles), correctness checked first. Each part
appends long-format rows (harness.COLUMNS; ``mode`` holds the TF32 state or the swept setting) to DIR/gpu_bench.csv
and writes DIR/<part>.md and DIR/summary.txt.
"""
from __future__ import annotations

import argparse
import contextlib
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

# The wavefront's launch overrides, read by csrc/cuda at every call: threads per block, blocks per image.
THREADS_ENV = "CINC_CUDA_WAVEFRONT_THREADS"
BLOCKS_PER_IMAGE_ENV = "CINC_CUDA_WAVEFRONT_BLOCKS"
PARTS = ("correctness", "ops", "sweep", "finc", "half", "fwdbwd", "profile")
# Relative errors (norm of the difference over the norm of the reference) the correctness part accepts.
TOLERANCE = {"forward": {torch.float32: 1e-5, torch.float64: 1e-10},
             "solve": {torch.float32: 1e-4, torch.float64: 1e-9}}


def make_weight(C, k, generator):
    """A well-conditioned ``(C, C, k, k)`` float64 weight: centre diagonal ±(1.5…2.5), other entries
    ``0.3 / (k·√C)``-scaled normals."""
    w = torch.randn(C, C, k, k, generator=generator, dtype=torch.float64) * 0.3 / (k * C**0.5)
    sign = torch.randint(0, 2, (C,), generator=generator).double() * 2 - 1
    w[:, :, k - 1, k - 1] += torch.diag(sign * (1.5 + torch.rand(C, generator=generator, dtype=torch.float64)))
    return w


def problem(B, C, H, W, k, device, dtype=torch.float32, seed=0):
    """``(x, weight, bias)`` in ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, g)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def adjoint_apply(u, w):
    """``Mᵀ u`` in float64: the vector-Jacobian product of the reference forward."""
    zeros = torch.zeros(u.shape, dtype=torch.float64, device=u.device, requires_grad=True)
    (mt_u,) = torch.autograd.grad(reference.forward(zeros, w.double()), zeros, u.double())
    return mt_u


def set_tf32(on: bool) -> None:
    """Lets cuDNN convolutions and matrix products use TF32 or not (torch's per-operation precision settings)."""
    precision = "tf32" if on else "ieee"
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cuda.matmul.fp32_precision = precision


def _set_environment(values):
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(value)


@contextlib.contextmanager
def environment(values):
    """``os.environ[name] = value`` for each item during the block (``None``: unset), restored afterwards."""
    before = {name: os.environ.get(name) for name in values}
    _set_environment(values)
    try:
        yield
    finally:
        _set_environment(before)


class Run:
    """What every part needs: where it runs, its rows and its summary."""

    def __init__(self, part, args):
        self.part, self.args, self.dry_run = part, args, args.dry_run
        if self.dry_run:
            self.device, self.impl = torch.device("cpu"), "cpu"
        else:
            if not torch.cuda.is_available():
                raise SystemExit("error: no CUDA GPU is visible; use --dry-run to check the program on the CPU")
            why = ck.backends.get_backend("cuda").unavailable()
            if why:
                raise SystemExit(f"error: the cuda backend is unavailable: {why}")
            self.device, self.impl = torch.device("cuda"), "cuda"
            torch.backends.cudnn.benchmark = True
            set_tf32(False)
        self.machine = harness.machine(self.device)
        self.rows, self.lines, self.failed = [], [], False

    def time(self, fn, grads=()):
        """Milliseconds per call of ``fn()``; the ``.grad`` of ``grads`` is cleared before every call."""
        def call():
            for t in grads:
                t.grad = None
            fn()

        if self.device.type == "cuda":
            return harness.measure(call, self.device, warmup=5, min_reps=20, max_reps=200, min_time=0.05)
        return harness.measure(call, self.device, warmup=0, min_reps=1, max_reps=1, min_time=0.0)  # a dry run

    def add(self, times, *, shape, k=3, dtype="float32", baseline=None, **fields):
        """Records a row (``ratio``: the median over ``baseline`` ms, when given); returns the median."""
        median = harness.quantiles(times)[0] if times else None
        ratio = median / baseline if median is not None and baseline else None
        self.rows.append(harness.record("bench_gpu", times, self.machine, shape=shape, ratio=ratio, k=k, dtype=dtype,
                                        suite=self.part, **fields))
        return median

    def say(self, line):
        print(line, flush=True)
        self.lines.append(line)

    def finish(self, out):
        csv_path = harness.append_csv(os.path.join(out, "gpu_bench.csv"), self.rows)
        header = [f"bench_gpu {self.part}{' (DRY RUN: CPU, tiny shapes)' if self.dry_run else ''}",
                  harness.describe_machine(self.machine)]
        harness.write_markdown(os.path.join(out, f"{self.part}.md"),
                               "\n".join([f"# {header[0]}", "", header[1], "", "```", *self.lines, "```"]))
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write("\n".join([*header, *self.lines]) + "\n")
        print(f"wrote {csv_path}, {self.part}.md and summary.txt in {out}")


def part_correctness(run):
    cases = ([(2, 3, 5, 4, 3, torch.float32), (1, 2, 3, 3, 2, torch.float64)] if run.dry_run else
             [(16, 12, 32, 32, 3, torch.float32), (16, 48, 32, 32, 3, torch.float32),
              (4, 12, 17, 23, 3, torch.float64), (2, 96, 64, 64, 3, torch.float32)])
    name, checked = run.impl, 0
    for B, C, H, W, k, dtype in cases:
        x, w, b = problem(B, C, H, W, k, run.device, dtype, seed=C + H)
        y = reference.forward(x.double(), w.double(), b.double())
        g = torch.randn(B, C, H, W, dtype=torch.float64, device=run.device)
        try:
            results = {
                "forward": (rel_err(ck.cinc_conv2d(x, w, b, backend=name), y), "forward"),
                "inverse": (rel_err(ck.cinc_conv2d_inverse(y.to(dtype), w, b, backend=name), x), "solve"),
                "inverse_transpose": (rel_err(adjoint_apply(
                    ck.cinc_conv2d_inverse_transpose(g.to(dtype), w, backend=name), w), g), "solve"),
                "logdet": (rel_err(ck.cinc_logdet(w, H, W, backend=name), reference.logdet(w.double(), H, W)),
                           "forward"),
            }
        except RuntimeError as exc:  # a launch the kernels refuse or a failing one: the other cases still run
            run.failed = True
            run.say(f"WRONG {name} {str(dtype)[6:]} {(B, C, H, W, k)} raised: {str(exc).splitlines()[0][:200]}")
            continue
        for op, (error, kind) in results.items():
            ok = error <= TOLERANCE[kind][dtype]
            checked += 1
            run.failed |= not ok
            run.add(None, shape=(B, C, H, W), k=k, dtype=str(dtype)[6:], op=op, provider=name, mode="check",
                    rel_error=f"{error:.3g}")
            run.say(f"{'ok   ' if ok else 'WRONG'} {name} {op:17s} {str(dtype)[6:]:7s} {(B, C, H, W, k)} "
                    f"relative error {error:.2e} (tolerance {TOLERANCE[kind][dtype]:.0e})")
    run.say(f"correctness: {'FAILED' if run.failed else 'all'} {checked} checks "
            f"{'have errors beyond tolerance' if run.failed else 'within tolerance'}")


def part_ops(run):
    B, channels, sizes = (2, [3], [5]) if run.dry_run else (run.args.batch, run.args.channels, run.args.sizes)
    for k in run.args.kernel_sizes:
        for C in channels:
            for S in sizes:
                _ops_at(run, (B, C, S, S), k)
    if run.device.type == "cuda":
        set_tf32(False)


def _ops_at(run, shape, k):
    B, C, S, _ = shape
    x, w, b = problem(B, C, S, S, k, run.device)
    wm = reference.masked_weight(w)
    xp = F.pad(x, (k - 1, 0, k - 1, 0))
    y = ck.cinc_conv2d(x, w, b, backend=run.impl)
    providers = {
        ("forward", "_aten"): lambda: ck.cinc_conv2d(x, w, b, backend="_aten"),
        ("forward", run.impl): lambda: ck.cinc_conv2d(x, w, b, backend=run.impl),
        ("inverse", run.impl): lambda: ck.cinc_conv2d_inverse(y, w, b, backend=run.impl),
        ("inverse_transpose", run.impl): lambda: ck.cinc_conv2d_inverse_transpose(y, w, backend=run.impl),
    }
    for tf32 in run.args.tf32:
        if run.device.type == "cuda":
            set_tf32(tf32 == "on")
        mode = f"tf32_{tf32}"
        auto = ck.backends.select("auto", "forward", run.device, x.dtype).name
        cudnn = run.add(run.time(lambda: F.conv2d(xp, wm, b)), shape=shape, k=k, op="forward", provider="cudnn",
                        mode=mode)
        medians = {(op, provider): run.add(run.time(fn), shape=shape, k=k, op=op, provider=provider, mode=mode,
                                           baseline=cudnn)
                   for (op, provider), fn in providers.items()}
        fastest = min((ms, provider) for (op, provider), ms in medians.items() if op == "forward")[1]
        cells = ", ".join(f"{op} {provider} {ms:.4f} ms ({ms / cudnn:.2f}x)" for (op, provider), ms in medians.items())
        run.say(f"k={k} C={C} {S}x{S} B={B} TF32 {tf32}: cuDNN forward {cudnn:.4f} ms; {cells}; "
                f"auto's forward: {auto}, fastest of ours and _aten: {fastest}")


def part_sweep(run):
    C, S = (3, 5) if run.dry_run else (run.args.channels[0], run.args.sizes[0])
    for B in [1, 2] if run.dry_run else run.args.batches:
        _sweep_at(run, (B, C, S, S))


def _sweep_at(run, shape):
    B, C, S, _ = shape
    # The default launch (neither override set), then one override at a time.
    settings = ([("default", {THREADS_ENV: None, BLOCKS_PER_IMAGE_ENV: None})]
                + [(f"threads={t}", {THREADS_ENV: t, BLOCKS_PER_IMAGE_ENV: None}) for t in run.args.threads]
                + [(f"blocks_per_image={n}", {THREADS_ENV: None, BLOCKS_PER_IMAGE_ENV: n})
                   for n in run.args.blocks_per_image])
    x, w, b = problem(B, C, S, S, 3, run.device)
    wm, xp = reference.masked_weight(w), F.pad(x, (2, 0, 2, 0))
    y = ck.cinc_conv2d(x, w, b, backend=run.impl)

    def inverse():
        return ck.cinc_conv2d_inverse(y, w, b, backend=run.impl)

    cudnn = run.add(run.time(lambda: F.conv2d(xp, wm, b)), shape=shape, op="forward", provider="cudnn",
                    mode="default")
    with environment(settings[0][1]):
        default = inverse()
    cells = []
    for mode, values in settings:
        with environment(values):
            try:
                error = rel_err(inverse(), default)
                times = run.time(inverse)
            except RuntimeError as exc:
                cells.append(f"{mode}: refused ({str(exc).splitlines()[0][:80]})")
                continue
        median = run.add(times, shape=shape, op="inverse", provider=run.impl, mode=mode, baseline=cudnn,
                         rel_error=f"{error:.3g}")
        flag = "" if error <= 1e-5 else f" DIFFERS FROM THE DEFAULT LAUNCH BY {error:.1e}"
        cells.append(f"{mode} {median:.4f} ms ({median / cudnn:.2f}x){flag}")
        run.failed |= error > 1e-5
    run.say(f"inverse C={C} {S}x{S} B={B}: cuDNN forward {cudnn:.4f} ms; " + "; ".join(cells))


def part_finc(run):
    import finc_baseline

    B, C, S = (1, 4, 2) if run.dry_run else (run.args.batch, run.args.channels[0], run.args.sizes[0])
    shape = (B, C, S, S)
    x, w, b = problem(B, C, S, S, 3, run.device)
    w_finc = finc_baseline.finc_weight(w)
    y_finc = reference.forward(x.double(), w_finc.double(), b.double(), True).float()
    y = ck.cinc_conv2d(x, w, b, backend=run.impl)
    launches = finc_baseline.launches_per_call(C, S, S)
    if run.device.type == "cuda":
        finc = finc_baseline.finc_inverse_graph(y_finc, w_finc, b)
    else:
        def finc():
            return finc_baseline.finc_inverse(y_finc, w_finc, b)

    def ours_finc():
        return ck.cinc_conv2d_inverse(y_finc, w_finc, b, unit_diagonal=True, backend=run.impl)

    errors = {"finc_baseline": rel_err(finc(), x), "ours_finc_layer": rel_err(ours_finc(), x)}
    baseline = run.add(run.time(finc), shape=shape, op="inverse", provider="finc_baseline",
                       mode=f"finc_layer launches={launches}", rel_error=f"{errors['finc_baseline']:.3g}")
    ours = run.add(run.time(ours_finc), shape=shape, op="inverse", provider=run.impl, mode="finc_layer",
                   rel_error=f"{errors['ours_finc_layer']:.3g}")
    ours_cinc = run.add(run.time(lambda: ck.cinc_conv2d_inverse(y, w, b, backend=run.impl)), shape=shape,
                        op="inverse", provider=run.impl, mode="cinc_layer")
    run.failed |= max(errors.values()) > 1e-4
    run.say(f"FInC's layer, C={C} {S}x{S} B={B}: FInC-algorithm baseline ({launches} launches"
            f"{', CUDA graph' if run.device.type == 'cuda' else ''}) {baseline:.4f} ms (error "
            f"{errors['finc_baseline']:.1e}); our inverse of the same layer {ours:.4f} ms (error "
            f"{errors['ours_finc_layer']:.1e}): {baseline / ours:.1f}x faster; our inverse of the full CInC layer "
            f"{ours_cinc:.4f} ms")


def part_half(run):
    if run.device.type != "cuda":
        run.say("half: needs a GPU (cuDNN's float16/bfloat16 convolutions); nothing to do on the CPU")
        return
    for dtype in (torch.float16, torch.bfloat16):
        _half_at(run, (run.args.batch, 48, run.args.sizes[0], run.args.sizes[0]), dtype)


def _half_at(run, shape, dtype):
    B, C, S, _ = shape
    x, w, b = problem(B, C, S, S, 3, run.device, dtype)
    wm, xp = reference.masked_weight(w), F.pad(x, (2, 0, 2, 0))
    error = rel_err(ck.cinc_conv2d(x, w, b, backend=run.impl), reference.forward(x.double(), w.double(), b.double()))
    name = str(dtype)[6:]
    cudnn = run.add(run.time(lambda: F.conv2d(xp, wm, b)), shape=shape, dtype=name, op="forward", provider="cudnn")
    ours = run.add(run.time(lambda: ck.cinc_conv2d(x, w, b, backend=run.impl)), shape=shape, dtype=name,
                   op="forward", provider=run.impl, baseline=cudnn, rel_error=f"{error:.3g}")
    run.say(f"forward {name} C={C} {S}x{S} B={B}: cuDNN {cudnn:.4f} ms, ours {ours:.4f} ms ({ours / cudnn:.2f}x), "
            f"error {error:.1e}; auto runs {ck.backends.select('auto', 'forward', run.device, dtype).name}")


def part_fwdbwd(run):
    B, channels, S = (2, [3], 5) if run.dry_run else (run.args.batch, run.args.channels, run.args.sizes[0])
    for C in channels:
        _fwdbwd_at(run, (B, C, S, S))


def _fwdbwd_at(run, shape):
    B, C, S, _ = shape
    x, w, b = problem(B, C, S, S, 3, run.device)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    grad = torch.randn_like(x)
    conv = torch.nn.Conv2d(C, C, 3, padding=1).to(run.device)
    cells = []
    for provider in (run.impl, "_aten"):
        def step(backend=provider):
            ck.cinc_conv2d(xg, wg, bg, backend=backend).backward(grad)

        ms = run.add(run.time(step, (xg, wg, bg)), shape=shape, op="fwd+bwd", provider=provider)
        cells.append(f"{provider} {ms:.4f} ms")
    ref = run.add(run.time(lambda: conv(xg).backward(grad), (xg, conv.weight, conv.bias)), shape=shape,
                  op="fwd+bwd", provider="nn.Conv2d")
    run.say(f"forward+backward C={C} {S}x{S} B={B}: nn.Conv2d {ref:.4f} ms; " + ", ".join(cells))


def part_profile(run):
    B, C, S = (2, 3, 5) if run.dry_run else (16, 48, 32)
    x, w, b = problem(B, C, S, S, 3, run.device)
    y = ck.cinc_conv2d(x, w, b, backend=run.impl)
    ck.cinc_conv2d_inverse(y, w, b, backend=run.impl)
    ck.cinc_conv2d_inverse_transpose(y, w, backend=run.impl)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    run.say(f"profile: one inverse and one adjoint at {(B, C, S, S)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=PARTS)
    p.add_argument("--out", default=None, help="directory of the results (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the program, times nothing")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, nargs="+", default=None, help="default: 12 48 (finc: 12, sweep: 48)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32])
    p.add_argument("--kernel-sizes", type=int, nargs="+", default=[3])
    p.add_argument("--tf32", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 132, 264], help="sweep: batch sizes")
    p.add_argument("--threads", type=int, nargs="+", default=[96, 192, 384, 512], help=f"sweep: {THREADS_ENV}")
    p.add_argument("--blocks-per-image", type=int, nargs="+", default=[1, 2, 4, 8],
                   help=f"sweep: {BLOCKS_PER_IMAGE_ENV}")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.channels is None:
        args.channels = {"finc": [12], "sweep": [48]}.get(args.part, [12, 48])
    for name in ("batch", "channels", "sizes", "kernel_sizes", "batches", "threads", "blocks_per_image"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    out = args.out or tempfile.mkdtemp(prefix=f"bench_gpu_{args.part}_")
    os.makedirs(out, exist_ok=True)
    run = Run(args.part, args)
    print(f"bench_gpu {args.part} on {run.machine['device']} ({platform.node()})", flush=True)
    globals()[f"part_{args.part}"](run)
    run.finish(out)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
