"""Invertible convolution layers with one interface: ``y, logdet = layer(x)``, ``x = layer.inverse(y)``.

``logdet`` has shape ``(B,)``: ``log|det ∂y/∂x|`` per sample. ``num_parameters()`` counts free entries only (not
the masked or fixed ones). :data:`LAYERS` maps the names a benchmark or a flow uses to the classes.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import conditioning
from . import functional as fn
from ._checks import Range, check_batch, check_bool, check_choice, check_int
from ._symbolic import tracing
from .contract import MAX_KERNEL_SIZE
from .finite_check import NonFiniteMonitor
from .masks import free_parameters, weight_mask

__all__ = ["CInCConv2d", "EmergingConv2d", "AutoregressiveConv2d", "InvConv1x1", "FInCConv2d", "LAYERS"]


Masks = dict[str, torch.Tensor]


class _Layer(Protocol):
    """What every layer of this module offers beyond ``nn.Module`` (for typing the composite layers)."""

    def num_parameters(self) -> int: ...

    def free_masks(self) -> Masks: ...



def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            padding: int = 0) -> torch.Tensor:
    """``F.conv2d`` that also takes an image without pixels or channels (ATen refuses those) and returns the
    equally empty result, still attached to the weight's graph (docs/spec.md §2: empty in, empty out)."""
    if x.numel() == 0:
        out = x.new_zeros(x.shape[0], weight.shape[0], x.shape[2], x.shape[3]) + 0 * weight.sum()
        return out if bias is None else out + 0 * bias.sum()
    return F.conv2d(x, weight, bias, padding=padding)


def _with_bias_mask(layer: nn.Module, masks: Masks) -> Masks:
    """``masks`` plus an all-free mask for the layer's bias, when it has one."""
    bias = getattr(layer, "bias", None)
    if bias is not None:
        masks["bias"] = torch.ones_like(bias)
    return masks


INIT_SCALE = Range(float, 0)
"""``init_scale`` of every layer: a standard deviation (a NaN or an infinity would train to NaN without a word)."""


INITS = ("identity", "rotation")
"""The starting centre taps of :class:`CInCConv2d` (its ``init`` argument)."""


def _rotation_lower(channels: int) -> torch.Tensor:
    """``L`` of ``Q = P·L·U`` for a random orthogonal ``Q``: unit lower triangular, ``(C, C)`` float32."""
    rotation, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
    lower: torch.Tensor = torch.linalg.lu(rotation)[1]
    return lower.float()


