"""The comparison benchmark: ``python -m cinc_kernels bench`` (also ``benchmarks/bench_layers.py``).

Two suites, on one device:

* **layers**: every layer of :data:`cinc_kernels.LAYERS` × backend × shape × dtype: free parameters, forward,
  inverse, log-determinant and forward+backward time, memory, and the reconstruction error
  ``‖inverse(forward(x)) − x‖ / ‖x‖``;
* **inverse_algorithms**: the same CInC weight inverted by our backends, a pure-PyTorch wavefront (one set of ops
  per anti-diagonal) and the paper's sequential raster solve (one pixel at a time, eager PyTorch). (The FInC-style
  launch per diagonal and channel is a GPU baseline of ``benchmarks/bench_gpu.py``.)

Every case is checked for correctness (round trip, log-determinant shape, agreement between inverse algorithms)
before anything is timed; a mismatch raises :class:`CorrectnessError`. Times are medians with the 20th and 80th
percentiles over repeated calls (:mod:`cinc_kernels.harness`: CUDA events on the GPU, ``perf_counter`` on the
CPU), taken in ``rounds`` passes over all cases so that load from elsewhere on a shared machine does not land on one
case only. Results are appended as long-format CSV rows (the harness's schema, :data:`CSV_COLUMNS`) under ``--out``
(default ``runs/bench``; ``benchmarks/results`` only when asked), with a Markdown table and PNG plots beside them.

Weights are the layers' own initialisation moved by ``N(0, (0.1/√fan_in)²)`` noise on every parameter, so every tap
matters and the inverse stays well conditioned (docs/spec.md §1, conditioning).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Callable, Optional

import torch

from ._checks import Range
from ._cli import ArgumentParser, range_type
from ._optional import optional_import
from . import functional as fn
from . import harness, torch_backend
from .backends import available_backends, get_backend
from .nn import LAYERS
from .testing import rel_error
from .masks import masked_weight

__all__ = ["BenchConfig", "CorrectnessError", "CSV_COLUMNS", "run", "write_results", "main",
           "torch_wavefront_inverse", "sequential_raster_inverse"]

CSV_COLUMNS = harness.COLUMNS

# Round-trip tolerance of the correctness check (relative, on well-conditioned weights); generous next to the
# tests' because composite layers (Emerging, the row-by-row autoregressive solve) chain several solves.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}

# Per layer name: constructor keywords from the benchmark's kernel size k (Emerging's two 2×2 convolutions give the
# composite 3×3 receptive field of the paper, whatever k is).
LAYER_KWARGS: dict[str, Callable[[int], dict]] = {
    "cinc": lambda k: {"kernel_size": k},
    "emerging": lambda k: {},
    "autoregressive": lambda k: {"kernel_size": k},
    "1x1": lambda k: {},
    "finc": lambda k: {"kernel_size": k},
}

LAYER_OPS = ("forward", "inverse", "logdet", "fwd+bwd")


class CorrectnessError(AssertionError):
    """A layer or an inverse algorithm failed the check that precedes timing."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class BenchConfig:
    """What to run. ``backends=None``: ``auto`` (what a layer uses by default), then every available backend that
    runs on ``device`` except the slow float64 ``reference``; ``layers=None``: all of :data:`LAYERS`.
    Shapes are ``(batch, base_channels, s, s)`` for ``s`` in ``size_sweep`` and
    ``(batch, c, base_size, base_size)`` for ``c`` in ``channel_sweep``."""

    device: str = dataclasses.field(default_factory=default_device)
    backends: Optional[list] = None
    layers: Optional[list] = None
    dtypes: list = dataclasses.field(default_factory=lambda: [torch.float32])
    batch: int = 8
    kernel_size: int = 3
    base_channels: int = 12
    base_size: int = 16
    size_sweep: list = dataclasses.field(default_factory=lambda: [8, 16, 32, 64])
    channel_sweep: list = dataclasses.field(default_factory=lambda: [4, 12, 24, 48])
    warmup: int = 1
    min_reps: int = 6
    max_reps: int = 24
    min_time: float = 0.06
    rounds: int = 3
    algorithms: bool = True
    out_dir: str = "runs/bench"
    plots: bool = True
    progress: bool = True
    seed: int = 0

    def shapes(self) -> list:
        shapes = [(self.batch, self.base_channels, s, s) for s in self.size_sweep]
        shapes += [(self.batch, c, self.base_size, self.base_size) for c in self.channel_sweep]
        return list(dict.fromkeys(shapes))

    def resolved_backends(self) -> list:
        if self.backends is not None:
            return list(self.backends)
        device_type = torch.device(self.device).type
        return ["auto"] + [b for b in available_backends() if b != "reference" and get_backend(b).runs_on(device_type)
                           and not (b == "triton" and device_type != "cuda")]

    def resolved_layers(self, layer_classes: dict) -> list:
        return list(self.layers) if self.layers is not None else list(layer_classes)


