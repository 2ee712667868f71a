"""The CInC forward and log-determinant (docs/spec.md §1) in ATen's own operators, differentiable by autograd.

One implementation for every place that needs them: the ``_aten`` backend, which ``backend="auto"`` prefers for
the forward and the log-determinant (:mod:`cinc_kernels.backends`); the ``torch`` backend's ``forward`` and
``logdet`` ops (:mod:`cinc_kernels.torch_backend`); and the derivative formulas, whose ``dM x`` and ``dMᵀ u`` are
these convolutions with another tap set (:mod:`cinc_kernels.registration`).

Autograd differentiates the ATen operators directly, so a training step through them is the convolution plus a
selection by a cached mask (:func:`cinc_kernels.masks.masked_weight`) and a few small ops for the log-determinant,
without a custom op's Python backward; ``benchmarks/bench_cpu_ops.py`` (the training-step part) measures it.
"""
from __future__ import annotations

from typing import Optional, Union, cast

import torch
import torch.nn.functional as F

from ._symbolic import pixel_count
from .masks import centre_diagonal, masked_weight

__all__ = ["anticausal_conv", "causal_conv", "forward", "logdet", "times_pixel_count"]

Size = Union[int, torch.SymInt]  # an image size; symbolic while torch.compile or torch.export traces


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_taps weight · x (+ bias)`` with the CInC padding, ``k − 1`` on the top and left only, for an already
    masked ``weight`` (any tap set: ``M x``, or ``dM x`` in the tangents). ``(B, C, H, W) -> (B, C, H, W)``.

    ATen's convolution refuses an image without pixels or channels; such an image gives the equally empty result,
    still attached to the graph of ``weight`` and ``bias`` (docs/spec.md §2: empty in, empty out)."""
    if x.numel() == 0:
        out = x + 0 * weight.sum()
        return out if bias is None else out + 0 * bias.sum()
    k = weight.shape[-1]
    return F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), weight, bias)


def anticausal_conv(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`causal_conv` (without bias): bottom-right padding, kernel flipped, channel axes
    swapped. ``(B, C, H, W) -> (B, C, H, W)``."""
    if g.numel() == 0:
        return g + 0 * weight.sum()
    k = weight.shape[-1]
    return F.conv2d(F.pad(g, (0, k - 1, 0, k - 1)), weight.transpose(0, 1).flip(2, 3))


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            unit_diagonal: bool) -> torch.Tensor:
    """``y = M x + bias``: :func:`causal_conv` on the masked weight (oneDNN on the CPU, cuDNN on CUDA)."""
    return causal_conv(x, masked_weight(weight, unit_diagonal), bias)


def times_pixel_count(t: torch.Tensor, height: Size, width: Size) -> torch.Tensor:
    """``t · H·W`` with ``H·W`` from :func:`cinc_kernels._symbolic.pixel_count`: a float (a product of two Python
    ints would overflow int64 once it meets a tensor for huge sizes) that stays symbolic while a program is traced."""
    return cast(torch.Tensor, t * pixel_count(height, width))


def logdet(weight: torch.Tensor, height: Size, width: Size, unit_diagonal: bool) -> torch.Tensor:
    """``H·W·Σ_c log|L[c, c]|``, a 0-dim tensor of ``weight``'s dtype: 0 with ``unit_diagonal``, ``-inf`` when the
    centre tap has a zero on its diagonal. Only the diagonal is read, so a NaN in a masked entry has no effect."""
    if unit_diagonal:
        return weight.new_zeros(())
    diagonal = centre_diagonal(weight)
    if height == 0 or width == 0:
        # The map of an image without pixels is the empty one: log-determinant 0, also for a singular weight
        # (H·W · -inf would be NaN). Still attached to the weight's graph.
        return 0 * diagonal.sum()
    return times_pixel_count(diagonal.abs().log().sum(), height, width)
