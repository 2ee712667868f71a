"""The building blocks of the flow, all with the layers' interface: ``y, logdet = block(x)`` and
``x = block.inverse(y)``, ``logdet`` of shape ``(B,)`` (``log|det ∂y/∂x|`` per sample).

docs/spec.md §4: per level ``squeeze → K × [ActNorm → invertible conv → reverse channels → coupling] → split``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, cast

import torch
from torch import nn
import torch.nn.functional as F

from ..nn import LAYERS

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "COUPLINGS",
    "CouplingNet",
    "FlowStep",
    "PERMUTATIONS",
    "QuadCoupling",
    "ReverseChannels",
    "ShuffleChannels",
    "Split",
    "Squeeze",
    "make_conv",
]

_LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``Σ log N(z; mean, exp(log_scale)²)`` over all but the batch dimension: ``(B, ...) → (B,)``."""
    d = -0.5 * (_LOG_2PI + 2 * log_scale + ((z - mean) * torch.exp(-log_scale)) ** 2)
    return d.flatten(1).sum(1)


class ActNorm(nn.Module):
    """Per-channel affine map ``y = (x + bias) · exp(log_scale)`` (Glow), initialised from the first batch it sees
    in training mode so that ``y`` has zero mean and unit variance per channel.

    Shapes: ``x``, ``y``: ``(B, C, H, W)``; ``logdet``: ``(B,)`` = ``H·W·Σ log_scale``.
    """

    initialized: torch.Tensor

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps
        # A buffer, not a Python flag, so that it travels in state_dict (a resumed run must not initialise again)
        # and DDP broadcasts rank 0's value with the parameters.
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized) and x.shape[0] > 0:
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = (x.shape[2] * x.shape[3]) * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class Squeeze(nn.Module):
    """2×2 space-to-depth: ``(B, C, H, W) → (B, 4C, H/2, W/2)``; volume preserving (logdet 0).

    Output channel ``4c + 2a + b`` holds input channel ``c`` at offset ``(a, b)`` of each 2×2 cell.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"Squeeze needs an even height and width, got {H}×{W}; pad or resize the images "
                             f"to a multiple of 2**levels")
        y = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
        return y, x.new_zeros(B)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        B, C4, H, W = y.shape
        C = C4 // 4
        return y.reshape(B, C, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C, 2 * H, 2 * W)


class CouplingNet(nn.Module):
    """The conditioner of a coupling: 3×3 conv → ReLU → 1×1 conv → ReLU → zero-initialised 3×3 conv.

    Shapes: ``(B, in_channels, H, W) → (B, out_channels, H, W)``. The last layer starts at zero so every
    coupling starts as a fixed per-element scale ``sigmoid(2)`` (a near-identity flow that trains stably).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
        )
        last = cast(nn.Conv2d, self.net[-1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(cast(torch.Tensor, last.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def _shift_and_log_scale(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a conditioner's output into the shift ``t`` and ``log s`` with ``s = sigmoid(h + 2)``."""
    t, raw = h.chunk(2, dim=1)
    return t, F.logsigmoid(raw + 2.0)


def _block_sizes(channels: int, blocks: int) -> list[int]:
    """``channels`` split into ``blocks`` near-equal parts (earlier parts take the remainder)."""
    if channels < blocks:
        raise ValueError(f"a coupling with {blocks} blocks needs at least {blocks} channels, got {channels}")
    base, rest = divmod(channels, blocks)
    return [base + (1 if i < rest else 0) for i in range(blocks)]


class _BlockCoupling(nn.Module):
    """Coupling over ``n`` channel blocks ``x1 … xn``: ``y1 = x1`` and, for ``i ≥ 2``,
    ``yi = (xi + t(x1 … x(i-1))) · s(x1 … x(i-1))``. ``n = 2`` is the affine coupling, ``n = 4`` the quad one.

    The conditioners see the *inputs* ``x1 … x(i-1)``, which equal the outputs ``y1 …`` only for the first block;
    the inverse therefore recovers the blocks in order, each from the ones already recovered.
    """

    blocks = 2

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.sizes = _block_sizes(channels, self.blocks)
        self.nets = nn.ModuleList(
            CouplingNet(sum(self.sizes[:i]), 2 * self.sizes[i], hidden_channels) for i in range(1, self.blocks)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = list(torch.split(x, self.sizes, dim=1))
        ys = [xs[0]]
        logdet = x.new_zeros(x.shape[0])
        for i, net in enumerate(self.nets, start=1):
            t, log_s = _shift_and_log_scale(net(torch.cat(xs[:i], dim=1)))
            ys.append((xs[i] + t) * torch.exp(log_s))
            logdet = logdet + log_s.flatten(1).sum(1)
        return torch.cat(ys, dim=1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ys = list(torch.split(y, self.sizes, dim=1))
        xs = [ys[0]]
        for i, net in enumerate(self.nets, start=1):
            t, log_s = _shift_and_log_scale(net(torch.cat(xs, dim=1)))
            xs.append(ys[i] * torch.exp(-log_s) - t)
        return torch.cat(xs, dim=1)


class AffineCoupling(_BlockCoupling):
    """Glow/RealNVP affine coupling: ``y1 = x1``, ``y2 = (x2 + t(x1)) · sigmoid(h(x1) + 2)``.

    Shapes: ``(B, C, H, W)`` in and out, ``C ≥ 2``; ``logdet``: ``(B,)``.
    """

    blocks = 2


class QuadCoupling(_BlockCoupling):
    """The CInC paper's quad coupling: four channel blocks, each transformed conditioned on all blocks before it
    (docs/spec.md §4). Shapes: ``(B, C, H, W)`` in and out, ``C ≥ 4``; ``logdet``: ``(B,)``.
    """

    blocks = 4


COUPLINGS: dict[str, type] = {"affine": AffineCoupling, "quad": QuadCoupling}


def make_conv(name: str, channels: int, backend: str = "auto", **kwargs: Any) -> nn.Module:
    """An invertible convolution from :data:`cinc_kernels.nn.LAYERS` by name; every layer there takes ``backend``
    (docs/spec.md §3: one interface)."""
    if name not in LAYERS:
        raise ValueError(f"conv must be one of {', '.join(sorted(LAYERS))}; got {name!r}")
    layer: nn.Module = LAYERS[name](channels, backend=backend, **kwargs)
    return layer


class ReverseChannels(nn.Module):
    """Reverse the channel order (Glow's "reverse" permutation): volume preserving, its own inverse.

    It lets a coupling condition on the other half in alternate steps; with a convolution whose same-pixel
    channel mixing is triangular (CInC's centre tap) the first channels otherwise never see the last ones of the
    same pixel. Shapes: ``(B, C, H, W)`` in and out; ``logdet``: zeros ``(B,)``.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flip(1), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.flip(1)


class ShuffleChannels(nn.Module):
    """A fixed random channel permutation with no parameters: output channel ``c`` is input channel ``perm[c]``.
    Volume preserving; the inverse applies ``perm``'s inverse, exactly.

    ``perm`` is drawn at construction from torch's global generator (so ``torch.manual_seed`` reproduces it, and
    every step of a flow gets its own) and kept as a buffer: it is saved in ``state_dict`` and a checkpoint
    restores the permutation it was trained with. Shapes: ``(B, C, H, W)`` in and out; ``logdet``: zeros ``(B,)``.
    """

    perm: torch.Tensor

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("perm", torch.randperm(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, torch.argsort(self.perm)]


PERMUTATIONS = ("reverse", "none", "1x1", "paper", "shuffle")


class FlowStep(nn.Module):
    """One step of flow: ActNorm → [LU 1×1 | channel reversal] → invertible convolution (by name) →
    [channel reversal] → coupling.

    ``permutation`` (docs/spec.md §4):

    - ``"reverse"`` (default): reverse the channels between the convolution and the coupling, ``R·M``. Our CInC
      centre tap is lower triangular (output ``c`` reads inputs ``0…c``); the authors' is upper triangular (their
      mask is flipped on both channel axes), and their coupling conditions on the first half. With the reversal
      the coupling's channel ``c`` reads inputs ``0…C−1−c`` at the centre tap, so the conditioning half receives
      the transformed half, as in the authors' step; but ``R·M = (R·M·R)·R``: this is the authors' step with one
      more channel reversal at its start (equivalently, between every coupling and the next step), so the two
      flows are not the same family of maps.
    - ``"paper"``: the authors' step exactly, ``R·M·R`` (reverse, convolve, reverse back) with nothing between
      steps: their upper triangular convolution, entry for entry (the coupling's channel ``c`` reads inputs
      ``c…C−1`` of the same pixel). ``R`` is a permutation, so the log-determinant is the convolution's.
    - ``"shuffle"``: a fixed random channel permutation (:class:`ShuffleChannels`, one per step, no parameters)
      between the convolution and the coupling, in place of the reversal.
    - ``"none"``: ActNorm → conv → coupling with our orientation (an ablation: the conditioning half never
      receives the transformed half through the centre tap).
    - ``"1x1"``: an LU :class:`~cinc_kernels.nn.InvConv1x1` before the convolution (the authors'
      ``--flow_permutation 6``, what Glow, Emerging and FInC Flow steps carry).

    Shapes: ``(B, C, H, W)`` in and out; ``logdet``: ``(B,)``.
    """

    def __init__(self, channels: int, hidden_channels: int, conv: str = "cinc", coupling: str = "quad",
                 backend: str = "auto", conv_kwargs: Optional[dict[str, Any]] = None, permutation: str = "reverse"):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {', '.join(sorted(COUPLINGS))}; got {coupling!r}")
        if permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {', '.join(PERMUTATIONS)}; got {permutation!r}")
        self.actnorm = ActNorm(channels)
        self.mix = make_conv("1x1", channels, backend) if permutation == "1x1" else None
        self.reverse_in = ReverseChannels() if permutation == "paper" else None
        self.conv = make_conv(conv, channels, backend, **(conv_kwargs or {}))
        self.permute: nn.Module | None = None
        if permutation in ("reverse", "paper"):
            self.permute = ReverseChannels()
        elif permutation == "shuffle":
            self.permute = ShuffleChannels(channels)
        self.coupling = COUPLINGS[coupling](channels, hidden_channels)

    def _layers(self) -> list[nn.Module]:
        return [m for m in (self.actnorm, self.mix, self.reverse_in, self.conv, self.permute, self.coupling)
                if m is not None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self._layers():
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self._layers()):
            y = cast(Any, layer).inverse(y)
        return y


class Split(nn.Module):
    """Factor out half of the channels as a latent ``z`` with a learned conditional Gaussian prior
    ``p(z | h) = N(mean(h), exp(log_scale(h))²)`` whose parameters come from a zero-initialised 3×3 conv of the
    kept half ``h`` (so it starts as a standard normal).

    ``forward(x) → (h, z, log p(z | h))``: ``x`` ``(B, C, H, W)``, ``h`` ``(B, C - C//2, H, W)``,
    ``z`` ``(B, C//2, H, W)``, log-density ``(B,)``. ``inverse(h, z=None, temperature)`` puts them back, drawing
    ``z`` from the prior (standard deviation scaled by ``temperature``) when it is ``None``.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got {channels}")
        self.kept = channels - channels // 2
        self.factored = channels // 2
        self.prior = nn.Conv2d(self.kept, 2 * self.factored, 3, padding=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(cast(torch.Tensor, self.prior.bias))

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_scale)`` of ``p(z | h)``, each ``(B, C//2, H, W)``."""
        mean, log_scale = self.prior(h).chunk(2, dim=1)
        return mean, log_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, z = torch.split(x, [self.kept, self.factored], dim=1)
        mean, log_scale = self.prior_params(h)
        return h, z, gaussian_log_density(z, mean, log_scale)

    def inverse(self, h: torch.Tensor, z: Optional[torch.Tensor] = None, temperature: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if z is None:
            mean, log_scale = self.prior_params(h)
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            z = mean + temperature * torch.exp(log_scale) * noise
        return torch.cat([h, z], dim=1)

