"""The CInC mask and the free-parameter count (docs/spec.md §1), for the production paths.

The backward formulas, the ATen forward, the layers, the conditioning tools and the benchmark mask weights with
these. :mod:`cinc_kernels.reference` deliberately builds its own mask instead, so that a masking bug here cannot agree
with itself in the tests that compare the two.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["weight_mask", "masked_weight", "centre_tap", "free_parameters"]


def weight_mask(channels: int, kernel_size: int, unit_diagonal: bool = False, *, dtype: torch.dtype = torch.float64,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """1 where ``weight`` is free, 0 where the mask zeroes it (above the centre tap's diagonal; and on it with
    ``unit_diagonal``). Shape ``(C, C, k, k)``."""
    C, k = channels, kernel_size
    keep = torch.ones(C, C, k, k, dtype=dtype, device=device)
    keep[:, :, k - 1, k - 1] = torch.ones(C, C, dtype=dtype, device=device).tril(-1 if unit_diagonal else 0)
    return keep


def masked_weight(weight: torch.Tensor, unit_diagonal: bool = False) -> torch.Tensor:
    """``Wm``: ``weight`` with the centre tap ``[:, :, k-1, k-1]`` lower triangular (unit diagonal if asked).

    The mask selects (``torch.where``) rather than multiplies, so a NaN or Inf in a masked entry has no effect.
    Differentiable: masked entries get exactly zero gradient. Shape ``(C, C, k, k)``, ``weight``'s dtype.
    """
    C, k = weight.shape[0], weight.shape[-1]
    keep = weight_mask(C, k, unit_diagonal, dtype=torch.bool, device=weight.device)
    fixed = torch.zeros((), dtype=weight.dtype, device=weight.device)
    if unit_diagonal:
        eye = torch.eye(C, dtype=weight.dtype, device=weight.device)[:, :, None, None]
        fixed = F.pad(eye, (k - 1, 0, k - 1, 0))
    return torch.where(keep, weight, fixed)


def centre_tap(weight: torch.Tensor, unit_diagonal: bool = False) -> torch.Tensor:
    """``L = Wm[:, :, k-1, k-1]``, the lower-triangular ``(C, C)`` block on the diagonal of ``M``."""
    return masked_weight(weight, unit_diagonal)[:, :, -1, -1]


def free_parameters(channels: int, kernel_size: int, unit_diagonal: bool) -> int:
    """``k²C² − C(C−1)/2`` (minus ``C`` with a unit diagonal)."""
    n = kernel_size**2 * channels**2 - channels * (channels - 1) // 2
    return n - channels if unit_diagonal else n
