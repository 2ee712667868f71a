"""Our invertible convolutions inside other flow libraries: normflows, FrEIA and zuko.

Every layer of :data:`cinc_kernels.nn.LAYERS` computes ``y, logdet = layer(x)`` with the cheap convolution and
``x = layer.inverse(y)`` with the wavefront solve (``docs/spec.md §1–§3``). Each adapter below puts the convolution
in the library's *density* direction (data → latent, the one training evaluates) and the solve in its *sampling*
direction, with the log-determinant signs that library expects::

    from cinc_kernels.interop import NormflowsConv, FrEIAConv, ZukoConv, image_flow, make_layer

    flows.append(NormflowsConv(make_layer("cinc", 12)))               # normflows: nf.NormalizingFlow / MultiscaleFlow
    inn = Ff.SequenceINN(3, 16, 16); inn.append(FrEIAConv, conv="cinc")   # FrEIA
    flow = image_flow([ZukoConv(make_layer("cinc", 3))], (3, 16, 16))  # zuko

The libraries are imported only when an adapter is first used; a missing one raises an ``ImportError`` that says
how to install it (``pip install cinc_kernels[interop]``).
"""
from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ._checks import check_batch

# The adapter classes are built on first use (module ``__getattr__``): their base classes come from the optional
# libraries.
__all__ = ["FrEIAConv", "NormflowsConv", "ZukoConv", "ZukoConvTransform", "image_flow", "make_layer"]  # noqa: F822

# The adapters subclass the libraries' own bases, so they are made on first access (module ``__getattr__`` at the
# end); declared here for readers and type checkers.
FrEIAConv: type[Any]
NormflowsConv: type[Any]
ZukoConv: type[Any]
ZukoConvTransform: type[Any]

# Names other libraries and papers use for the same layer.
_ALIASES = {"glow1x1": "1x1"}


def make_layer(conv: str, channels: int, **conv_kwargs: Any) -> nn.Module:
    """An invertible convolution of :data:`cinc_kernels.nn.LAYERS` by name (``"cinc"``, ``"emerging"``,
    ``"autoregressive"``, ``"1x1"`` alias ``"glow1x1"``, ``"finc"``); keyword arguments go to its constructor."""
    from .flow.layers import make_conv
    from .nn import LAYERS

    if not isinstance(conv, str):
        raise TypeError(f"conv must be a layer name (str), got {type(conv).__name__}")
    if conv not in LAYERS and _ALIASES.get(conv) in LAYERS:
        conv = _ALIASES[conv]
    if conv not in LAYERS:
        names = sorted(set(LAYERS) | {a for a, target in _ALIASES.items() if target in LAYERS})
        raise ValueError(f"conv must be one of {', '.join(names)}; got {conv!r}")
    backend = conv_kwargs.pop("backend", "auto")
    return make_conv(conv, channels, backend, **conv_kwargs)


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this adapter needs {package} ({exc}); install it with `pip install {package}` or "
            "`pip install cinc_kernels[interop]`") from exc


def _check_layer(layer: Any) -> None:
    if not isinstance(layer, nn.Module) or not all(callable(getattr(layer, m, None)) for m in ("inverse", "logdet")):
        raise TypeError("layer must be an invertible convolution module with forward(x) -> (y, logdet), "
                        f"inverse(y) and logdet(H, W), e.g. cinc_kernels.CInCConv2d; got {type(layer).__name__}")


def _layer_logdet(layer: Any, y: torch.Tensor) -> torch.Tensor:
    """``log|det ∂y/∂x|`` per sample for images of ``y``'s size, ``(B,)``."""
    logdet: torch.Tensor = layer.logdet(y.shape[-2], y.shape[-1]).to(y.dtype).expand(y.shape[0])
    return logdet


# The adapters subclass the libraries' own bases, which come without type information (mypy sees them as Any).


def _build_normflows() -> type[Any]:
    _require("normflows", "normflows")
    from normflows.flows import Flow

    class NormflowsConv(Flow):  # type: ignore[misc]
        """A layer of ours as a ``normflows`` flow (NCHW tensors, as normflows' Glow layers).

        normflows evaluates densities through ``inverse`` (``log q += log_det``) and samples through ``forward``
        (``log q -= log_det``), both returning ``(tensor, log|det|)`` of the direction they run. So
        ``inverse(x)`` is our convolution with ``+logdet`` and ``forward(z)`` our wavefront inverse with
        ``−logdet``.

        Args:
            layer: e.g. ``CInCConv2d(C)`` or :func:`make_layer` ``("cinc", C)``; its parameters become this flow's.
        """

        layer: Any  # one of our layers: forward -> (y, logdet), inverse, logdet(H, W)

        def __init__(self, layer: nn.Module):
            super().__init__()
            _check_layer(layer)
            self.layer = layer

        def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            check_batch(z, "z")
            return self.layer.inverse(z), -_layer_logdet(self.layer, z)

        def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            check_batch(z, "z")
            y, logdet = self.layer(z)
            return y, logdet.to(y.dtype)

    return NormflowsConv


