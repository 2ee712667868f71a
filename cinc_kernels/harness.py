"""The benchmark harness: one timer, one CSV schema and one machine record for every benchmark of this repository
(``python -m cinc_kernels bench`` and the programs in ``benchmarks/``).

* :func:`measure` times one callable (CUDA events on a GPU, ``perf_counter`` on the CPU) and
  :func:`measure_interleaved` several side by side, one call of each per round, so that load from elsewhere on a
  shared machine hits all of them alike; :func:`quantiles` gives the median and the 20th/80th percentiles.
* :data:`COLUMNS` is the long-format CSV schema, one row per measurement; :func:`record` fills a row's timing and
  machine fields, :func:`append_csv` appends rows (history) and :func:`write_markdown` replaces a report.
* :func:`machine` is what every row says about where and when it was measured.

Benchmarks only time public functions; correctness is checked before anything is timed.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.metadata
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

Device = Union[torch.device, str]
Row = dict[str, Any]  # one CSV row of COLUMNS

__all__ = ["COLUMNS", "num_threads", "machine", "load_average", "measure", "measure_interleaved", "quantiles", "record",
           "append_csv", "write_markdown", "describe_machine"]

# One row per measurement. ``provider`` is what was timed (a backend, ATen, a baseline algorithm, a layer's
# backend); ``mode`` says how (e.g. ``forward``, ``fwd+bwd``, ``no_grad``); fields a benchmark has no use for stay
# empty. ``ratio`` is the median over the benchmark's stated baseline (see its report).
COLUMNS = [
    "benchmark", "suite", "op", "layer", "provider", "mode", "B", "C", "H", "W", "k", "shape", "dtype",
    "median_ms", "p20_ms", "p80_ms", "reps", "ratio", "free_params", "rel_error", "memory_mb", "memory_kind",
    "device", "machine", "threads", "load_avg", "torch", "cuda", "triton", "python", "cinc_kernels", "date",
]

MACHINE_FIELDS = ("device", "machine", "threads", "load_avg", "torch", "cuda", "triton", "python", "cinc_kernels",
                  "date")


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_average() -> str:
    """The 1-minute load average when the OS has one (a busy machine makes CPU timings noisy), else ``""``."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: Device = "cpu") -> Row:
    """The :data:`MACHINE_FIELDS` of a row measured now on ``device``: its name (CPU model or GPU), the host's
    architecture and core count, torch's thread count, the load average, the versions and the UTC date."""
    device = torch.device(device)
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = ""
    from . import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "load_avg": load_average(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": triton,
        "python": platform.python_version(),
        "cinc_kernels": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def describe_machine(m: Row) -> str:
    """One line for a report's header."""
    return (f"{m['device']} ({m['machine']}), {m['threads']} threads, load average {m['load_avg'] or '?'}; "
            f"torch {m['torch']}" + (f" (CUDA {m['cuda']})" if m["cuda"] else "")
            + (f", triton {m['triton']}" if m["triton"] else "") + f", python {m['python']}, "
            f"cinc_kernels {m['cinc_kernels']}; {m['date']}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn: Callable[[], object], device: Device = "cpu", *, warmup: int = 1, min_reps: int = 5,
            max_reps: int = 30, min_time: float = 0.1) -> list[float]:
    """Milliseconds per call of ``fn()``: at least ``min_reps`` calls and ``min_time`` seconds, at most
    ``max_reps`` calls, after ``warmup`` untimed ones."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max(1, min_reps) or (time.perf_counter() - started < min_time and len(times) < max_reps):
        times.append(_one_call_ms(fn, device))
    return times


def measure_interleaved(fns: Mapping[Any, Callable[[], object]], device: Device = "cpu", *, rounds: int = 30,
                        warmup: int = 3) -> dict[Any, list[float]]:
    """``{name: [ms, …]}``: ``rounds`` rounds of one call of every ``fns[name]()`` in turn, after ``warmup``
    untimed rounds. Side by side in one process, the ratios between them survive a noisy machine better than
    separate runs."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_one_call_ms(fn, device))
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of a list of times."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def record(benchmark: str, times: Optional[list[float]], machine_fields: Row, *,
           shape: Optional[Sequence[int]] = None, ratio: Optional[float] = None, **fields: Any) -> Row:
    """A row of :data:`COLUMNS`: ``fields`` (``op``, ``provider``, ``dtype``, …), the shape ``(B, C, H, W)``, the
    timing of ``times`` (ms) and the machine record."""
    row: Row = {key: "" for key in COLUMNS}
    row["benchmark"] = benchmark
    if shape is not None:
        row.update(zip(("B", "C", "H", "W"), shape))
        row["shape"] = "x".join(map(str, shape))
    if times:
        median, p20, p80 = quantiles(times)
        row.update(median_ms=f"{median:.6g}", p20_ms=f"{p20:.6g}", p80_ms=f"{p80:.6g}", reps=len(times))
    if ratio is not None:
        row["ratio"] = f"{ratio:.4g}"
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"record: fields {sorted(unknown)} are not columns of the schema")
    row.update({key: ("" if value is None else value) for key, value in fields.items()})
    row.update({key: machine_fields[key] for key in MACHINE_FIELDS})
    return row


def append_csv(path: Union[str, pathlib.Path], rows: Iterable[Row]) -> pathlib.Path:
    """Append ``rows`` to the CSV at ``path`` (header on first write). A file written with other columns is left
    alone: the rows go to a dated file beside it instead. Returns the path written."""
    rows = list(rows)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            stamp = (rows[0]["date"] if rows else "empty").replace(":", "")
            path = path.with_name(f"{path.stem}-{stamp}{path.suffix}")
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows({key: r.get(key, "") for key in COLUMNS} for r in rows)
    return path


def write_markdown(path: Union[str, pathlib.Path], text: str) -> pathlib.Path:
    """Replace the report at ``path`` (the latest run's; the CSV keeps the history)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
    return path
