"""What the benchmark runs (:class:`BenchConfig`), which constructor keywords each layer gets, and the tolerance of
the correctness check that precedes timing."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from .. import harness
from ..backends import available_backends, get_backend

__all__ = ["CHECK_TOLERANCE", "CSV_COLUMNS", "LAYER_KWARGS", "LAYER_OPS", "BenchConfig", "CorrectnessError",
           "default_device"]

CSV_COLUMNS = harness.COLUMNS

# Round-trip tolerance of the correctness check (relative, on well-conditioned weights); generous next to the
# tests' because composite layers (Emerging, the row-by-row autoregressive solve) chain several solves.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}

# Per layer name: constructor keywords from the benchmark's kernel size k (Emerging's two 2×2 convolutions give the
# composite 3×3 receptive field of the paper, whatever k is).
LAYER_KWARGS: dict[str, Callable[[int], dict[str, Any]]] = {
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
    backends: Optional[list[str]] = None
    layers: Optional[list[str]] = None
    dtypes: list[torch.dtype] = dataclasses.field(default_factory=lambda: [torch.float32])
    batch: int = 8
    kernel_size: int = 3
    base_channels: int = 12
    base_size: int = 16
    size_sweep: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 32, 64])
    channel_sweep: list[int] = dataclasses.field(default_factory=lambda: [4, 12, 24, 48])
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
    argv: list[str] = dataclasses.field(default_factory=list)  # the command line that asked for this run

    def shapes(self) -> list[tuple[int, int, int, int]]:
        shapes = [(self.batch, self.base_channels, s, s) for s in self.size_sweep]
        shapes += [(self.batch, c, self.base_size, self.base_size) for c in self.channel_sweep]
        return list(dict.fromkeys(shapes))

    def resolved_backends(self) -> list[str]:
        if self.backends is not None:
            return list(self.backends)
        device_type = torch.device(self.device).type
        return ["auto"] + [b for b in available_backends() if b != "reference" and get_backend(b).runs_on(device_type)
                           and not (b == "triton" and device_type != "cuda")]

    def resolved_layers(self, layer_classes: dict[str, type]) -> list[str]:
        return list(self.layers) if self.layers is not None else list(layer_classes)

