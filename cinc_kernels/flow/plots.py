"""Pictures of a run: sample grids and the training curve, written atomically (torchvision and matplotlib are the
``flow`` extra's; a missing one is named)."""
from __future__ import annotations

import io
import math
from typing import Optional

import torch

from .._optional import optional_import
from .checkpoint import atomic_write_bytes

__all__ = ["grid_tensor", "plot_history", "save_grid"]


def grid_tensor(images: torch.Tensor, nrow: Optional[int], padding: int, scale: int) -> torch.Tensor:
    """``(N, C, H, W)`` images in ``[0, 1]`` (clamped) tiled into one ``(C, H', W')`` image, each pixel
    ``scale × scale``, ``nrow`` images a row (default: square)."""
    make_grid = optional_import("torchvision.utils", "flow", "saving sample grids").make_grid

    images = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid: torch.Tensor = make_grid(images, nrow=nrow, padding=padding * scale, pad_value=1.0)
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None, padding: int = 1,
              scale: int = 1) -> None:
    """Write ``(N, C, H, W)`` images in ``[0, 1]`` (clamped) as one PNG grid, ``nrow`` images a row (default:
    square), each pixel ``scale × scale``; written atomically."""
    save_image = optional_import("torchvision.utils", "flow", "saving sample grids").save_image

    buffer = io.BytesIO()
    save_image(grid_tensor(images, nrow, padding, scale), buffer, format="png", padding=0)
    atomic_write_bytes(buffer.getvalue(), path)


def plot_history(history: dict[str, list[float]], path: str, title: str) -> None:
    """The training bits/dim (raw and a running mean) and the test bits/dim against the step, as a PNG."""
    matplotlib = optional_import("matplotlib", "flow", "the training-curve plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, bpd = history["train_step"], history["train_bpd"]
    if steps:
        ax.plot(steps, bpd, color="tab:blue", alpha=0.25, linewidth=0.8)
        k = max(1, len(bpd) // 50)
        smooth = [sum(bpd[max(0, i - k + 1):i + 1]) / len(bpd[max(0, i - k + 1):i + 1]) for i in range(len(bpd))]
        ax.plot(steps, smooth, color="tab:blue", label="train (running mean)")
    if history["test_step"]:
        ax.plot(history["test_step"], history["test_bpd"], "o-", color="tab:red", label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.set_title(title)
    finite = [b for b in bpd[len(bpd) // 10:] + history["test_bpd"] if math.isfinite(b)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)
