"""CInC Flow: the Glow-style multi-scale flow of docs/spec.md §4 with a choice of invertible convolution and
coupling, and the named configurations of the paper.

Data convention: images are continuous values in ``[0, 1)`` (dequantised, see :mod:`cinc_kernels.flow.data`);
the model centres them (``x - 0.5``, unit Jacobian) before the first level. Latents are a list with one tensor
per level: ``latents[i]`` is what level ``i``'s split factored out, ``latents[-1]`` the output of the last level.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union, cast

import torch
from torch import nn

from .layers import FlowStep, Split, Squeeze, gaussian_log_density

__all__ = ["CInCFlow", "PRESETS", "build_model", "flatten_latents", "unflatten_latents"]

Size = Union[int, Sequence[int]]


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class _Level(nn.Module):
    """``squeeze → steps → split`` (no split on the last level)."""

    steps: Any  # an nn.ModuleList of FlowStep (ModuleList is not generic, so its items would type as Module)
    split: Optional[Split]

    def __init__(self, channels: int, steps: int, hidden_channels: int, conv: str, coupling: str, backend: str,
                 conv_kwargs: Optional[dict[str, Any]], split: bool, permutation: str):
        super().__init__()
        self.squeeze = Squeeze()
        self.steps = nn.ModuleList(
            FlowStep(4 * channels, hidden_channels, conv, coupling, backend, conv_kwargs, permutation)
            for _ in range(steps)
        )
        self.split = Split(4 * channels) if split else None


class CInCFlow(nn.Module):
    """A multi-scale normalising flow: per level ``squeeze → steps_per_level × [ActNorm → conv → coupling] →
    split``, a learned conditional Gaussian prior on every split-off latent and a learned per-channel Gaussian on
    the last level's output.

    Args:
        in_channels: image channels ``C``.
        levels: number of levels ``L``; the image height and width must be multiples of ``2**L``.
        steps_per_level: flow steps per level ``K`` (0 is allowed: a pure Gaussian model, useful in tests).
        hidden_channels: width of the couplings' conditioner CNNs.
        conv: an invertible convolution of :data:`cinc_kernels.nn.LAYERS` by name (``"cinc"``, ``"emerging"``,
            ``"autoregressive"``, ``"1x1"``, ``"finc"``).
        coupling: ``"quad"`` (the paper's) or ``"affine"``.
        image_size: ``H`` or ``(H, W)`` of the training images; needed only by :meth:`sample` (which also takes it).
        backend: kernel backend passed to the convolutions (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, …).
        conv_kwargs: extra constructor arguments for the convolution layers (e.g. ``{"kernel_size": 3}``).
        permutation: ``"reverse"`` (a reversal before each coupling, docs/spec.md §4), ``"paper"`` (the authors'
            step exactly), ``"shuffle"`` (a fixed random permutation before each coupling), ``"none"`` (an
            ablation) or ``"1x1"`` (an LU 1×1 convolution before the convolution);
            see :class:`~cinc_kernels.flow.layers.FlowStep`.

    Shapes: ``x``: ``(B, C, H, W)`` in ``[0, 1)``; :meth:`log_prob` and :meth:`bits_per_dim`: ``(B,)``;
    :meth:`encode`: a list of ``L`` tensors with the shapes of :meth:`latent_shapes`.
    """

    levels: Any  # an nn.ModuleList of _Level (typed loosely, as _Level.steps)

    def __init__(self, in_channels: int, levels: int, steps_per_level: int, hidden_channels: int,
                 conv: str = "cinc", coupling: str = "quad", *, image_size: Optional[Size] = None,
                 backend: str = "auto", conv_kwargs: Optional[dict[str, Any]] = None, permutation: str = "reverse"):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("levels", levels, 1),
                                 ("steps_per_level", steps_per_level, 0), ("hidden_channels", hidden_channels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.in_channels, self.num_levels = in_channels, levels
        self.image_size = None if image_size is None else _pair(image_size)
        self.config = dict(in_channels=in_channels, levels=levels, steps_per_level=steps_per_level,
                           hidden_channels=hidden_channels, conv=conv, coupling=coupling,
                           image_size=None if self.image_size is None else list(self.image_size), backend=backend,
                           conv_kwargs=dict(conv_kwargs or {}), permutation=permutation)
        self.levels = nn.ModuleList()
        channels = in_channels
        for i in range(levels):
            last = i == levels - 1
            self.levels.append(_Level(channels, steps_per_level, hidden_channels, conv, coupling, backend,
                                      conv_kwargs, split=not last, permutation=permutation))
            channels = 4 * channels if last else 4 * channels - (4 * channels) // 2
        self.top_channels = channels
        for i, level in enumerate(self.levels):
            for j, step in enumerate(level.steps):
                if hasattr(step.conv, "name"):  # layers that name themselves in warnings (e.g. a non-finite inverse)
                    step.conv.name = f"levels.{i}.steps.{j}.conv"
        self.top_mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.top_log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @classmethod
    def upgrade_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A saved :attr:`config` completed with the defaults of the time it was saved: configurations written
        before the step had a ``permutation`` were trained with the step that is now ``"none"``."""
        config = dict(config)
        config.setdefault("permutation", "none")
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CInCFlow":
        """The model a saved :attr:`config` describes (see :meth:`upgrade_config`)."""
        return cls(**cls.upgrade_config(config))

    # ---------------------------------------------------------------------------------------------------------
    # shapes

    def _check_input(self, x: torch.Tensor, arg: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{arg} must be a 4-D tensor (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{arg} has {x.shape[1]} channels but the model takes {self.in_channels}")
        m = 2 ** self.num_levels
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"{arg}: height and width must be multiples of 2**levels = {m}, got "
                             f"{x.shape[2]}×{x.shape[3]}")

    def latent_shapes(self, image_size: Optional[Size] = None) -> list[tuple[int, int, int]]:
        """The ``(C, H, W)`` of each level's latent for images of ``image_size`` (default: the model's)."""
        size = image_size if image_size is not None else self.image_size
        if size is None:
            raise ValueError("image_size is needed: pass it here or to the CInCFlow constructor")
        h, w = _pair(size)
        shapes, channels = [], self.in_channels
        for level in self.levels:
            channels, h, w = 4 * channels, h // 2, w // 2
            if level.split is not None:
                shapes.append((level.split.factored, h, w))
                channels = level.split.kept
        shapes.append((channels, h, w))
        return shapes

    # ---------------------------------------------------------------------------------------------------------
    # density

    def transform(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The bijection and the prior: ``x`` in ``[0, 1)`` → ``(latents, logdet, log_prior)``, the last two
        ``(B,)``: ``log p(x) = log_prior + logdet``."""
        self._check_input(x)
        h = x - 0.5
        logdet = x.new_zeros(x.shape[0])
        log_prior = x.new_zeros(x.shape[0])
        latents: list[torch.Tensor] = []
        for level in self.levels:
            h, _ = level.squeeze(h)
            for step in level.steps:
                h, ld = step(h)
                logdet = logdet + ld
            if level.split is not None:
                h, z, lp = level.split(h)
                latents.append(z)
                log_prior = log_prior + lp
        latents.append(h)
        log_prior = log_prior + gaussian_log_density(h, self.top_mean, self.top_log_scale)
        return latents, logdet, log_prior

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` of the continuous density on ``[0, 1)^D``: ``(B, C, H, W) → (B,)``."""
        _, logdet, log_prior = self.transform(x)
        return log_prior + logdet

    forward = log_prob

    @staticmethod
    def bits_per_dim_from_log_prob(log_prob: torch.Tensor, dims: int, n_bits: float) -> torch.Tensor:
        """``(-log p(x) + D·log(2^n_bits)) / (D·log 2)``: the discrete data's code length per dimension, for
        a density ``p`` on ``[0, 1)^D`` of uniformly dequantised ``n_bits`` data (``n_bits`` may be fractional,
        e.g. ``log2(17)`` for 17 grey levels)."""
        return (-log_prob + dims * n_bits * math.log(2.0)) / (dims * math.log(2.0))

    def bits_per_dim(self, x: torch.Tensor, n_bits: float = 8) -> torch.Tensor:
        """Bits per dimension of dequantised ``x`` (values ``(k + u) / 2^n_bits``, ``u ~ U[0, 1)``): ``(B,)``."""
        return self.bits_per_dim_from_log_prob(self.log_prob(x), x[0].numel(), n_bits)

    # ---------------------------------------------------------------------------------------------------------
    # latents

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The latents of ``x``: a list of ``levels`` tensors ``(B, *latent_shapes()[i])``."""
        return self.transform(x)[0]

    def decode(self, latents: Sequence[Optional[torch.Tensor]], temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The images of ``latents`` (the inverse of :meth:`encode`). An entry may be ``None``: it is drawn from
        its (conditional) prior with the standard deviation scaled by ``temperature``; the last entry must then be
        given (use :meth:`sample` to draw everything).

        Returns ``(B, C, H, W)`` in data space (about ``[0, 1)``, not clamped).
        """
        if len(latents) != self.num_levels:
            raise ValueError(f"latents must hold {self.num_levels} tensors (one per level), got {len(latents)}")
        h = latents[-1]
        if h is None:
            raise ValueError("latents[-1] (the last level's latent) must be a tensor; use sample() to draw it")
        for i in reversed(range(self.num_levels)):
            level = self.levels[i]
            if level.split is not None:
                h = level.split.inverse(h, latents[i], temperature, generator)
            for step in reversed(level.steps):
                h = step.inverse(h)
            h = level.squeeze.inverse(h)
        return h + 0.5

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, image_size: Optional[Size] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` images drawn from the model with every prior's standard deviation scaled by ``temperature``:
        ``(n, C, H, W)`` in data space (clamp to ``[0, 1]`` to display)."""
        shapes = self.latent_shapes(image_size)
        ref = self.top_mean
        noise = torch.randn((n, *shapes[-1]), generator=generator, dtype=ref.dtype, device=ref.device)
        top = self.top_mean + temperature * torch.exp(self.top_log_scale) * noise
        return self.decode([None] * (self.num_levels - 1) + [top], temperature, generator)

    def num_parameters(self) -> int:
        """Free parameters, each entry once: a submodule with its own ``num_parameters()`` (the convolutions, which
        count only their free entries) answers for everything inside it, so the layers it is built from (e.g.
        :class:`~cinc_kernels.nn.EmergingConv2d`'s 1×1 and two CInC convolutions) are not counted again; every
        other parameter counts all its entries."""
        total, seen = 0, set[int]()
        pending = list(self.children())
        while pending:
            module = pending.pop()
            if hasattr(module, "num_parameters"):
                total += cast(Any, module).num_parameters()
                seen.update(id(p) for p in module.parameters())
            else:
                pending.extend(module.children())
        return total + sum(p.numel() for p in self.parameters() if id(p) not in seen)


def flatten_latents(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """The list of per-level latents as one ``(B, D)`` matrix (the order :func:`unflatten_latents` undoes)."""
    return torch.cat([z.flatten(1) for z in latents], dim=1)


def unflatten_latents(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """``(B, D)`` → per-level latents of ``shapes`` (from :meth:`CInCFlow.latent_shapes`)."""
    sizes = [math.prod(s) for s in shapes]
    if flat.dim() != 2 or flat.shape[1] != sum(sizes):
        raise ValueError(f"flat must be (B, {sum(sizes)}) for latent shapes {list(shapes)}, got {tuple(flat.shape)}")
    return [part.reshape(flat.shape[0], *s) for part, s in zip(torch.split(flat, sizes, dim=1), shapes)]


# Named configurations. The paper's (Nagar et al. 2021, §5) use 512 hidden channels; the small ones are sized for a
# 2-core CPU (digits-small trains to a useful model in a few minutes there, digits-tiny is for tests).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(in_channels=3, image_size=32, levels=3, steps_per_level=32, hidden_channels=512),
    "imagenet32": dict(in_channels=3, image_size=32, levels=3, steps_per_level=48, hidden_channels=512),
    "imagenet64": dict(in_channels=3, image_size=64, levels=4, steps_per_level=48, hidden_channels=512),
    "cifar10-small": dict(in_channels=3, image_size=32, levels=3, steps_per_level=8, hidden_channels=128),
    "mnist-small": dict(in_channels=1, image_size=32, levels=3, steps_per_level=8, hidden_channels=64),
    "digits-small": dict(in_channels=1, image_size=8, levels=2, steps_per_level=4, hidden_channels=32),
    "digits-tiny": dict(in_channels=1, image_size=8, levels=2, steps_per_level=1, hidden_channels=8),
}


def build_model(preset: Optional[str] = None, **overrides: Any) -> CInCFlow:
    """A :class:`CInCFlow` from a preset name with keyword overrides (``None`` values are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    kwargs = dict(PRESETS[preset]) if preset is not None else {}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("in_channels", "levels", "steps_per_level", "hidden_channels") if k not in kwargs]
    if missing:
        raise ValueError(f"build_model needs a preset or {', '.join(missing)}")
    return CInCFlow(**kwargs)
