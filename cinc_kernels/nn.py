"""Invertible convolution layers with one interface: ``y, logdet = layer(x)``, ``x = layer.inverse(y)``.

``logdet`` has shape ``(B,)``: ``log|det ∂y/∂x|`` per sample. ``num_parameters()`` counts free entries only (not
the masked or fixed ones). :data:`LAYERS` maps the names a benchmark or a flow uses to the classes.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as fn
from .reference import free_parameters, weight_mask

__all__ = ["CInCConv2d", "LAYERS"]


class CInCConv2d(nn.Module):
    """The CInC convolution as a layer (shared/SPEC.md §1).

    Args:
        channels: ``C``; input and output have ``C`` channels.
        kernel_size: ``k`` in 1…7 (the paper's 3).
        bias: learn a ``(C,)`` bias.
        unit_diagonal: fix the centre tap's diagonal to ones (log-determinant 0, invertible by construction).
        backend: passed to the functional ops (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``).
        init_scale: standard deviation of the off-identity initial entries (the layer starts near the identity).

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, unit_diagonal: bool = False,
                 backend: str = "auto", init_scale: float = 1e-2):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not 1 <= kernel_size <= fn.MAX_KERNEL_SIZE:
            raise ValueError(f"kernel_size must be in 1…{fn.MAX_KERNEL_SIZE}, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.unit_diagonal, self.backend = unit_diagonal, backend
        k = kernel_size
        w = init_scale * torch.randn(channels, channels, k, k)
        w[:, :, k - 1, k - 1] += torch.eye(channels)
        self.weight = nn.Parameter(w * weight_mask(channels, k, unit_diagonal, dtype=w.dtype))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def logdet(self, height: int, width: int) -> torch.Tensor:
        """``log|det|`` for one ``height × width`` image, a 0-dim tensor."""
        return fn.cinc_logdet(self.weight, height, width, unit_diagonal=self.unit_diagonal, backend=self.backend)

    def forward(self, x: torch.Tensor):
        y = fn.cinc_conv2d(x, self.weight, self.bias, unit_diagonal=self.unit_diagonal, backend=self.backend)
        return y, self.logdet(x.shape[2], x.shape[3]).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return fn.cinc_conv2d_inverse(y, self.weight, self.bias, unit_diagonal=self.unit_diagonal,
                                      backend=self.backend)

    def num_parameters(self) -> int:
        n = free_parameters(self.channels, self.kernel_size, self.unit_diagonal)
        return n + (self.channels if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
                f"unit_diagonal={self.unit_diagonal}, backend={self.backend!r}, free_parameters={self.num_parameters()}")


LAYERS: dict[str, type] = {"cinc": CInCConv2d}
