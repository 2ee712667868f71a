"""One benchmark run: every case checked for correctness, then timed in rounds."""
from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, Optional

import torch

from .. import functional as fn
from .. import harness
from .._optional import optional_import
from ..backends import available_backends
from ..nn import LAYERS
from ..testing import rel_error
from .baselines import inverse_algorithms
from .config import CHECK_TOLERANCE, LAYER_KWARGS, BenchConfig, CorrectnessError

__all__ = ["run"]


Row = dict[str, Any]
Shape = tuple[int, int, int, int]
Fields = tuple[str, str, str, str, Shape, torch.dtype]  # suite, layer, provider, op, shape, dtype of a row


def _memory_mb(fn_: Callable[[], object], device: torch.device | str) -> tuple[float, str]:
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
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
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


def _fwd_bwd(layer: Any, x: torch.Tensor) -> None:
    """One training step's worth of work: forward with the log-determinant, then backward."""
    layer.zero_grad(set_to_none=True)
    out, logdet = layer(x.detach().requires_grad_())
    (0.5 * out.square().mean() - logdet.mean()).backward()


def _make_layer(name: str, cls: type, channels: int, backend: str, k: int, dtype: torch.dtype,
                device: torch.device, seed: int) -> Any:
    torch.manual_seed(seed)
    kwargs = LAYER_KWARGS[name](k) if name in LAYER_KWARGS else {}
    layer = cls(channels, backend=backend, **kwargs)
    _perturb_(layer, torch.Generator().manual_seed(seed + 1))
    return layer.to(device=device, dtype=dtype)


def run(config: BenchConfig, layer_classes: Optional[dict[str, type]] = None) -> list[Row]:
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

    def row(suite: str, layer: str, provider: str, op: str, shape: Shape, dtype: torch.dtype, times: list[float],
            **extra: Any) -> Row:
        return harness.record("layers", times, machine, shape=shape, suite=suite, layer=layer, provider=provider,
                              op=op, mode="fwd+bwd" if op == "fwd+bwd" else "no_grad", k=k,
                              dtype=str(dtype).replace("torch.", ""), **extra)

    n_algorithms = len(backends) + 2
    total = len(cases) + len(algo_cases) + config.rounds * (4 * len(cases) + len(algo_cases) * n_algorithms)
    bar = tqdm(total=total, desc="bench", disable=None if config.progress else True, file=sys.stderr, leave=False)
    try:
        # 1. correctness of everything, before any timing
        prepared: list[tuple[str, str, torch.dtype, tuple[int, int, int, int], Any, torch.Tensor, torch.Tensor,
                             float]] = []
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

        algorithms: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], torch.dtype, tuple[int, int, int, int],
                               torch.Tensor, float]] = []
        for dtype, shape in algo_cases:
            bar.set_postfix_str(f"check inverse algorithms {'x'.join(map(str, shape))}")
            cinc = _make_layer("cinc", LAYERS["cinc"], shape[1], backends[0], k, dtype, device, config.seed)
            w, b = cinc.weight.detach(), cinc.bias.detach()
            x = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed + 3),
                            dtype=torch.float64).to(device=device, dtype=dtype)
            y = fn.cinc_conv2d(x, w, b, backend=backends[0])
            impls = inverse_algorithms(w, b, backends)
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
        # (row fields, extra columns), the call, whether it runs under no_grad
        jobs: list[tuple[tuple[Fields, dict[str, Any]], Callable[[], object], bool]] = []
        for name, backend, dtype, shape, layer, x, y, err in prepared:
            H, W = shape[2], shape[3]
            common: dict[str, Any] = {"free_params": layer.num_parameters(), "rel_error": f"{err:.3g}"}
            calls: dict[str, Callable[[], object]] = {
                "forward": functools.partial(layer, x), "inverse": functools.partial(layer.inverse, y),
                "logdet": functools.partial(layer.logdet, H, W), "fwd+bwd": functools.partial(_fwd_bwd, layer, x)}
            for op, call in calls.items():
                extra = dict(common)
                if op == "fwd+bwd" or device.type == "cuda":
                    with torch.set_grad_enabled(op == "fwd+bwd"):
                        mem, extra["memory_kind"] = _memory_mb(call, device)
                    extra["memory_mb"] = f"{mem:.3f}"
                jobs.append(((("layers", name, backend, op, shape, dtype), extra), call, op != "fwd+bwd"))
        for label, impl, dtype, shape, y, err in algorithms:
            jobs.append(((("inverse_algorithms", "cinc", label, "inverse", shape, dtype), {"rel_error": f"{err:.3g}"}),
                         functools.partial(impl, y), True))
        rounds = max(1, config.rounds)
        bar.total = bar.n + rounds * len(jobs)
        bar.refresh()
        times: list[list[float]] = [[] for _ in jobs]
        for r in range(rounds):
            for n, ((fields, _), call, no_grad) in enumerate(jobs):
                bar.set_postfix_str(f"time {fields[1]}/{fields[2]} {fields[3]} {'x'.join(map(str, fields[4]))}")
                with torch.set_grad_enabled(not no_grad):
                    times[n] += harness.measure(call, device, warmup=config.warmup if r == 0 else 0,
                                                min_reps=math.ceil(config.min_reps / rounds),
                                                max_reps=math.ceil(config.max_reps / rounds),
                                                min_time=config.min_time / rounds)
                bar.update()
        rows = [row(*fields, t, **extra) for ((fields, extra), _, _), t in zip(jobs, times)]
    finally:
        bar.close()
    return rows