# --------------------------------------------------------------------------------------------------------------
# the inverse algorithms we compare ours against


def _solve_parts(weight, bias, unit_diagonal, y):
    """``(off-centre taps as (C, C·k·k), L⁻¹, y − bias)`` of the raster solve."""
    C, k = weight.shape[0], weight.shape[-1]
    wm = masked_weight(weight, unit_diagonal)
    eye = torch.eye(C, dtype=weight.dtype, device=weight.device)
    l_inv = torch.linalg.solve_triangular(wm[:, :, -1, -1], eye, upper=False)
    off = wm.clone()
    off[:, :, -1, -1] = 0
    r = y if bias is None else y - bias.view(1, C, 1, 1)
    return off.reshape(C, C * k * k), l_inv, r


def torch_wavefront_inverse(y, weight, bias=None, unit_diagonal=False):
    """The CInC inverse as a wavefront in plain PyTorch, one set of ops per anti-diagonal: the ``torch`` backend's
    (:mod:`cinc_kernels.torch_backend`). ``(B, C, H, W) -> (B, C, H, W)``."""
    return torch_backend.inverse(y, weight, bias, unit_diagonal)


def sequential_raster_inverse(y, weight, bias=None, unit_diagonal=False):
    """The paper's inverse: pixels one at a time in raster order (eager PyTorch, ``H·W`` steps), each solved with
    ``L⁻¹`` precomputed (kinder to the baseline than the channel-by-channel substitution).
    ``(B, C, H, W) -> (B, C, H, W)``.

    ``torch.compile`` does not help here: with the pixel as Python ints it recompiles per pixel (and stops at the
    recompile limit), with tensor indices each compiled step costs more than the eager one (measured on this
    2-core machine, torch 2.14: compile ~11 s, then a 16×16 solve 5× slower than eager)."""
    B, C, H, W = y.shape
    k = weight.shape[-1]
    off, l_inv, r = _solve_parts(weight, bias, unit_diagonal, y)
    off_t, l_inv_t = off.T, l_inv.T
    xp = y.new_zeros(B, C, H + k - 1, W + k - 1)
    for i in range(H):
        for j in range(W):
            window = xp[:, :, i:i + k, j:j + k].reshape(B, C * k * k)
            xp[:, :, i + k - 1, j + k - 1] = (r[:, :, i, j] - window @ off_t) @ l_inv_t
    return xp[:, :, k - 1:, k - 1:]


def _inverse_algorithms(w, b, backends) -> dict:
    """``{label: y -> x}`` for one CInC weight and bias: ours per backend, then the baselines."""
    impls = {be: (lambda y, be=be: fn.cinc_conv2d_inverse(y, w, b, backend=be)) for be in backends}
    if "torch" not in backends:  # otherwise already timed under its backend name
        impls["torch_wavefront"] = lambda y: torch_wavefront_inverse(y, w, b)
    impls["sequential_raster_eager"] = lambda y: sequential_raster_inverse(y, w, b)
    return impls


# --------------------------------------------------------------------------------------------------------------
# timing and memory


