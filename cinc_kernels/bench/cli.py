"""``python -m cinc_kernels bench``: options, ``--quick``, and the summary it prints."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from .. import harness
from .._checks import Range
from .._cli import ArgumentParser, range_type
from ..contract import MAX_KERNEL_SIZE
from ..nn import LAYERS
from .config import BenchConfig, CorrectnessError, default_device
from .report import write_results
from .runner import run

__all__ = ["QUICK", "main", "parse_args"]


def _int_at_least(low: int) -> Callable[[str], int]:
    return range_type(Range(int, low))


def _int_list(text: str) -> list[int]:
    """A comma list of integers >= 1 (an empty text: no entries)."""
    values = [v.strip() for v in text.split(",") if v.strip()] if text else []
    parse = _int_at_least(1)
    try:
        return [parse(v) for v in values]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers >= 1, got {text!r}") from None


def _layer_list(text: str) -> list[str]:
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


def parse_args(argv: Optional[Sequence[str]] = None) -> BenchConfig:
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
    if a.kernel_size > MAX_KERNEL_SIZE:
        p.error(f"argument --kernel-size: must be in 1…{MAX_KERNEL_SIZE}, got {a.kernel_size}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"argument --out: {a.out!r} is a file, not a folder")
    dtypes = []
    for name in a.dtypes.split(","):
        if not isinstance(getattr(torch, name.strip(), None), torch.dtype):
            p.error(f"argument --dtypes: unknown dtype {name!r}")
        dtypes.append(getattr(torch, name.strip()))
    d = BenchConfig(device="cpu")
    full = {"batch": d.batch, "channels": d.base_channels, "size": d.base_size, "sizes": d.size_sweep,
            "channel_sweep": d.channel_sweep, "min_reps": d.min_reps, "max_reps": d.max_reps, "min_time": d.min_time,
            "rounds": d.rounds}
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
        algorithms=not a.no_algorithms, out_dir=a.out, plots=not a.no_plots, progress=not a.no_progress,
        argv=list(sys.argv[2:] if argv is None else argv))
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
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