class CInCConv2d(nn.Module):
    """The CInC convolution as a layer (docs/spec.md §1).

    Args:
        channels: ``C``; input and output have ``C`` channels.
        kernel_size: ``k`` in 1…7 (the paper's 3).
        bias: learn a ``(C,)`` bias.
        unit_diagonal: fix the centre tap's diagonal to ones (log-determinant 0, invertible by construction).
        backend: passed to the functional ops (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"``,
            ``"reference"``).
        init_scale: standard deviation of the random initial entries (every free entry gets N(0, init_scale²)).
        init: the starting centre tap (:data:`INITS`). ``"identity"``: the identity plus the random entries (the
            authors' initialisation; the layer starts near the identity, log-determinant near 0).
            ``"rotation"``: the unit lower-triangular factor ``L`` of the LU factorisation ``Q = P·L·U`` (partial
            pivoting, so ``|L[o, c]| ≤ 1``) of a random orthogonal ``Q`` (the QR factor of a Gaussian matrix);
            the other taps as with ``"identity"``. The layer then mixes every channel into the later ones from the
            first step while its log-determinant is exactly 0 (unit diagonal). Both are drawn from torch's global
            generator, so ``torch.manual_seed`` makes them reproducible.
        parametrization: ``"none"`` (``weight`` is free) or ``"contractive"``: ``weight`` is
            :class:`cinc_kernels.conditioning.ContractiveTaps` of a free parameter (registered with
            ``torch.nn.utils.parametrize``; the free one is ``parametrizations.weight.original``): the centre tap's
            diagonal magnitudes are clamped to ``[e^{-a}, e^a]`` and its off-diagonal part to
            ``‖D⁻¹(L − D)‖₂ ≤ β``, then the other taps scaled to ``Σ_t ‖L⁻¹W_t‖₂ ≤ γ``, so that
            ``‖M⁻¹‖₂ ≤ e^a / ((1 − β)(1 − γ))`` (:meth:`gain_ceiling`; 40 with the defaults) at every image size and
            for every value of the free parameter. Like every parametrised module it is saved through
            ``state_dict()``, not by pickling the module.
        max_contraction: ``γ`` in ``(0, 1)`` of the contractive parametrisation.
        max_log_diagonal: ``a ≥ 0`` of the contractive parametrisation (``None``: the diagonal is free and
            :meth:`gain_ceiling` is ``inf``).
        max_centre_coupling: ``β`` in ``(0, 1)`` of the contractive parametrisation (``None``: free, as above).
        dilation: tap spacing ``d`` (see :func:`cinc_kernels.cinc_conv2d`); the log-determinant does not depend on
            it, and the inverse solves ``d²`` interleaved sub-images of about ``H/d × W/d``.
        check_finite: after each :meth:`inverse`, check the result for inf/NaN and warn once
            (:class:`~cinc_kernels.conditioning.NonFiniteInverseWarning`, naming the layer). It never synchronises
            a GPU stream: on CPU tensors the warning comes with the failing inverse, on CUDA tensors a few inverses
            later (the flag reaches the host by an asynchronous copy), on other devices there is no check
            (:mod:`cinc_kernels.finite_check`). Skipped under ``torch.compile`` and ``torch.jit.trace``; switch
            it off here or by setting the attribute.

    Attributes:
        name: how warnings refer to the layer (a container may set it, e.g. ``"level1.step3.conv"``).

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)``.

    Example:
        >>> import torch, cinc_kernels as ck
        >>> layer = ck.CInCConv2d(8, kernel_size=3)
        >>> x = torch.randn(4, 8, 16, 12)
        >>> y, logdet = layer(x)
        >>> y.shape, logdet.shape
        (torch.Size([4, 8, 16, 12]), torch.Size([4]))
        >>> torch.allclose(layer.inverse(y), x, atol=1e-5)
        True
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, unit_diagonal: bool = False,
                 backend: str = "auto", init_scale: float = 1e-2, *, parametrization: str = "none",
                 max_contraction: float = conditioning.DEFAULT_MAX_CONTRACTION,
                 max_log_diagonal: Optional[float] = conditioning.DEFAULT_MAX_LOG_DIAGONAL,
                 max_centre_coupling: Optional[float] = conditioning.DEFAULT_MAX_CENTRE_COUPLING,
                 check_finite: bool = True, dilation: int = 1, init: str = "identity"):
        super().__init__()
        check_choice("init", init, INITS)
        check_choice("parametrization", parametrization, ("none", "contractive"))
        check_int("channels", channels, 1)
        check_int("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE)
        check_bool("unit_diagonal", unit_diagonal)
        check_bool("bias", bias)
        check_bool("check_finite", check_finite)
        INIT_SCALE.check("init_scale", init_scale)
        check_int("dilation", dilation, 1)
        self.channels, self.kernel_size, self.dilation = channels, kernel_size, dilation
        self.unit_diagonal, self.backend = unit_diagonal, backend
        k = kernel_size
        w = init_scale * torch.randn(channels, channels, k, k)
        if init == "identity":
            w[:, :, k - 1, k - 1] += torch.eye(channels)
        else:
            w[:, :, k - 1, k - 1] = _rotation_lower(channels)
        self.weight = nn.Parameter(w * weight_mask(channels, k, unit_diagonal, dtype=w.dtype))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.init = init
        self.parametrization = parametrization
        if parametrization == "contractive":
            parametrize.register_parametrization(
                self, "weight", conditioning.ContractiveTaps(unit_diagonal, max_contraction, max_log_diagonal,
                                                             max_centre_coupling))
        self.check_finite = check_finite
        self.name: Optional[str] = None
        self._warned_non_finite = False
        self._non_finite = NonFiniteMonitor()

    def logdet(self, height: int, width: int) -> torch.Tensor:
        """``log|det|`` for one ``height × width`` image, a 0-dim tensor."""
        return fn.cinc_logdet(self.weight, height, width, unit_diagonal=self.unit_diagonal, backend=self.backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight  # read once: with a parametrisation every read recomputes it
        y = fn.cinc_conv2d(x, weight, self.bias, unit_diagonal=self.unit_diagonal, backend=self.backend,
                           dilation=self.dilation)
        logdet = fn.cinc_logdet(weight, x.shape[2], x.shape[3], unit_diagonal=self.unit_diagonal,
                                backend=self.backend)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor, *, accumulate: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x = M⁻¹(y − bias)``; ``accumulate=torch.float64`` solves in float64 (see
        :func:`cinc_kernels.cinc_conv2d_inverse`)."""
        x = fn.cinc_conv2d_inverse(y, self.weight, self.bias, unit_diagonal=self.unit_diagonal,
                                   backend=self.backend, accumulate=accumulate, dilation=self.dilation)
        if (self.check_finite and not self._warned_non_finite and not torch.compiler.is_compiling()
                and not tracing() and self._non_finite.observe(x, y)):
            self._warn_non_finite(y)
        return x

    def _warn_non_finite(self, y: torch.Tensor) -> None:
        self._warned_non_finite = True
        H, W = y.shape[-2:]
        # Off the CPU the flag arrives without synchronising, so it may be an earlier inverse's.
        which = "the inverse" if y.device.type == "cpu" else f"an inverse on {y.device} (this or an earlier one)"
        warnings.warn(
            f"{self.name or 'CInCConv2d(' + self.extra_repr() + ')'}: {which} of a {H}x{W} image returned "
            f"inf/NaN. The map is probably ill-conditioned at this size (check layer.inverse_gain({H}, {W}) "
            "against 1/eps of the dtype); invert in float64 (inverse(..., accumulate=torch.float64) if only the "
            "solve overflows), or train with parametrization='contractive'. Warned once per layer; silence with "
            "check_finite=False.",
            conditioning.NonFiniteInverseWarning, stacklevel=3)

    def inverse_gain(self, height: int, width: int, **kwargs: Any) -> float:
        """Estimate of ``‖M⁻¹‖₂`` for one ``height × width`` image (:func:`cinc_kernels.conditioning.inverse_gain`;
        keyword arguments go there).

        With ``parametrization="contractive"`` the true value never exceeds :meth:`gain_ceiling`,
        ``e^a / ((1 − β)(1 − γ))`` (40 with the defaults ``a = log 2``, ``β = 0.5``, ``γ = 0.9``; ``a = 0`` with
        ``unit_diagonal``), at any size and for any parameter values, so a float32 inverse keeps about
        ``7 − log10(40)`` ≈ 5.4 digits. Without it there is no such bound: measure, or see :meth:`contraction_bound`.
        """
        kwargs.setdefault("backend", self.backend)
        return conditioning.inverse_gain(self.weight.detach(), height, width, unit_diagonal=self.unit_diagonal,
                                         **kwargs)

    def gain_ceiling(self) -> float:
        """The bound on ``‖M⁻¹‖₂`` fixed at construction by the contractive parametrisation (see
        :meth:`inverse_gain`); ``inf`` without it."""
        if self.parametrization != "contractive":
            return math.inf
        contractive: conditioning.ContractiveTaps = self.parametrizations.weight[0]  # type: ignore[union-attr,index,assignment]
        return float(contractive.gain_ceiling())

    def contraction_bound(self) -> float:
        """``q = Σ_t ‖L⁻¹W_t‖₂``; ``< 1`` certifies the inverse at every image size
        (:func:`cinc_kernels.conditioning.contraction_bound`)."""
        with torch.no_grad():
            return float(conditioning.contraction_bound(self.weight, self.unit_diagonal))

    def num_parameters(self) -> int:
        n = free_parameters(self.channels, self.kernel_size, self.unit_diagonal)
        return n + (self.channels if self.bias is not None else 0)

    def free_masks(self) -> Masks:
        """``{parameter name: 1 where the entry is free, 0 where it is masked}``, one mask per parameter."""
        return _with_bias_mask(self, {"weight": weight_mask(self.channels, self.kernel_size, self.unit_diagonal,
                                                            dtype=self.weight.dtype, device=self.weight.device)})

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
                f"unit_diagonal={self.unit_diagonal}, backend={self.backend!r}, free_parameters={self.num_parameters()}"
                + (f", dilation={self.dilation}" if self.dilation != 1 else "")
                + (f", init={self.init!r}" if self.init != "identity" else "")
                + (f", parametrization={self.parametrization!r}" if self.parametrization != "none" else ""))


