"""The public functions of docs/spec.md §2: forward, inverse, adjoint inverse and log-determinant.

Each checks its arguments (errors name the argument), picks a backend (:mod:`cinc_kernels.backends`) and calls it.
All are differentiable in every tensor argument and traceable by ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._checks import check_batch, check_bool, check_int, check_tensor
from ._symbolic import scaled_by_pixels, traced_sizes
from .autocast import runs_outside_autocast
from .backends import select
from .contract import MAX_KERNEL_SIZE

__all__ = ["MAX_KERNEL_SIZE", "cinc_conv2d", "cinc_conv2d_inverse", "cinc_conv2d_inverse_transpose",
           "cinc_logdet"]

def check_weight(weight: torch.Tensor, channels: Optional[int] = None, arg: str = "x") -> int:
    """Validate a ``(C, C, k, k)`` weight (``C`` = ``channels`` when given); returns ``k``."""
    check_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C, C, k, k), got shape {tuple(weight.shape)}")
    c_out, c_in, kh, kw = weight.shape
    if c_out != c_in:
        raise ValueError(f"weight must be square over channels (C, C, k, k), got shape {tuple(weight.shape)}")
    if kh != kw:
        raise ValueError(f"weight must have a square k×k kernel, got shape {tuple(weight.shape)}")
    if not 1 <= kw <= MAX_KERNEL_SIZE:
        raise ValueError(f"weight: kernel size k must be in 1…{MAX_KERNEL_SIZE}, got {kw}")
    if channels is not None and c_in != channels:
        raise ValueError(
            f"weight has {c_in} channels but {arg} has {channels}: weight must be (C, C, k, k) matching {arg}"
        )
    return kw


def check_image(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, arg: str = "x") -> int:
    """Validate an image batch against ``weight`` and ``bias``; returns ``k``."""
    check_batch(x, arg)
    k = check_weight(weight, x.shape[1], arg)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but {arg} has {x.dtype}; they must match")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but {arg} is on {x.device}; they must be on one device")
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.shape != (x.shape[1],):
            raise ValueError(f"bias must have shape ({x.shape[1]},) to match {arg}, got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but {arg} has {x.dtype}; they must match")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but {arg} is on {x.device}; they must be on one device")
    return k


def check_unit_diagonal(unit_diagonal: object) -> None:
    """``unit_diagonal`` must be a real ``bool``: a truthy string or number would pick a mask silently."""
    check_bool("unit_diagonal", unit_diagonal)


def _check_dilation(dilation: object) -> int:
    return check_int("dilation", dilation, 1)


def _per_sub_image(op: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, dilation: int) -> torch.Tensor:
    """``op`` (an undilated op on ``(B, C, H, W)``) applied with dilation ``d``: pixels ``(i, j)`` with the same
    ``(i mod d, j mod d)`` only ever meet each other, so the d² interleaved sub-images are independent CInC problems
    with the same weight (docs/spec.md §4). They go into the batch (space-to-batch), ``op`` runs once, and they come
    back. ``H, W`` are zero-padded at the bottom and right to multiples of ``d``: exact for all three ops, since the
    padded pixels come after every real one in raster order (forward and inverse never read them; for ``M⁻ᵀ`` the
    padded block of the solution is ``M_ppᵀ⁻¹·0 = 0``)."""
    d = dilation
    B, C, H, W = t.shape
    if d == 1 or H == 0 or W == 0:
        return op(t)
    h, w = -(-H // d), -(-W // d)
    t = torch.nn.functional.pad(t, (0, w * d - W, 0, h * d - H))
    t = t.reshape(B, C, h, d, w, d).permute(0, 3, 5, 1, 2, 4).reshape(B * d * d, C, h, w)
    out = op(t).reshape(B, d, d, C, h, w).permute(0, 3, 4, 1, 5, 2).reshape(B, C, h * d, w * d)
    return out[:, :, :H, :W]


# Under torch.autocast: float32 in and out (cinc_kernels/autocast.py).
@runs_outside_autocast
def cinc_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                unit_diagonal: bool = False, backend: str = "auto", dilation: int = 1) -> torch.Tensor:
    """The CInC convolution ``y = M x + bias``: a k×k correlation padded ``k-1`` on the top and left only, whose
    centre (bottom-right) tap is lower triangular over channels.

    Args:
        x: ``(B, C, H, W)``, any strides (channels-last works).
        weight: ``(C, C, k, k)``, ``1 ≤ k ≤ 7``; the mask is applied inside the kernels, masked entries get zero
            gradient.
        bias: ``(C,)`` or ``None``.
        unit_diagonal: treat the centre tap's diagonal as ones (log-determinant 0).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"`` (portable, any device).
        dilation: ``d ≥ 1``, the spacing of the taps: tap ``(a, b)`` reads the pixel ``((k-1-a)·d, (k-1-b)·d)``
            above and left (padding ``(k-1)·d``), as the authors' ``invertible_conv2D(..., dilation)``.

    Returns:
        ``y``: ``(B, C, H, W)``, same dtype and device as ``x``.

    Example:
        >>> import torch, cinc_kernels as ck
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2, 3, 5, 7, generator=g)
        >>> w = 0.1 * torch.randn(3, 3, 3, 3, generator=g)
        >>> w[:, :, 2, 2] += torch.eye(3)  # the centre tap: a well-conditioned lower triangle
        >>> y = ck.cinc_conv2d(x, w)
        >>> y.shape
        torch.Size([2, 3, 5, 7])
        >>> torch.allclose(ck.cinc_conv2d_inverse(y, w), x, atol=1e-5)
        True
    """
    check_image(x, weight, bias, "x")
    check_unit_diagonal(unit_diagonal)
    _check_dilation(dilation)
    impl = select(backend, "forward", x.device, x.dtype, "x")
    return _per_sub_image(lambda t: impl.ops["forward"](t, weight, bias, unit_diagonal), x, dilation)


def _check_accumulate(accumulate: Optional[torch.dtype], t: torch.Tensor, arg: str) -> None:
    if accumulate is None:
        return
    if accumulate not in (torch.float32, torch.float64):
        raise ValueError(f"accumulate must be None, torch.float32 or torch.float64, got {accumulate!r}")
    if torch.finfo(accumulate).bits < torch.finfo(t.dtype).bits:
        raise ValueError(f"accumulate={accumulate} is narrower than {arg}'s dtype {t.dtype}; it may only widen")


def _upcast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


# Under torch.autocast: float32 in and out (cinc_kernels/autocast.py).
@runs_outside_autocast
def cinc_conv2d_inverse(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                        unit_diagonal: bool = False, backend: str = "auto",
                        accumulate: Optional[torch.dtype] = None, dilation: int = 1) -> torch.Tensor:
    """``x = M⁻¹ (y - bias)``, the exact inverse of :func:`cinc_conv2d`, solved as a wavefront over the image's
    ``H + W - 1`` anti-diagonals.

    Args:
        y: ``(B, C, H, W)``.
        weight, bias, unit_diagonal, backend, dilation: as for :func:`cinc_conv2d`.
        accumulate: ``None`` (work in ``y``'s dtype) or a wider dtype (``torch.float64``): the inputs are cast to
            it, the backend solves in it, and the result is cast back to ``y``'s dtype. A float32 solve loses about
            ``log10(gain)`` of its ~7 digits (see :func:`cinc_kernels.inverse_gain`); with float64 accumulation the
            solve itself adds no error beyond the final rounding (rounding already in ``y`` is still amplified by
            the gain). Differentiable (the casts are).

    Returns:
        ``x``: ``(B, C, H, W)``, ``y``'s dtype.

    Raises:
        ValueError: naming ``weight``, if the centre tap has a zero on its diagonal (the map is singular).
        Except on the ``"cuda"`` backend and ``"triton"`` on a GPU: checking would stall the GPU stream on a
        device-to-host copy, so there a singular weight is not refused and the result holds ``inf``/``nan``; check
        ``cinc_logdet(...) > -inf`` (computed on the device) if the weight may be singular.
    """
    check_image(y, weight, bias, "y")
    check_unit_diagonal(unit_diagonal)
    _check_accumulate(accumulate, y, "y")
    _check_dilation(dilation)
    if accumulate is not None and accumulate != y.dtype:
        impl = select(backend, "inverse", y.device, accumulate, "accumulate")
        w, b = weight.to(accumulate), _upcast(bias, accumulate)
        x = _per_sub_image(lambda t: impl.ops["inverse"](t, w, b, unit_diagonal), y.to(accumulate), dilation)
        return x.to(y.dtype)
    impl = select(backend, "inverse", y.device, y.dtype, "y")
    return _per_sub_image(lambda t: impl.ops["inverse"](t, weight, bias, unit_diagonal), y, dilation)


# Under torch.autocast: float32 in and out (cinc_kernels/autocast.py).
@runs_outside_autocast
def cinc_conv2d_inverse_transpose(g: torch.Tensor, weight: torch.Tensor, *, unit_diagonal: bool = False,
                                  backend: str = "auto",
                                  accumulate: Optional[torch.dtype] = None, dilation: int = 1) -> torch.Tensor:
    """``u = M⁻ᵀ g``: solves ``Mᵀ u = g`` (the adjoint of the inverse, used to back-propagate through it).

    Args:
        g: ``(B, C, H, W)``.
        weight, unit_diagonal, backend, dilation: as for :func:`cinc_conv2d`.
        accumulate: as for :func:`cinc_conv2d_inverse`.

    Returns:
        ``u``: ``(B, C, H, W)``, ``g``'s dtype.
    """
    check_image(g, weight, None, "g")
    check_unit_diagonal(unit_diagonal)
    _check_accumulate(accumulate, g, "g")
    _check_dilation(dilation)
    if accumulate is not None and accumulate != g.dtype:
        impl = select(backend, "inverse_transpose", g.device, accumulate, "accumulate")
        w = weight.to(accumulate)
        u = _per_sub_image(lambda t: impl.ops["inverse_transpose"](t, w, unit_diagonal), g.to(accumulate), dilation)
        return u.to(g.dtype)
    impl = select(backend, "inverse_transpose", g.device, g.dtype, "g")
    return _per_sub_image(lambda t: impl.ops["inverse_transpose"](t, weight, unit_diagonal), g, dilation)


# Under torch.autocast: float32 in and out (cinc_kernels/autocast.py).
@runs_outside_autocast
def cinc_logdet(weight: torch.Tensor, height: int, width: int, *, unit_diagonal: bool = False,
                backend: str = "auto", dilation: int = 1) -> torch.Tensor:
    """``log|det M| = H·W·Σ_c log|weight[c, c, k-1, k-1]|`` for one ``H×W`` image (0 with ``unit_diagonal``).

    Args:
        weight: ``(C, C, k, k)``.
        height, width: the image size, integers ``≥ 0``.
        dilation: as for :func:`cinc_conv2d`; it does not change the log-determinant (the sub-images' sizes add
            up to ``H·W`` pixels, each with the centre tap on the diagonal).

    Returns:
        A 0-dim tensor of ``weight``'s dtype; ``-inf`` when the centre tap has a zero on its diagonal.

    Example:
        >>> import math, torch, cinc_kernels as ck
        >>> w = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
        >>> w[:, :, 2, 2] = 2 * torch.eye(4)  # every pixel scales each of its 4 channels by 2
        >>> math.isclose(ck.cinc_logdet(w, 5, 6).item(), 5 * 6 * 4 * math.log(2))
        True
    """
    check_weight(weight)
    check_unit_diagonal(unit_diagonal)
    _check_dilation(dilation)
    if traced_sizes(height, width):
        # torch.jit.trace hands out sizes as 0-dim tensors: scaling the one-pixel log-determinant by them keeps
        # H·W in the traced program instead of baking in the size it was traced at.
        impl = select(backend, "logdet", weight.device, weight.dtype, "weight")
        return scaled_by_pixels(lambda: impl.ops["logdet"](weight, 1, 1, unit_diagonal), height, width)
    check_int("height", height, 0)
    check_int("width", width, 0)
    impl = select(backend, "logdet", weight.device, weight.dtype, "weight")
    return impl.ops["logdet"](weight, height, width, unit_diagonal)
