"""The CInC mask and the free-parameter count (docs/spec.md §1), for the production paths.

The backward formulas, the ATen forward, the layers, the conditioning tools and the benchmark mask weights with
these. :mod:`cinc_kernels.reference` deliberately builds its own mask instead, so that a masking bug here cannot agree
with itself in the tests that compare the two.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["centre_diagonal", "centre_tap", "free_entries", "free_parameters", "masked_weight", "weight_mask"]


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
    keep, fixed = _mask_parts(weight.shape[0], weight.shape[-1], unit_diagonal, weight.dtype, weight.device)
    return torch.where(keep, weight, fixed)


def free_entries(t: torch.Tensor, unit_diagonal: bool = False) -> torch.Tensor:
    """``t`` (a tangent or gradient of the weight) on the free entries, exactly 0 on the masked ones and, with
    ``unit_diagonal``, on the fixed diagonal; selected, so a NaN in such an entry does not leak. ``(C, C, k, k)``."""
    keep, _ = _mask_parts(t.shape[0], t.shape[-1], unit_diagonal, t.dtype, t.device)
    zero = _cached(("zero", t.dtype, t.device), lambda: torch.zeros((), dtype=t.dtype, device=t.device))
    return torch.where(keep, t, zero)


def centre_diagonal(weight: torch.Tensor) -> torch.Tensor:
    """``L[c, c]`` for every ``c``: the centre tap's diagonal, ``(C,)``, a differentiable selection of ``weight``
    (one ``take``, whose backward is one scatter)."""
    C, k, device = weight.shape[0], weight.shape[-1], weight.device
    index = _cached(("centre", C, k, device),
                    lambda: torch.arange(C, device=device) * ((C + 1) * k * k) + (k * k - 1))
    return torch.take(weight, index)


def _mask_parts(C: int, k: int, unit_diagonal: bool, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, fixed)``: ``masked = where(keep, weight, fixed)``, ``fixed`` the unit diagonal or 0."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        keep = weight_mask(C, k, unit_diagonal, dtype=torch.bool, device=device)
        fixed = torch.zeros((), dtype=dtype, device=device)
        if unit_diagonal:
            eye = torch.eye(C, dtype=dtype, device=device)[:, :, None, None]
            fixed = F.pad(eye, (k - 1, 0, k - 1, 0))
        return keep, fixed

    parts: tuple[torch.Tensor, torch.Tensor] = _cached(("mask", C, k, unit_diagonal, dtype, device), build)
    return parts


# Masks and indices by (what, sizes, dtype, device). Building one is several small ops, which would cost a training
# step as much as using it; each is built once instead. The keys are few: one per layer shape, dtype and device.
_CACHE: dict[tuple[Any, ...], Any] = {}


def _cached(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()``, once per ``key`` in plain eager mode. Under a transform or a trace (``torch.func``,
    ``torch.compile``, a fake-tensor or proxy mode) it is built afresh every time, so that no tensor of a transform
    level or a trace lands in the cache; cached tensors are made outside inference mode, so that autograd may save
    them later."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return build()
    value = _CACHE.get(key)
    if value is None:
        with torch.inference_mode(False):
            value = _CACHE[key] = build()
    return value


def centre_tap(weight: torch.Tensor, unit_diagonal: bool = False) -> torch.Tensor:
    """``L = Wm[:, :, k-1, k-1]``, the lower-triangular ``(C, C)`` block on the diagonal of ``M``."""
    return masked_weight(weight, unit_diagonal)[:, :, -1, -1]


def free_parameters(channels: int, kernel_size: int, unit_diagonal: bool) -> int:
    """``k²C² − C(C−1)/2`` (minus ``C`` with a unit diagonal)."""
    n = kernel_size**2 * channels**2 - channels * (channels - 1) // 2
    return n - channels if unit_diagonal else n
