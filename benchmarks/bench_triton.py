"""The Triton backend beside cuDNN (and the CUDA backend when it is built), at the shapes of the GPU targets.

    python benchmarks/bench_triton.py                          # B=64, k=3, C ∈ {12, 48, 96}, H=W ∈ {8, 16, 32, 64}
    python benchmarks/bench_triton.py --out "$OUT/triton"      # what tools/gpu_check.sh runs
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --batch 1 --channels 3 --sizes 4 --no-write   # CPU smoke run

For every shape: correctness first (forward against the float64 reference, ``inverse(forward(x))`` against ``x``,
the adjoint through ``Mᵀ``), then each provider is timed with ``triton.testing.do_bench`` (median and 20th/80th
percentiles, ms; a wall-clock loop without a GPU). Ratios are to cuDNN's forward (``F.conv2d`` on the padded input,
masked weight) on the same tensors; targets: inverse ≤ 3×, forward ≤ 1.1×. Also the batch-1
inverse at 64×64, C=48, and its time per image against the batch-64 run.
Writes long-format CSV rows (appended) to ``<out>/triton_ops.csv`` and the latest table to ``<out>/triton_ops.md``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cinc_kernels as ck  # noqa: E402
from cinc_kernels import harness, reference  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGETS = {"inverse": 3.0, "forward": 1.1}  # time / cuDNN forward, the GPU targets in the README


def timer(fn, device: torch.device, rounds: int):
    """(median, p20, p80) in ms: the harness's timer (CUDA events on a GPU), ``rounds`` calls at least."""
    return harness.quantiles(harness.measure(fn, device, warmup=2, min_reps=rounds, max_reps=4 * rounds,
                                             min_time=0.1 if device.type == "cuda" else 0.0))


def adjoint_apply(u, w):
    """``Mᵀ u`` in float64 (docs/spec.md §1): the bottom-right padded correlation with the masked taps flipped and
    their channel axes swapped."""
    k = w.shape[-1]
    wm = reference.masked_weight(w.double())
    return F.conv2d(F.pad(u.double(), (0, k - 1, 0, k - 1)), wm.transpose(0, 1).flip(2, 3))


def make_problem(B, C, H, W, k, dtype, device, seed=0):
    """Well-conditioned weights (centre diagonal 2, small off-centre taps) so the inverse keeps float32 digits."""
    g = torch.Generator().manual_seed(seed)
    w = 0.3 * torch.randn(C, C, k, k, generator=g) / (k * C**0.5)
    w[:, :, k - 1, k - 1] += 2 * torch.eye(C)
    x = torch.randn(B, C, H, W, generator=g)
    b = torch.randn(C, generator=g)
    return x.to(device, dtype), w.to(device, dtype), b.to(device, dtype)


def check(x, w, b) -> dict:
    """Relative errors of the Triton ops; exits if any is above 1e-4 (float32)."""
    def rel(a, e):
        return ((a.double() - e.double()).norm() / e.double().norm()).item()

    y_ref = reference.forward(x, w, b)  # conv-based, fast enough at every benchmark shape
    y = ck.cinc_conv2d(x, w, b, backend="triton")
    x_hat = ck.cinc_conv2d_inverse(ck.cinc_conv2d(x, w, b, backend="triton"), w, b, backend="triton")
    u = ck.cinc_conv2d_inverse_transpose(x, w, backend="triton")
    errs = {
        "forward": rel(y, y_ref),
        "inverse(forward(x))": rel(x_hat, x),
        "M^T inverse_transpose(g)": rel(adjoint_apply(u, w), x),
    }
    tol = 1e-4 if x.dtype == torch.float32 else 3e-2
    for name, e in errs.items():
        if not e <= tol:
            raise SystemExit(f"correctness check failed before timing: {name} relative error {e:.2e} (shape "
                             f"{tuple(x.shape)}, {x.dtype})")
    return errs