# --------------------------------------------------------------------------------------------------------------
# The layers CInC is compared against (docs/spec.md §3). Same interface as CInCConv2d, plus ``free_masks()``
# (which entries of each parameter are free) and ``logdet(height, width)``.


def _child_masks(module: nn.Module) -> Masks:
    """The ``free_masks()`` of every child, keyed like ``named_parameters()``."""
    return {f"{name}.{p}": m for name, child in module.named_children()
            for p, m in cast(_Layer, child).free_masks().items()}


class InvConv1x1(nn.Module):
    """Glow's invertible 1×1 convolution (Kingma & Dhariwal 2018), LU-parametrised:
    ``W = P · (L + I) · (U + diag(sign · exp(log_scale)))``.

    ``P`` (a permutation) and ``sign`` are fixed at initialisation (the LU factors of a random rotation);
    ``L`` strictly lower and ``U`` strictly upper triangular and ``log_scale`` are free: ``C²`` entries
    (``+ C`` with a bias). ``log|det| = H·W·Σ log_scale``; the inverse is the 1×1 convolution with ``W⁻¹``, from two
    triangular solves. It runs on ATen's convolution whatever ``backend`` says (kept for a uniform interface).

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)``.
    """

    permutation: torch.Tensor
    sign: torch.Tensor
    lower_mask: torch.Tensor
    upper_mask: torch.Tensor

    def __init__(self, channels: int, bias: bool = False, backend: str = "auto"):
        super().__init__()
        check_int("channels", channels, 1)
        check_bool("bias", bias)
        self.channels, self.backend = channels, backend
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        perm, lower, upper = torch.linalg.lu(rotation)
        scale = upper.diagonal()
        ones = torch.ones(channels, channels)
        self.register_buffer("permutation", perm.float())
        self.register_buffer("sign", scale.sign().float())
        self.register_buffer("lower_mask", ones.tril(-1), persistent=False)
        self.register_buffer("upper_mask", ones.triu(1), persistent=False)
        self.lower = nn.Parameter(lower.tril(-1).float())
        self.upper = nn.Parameter(upper.triu(1).float())
        self.log_scale = nn.Parameter(scale.abs().log().float())
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.upper_mask + torch.diag(self.sign * self.log_scale.exp())
        return lower, upper

    def weight(self) -> torch.Tensor:
        """``W``, ``(C, C)``."""
        lower, upper = self._factors()
        return self.permutation @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """``W⁻¹ = U⁻¹ L⁻¹ Pᵀ``, ``(C, C)``, by triangular solves (no general inverse)."""
        lower, upper = self._factors()
        l_inv_pt = torch.linalg.solve_triangular(lower, self.permutation.T, upper=False, unitriangular=True)
        inverse: torch.Tensor = torch.linalg.solve_triangular(upper, l_inv_pt, upper=True)
        return inverse

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return height * width * self.log_scale.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(x, "x", self.channels)
        y = _conv2d(x, self.weight()[:, :, None, None], self.bias)
        return y, self.logdet(x.shape[2], x.shape[3]).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_batch(y, "y", self.channels)
        if self.bias is not None:
            y = y - self.bias.view(1, -1, 1, 1)
        return _conv2d(y, self.inverse_weight()[:, :, None, None])

    def num_parameters(self) -> int:
        return self.channels**2 + (self.channels if self.bias is not None else 0)

    def free_masks(self) -> Masks:
        return _with_bias_mask(self, {"lower": self.lower_mask, "upper": self.upper_mask,
                                      "log_scale": torch.ones_like(self.log_scale)})

    def extra_repr(self) -> str:
        return f"{self.channels}, bias={self.bias is not None}, LU, free_parameters={self.num_parameters()}"


