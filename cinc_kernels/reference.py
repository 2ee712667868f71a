"""The float64 reference: the spec (``docs/spec.md`` §1) written as plainly as possible.

Every fast path in the package is tested against these functions, so this module is a leaf: it imports nothing of
the package, and no fast path imports it (only the registry, to offer it as ``backend="reference"``). They upcast to
float64, loop in the most obvious order and cast back, so they are slow; they are also the one place to read what an
op means.

Shapes: ``x``/``y``/``g`` are ``(B, C, H, W)``, ``weight`` is ``(C, C, k, k)`` with ``weight[o, c, a, b]``,
``bias`` is ``(C,)`` or ``None``. ``dilation`` ``d``: tap ``(a, b)`` reads the pixel ``((k-1-a)·d, (k-1-b)·d)``
above and left (docs/spec.md §4), written out directly here; the fast paths rearrange into sub-images instead.
"""
from __future__ import annotations

from typing import Optional, Union, cast

import torch

Size = Union[int, torch.SymInt]

__all__ = [
    "weight_mask",
    "masked_weight",
    "centre_tap",
    "forward",
    "inverse",
    "inverse_transpose",
    "logdet",
    "dense_matrix",
]


def weight_mask(channels: int, kernel_size: int, unit_diagonal: bool = False, *, dtype: torch.dtype = torch.float64,
                device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """1 where ``weight`` is free, 0 where the mask zeroes it: centre-tap entries ``[o, c, k-1, k-1]`` with
    ``c > o`` (and ``c == o`` with ``unit_diagonal``). Shape ``(C, C, k, k)``. Built from the row and column
    indices, independently of :mod:`cinc_kernels.masks`, which the fast paths use."""
    C, k = channels, kernel_size
    o = torch.arange(C, device=device).view(C, 1)
    c = torch.arange(C, device=device).view(1, C)
    zeroed = (c >= o) if unit_diagonal else (c > o)
    keep = torch.ones(C, C, k, k, dtype=dtype, device=device)
    keep[:, :, k - 1, k - 1] = (~zeroed).to(dtype)
    return keep


def masked_weight(weight: torch.Tensor, unit_diagonal: bool = False) -> torch.Tensor:
    """``Wm``: ``weight`` with the centre tap ``[:, :, k-1, k-1]`` lower triangular (unit diagonal if asked).

    The mask selects (``torch.where``) rather than multiplies, so a NaN or Inf in a masked entry has no effect.
    Differentiable: masked entries get exactly zero gradient. Shape ``(C, C, k, k)``.
    """
    C, k = weight.shape[0], weight.shape[-1]
    keep = weight_mask(C, k, unit_diagonal, dtype=torch.bool, device=weight.device)
    fixed = torch.zeros(C, C, k, k, dtype=weight.dtype, device=weight.device)
    if unit_diagonal:
        fixed[:, :, k - 1, k - 1] = torch.eye(C, dtype=weight.dtype, device=weight.device)
    return torch.where(keep, weight, fixed)


def centre_tap(weight: torch.Tensor, unit_diagonal: bool = False) -> torch.Tensor:
    """``L = Wm[:, :, k-1, k-1]``, the lower-triangular ``(C, C)`` block on the diagonal of ``M``."""
    return masked_weight(weight, unit_diagonal)[:, :, -1, -1]


def _empty_like_image(t: torch.Tensor, dtype: torch.dtype, *connected: Optional[torch.Tensor]) -> torch.Tensor:
    """The (empty) result for an image with no pixels or channels, still attached to the autograd graph of
    ``connected`` so that gradients come back as zeros rather than as an error."""
    out = torch.zeros(t.shape, dtype=torch.float64, device=t.device) + t.double()
    for c in connected:
        if c is not None:
            out = out + 0 * c.double().sum()
    return out.to(dtype)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, unit_diagonal: bool = False,
            dilation: int = 1) -> torch.Tensor:
    """``y = M x + bias``: top-left padded k×k convolution with the masked weight. ``(B, C, H, W) -> same``."""
    k, d = weight.shape[-1], dilation
    wm = masked_weight(weight.double(), unit_diagonal)
    if x.numel() == 0:
        return _empty_like_image(x, x.dtype, wm, bias)
    xp = torch.nn.functional.pad(x.double(), ((k - 1) * d, 0, (k - 1) * d, 0))
    y = torch.nn.functional.conv2d(xp, wm, None if bias is None else bias.double(), dilation=d)
    return y.to(x.dtype)


def _check_nonsingular(L: torch.Tensor) -> None:
    if bool((L.diagonal() == 0).any()):
        raise ValueError("weight: the centre tap has a zero on its diagonal, the convolution is singular")


