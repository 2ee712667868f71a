"""Image sizes that stay sizes, not constants, when a program is captured.

``torch.export`` and ``torch.compile`` hand a layer its image sizes as ``SymInt``; ``torch.jit.trace`` hands them out
as 0-dim tensors (``x.shape[2]`` is traced). The log-determinant ``H·W·Σ log|L[c, c]|`` (docs/spec.md §1) multiplies
by ``H·W``, and ``float(H)`` or a Python-int argument would bake the traced size into the program, which then
returns a wrong log-determinant at every other size. The helpers here keep the product symbolic in all three.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["pixel_count", "scaled_by_pixels", "traced_sizes", "tracing"]

Size = int | torch.SymInt | torch.Tensor


def pixel_count(height: Size, width: Size) -> float | torch.SymFloat | torch.Tensor:
    """``H·W``: a float for ints (the int64 product of two huge sizes would wrap once it meets a tensor), a
    ``SymFloat`` under export and compile, and a traced integer tensor under ``torch.jit.trace``."""
    if type(height) is int and type(width) is int:  # the common case, on every call: no torch.sym_float dispatch
        return float(height) * float(width)
    if isinstance(height, torch.Tensor) or isinstance(width, torch.Tensor):
        return torch.as_tensor(height) * torch.as_tensor(width)
    return torch.sym_float(height) * torch.sym_float(width)


def tracing() -> bool:
    """Whether ``torch.jit.trace`` is recording (``torch.jit.is_tracing``, typed)."""
    return torch._C._get_tracing_state() is not None


def traced_sizes(height: object, width: object) -> bool:
    """Whether ``height``/``width`` are sizes that ``torch.jit.trace`` is recording (0-dim tensors while tracing)."""
    return tracing() and (isinstance(height, torch.Tensor) or isinstance(width, torch.Tensor))


def scaled_by_pixels(per_pixel: Callable[[], torch.Tensor], height: Size, width: Size) -> torch.Tensor:
    """``H·W · per_pixel()`` where ``per_pixel()`` is the log-determinant of a one-pixel image, as a traced program:
    0 for an image without pixels, whatever ``per_pixel()`` is (``-inf`` for a singular weight)."""
    one_pixel = per_pixel()
    pixels = pixel_count(height, width)
    return torch.where(torch.as_tensor(pixels) == 0, torch.zeros_like(one_pixel), one_pixel * pixels)
