"""Invertible convolution layers with one interface: ``y, logdet = layer(x)``, ``x = layer.inverse(y)``.

``logdet`` has shape ``(B,)``: ``log|det ∂y/∂x|`` per sample. ``num_parameters()`` counts free entries only (not
the masked or fixed ones). :data:`LAYERS` maps the names a benchmark or a flow uses to the classes.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import conditioning
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
        parametrization: ``"none"`` (``weight`` is free) or ``"contractive"``: ``weight`` is
            :func:`cinc_kernels.conditioning.contractive_weight` of a free parameter (registered with
            ``torch.nn.utils.parametrize``; the free one is ``parametrizations.weight.original``), which keeps
            ``Σ_t ‖L⁻¹W_t‖₂ ≤ max_contraction`` so that ``‖M⁻¹‖₂ ≤ ‖L⁻¹‖₂ / (1 − max_contraction)`` at every image
            size. Like every parametrised module it is saved through ``state_dict()``, not by pickling the module.
        max_contraction: ``γ`` in ``(0, 1)`` of the contractive parametrisation.
        check_finite: after each :meth:`inverse`, check the result for inf/NaN and warn once
            (:class:`~cinc_kernels.conditioning.NonFiniteInverseWarning`, naming the layer). The check synchronises
            a GPU stream; switch it off (here or by setting the attribute) on hot paths. Skipped under
            ``torch.compile``.

    Attributes:
        name: how warnings refer to the layer (a container may set it, e.g. ``"level1.step3.conv"``).

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, unit_diagonal: bool = False,
                 backend: str = "auto", init_scale: float = 1e-2, *, parametrization: str = "none",
                 max_contraction: float = conditioning.DEFAULT_MAX_CONTRACTION, check_finite: bool = True):
        super().__init__()
        if parametrization not in ("none", "contractive"):
            raise ValueError(f"parametrization must be 'none' or 'contractive', got {parametrization!r}")
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
        self.parametrization = parametrization
        if parametrization == "contractive":
            parametrize.register_parametrization(
                self, "weight", conditioning.ContractiveTaps(unit_diagonal, max_contraction))
        self.check_finite = check_finite
        self.name: Optional[str] = None
        self._warned_non_finite = False

    def logdet(self, height: int, width: int) -> torch.Tensor:
        """``log|det|`` for one ``height × width`` image, a 0-dim tensor."""
        return fn.cinc_logdet(self.weight, height, width, unit_diagonal=self.unit_diagonal, backend=self.backend)

    def forward(self, x: torch.Tensor):
        weight = self.weight  # read once: with a parametrisation every read recomputes it
        y = fn.cinc_conv2d(x, weight, self.bias, unit_diagonal=self.unit_diagonal, backend=self.backend)
        logdet = fn.cinc_logdet(weight, x.shape[2], x.shape[3], unit_diagonal=self.unit_diagonal,
                                backend=self.backend)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor, *, accumulate: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x = M⁻¹(y − bias)``; ``accumulate=torch.float64`` solves in float64 (see
        :func:`cinc_kernels.cinc_conv2d_inverse`)."""
        x = fn.cinc_conv2d_inverse(y, self.weight, self.bias, unit_diagonal=self.unit_diagonal,
                                   backend=self.backend, accumulate=accumulate)
        if self.check_finite and not self._warned_non_finite and not torch.compiler.is_compiling():
            self._check_finite(x, y)
        return x

    def _check_finite(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # One synchronisation; a non-finite input is the caller's problem, not this layer's conditioning.
        if not bool(torch.isfinite(y).all() & ~torch.isfinite(x).all()):
            return
        self._warned_non_finite = True
        H, W = y.shape[-2:]
        warnings.warn(
            f"{self.name or 'CInCConv2d(' + self.extra_repr() + ')'}: the inverse of a {H}x{W} image returned "
            f"inf/NaN. The map is probably ill-conditioned at this size (check layer.inverse_gain({H}, {W}) "
            "against 1/eps of the dtype); invert in float64 (inverse(..., accumulate=torch.float64) if only the "
            "solve overflows), or train with parametrization='contractive'. Warned once per layer; silence with "
            "check_finite=False.",
            conditioning.NonFiniteInverseWarning, stacklevel=3)

    def inverse_gain(self, height: int, width: int, **kwargs) -> float:
        """Estimate of ``‖M⁻¹‖₂`` for one ``height × width`` image (:func:`cinc_kernels.conditioning.inverse_gain`;
        keyword arguments go there)."""
        kwargs.setdefault("backend", self.backend)
        return conditioning.inverse_gain(self.weight.detach(), height, width, unit_diagonal=self.unit_diagonal,
                                         **kwargs)

    def contraction_bound(self) -> float:
        """``q = Σ_t ‖L⁻¹W_t‖₂``; ``< 1`` certifies the inverse at every image size
        (:func:`cinc_kernels.conditioning.contraction_bound`)."""
        with torch.no_grad():
            return float(conditioning.contraction_bound(self.weight, self.unit_diagonal))

    def num_parameters(self) -> int:
        n = free_parameters(self.channels, self.kernel_size, self.unit_diagonal)
        return n + (self.channels if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
                f"unit_diagonal={self.unit_diagonal}, backend={self.backend!r}, free_parameters={self.num_parameters()}"
                + (f", parametrization={self.parametrization!r}" if self.parametrization != "none" else ""))


LAYERS: dict[str, type] = {"cinc": CInCConv2d}