def _stack_pixels(pixels: dict[tuple[int, int], torch.Tensor], H: int, W: int) -> torch.Tensor:
    """``{(i, j): (B, C)}`` -> ``(B, C, H, W)``."""
    return torch.stack([torch.stack([pixels[i, j] for j in range(W)], -1) for i in range(H)], -2)


def inverse(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, unit_diagonal: bool = False,
            dilation: int = 1) -> torch.Tensor:
    """``x = M⁻¹ (y - bias)`` by raster-order back-substitution, one pixel and one channel at a time.

    ``(B, C, H, W) -> same``. Raises ``ValueError`` if ``L`` has a zero on its diagonal. Differentiable (no
    in-place writes), and slow.
    """
    B, C, H, W = y.shape
    k = weight.shape[-1]
    wm = masked_weight(weight.double(), unit_diagonal)
    L = wm[:, :, k - 1, k - 1]
    _check_nonsingular(L)
    if y.numel() == 0:
        return _empty_like_image(y, y.dtype, wm, bias)
    r = y.double()
    if bias is not None:
        r = r - bias.double().view(1, C, 1, 1)
    x: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(H):
        for j in range(W):
            acc = r[:, :, i, j]  # (B, C)
            for a in range(k):
                for b in range(k):
                    ii, jj = i + (a - (k - 1)) * dilation, j + (b - (k - 1)) * dilation
                    if (a, b) == (k - 1, k - 1) or ii < 0 or jj < 0:
                        continue
                    acc = acc - x[ii, jj] @ wm[:, :, a, b].T
            xc: list[torch.Tensor] = []
            for c in range(C):
                s = acc[:, c]
                for c2 in range(c):
                    s = s - L[c, c2] * xc[c2]
                xc.append(s / L[c, c])
            x[i, j] = torch.stack(xc, 1)
    return _stack_pixels(x, H, W).to(y.dtype)


def inverse_transpose(g: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool = False,
                      dilation: int = 1) -> torch.Tensor:
    """``u = M⁻ᵀ g``: reverse raster order, neighbours below/right, backward substitution with ``Lᵀ``.

    ``(B, C, H, W) -> same``.
    """
    B, C, H, W = g.shape
    k = weight.shape[-1]
    wm = masked_weight(weight.double(), unit_diagonal)
    L = wm[:, :, k - 1, k - 1]
    _check_nonsingular(L)
    if g.numel() == 0:
        return _empty_like_image(g, g.dtype, wm)
    gd = g.double()
    u: dict[tuple[int, int], torch.Tensor] = {}
    for i in reversed(range(H)):
        for j in reversed(range(W)):
            acc = gd[:, :, i, j]
            for a in range(k):
                for b in range(k):
                    ii, jj = i + (k - 1 - a) * dilation, j + (k - 1 - b) * dilation
                    if (a, b) == (k - 1, k - 1) or ii >= H or jj >= W:
                        continue
                    acc = acc - u[ii, jj] @ wm[:, :, a, b]
            uc: dict[int, torch.Tensor] = {}
            for c in reversed(range(C)):
                s = acc[:, c]
                for c2 in range(c + 1, C):
                    s = s - L[c2, c] * uc[c2]
                uc[c] = s / L[c, c]
            u[i, j] = torch.stack([uc[c] for c in range(C)], 1)
    return _stack_pixels(u, H, W).to(g.dtype)


def logdet(weight: torch.Tensor, height: Size, width: Size, unit_diagonal: bool = False,
           dilation: int = 1) -> torch.Tensor:
    """``log|det M| = H·W·Σ_c log|L[c, c]|`` as a 0-dim float64 tensor (``-inf`` when singular; 0 for an image
    without pixels, whose map is the empty one), the same for every ``dilation`` (in raster order ``M`` stays block
    lower triangular with ``L`` on the diagonal). ``H·W`` is taken as a float, so huge sizes cannot overflow."""
    L = centre_tap(weight.double(), unit_diagonal)
    if height == 0 or width == 0:
        return 0 * L.diagonal().sum()
    pixels = torch.sym_float(height) * torch.sym_float(width)
    return cast(torch.Tensor, torch.log(L.diagonal().abs()).sum() * pixels)


def dense_matrix(weight: torch.Tensor, height: int, width: int, unit_diagonal: bool = False,
                 dilation: int = 1) -> torch.Tensor:
    """The dense ``(C·H·W, C·H·W)`` matrix ``M`` in NCHW flattening order (``x.reshape(-1)`` of one image).

    Built column by column from :func:`forward`, so only for tiny shapes.
    """
    C = weight.shape[0]
    n = C * height * width
    basis = torch.eye(n, dtype=torch.float64, device=weight.device).view(n, C, height, width)
    cols = forward(basis, weight.double(), None, unit_diagonal, dilation).reshape(n, n)
    return cols.T
