"""Pictures of a run: sample grids (drawn in chunks and streamed into the PNG, so that memory does not grow with the
number of samples) and the training curve, written atomically (torchvision and matplotlib are the ``flow`` extra's;
a missing one is named)."""
from __future__ import annotations

import io
import math
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO, Optional

import torch

from .._optional import optional_import
from .checkpoint import atomic_write_bytes, atomic_writer

if TYPE_CHECKING:
    from .model import CInCFlow

__all__ = ["MAX_GRID_PIXELS", "SAMPLE_CHUNK", "grid_scale", "grid_shape", "grid_tensor", "largest_scale",
           "plot_history", "sample_batches", "save_grid", "write_grid"]


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


# PIL's default ``Image.MAX_IMAGE_PIXELS``: PIL warns that a larger image may be a decompression bomb (and refuses
# one twice as large), and image viewers give up around there too; a grid past it is of no use to anyone.
MAX_GRID_PIXELS = 89_478_485


def grid_shape(count: int, image_size: tuple[int, int], nrow: int | None = None, padding: int = 1,
               scale: int = 1) -> tuple[int, int]:
    """``(height, width)`` in pixels of the grid :func:`write_grid` lays ``count`` images of ``image_size``
    ``(H, W)`` out in (the layout of :func:`grid_tensor`)."""
    columns = min(nrow or max(1, math.ceil(math.sqrt(count))), count)
    rows = math.ceil(count / columns)
    pad = padding * scale
    return rows * (image_size[0] * scale + pad) + pad, columns * (image_size[1] * scale + pad) + pad


def largest_scale(count: int, image_size: tuple[int, int], scale: int, nrow: int | None = None,
                  padding: int = 1) -> int | None:
    """The largest pixel scale up to ``scale`` whose grid of ``count`` images stays within
    :data:`MAX_GRID_PIXELS`; ``None`` when not even scale 1 does."""
    for s in range(scale, 0, -1):
        height, width = grid_shape(count, image_size, nrow, padding, s)
        if height * width <= MAX_GRID_PIXELS:
            return s
    return None


def grid_scale(count: int, image_size: tuple[int, int], option: str) -> int:
    """The pixel scale of a grid of ``count`` samples of ``image_size``: images 64 pixels high where the grid stays
    within :data:`MAX_GRID_PIXELS`, smaller where it would not; ``ValueError`` naming ``option`` (the setting that
    chose ``count``) when not even one pixel per pixel fits."""
    scale = largest_scale(count, image_size, max(1, 64 // image_size[0]))
    if scale is None:
        most = MAX_GRID_PIXELS // ((image_size[0] + 1) * (image_size[1] + 1))
        while most > 1 and largest_scale(most, image_size, 1) is None:
            most -= 1
        raise ValueError(f"{option} {count}: one grid of {count} images of {image_size[0]}×{image_size[1]} pixels "
                         f"would be larger than {MAX_GRID_PIXELS:,} pixels, more than PIL or an image viewer opens; "
                         f"use {option} {most} or fewer")
    return scale


# Samples drawn per call of the model for a grid: memory holds this chunk and one row of the grid, whatever the
# number of samples.
SAMPLE_CHUNK = 256


def sample_batches(model: CInCFlow, count: int, temperature: float, generator: torch.Generator,
                   seconds: list[float] | None = None) -> Iterator[torch.Tensor]:
    """``count`` samples of ``model`` at ``temperature``, :data:`SAMPLE_CHUNK` at a time from ``generator`` (for
    :func:`write_grid`); each chunk's sampling time is appended to ``seconds``."""
    device = model.top_mean.device
    for start in range(0, count, SAMPLE_CHUNK):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        images = model.sample(min(SAMPLE_CHUNK, count - start), temperature, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if seconds is not None:
            seconds.append(time.perf_counter() - tic)
        yield images


def _rgb_levels(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` in ``[0, 1]`` (clamped) as ``(N, 3, H, W)`` uint8, rounded as ``torchvision.utils.save_image``
    rounds (a grey image repeated in three channels, as ``make_grid`` does)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    levels = images.detach().float().clamp(0, 1).cpu().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return levels.expand(-1, 3, -1, -1) if levels.shape[1] == 1 else levels


class _PngStream:
    """An 8-bit RGB PNG written scanline band by scanline band (the deflate stream is fed as the rows arrive), so
    that a grid never has to exist in memory as a whole."""

    def __init__(self, f: BinaryIO, height: int, width: int):
        self.f, self.width = f, width
        f.write(b"\x89PNG\r\n\x1a\n")
        # width, height, bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        self.deflate = zlib.compressobj(6)

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))

    def rows(self, pixels: torch.Tensor) -> None:
        """Append ``(h, width, 3)`` uint8 rows."""
        if pixels.shape[0] == 0:
            return
        lines = torch.zeros(pixels.shape[0], 1 + 3 * self.width, dtype=torch.uint8)  # filter byte 0: none
        lines[:, 1:] = pixels.reshape(pixels.shape[0], -1)
        data = self.deflate.compress(lines.numpy().tobytes())
        if data:
            self._chunk(b"IDAT", data)

    def close(self) -> None:
        self._chunk(b"IDAT", self.deflate.flush())
        self._chunk(b"IEND", b"")


def write_grid(batches: Iterable[torch.Tensor], count: int, path: str, nrow: int | None = None,
               padding: int = 1, scale: int = 1) -> None:
    """Write ``count`` images that arrive in ``batches`` of ``(N_i, C, H, W)`` in ``[0, 1]`` (clamped) as one PNG
    grid laid out as :func:`grid_tensor` lays them out (``nrow`` images a row, default square; white padding; each
    pixel ``scale × scale``), atomically. Only one row of the grid is held at a time, so memory grows with the
    grid's width, not with ``count``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    columns = min(nrow or max(1, math.ceil(math.sqrt(count))), count)
    pad = padding * scale
    row: list[torch.Tensor] = []
    done = 0
    png: _PngStream | None = None
    with atomic_writer(path) as f:
        for batch in batches:
            for image in _rgb_levels(batch):
                if png is None:
                    height, width = grid_shape(count, (image.shape[1], image.shape[2]), nrow, padding, scale)
                    png = _PngStream(f, height, width)
                    png.rows(torch.full((pad, width, 3), 255, dtype=torch.uint8))
                if done + len(row) == count:
                    raise ValueError(f"more than the {count} images announced")
                row.append(image)
                if len(row) == columns or done + len(row) == count:
                    png.rows(_grid_row(row, png.width, pad, scale))
                    done, row = done + len(row), []
        if png is None or done != count:
            raise ValueError(f"{done} images arrived, {count} were announced")
        png.close()


def _grid_row(images: list[torch.Tensor], width: int, pad: int, scale: int) -> torch.Tensor:
    """One row of the grid, ``(H·scale + pad, width, 3)`` uint8: the images side by side on white, the padding
    below them (the padding above is the previous row's)."""
    height = images[0].shape[1] * scale
    band = torch.full((height + pad, width, 3), 255, dtype=torch.uint8)
    x = pad
    for image in images:
        up = image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).permute(1, 2, 0)
        band[:height, x:x + up.shape[1]] = up
        x += up.shape[1] + pad
    return band


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, padding: int = 1,
              scale: int = 1) -> None:
    """Write ``(N, C, H, W)`` images in ``[0, 1]`` (clamped) as one PNG grid, ``nrow`` images a row (default:
    square), each pixel ``scale × scale``; written atomically (:func:`write_grid`)."""
    write_grid([images], images.shape[0], path, nrow, padding, scale)


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