class EmergingConv2d(nn.Module):
    """The emerging convolution (Hoogeboom, van den Berg, Welling, ICML 2019): a 1×1 convolution, then two
    autoregressive k×k convolutions, the first padded top-left, the second bottom-right (k = 2 gives the paper's
    composite 3×3 receptive field).

    Both triangular convolutions are CInC convolutions (:class:`CInCConv2d`). The bottom-right one is a CInC
    convolution on the *flipped* image: with ``R`` reversing H, W **and** the channel order,
    ``R · M(W) · R`` is the bottom-right padded correlation with kernel ``W.flip(0, 1, 2, 3)``, whose centre tap
    ``W[C-1-o, C-1-c, k-1, k-1]`` is upper triangular (block upper triangular in raster order, the mirror image of
    the first). ``R`` is a permutation, so the log-determinant is that of ``M(W)`` and the inverse is
    ``R · M(W)⁻¹ · R``: our wavefront on the flipped image. The layer's inverse runs the three inverses in reverse
    order.

    ``log|det| = H·W·(Σ log|diag₁| + Σ log|diag₂|) + the 1×1's``. Free parameters: ``C²`` (the LU 1×1) +
    ``2·(k²C² − C(C−1)/2)`` (minus ``C`` each with ``unit_diagonal``) + ``C`` bias.

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)``.
    """

    def __init__(self, channels: int, kernel_size: int = 2, bias: bool = True, unit_diagonal: bool = False,
                 backend: str = "auto", init_scale: float = 1e-2):
        super().__init__()
        check_int("channels", channels, 1)
        check_bool("unit_diagonal", unit_diagonal)
        check_bool("bias", bias)
        self.channels, self.kernel_size = channels, kernel_size
        self.unit_diagonal, self.backend = unit_diagonal, backend
        self.mix = InvConv1x1(channels, bias=False, backend=backend)
        self.conv_tl = CInCConv2d(channels, kernel_size, bias=False, unit_diagonal=unit_diagonal, backend=backend,
                                  init_scale=init_scale)
        self.conv_br = CInCConv2d(channels, kernel_size, bias=bias, unit_diagonal=unit_diagonal, backend=backend,
                                  init_scale=init_scale)

    @staticmethod
    def _reverse(x: torch.Tensor) -> torch.Tensor:
        """``R``: reverse channels, rows and columns (an involution)."""
        return x.flip(1, 2, 3)

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return (self.mix.logdet(height, width) + self.conv_tl.logdet(height, width)
                + self.conv_br.logdet(height, width))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(x, "x", self.channels)
        h, ld_mix = self.mix(x)
        h, ld_tl = self.conv_tl(h)
        z, ld_br = self.conv_br(self._reverse(h))
        return self._reverse(z), ld_mix + ld_tl + ld_br

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_batch(y, "y", self.channels)
        h = self._reverse(self.conv_br.inverse(self._reverse(y)))
        return self.mix.inverse(self.conv_tl.inverse(h))

    def num_parameters(self) -> int:
        return sum(cast(_Layer, child).num_parameters() for child in self.children())

    def free_masks(self) -> Masks:
        return _child_masks(self)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, bias={self.conv_br.bias is not None}, "
                f"unit_diagonal={self.unit_diagonal}, backend={self.backend!r}, "
                f"free_parameters={self.num_parameters()}")