def _memory_mb(fn_, device) -> tuple:
    """Memory of one call: the CUDA allocator's peak above what was allocated before (``cuda_peak``), or on the
    CPU, which has no allocator statistics, the bytes autograd saves for backward (``saved_for_backward``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn_()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda_peak"
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn_()
    return sum(storages.values()) / 2**20, "saved_for_backward"


def _perturb_(layer: torch.nn.Module, generator: torch.Generator) -> None:
    """Add ``N(0, (0.1/√fan_in)²)`` to every parameter (fixed entries stay inert: the layers mask them)."""
    with torch.no_grad():
        for p in layer.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * (0.1 / math.sqrt(fan_in))
            p.add_(noise.to(p))


# --------------------------------------------------------------------------------------------------------------
# the run


def _make_layer(name, cls, channels, backend, k, dtype, device, seed):
    torch.manual_seed(seed)
    layer = cls(channels, backend=backend, **LAYER_KWARGS.get(name, lambda k: {})(k))
    _perturb_(layer, torch.Generator().manual_seed(seed + 1))
    return layer.to(device=device, dtype=dtype)


def run(config: BenchConfig, layer_classes: Optional[dict] = None) -> list:
    """Run both suites; returns the rows (dicts with the keys of :data:`CSV_COLUMNS`).

    Raises :class:`CorrectnessError` before timing anything if a layer does not invert (or an inverse algorithm
    disagrees with ours) within :data:`CHECK_TOLERANCE`.
    """
    tqdm = optional_import("tqdm.auto", "bench", "the benchmark's progress bar").tqdm

    layer_classes = dict(LAYERS if layer_classes is None else layer_classes)
    device = torch.device(config.device)
    backends = config.resolved_backends()
    names = config.resolved_layers(layer_classes)
    if not backends:
        raise ValueError(f"no backend to benchmark on {device.type}; available: {available_backends()}")
    unknown = [n for n in names if n not in layer_classes]
    if unknown:
        raise ValueError(f"layers: unknown {unknown}; known: {sorted(layer_classes)}")
    machine = harness.machine(device)
    k = config.kernel_size
    shapes = config.shapes()
    cases = [(n, b, d, s) for n in names for b in backends for d in config.dtypes for s in shapes]
    algo_cases = [(d, s) for d in config.dtypes for s in shapes] if config.algorithms else []

    def row(suite, layer, provider, op, shape, dtype, times, **extra):
        return harness.record("layers", times, machine, shape=shape, suite=suite, layer=layer, provider=provider,
                              op=op, mode="fwd+bwd" if op == "fwd+bwd" else "no_grad", k=k,
                              dtype=str(dtype).replace("torch.", ""), **extra)

    n_algorithms = len(backends) + 2
    total = len(cases) + len(algo_cases) + config.rounds * (4 * len(cases) + len(algo_cases) * n_algorithms)
    bar = tqdm(total=total, desc="bench", disable=not config.progress, file=sys.stderr, leave=False)
    try:
        # 1. correctness of everything, before any timing
        prepared = []
        for name, backend, dtype, shape in cases:
            bar.set_postfix_str(f"check {name}/{backend} {'x'.join(map(str, shape))}")
            layer = _make_layer(name, layer_classes[name], shape[1], backend, k, dtype, device, config.seed)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed + 2),
                            dtype=torch.float64).to(device=device, dtype=dtype)
            with torch.no_grad():
                y, logdet = layer(x)
                err = rel_error(layer.inverse(y), x)
            what = f"{name} on backend {backend}, shape {tuple(shape)}, {dtype}"
            if tuple(logdet.shape) != (shape[0],) or not bool(torch.isfinite(logdet).all()):
                raise CorrectnessError(f"{what}: log-determinant of shape {tuple(logdet.shape)}, values {logdet}")
            if not err <= CHECK_TOLERANCE[dtype]:
                raise CorrectnessError(f"{what}: ‖inverse(forward(x)) − x‖/‖x‖ = {err:.2e} > "
                                       f"{CHECK_TOLERANCE[dtype]:.0e}")
            prepared.append((name, backend, dtype, shape, layer, x, y, err))
            bar.update()

        algorithms = []
        for dtype, shape in algo_cases:
            bar.set_postfix_str(f"check inverse algorithms {'x'.join(map(str, shape))}")
            cinc = _make_layer("cinc", LAYERS["cinc"], shape[1], backends[0], k, dtype, device, config.seed)
            w, b = cinc.weight.detach(), cinc.bias.detach()
            x = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed + 3),
                            dtype=torch.float64).to(device=device, dtype=dtype)
            y = fn.cinc_conv2d(x, w, b, backend=backends[0])
            impls = _inverse_algorithms(w, b, backends)
            with torch.no_grad():
                for label, impl in impls.items():
                    err = rel_error(impl(y), x)
                    if not err <= CHECK_TOLERANCE[dtype]:
                        raise CorrectnessError(f"inverse algorithm {label}, shape {tuple(shape)}, {dtype}: "
                                               f"error {err:.2e} against x > {CHECK_TOLERANCE[dtype]:.0e}")
                    algorithms.append((label, impl, dtype, shape, y, err))
            bar.update()

        # 2. timing, in rounds: every case gets a share of each round, so a burst of load from elsewhere on the
        # machine spreads over many cases instead of spoiling one case's median.
        jobs = []  # (row fields, callable, whether it runs under no_grad)
        for name, backend, dtype, shape, layer, x, y, err in prepared:
            H, W = shape[2], shape[3]
            common = {"free_params": layer.num_parameters(), "rel_error": f"{err:.3g}"}

            def fwd_bwd(layer=layer, x=x):
                layer.zero_grad(set_to_none=True)
                out, logdet = layer(x.detach().requires_grad_())
                (0.5 * out.square().mean() - logdet.mean()).backward()

            calls = {"forward": (lambda layer=layer, x=x: layer(x)),
                     "inverse": (lambda layer=layer, y=y: layer.inverse(y)),
                     "logdet": (lambda layer=layer, H=H, W=W: layer.logdet(H, W)),
                     "fwd+bwd": fwd_bwd}
            for op, call in calls.items():
                extra = dict(common)
                if op == "fwd+bwd" or device.type == "cuda":
                    with torch.set_grad_enabled(op == "fwd+bwd"):
                        mem, extra["memory_kind"] = _memory_mb(call, device)
                    extra["memory_mb"] = f"{mem:.3f}"
                jobs.append(((("layers", name, backend, op, shape, dtype), extra), call, op != "fwd+bwd"))
        for label, impl, dtype, shape, y, err in algorithms:
            jobs.append(((("inverse_algorithms", "cinc", label, "inverse", shape, dtype), {"rel_error": f"{err:.3g}"}),
                         (lambda impl=impl, y=y: impl(y)), True))
        rounds = max(1, config.rounds)
        per_round = dict(warmup=config.warmup, min_reps=math.ceil(config.min_reps / rounds),
                         max_reps=math.ceil(config.max_reps / rounds), min_time=config.min_time / rounds)
        bar.total = bar.n + rounds * len(jobs)
        bar.refresh()
        times = [[] for _ in jobs]
        for r in range(rounds):
            for n, ((fields, _), call, no_grad) in enumerate(jobs):
                bar.set_postfix_str(f"time {fields[1]}/{fields[2]} {fields[3]} {'x'.join(map(str, fields[4]))}")
                with torch.set_grad_enabled(not no_grad):
                    times[n] += harness.measure(call, device,
                                                **dict(per_round, warmup=per_round["warmup"] if r == 0 else 0))
                bar.update()
        rows = [row(*fields, t, **extra) for ((fields, extra), _, _), t in zip(jobs, times)]
    finally:
        bar.close()
    return rows


# --------------------------------------------------------------------------------------------------------------
# output: CSV, Markdown, plots


def _fmt_ms(v) -> str:
    v = float(v)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt_ratio(v: float) -> str:
    return f"{v:.2g}×" if v < 10 else f"{v:.0f}×"


def markdown_tables(rows: list) -> str:
    """The layers table (one line per layer × backend × shape × dtype) and the inverse-algorithms table."""
    lines = []
    layer_rows = [r for r in rows if r["suite"] == "layers"]
    if layer_rows:
        lines += ["| layer | backend | B×C×H×W | dtype | free params | forward ms | inverse ms | logdet ms | "
                  "fwd+bwd ms | inverse / forward | memory MB | rel. error |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        keys = list(dict.fromkeys((r["layer"], r["provider"], r["shape"], r["dtype"]) for r in layer_rows))
        for key in keys:
            by_op = {r["op"]: r for r in layer_rows if (r["layer"], r["provider"], r["shape"], r["dtype"]) == key}
            ratio = float(by_op["inverse"]["median_ms"]) / max(float(by_op["forward"]["median_ms"]), 1e-12)
            mem = by_op["fwd+bwd"]["memory_mb"]
            lines.append("| " + " | ".join([
                *key[:2], key[2], key[3], str(by_op["forward"]["free_params"]),
                *(_fmt_ms(by_op[op]["median_ms"]) for op in LAYER_OPS), _fmt_ratio(ratio),
                f"{float(mem):.3g}" if mem != "" else "", by_op["inverse"]["rel_error"]]) + " |")
    algo_rows = [r for r in rows if r["suite"] == "inverse_algorithms"]
    if algo_rows:
        labels = list(dict.fromkeys(r["provider"] for r in algo_rows))
        ours = labels[0]
        lines += ["", f"Inverse algorithms on the same CInC weight (ms, median; × = time / time of ours, {ours}):", "",
                  "| B×C×H×W | dtype | " + " | ".join(labels) + " |",
                  "|---|---|" + "---:|" * len(labels)]
        for key in dict.fromkeys((r["shape"], r["dtype"]) for r in algo_rows):
            by = {r["provider"]: float(r["median_ms"]) for r in algo_rows if (r["shape"], r["dtype"]) == key}
            cells = []
            for label in labels:
                if label not in by:
                    cells.append("")
                elif label == ours:
                    cells.append(_fmt_ms(by[label]))
                else:
                    cells.append(f"{_fmt_ms(by[label])} ({_fmt_ratio(by[label] / max(by[ours], 1e-12))})")
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log_axes(ax, xticks) -> None:
    """Log-log axes whose x ticks are the measured sizes, written as plain numbers."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if xticks:
        ax.set_xticks(xticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plot(rows, config: BenchConfig, path, sweep: str) -> None:
    matplotlib = optional_import("matplotlib", "bench", "the benchmark plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_rows = [r for r in rows if r["suite"] == "layers"]
    if not layer_rows:
        return
    backend, dtype = layer_rows[0]["provider"], layer_rows[0]["dtype"]
    if sweep == "size":
        pick = lambda r: int(r["C"]) == config.base_channels and int(r["H"]) == int(r["W"])  # noqa: E731
        xkey, xlabel = "H", f"image size H = W (C = {config.base_channels})"
    else:
        pick = lambda r: int(r["H"]) == config.base_size and int(r["W"]) == config.base_size  # noqa: E731
        xkey, xlabel = "C", f"channels C (H = W = {config.base_size})"
    ops = ("forward", "inverse", "fwd+bwd")
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for layer in dict.fromkeys(r["layer"] for r in layer_rows):
            pts = sorted((int(r[xkey]), float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"]))
                         for r in layer_rows if r["layer"] == layer and r["op"] == op and r["provider"] == backend
                         and r["dtype"] == dtype and pick(r))
            if pts:
                xs, med, lo, hi = zip(*pts)
                ax.plot(xs, med, marker="o", label=layer)
                ax.fill_between(xs, lo, hi, alpha=0.2)
        _log_axes(ax, sorted({int(r[xkey]) for r in layer_rows if pick(r)}))
        ax.set(xlabel=xlabel, ylabel="ms (median, p20–p80)", title=op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    device = layer_rows[0]["device"]
    fig.suptitle(f"invertible layers, {backend} backend, {dtype}, B = {layer_rows[0]['B']} — {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_algorithms(rows, config: BenchConfig, path) -> None:
    matplotlib = optional_import("matplotlib", "bench", "the benchmark plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algo_rows = [r for r in rows if r["suite"] == "inverse_algorithms"]
    if not algo_rows:
        return
    dtype = algo_rows[0]["dtype"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    sweeps = (("H", lambda r: int(r["C"]) == config.base_channels, f"image size H = W (C = {config.base_channels})"),
              ("C", lambda r: int(r["H"]) == config.base_size, f"channels C (H = W = {config.base_size})"))
    for ax, (xkey, pick, xlabel) in zip(axes[0], sweeps):
        for label in dict.fromkeys(r["provider"] for r in algo_rows):
            pts = sorted((int(r[xkey]), float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"]))
                         for r in algo_rows if r["provider"] == label and r["dtype"] == dtype and pick(r))
            if pts:
                xs, med, lo, hi = zip(*pts)
                ax.plot(xs, med, marker="o", label=label if label.startswith(("torch_", "seq", "finc")) else
                        f"ours ({label})")
                ax.fill_between(xs, lo, hi, alpha=0.2)
        _log_axes(ax, sorted({int(r[xkey]) for r in algo_rows if pick(r)}))
        ax.set(xlabel=xlabel, ylabel="inverse, ms (median, p20–p80)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"CInC inverse algorithms, {dtype}, B = {algo_rows[0]['B']} — {algo_rows[0]['device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows: list, config: BenchConfig, quiet: bool = False) -> dict:
    """Append the rows to ``<out>/layers.csv`` (a new dated file if that one's columns differ), write this run's
    Markdown (``layers.md``) and plots; print the table unless ``quiet``. Returns the paths by kind."""
    out = pathlib.Path(config.out_dir)
    csv_path = harness.append_csv(out / "layers.csv", rows)
    paths = {"csv": csv_path}
    table = markdown_tables(rows)
    first = rows[0] if rows else {}
    mem_kind = "CUDA allocator peak" if any(r.get("memory_kind") == "cuda_peak" for r in rows) else \
        "bytes saved for backward (the CPU has no allocator statistics)"
    header = (f"# Invertible layers: {first.get('device', '?')}\n\n"
              + (harness.describe_machine(first) + " (load average at the start).\n" if first else "")
              + f"Times: median over repeated calls (p20/p80 in `{csv_path.name}`). Memory: fwd+bwd, {mem_kind}. "
              f"rel. error: ‖inverse(forward(x)) − x‖/‖x‖.\n"
              f"Command: `python -m cinc_kernels bench {' '.join(getattr(config, 'argv', []))}`.\n\n")
    md_path = harness.write_markdown(out / "layers.md", header + table)
    paths["markdown"] = md_path
    if config.plots and rows:
        for key, sweep in (("plot_size", "size"), ("plot_channels", "channels")):
            paths[key] = out / f"layers_vs_{sweep}.png"
            _plot(rows, config, paths[key], sweep)
        paths["plot_algorithms"] = out / "inverse_algorithms.png"
        _plot_algorithms(rows, config, paths["plot_algorithms"])
        paths = {k: p for k, p in paths.items() if p.exists()}
    if not quiet:
        print(table)
    return paths


# --------------------------------------------------------------------------------------------------------------
# the command line


def _int_at_least(low: int) -> Callable[[str], int]:
    return range_type(Range(int, low))


def _int_list(text: str) -> list:
    """A comma list of integers >= 1 (an empty text: no entries)."""
    values = [v.strip() for v in text.split(",") if v.strip()] if text else []
    parse = _int_at_least(1)
    try:
        return [parse(v) for v in values]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers >= 1, got {text!r}") from None


def _layer_list(text: str) -> list:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in LAYERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown layer(s) {', '.join(map(repr, unknown)) or repr(text)}; choose "
                                         f"from {', '.join(LAYERS)}")
    return names


_seconds = range_type(Range(float, 0))


# What --quick sets, for each option the command line did not give.
QUICK = {"batch": 2, "channels": 4, "size": 8, "sizes": [4, 8], "channel_sweep": [4], "min_reps": 2, "max_reps": 2,
         "min_time": 0.0, "rounds": 1}


def parse_args(argv=None) -> BenchConfig:
    p = ArgumentParser(prog="python -m cinc_kernels bench",
                description="Invertible layers side by side, and the CInC inverse algorithms.")
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if present)")
    p.add_argument("--backends", default=None, help="comma list (default: auto, then every available one for the "
                                                     "device except the slow float64 reference)")
    p.add_argument("--layers", default=None, type=_layer_list,
                   help=f"comma list of {', '.join(LAYERS)} (default: all)")
    p.add_argument("--dtypes", default="float32", help="comma list: float32, float64")
    # Defaults of None: --quick fills only what the command line left out.
    p.add_argument("--batch", type=_int_at_least(1), default=None, help="images per call (default 8)")
    p.add_argument("--kernel-size", type=_int_at_least(1), default=3,
                   help="k of cinc, autoregressive and finc (default 3)")
    p.add_argument("--channels", type=_int_at_least(1), default=None, help="C of the image-size sweep (default 12)")
    p.add_argument("--size", type=_int_at_least(1), default=None, help="H = W of the channel sweep (default 16)")
    p.add_argument("--sizes", type=_int_list, default=None, help="H = W of the image-size sweep (default 8,16,32,64)")
    p.add_argument("--channel-sweep", type=_int_list, default=None, help="C of the channel sweep (default 4,12,24,48)")
    p.add_argument("--min-time", type=_seconds, default=None,
                   help="seconds of timed calls per measurement, at least (over all rounds; default 0.06)")
    p.add_argument("--min-reps", type=_int_at_least(1), default=None,
                   help="timed calls per measurement, at least (over all rounds; default 6)")
    p.add_argument("--max-reps", type=_int_at_least(1), default=None, help="(default 24)")
    p.add_argument("--rounds", type=_int_at_least(1), default=None,
                   help="passes over all cases, each taking its share of the calls (default 3)")
    p.add_argument("--no-algorithms", action="store_true", help="skip the inverse-algorithms suite")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: C = 4, H = W ∈ {4, 8}, 2 reps (options given explicitly win)")
    p.add_argument("--out", default="runs/bench",
                   help="folder for the CSV, Markdown and plots (default runs/bench; the committed results are "
                        "benchmarks/results)")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch.set_num_threads (default: torch's)")
    a = p.parse_args(argv)
    try:
        device = torch.device(a.device)
    except RuntimeError:
        p.error(f"argument --device: {a.device!r} is not a device name")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: no CUDA GPU is visible to torch on this machine")
    if a.kernel_size > fn.MAX_KERNEL_SIZE:
        p.error(f"argument --kernel-size: must be in 1…{fn.MAX_KERNEL_SIZE}, got {a.kernel_size}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"argument --out: {a.out!r} is a file, not a folder")
    dtypes = []
    for name in a.dtypes.split(","):
        if not isinstance(getattr(torch, name.strip(), None), torch.dtype):
            p.error(f"argument --dtypes: unknown dtype {name!r}")
        dtypes.append(getattr(torch, name.strip()))
    full = {"batch": 8, "channels": 12, "size": 16, "sizes": [8, 16, 32, 64], "channel_sweep": [4, 12, 24, 48],
            "min_reps": 6, "max_reps": 24, "min_time": 0.06, "rounds": 3}
    given = {k: getattr(a, k) for k in full if getattr(a, k) is not None}
    v = {**full, **(QUICK if a.quick else {}), **given}
    if v["min_reps"] > v["max_reps"]:
        p.error(f"argument --min-reps: {v['min_reps']} exceeds --max-reps {v['max_reps']}")
    if a.threads:
        torch.set_num_threads(a.threads)
    config = BenchConfig(
        device=a.device, backends=a.backends.split(",") if a.backends else None,
        layers=a.layers, dtypes=dtypes, batch=v["batch"], kernel_size=a.kernel_size,
        base_channels=v["channels"], base_size=v["size"], size_sweep=v["sizes"],
        channel_sweep=v["channel_sweep"], min_reps=v["min_reps"], max_reps=v["max_reps"], min_time=v["min_time"],
        rounds=v["rounds"],
        algorithms=not a.no_algorithms, out_dir=a.out, plots=not a.no_plots, progress=not a.no_progress)
    config.argv = list(sys.argv[2:] if argv is None else argv)
    return config


def main(argv=None) -> int:
    config = parse_args(argv)
    load = harness.load_average()
    if torch.device(config.device).type == "cpu" and load and float(load) > 0.75 * (os.cpu_count() or 1):
        print(f"note: this machine is busy (load average {load} on {os.cpu_count()} cores): CPU timings will be "
              f"noisy, multi-threaded ones most (`--threads 1` is steadier)", file=sys.stderr)
    started = time.perf_counter()
    try:
        rows = run(config)
    except CorrectnessError as exc:
        print(f"CORRECTNESS CHECK FAILED, nothing timed: {exc}", file=sys.stderr)
        return 1
    print()
    paths = write_results(rows, config)
    shapes = ", ".join("x".join(map(str, s)) for s in config.shapes())
    print(f"\nMeasured on {rows[0]['device'] if rows else config.device} ({config.device}, "
          f"{torch.get_num_threads()} threads) in {time.perf_counter() - started:.0f} s: layers "
          f"{', '.join(config.resolved_layers(LAYERS))} × backends {', '.join(config.resolved_backends())} × "
          f"{', '.join(str(d).replace('torch.', '') for d in config.dtypes)} × shapes (B×C×H×W) {shapes}; "
          f"each case checked (round trip, inverse algorithms against x) before timing.")
    for kind, path in paths.items():
        print(f"  {kind:<16} {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