class _tf32:
    """Sets PyTorch's TF32 switches for one call: cuDNN convolutions (on by default in PyTorch) and float32 GEMMs
    (off by default; the Triton forward follows it)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def providers(x, w, b, with_cuda: bool, inverses: bool = True) -> dict:
    """``{provider_op: fn}``. ``cudnn_forward`` is ATen's convolution with full float32 products (TF32 off, like
    our kernels); ``*_tf32`` variants allow TF32 tensor cores (cuDNN's PyTorch default) for float32."""
    k = w.shape[-1]
    wm = reference.masked_weight(w)

    def cudnn(tf32):
        with _tf32(tf32):
            return F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), wm, b)

    def triton_forward(tf32):
        with _tf32(tf32):
            return ck.cinc_conv2d(x, w, b, backend="triton")

    out = {"cudnn_forward": lambda: cudnn(False), "triton_forward": lambda: triton_forward(False)}
    if x.is_cuda and x.dtype == torch.float32:
        out["cudnn_forward-tf32"] = lambda: cudnn(True)
        out["triton_forward-tf32"] = lambda: triton_forward(True)
    if with_cuda:
        out["cuda_forward"] = lambda: ck.cinc_conv2d(x, w, b, backend="cuda")
    if inverses:
        out["triton_inverse"] = lambda: ck.cinc_conv2d_inverse(x, w, b, backend="triton")
        out["triton_inverse_transpose"] = lambda: ck.cinc_conv2d_inverse_transpose(x, w, backend="triton")
        if with_cuda:
            out["cuda_inverse"] = lambda: ck.cinc_conv2d_inverse(x, w, b, backend="cuda")
            out["cuda_inverse_transpose"] = lambda: ck.cinc_conv2d_inverse_transpose(x, w, backend="cuda")
    return out