def autoregressive_mask(channels: int, kernel_size: int, *, dtype: torch.dtype = torch.float32,
                        device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The MADE/PixelCNN raster mask of a centred ``k×k`` kernel, ``(C, C, k, k)``: 1 on the taps before the centre
    in raster order (all rows above, the left part of the centre row), lower triangular on the centre, 0 after."""
    p = kernel_size // 2
    mask = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=dtype, device=device)
    mask[:, :, :p, :] = 1
    mask[:, :, p, :p] = 1
    mask[:, :, p, p] = torch.ones(channels, channels, dtype=dtype, device=device).tril()
    return mask


class AutoregressiveConv2d(nn.Module):
    """The autoregressive convolution of the CInC paper's comparison: a centred ``k×k`` convolution (padding
    ``k//2`` on every side) under the MADE/PixelCNN raster mask (:func:`autoregressive_mask`).

    Output pixel ``(i, j)`` sees the rows above (including the up-right taps, which lie on the *same* anti-diagonal,
    so the CInC wavefront does not apply) and the pixels to its left. Its inverse is a raster-order solve, done
    here one row at a time with our ops: subtract the rows above (one convolution), then solve the row, which is a
    CInC convolution of kernel ``k//2 + 1`` on a ``1 × W`` image (left taps and the triangular centre):
    ``H`` steps, each one ATen convolution and one of our inverses.

    ``log|det| = H·W·Σ log|diag|``. Free parameters: ``(k+1)·(k//2)·C² + C(C+1)/2`` (``4C² + C(C+1)/2`` at
    ``k = 3``) + ``C`` bias.

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)``.
    """

    mask: torch.Tensor

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, backend: str = "auto",
                 init_scale: float = 1e-2):
        super().__init__()
        check_int("channels", channels, 1)
        check_bool("bias", bias)
        INIT_SCALE.check("init_scale", init_scale)
        # The row solve is a CInC convolution of kernel k//2 + 1, which our ops take up to MAX_KERNEL_SIZE.
        check_int("kernel_size", kernel_size, 1, 2 * MAX_KERNEL_SIZE - 1)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.channels, self.kernel_size, self.backend = channels, kernel_size, backend
        p = kernel_size // 2
        self.register_buffer("mask", autoregressive_mask(channels, kernel_size), persistent=False)
        w = init_scale * torch.randn(channels, channels, kernel_size, kernel_size)
        w[:, :, p, p] += torch.eye(channels)
        self.weight = nn.Parameter(w * self.mask)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def _row_weight(self, wm: torch.Tensor) -> torch.Tensor:
        """The centre row's taps (left ones and the centre) as a CInC weight ``(C, C, p+1, p+1)``: its last row is
        ``wm[:, :, p, :p+1]``, the rows above are zero (they would read padding on a one-row image anyway)."""
        p = self.kernel_size // 2
        return F.pad(wm[:, :, p:p + 1, :p + 1], (0, 0, p, 0))

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return fn.cinc_logdet(self._row_weight(self.weight * self.mask), height, width, backend=self.backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(x, "x", self.channels)
        p = self.kernel_size // 2
        y = _conv2d(x, self.weight * self.mask, self.bias, padding=p)
        return y, self.logdet(x.shape[2], x.shape[3]).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_batch(y, "y", self.channels)
        B, C, H, W = y.shape
        p = self.kernel_size // 2
        wm = self.weight * self.mask
        if y.numel() == 0:
            return _conv2d(y, wm[:, :, :1, :1])
        row_weight, above_weight = self._row_weight(wm), wm[:, :, :p, :]
        # Solved rows are kept in a list (no in-place writes), so autograd sees an ordinary graph.
        rows = [y.new_zeros(B, C, 1, W)] * p
        for i in range(H):
            r = y[:, :, i:i + 1, :]
            if p:
                above = torch.cat(rows[len(rows) - p:], dim=2)
                r = r - F.conv2d(F.pad(above, (p, p, 0, 0)), above_weight)
            rows.append(fn.cinc_conv2d_inverse(r, row_weight, self.bias, backend=self.backend))
        return torch.cat(rows[p:], dim=2) if H else y.new_zeros(y.shape)

    def num_parameters(self) -> int:
        C, k, p = self.channels, self.kernel_size, self.kernel_size // 2
        return (k + 1) * p * C * C + C * (C + 1) // 2 + (C if self.bias is not None else 0)

    def free_masks(self) -> Masks:
        return _with_bias_mask(self, {"weight": self.mask})

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
                f"backend={self.backend!r}, free_parameters={self.num_parameters()}")


class FInCConv2d(nn.Module):
    """The FInC convolution (Kallappa, Nagar, Varma 2023), as read here: the channels in four groups (sizes as equal
    as ``tensor_split`` makes them), each mixed only within itself by a k×k convolution padded from a different
    corner (top-left, top-right, bottom-left, bottom-right) whose centre tap is unit lower triangular.

    Why exactly invertible: the Jacobian is block diagonal over the groups; flipping a group's rows and/or columns
    (a permutation) turns its corner-padded convolution into a top-left padded one, i.e. a CInC convolution with a
    unit diagonal (log-determinant 0). So the whole layer is ``G · M(W_blockdiag) · G`` with ``G`` the per-group flip
    and ``W_blockdiag`` a ``(C, C, k, k)`` weight that is zero between groups: **one** call of our forward and one
    of our wavefront inverse do all four groups at once.

    Free parameters: ``Σ_g (k²c_g² − c_g(c_g−1)/2 − c_g)`` over the group sizes ``c_g`` + ``C`` bias.

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)`` (zeros).
    """

    CORNERS = (("top-left", ()), ("top-right", (3,)), ("bottom-left", (2,)), ("bottom-right", (2, 3)))
    mask: torch.Tensor

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, backend: str = "auto",
                 init_scale: float = 1e-2):
        super().__init__()
        check_int("channels", channels, 1)
        check_bool("bias", bias)
        INIT_SCALE.check("init_scale", init_scale)
        check_int("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE)
        self.channels, self.kernel_size, self.backend = channels, kernel_size, backend
        self.group_sizes = [len(g) for g in torch.arange(channels).tensor_split(len(self.CORNERS))]
        block = torch.zeros(channels, channels)
        start = 0
        for size in self.group_sizes:
            block[start:start + size, start:start + size] = 1
            start += size
        mask = block[:, :, None, None] * weight_mask(channels, kernel_size, unit_diagonal=True, dtype=torch.float32)
        self.register_buffer("mask", mask, persistent=False)
        self.weight = nn.Parameter(init_scale * torch.randn(channels, channels, kernel_size, kernel_size) * mask)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def _to_top_left(self, x: torch.Tensor) -> torch.Tensor:
        """``G``: flip each group so that its corner becomes the top-left one (an involution)."""
        groups = torch.split(x, self.group_sizes, dim=1)
        return torch.cat([g.flip(dims) if dims else g for g, (_, dims) in zip(groups, self.CORNERS)], dim=1)

    def logdet(self, height: int, width: int) -> torch.Tensor:
        return self.weight.new_zeros(())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(x, "x", self.channels)
        z = fn.cinc_conv2d(self._to_top_left(x), self.weight * self.mask, self.bias, unit_diagonal=True,
                           backend=self.backend)
        return self._to_top_left(z), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_batch(y, "y", self.channels)
        z = fn.cinc_conv2d_inverse(self._to_top_left(y), self.weight * self.mask, self.bias, unit_diagonal=True,
                                   backend=self.backend)
        return self._to_top_left(z)

    def num_parameters(self) -> int:
        n = sum(free_parameters(c, self.kernel_size, unit_diagonal=True) for c in self.group_sizes if c)
        return n + (self.channels if self.bias is not None else 0)

    def free_masks(self) -> Masks:
        return _with_bias_mask(self, {"weight": self.mask})

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, groups={self.group_sizes}, "
                f"bias={self.bias is not None}, backend={self.backend!r}, free_parameters={self.num_parameters()}")


LAYERS: dict[str, type] = {
    "cinc": CInCConv2d,
    "emerging": EmergingConv2d,
    "autoregressive": AutoregressiveConv2d,
    "1x1": InvConv1x1,
    "finc": FInCConv2d,
}
"""The invertible convolutions by the names a benchmark or a flow uses; each takes ``(channels, backend=...)``."""