def _build_freia() -> type[Any]:
    _require("FrEIA", "FrEIA")
    from FrEIA.modules import InvertibleModule

    class FrEIAConv(InvertibleModule):  # type: ignore[misc]
        """A layer of ours as a FrEIA ``InvertibleModule``: ``Ff.SequenceINN(C, H, W).append(FrEIAConv,
        conv="cinc")``.

        ``rev=False`` runs the convolution and returns ``log|det J|``; ``rev=True`` runs the wavefront inverse and
        returns ``−log|det J|``, as FrEIA defines them.

        Args:
            dims_in: ``[(C, H, W)]`` (FrEIA passes it).
            dims_c: must be empty: the convolutions take no condition.
            conv: a name of :func:`make_layer`.
            **conv_kwargs: constructor arguments of that layer (``kernel_size``, ``parametrization``, ``backend``…).
        """

        layer: Any  # one of our layers: forward -> (y, logdet), inverse, logdet(H, W)

        def __init__(self, dims_in: list[tuple[int, ...]], dims_c: Optional[list[tuple[int, ...]]] = None,
                     conv: str = "cinc", **conv_kwargs: Any):
            super().__init__(dims_in, dims_c)
            if len(self.dims_in) != 1 or len(self.dims_in[0]) != 3:
                raise ValueError(f"dims_in must be one (C, H, W) shape, got {self.dims_in}")
            if self.dims_c:
                raise ValueError(f"dims_c must be empty: {conv!r} takes no condition, got {self.dims_c}")
            self.layer = make_layer(conv, int(self.dims_in[0][0]), **conv_kwargs)

        def forward(self, x_or_z: Sequence[torch.Tensor], c: Optional[Sequence[torch.Tensor]] = None,
                    rev: bool = False, jac: bool = True) -> tuple[tuple[torch.Tensor], torch.Tensor]:
            if c:
                raise ValueError("c must be empty: the convolution takes no condition")
            (x,) = x_or_z
            check_batch(x, "x_or_z[0]")
            if rev:
                return (self.layer.inverse(x),), -_layer_logdet(self.layer, x)
            y, logdet = self.layer(x)
            return (y,), logdet.to(y.dtype)

        def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
            return input_dims

    return FrEIAConv


def _build_zuko() -> dict[str, type[Any]]:
    _require("zuko", "zuko")
    from torch.distributions import Transform, constraints
    from zuko.lazy import LazyTransform

    class ZukoConvTransform(Transform):
        """``torch.distributions.Transform`` over images (event ``(C, H, W)``, any batch shape in front):
        ``__call__`` is our convolution, ``inv`` our wavefront inverse, and ``call_and_ladj`` (what zuko's
        ``NormalizingFlow.log_prob`` calls) returns both from one convolution."""

        domain = constraints.independent(constraints.real, 3)
        codomain = constraints.independent(constraints.real, 3)
        bijective = True

        layer: Any  # one of our layers: forward -> (y, logdet), inverse, logdet(H, W)

        def __init__(self, layer: nn.Module, **kwargs: Any):
            super().__init__(**kwargs)
            _check_layer(layer)
            self.layer = layer

        @staticmethod
        def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
            if x.dim() < 3:
                raise ValueError(f"{name} must be (..., C, H, W), got shape {tuple(x.shape)}")
            return x.reshape(-1, *x.shape[-3:])

        def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, logdet = self.layer(self._flat(x, "x"))
            return y.reshape(x.shape), logdet.to(y.dtype).reshape(x.shape[:-3])

        def _call(self, x: torch.Tensor) -> torch.Tensor:
            return self.call_and_ladj(x)[0]

        def _inverse(self, y: torch.Tensor) -> torch.Tensor:
            x: torch.Tensor = self.layer.inverse(self._flat(y, "y")).reshape(y.shape)
            return x

        def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            ladj: torch.Tensor = self.layer.logdet(x.shape[-2], x.shape[-1]).to(x.dtype).expand(x.shape[:-3])
            return ladj

    class ZukoConv(LazyTransform):  # type: ignore[misc]
        """A layer of ours as a zuko lazy transform (an ``nn.Module`` holding the parameters, returning a
        :class:`ZukoConvTransform` when called); put it in ``zuko.lazy.Flow`` with a base over images, e.g. by
        :func:`image_flow`."""

        layer: Any  # one of our layers: forward -> (y, logdet), inverse, logdet(H, W)

        def __init__(self, layer: nn.Module):
            super().__init__()
            _check_layer(layer)
            self.layer = layer

        def forward(self, c: Optional[torch.Tensor] = None) -> Transform:
            if c is not None:
                raise ValueError("c must be None: the convolution takes no context")
            return ZukoConvTransform(self.layer)

    return {"ZukoConv": ZukoConv, "ZukoConvTransform": ZukoConvTransform}


def image_flow(transforms: Sequence[nn.Module], shape: Sequence[int]) -> Any:
    """A ``zuko.lazy.Flow`` over ``shape = (C, H, W)`` images: ``transforms`` (zuko lazy transforms, e.g.
    :class:`ZukoConv`) towards a standard normal base whose event is the whole image (zuko's own bases are over
    vectors). ``flow().log_prob(x)`` is ``(B,)``; ``flow().sample((n,))`` is ``(n, C, H, W)``."""
    _require("zuko", "zuko")
    from zuko.distributions import DiagNormal
    from zuko.lazy import Flow, UnconditionalDistribution

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    base = UnconditionalDistribution(DiagNormal, torch.zeros(shape), torch.ones(shape), 3, buffer=True)
    return Flow(list(transforms), base)


_BUILDERS = {"NormflowsConv": _build_normflows, "FrEIAConv": _build_freia, "ZukoConv": _build_zuko,
             "ZukoConvTransform": _build_zuko}
_BUILT: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # PEP 562: the adapter classes are built when first asked for, which keeps their libraries optional.
    if name not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        built: Any = _BUILDERS[name]()
        _BUILT.update(built if isinstance(built, dict) else {name: built})
    return _BUILT[name]
