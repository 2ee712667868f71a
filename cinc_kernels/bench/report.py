"""What a run writes: long-format CSV rows (the harness's schema), a Markdown table and PNG plots."""
from __future__ import annotations

import pathlib
from typing import Any

from .. import harness
from .._optional import optional_import
from .config import LAYER_OPS, BenchConfig

__all__ = ["markdown_tables", "write_results"]


Row = dict[str, Any]


def _fmt_ms(value: str | float) -> str:
    ms = float(value)
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_ratio(v: float) -> str:
    return f"{v:.2g}×" if v < 10 else f"{v:.0f}×"


def markdown_tables(rows: list[Row]) -> str:
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
        for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in algo_rows):
            by = {r["provider"]: float(r["median_ms"]) for r in algo_rows
                  if (r["shape"], r["dtype"]) == (shape, dtype)}
            cells = []
            for label in labels:
                if label not in by:
                    cells.append("")
                elif label == ours:
                    cells.append(_fmt_ms(by[label]))
                else:
                    cells.append(f"{_fmt_ms(by[label])} ({_fmt_ratio(by[label] / max(by[ours], 1e-12))})")
            lines.append(f"| {shape} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log_axes(ax: Any, xticks: list[int]) -> None:
    """Log-log axes whose x ticks are the measured sizes, written as plain numbers."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if xticks:
        ax.set_xticks(xticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plot(rows: list[Row], config: BenchConfig, path: pathlib.Path, sweep: str) -> None:
    matplotlib = optional_import("matplotlib", "bench", "the benchmark plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_rows = [r for r in rows if r["suite"] == "layers"]
    if not layer_rows:
        return
    backend, dtype = layer_rows[0]["provider"], layer_rows[0]["dtype"]
    def pick(r: Row) -> bool:
        """Whether row ``r`` belongs to the sweep."""
        if sweep == "size":
            return int(r["C"]) == config.base_channels and int(r["H"]) == int(r["W"])
        return int(r["H"]) == config.base_size and int(r["W"]) == config.base_size

    if sweep == "size":
        xkey, xlabel = "H", f"image size H = W (C = {config.base_channels})"
    else:
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


def _plot_algorithms(rows: list[Row], config: BenchConfig, path: pathlib.Path) -> None:
    matplotlib = optional_import("matplotlib", "bench", "the benchmark plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algo_rows = [r for r in rows if r["suite"] == "inverse_algorithms"]
    if not algo_rows:
        return
    dtype = algo_rows[0]["dtype"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    # (swept column, the column held at its base value, that value, the axis label)
    sweeps = (("H", "C", config.base_channels, f"image size H = W (C = {config.base_channels})"),
              ("C", "H", config.base_size, f"channels C (H = W = {config.base_size})"))
    for ax, (xkey, held, base, xlabel) in zip(axes[0], sweeps):

        def pick(r: Row, held: str = held, base: int = base) -> bool:
            return int(r[held]) == base

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


def write_results(rows: list[Row], config: BenchConfig, quiet: bool = False) -> dict[str, pathlib.Path]:
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
              f"Command: `python -m cinc_kernels bench {' '.join(config.argv)}`.\n\n")
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