def forward_config(C) -> str:
    """The block sizes the GPU autotuner picked for the last forward call (empty under the interpreter)."""
    kern = getattr(getattr(ck.triton, "kernels", None), "cinc_forward_gemm_kernel", None)
    best = getattr(kern, "best_config", None)
    return "" if best is None else f"{best}".replace(",", ";")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, nargs="+", default=[12, 48, 96])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--half", action="store_true", help="also time the float16 / bfloat16 forward against cuDNN")
    p.add_argument("--rounds", type=int, default=25, help="timed calls without a GPU; do_bench's rep (ms / 4) on one")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    if "triton" not in ck.available_backends():
        raise SystemExit("the Triton backend is unavailable on this install (`python -m cinc_kernels info` says why)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with_cuda = "cuda" in ck.available_backends() and device.type == "cuda"
    machine = harness.machine(device)
    if device.type == "cpu":
        machine["device"] += " (Triton interpreter)"
    k, B = args.kernel_size, args.batch
    rows, table = [], []

    def record(op_provider, shape, dtype, stats, base, extra=""):
        med, p20, p80 = stats
        provider, _, op = op_provider.partition("_")
        op, _, mode = op.partition("-")
        if device.type == "cpu" and provider == "cudnn":
            provider = "aten"
        if dtype == torch.float32:
            mode = mode or "ieee"  # the precision of float32 products
        row = harness.record("triton_ops", None, machine, shape=tuple(map(int, shape.split("x"))), op=op,
                             provider=provider, mode=f"{mode} {extra}".strip(), k=k, dtype=str(dtype)[6:],
                             ratio=med / base)
        row.update(median_ms=f"{med:.5g}", p20_ms=f"{p20:.5g}", p80_ms=f"{p80:.5g}", load_avg=harness.load_average())
        rows.append(row)

    per_image_b = {}
    for C in args.channels:
        for S in args.sizes:
            shape = f"{B}x{C}x{S}x{S}"
            x, w, b = make_problem(B, C, S, S, k, torch.float32, device)
            errs = check(x, w, b)
            res = {name: timer(fn, device, args.rounds) for name, fn in providers(x, w, b, with_cuda).items()}
            base = res["cudnn_forward"][0]
            cfg = forward_config(C)
            for name, stats in res.items():
                record(name, shape, torch.float32, stats, base, cfg if name == "triton_forward" else "")
            table.append((C, S, res, errs["inverse(forward(x))"]))
            if C == 48 and S == 64:
                per_image_b[B] = res["triton_inverse"][0] / B

    # Sampling one image: the one-program-per-image wavefront uses a single SM.
    if 48 in args.channels and 64 in args.sizes and B != 1:
        x, w, b = make_problem(1, 48, 64, 64, k, torch.float32, device)
        check(x, w, b)
        res1 = {name: timer(fn, device, args.rounds) for name, fn in providers(x, w, b, with_cuda).items()}
        for name, stats in res1.items():
            record(name, "1x48x64x64", torch.float32, stats, res1["cudnn_forward"][0])
        per_image_b[1] = res1["triton_inverse"][0]

    half_lines = []
    if args.half and device.type == "cuda":
        for dtype in (torch.float16, torch.bfloat16):
            for C in args.channels:
                for S in args.sizes:
                    x, w, b = make_problem(B, C, S, S, k, dtype, device)
                    check(x, w, b)
                    res = {n: timer(fn, device, args.rounds)
                           for n, fn in providers(x, w, b, with_cuda, inverses=False).items()}
                    base = res["cudnn_forward"][0]
                    for name, stats in res.items():
                        record(name, f"{B}x{C}x{S}x{S}", dtype, stats, base)
                    tf = res["triton_forward"][0]
                    half_lines.append(f"| {str(dtype)[6:]} | {C} | {S} | {base:.4f} | {tf:.4f} | {tf / base:.2f}× |")

    def ms(res, name):
        return f"{res[name][0]:.4f}" if name in res else "—"

    lines = [f"Triton backend vs cuDNN — B={B}, k={k}, float32; {harness.describe_machine(machine)}",
             "cuDNN and triton forward with full float32 products (TF32 off); the TF32 columns allow TF32 in both.", "",
             "| C | H=W | cuDNN fwd ms | triton fwd ms | cuda fwd ms | cuDNN TF32 ms | triton TF32 ms |"
             " triton inv ms | cuda inv ms | triton inv_T ms | cuda inv_T ms | triton fwd / cuDNN |"
             " triton inv / cuDNN | targets met (fwd ≤ 1.1×, inv ≤ 3×) | inv(fwd(x)) rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for C, S, res, err in table:
        base = res["cudnn_forward"][0]
        fr, ir = res["triton_forward"][0] / base, res["triton_inverse"][0] / base
        met = f"{'yes' if fr <= TARGETS['forward'] else 'no'} / {'yes' if ir <= TARGETS['inverse'] else 'no'}"
        cells = [ms(res, n) for n in ("cudnn_forward", "triton_forward", "cuda_forward", "cudnn_forward-tf32",
                                      "triton_forward-tf32", "triton_inverse", "cuda_inverse",
                                      "triton_inverse_transpose", "cuda_inverse_transpose")]
        lines.append(f"| {C} | {S} | " + " | ".join(cells) + f" | {fr:.2f}× | {ir:.2f}× | {met} | {err:.1e} |")
    if 1 in per_image_b and B in per_image_b:
        lines += ["", f"Batch-1 triton inverse at 64×64, C=48: {per_image_b[1]:.4f} ms per image; "
                      f"batch {B}: {per_image_b[B]:.4f} ms per image (ratio {per_image_b[1] / per_image_b[B]:.1f}×)"]
    if half_lines:
        lines += ["", "Half-precision forward (float32 accumulation)", "",
                  "| dtype | C | H=W | cuDNN ms | triton ms | triton / cuDNN |", "|---|---|---|---|---|---|"]
        lines += half_lines

    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        harness.append_csv(pathlib.Path(args.out) / "triton_ops.csv", rows)
        harness.write_markdown(pathlib.Path(args.out) / "triton_ops.md", report)

if __name__ == "__main__":
    main()
