"""Inputs and error measures for checking CInC ops: what the test suite, ``python -m cinc_kernels check`` and the
benchmarks share, so that all three judge a backend on the same kind of problem.

    >>> import torch
    >>> from cinc_kernels import cinc_conv2d, cinc_conv2d_inverse
    >>> from cinc_kernels.testing import make_image, make_weight, rel_error
    >>> g = torch.Generator().manual_seed(0)
    >>> w, x = make_weight(3, 2, generator=g), make_image(2, 3, 5, 4, generator=g)
    >>> rel_error(cinc_conv2d_inverse(cinc_conv2d(x, w), w), x) < 1e-12
    True
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from . import functional as fn

__all__ = ["make_image", "make_weight", "op_arguments", "op_function", "rel_error"]

Device = Union[torch.device, str]


def make_weight(C: int, k: int, dtype: torch.dtype = torch.float64, device: Device = "cpu", *,
                off_centre: float = 0.3, generator: Optional[torch.Generator] = None,
                unit_diagonal: bool = False) -> torch.Tensor:
    """A ``(C, C, k, k)`` weight whose inverse is well conditioned: every entry an ``off_centre / (k·√C)`` scaled
    normal, plus 1.5…2.5 with a random sign on the centre tap's diagonal (drawn in float64, then cast). With
    ``unit_diagonal`` the diagonal is drawn as well, and ignored by the ops."""
    w = torch.randn(C, C, k, k, generator=generator, dtype=torch.float64) * off_centre / (k * C**0.5)
    sign = torch.randint(0, 2, (C,), generator=generator).double() * 2 - 1
    diag = sign * (1.5 + torch.rand(C, generator=generator, dtype=torch.float64))
    w[:, :, k - 1, k - 1] += torch.diag(diag)
    weight: torch.Tensor = w.to(dtype=dtype, device=device)
    return weight


def make_image(B: int, C: int, H: int, W: int, dtype: torch.dtype = torch.float64, device: Device = "cpu", *,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A ``(B, C, H, W)`` batch of standard normals (drawn in float64, then cast)."""
    return torch.randn(B, C, H, W, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def op_function(op: str, backend: str, unit_diagonal: bool = False, height: int = 5,
                width: int = 3) -> Callable[..., torch.Tensor]:
    """The public function of ``op`` (a name of :data:`cinc_kernels.contract.OP_NAMES`) on ``backend`` as a function
    of its tensors only, in the order of :func:`op_arguments`; the log-determinant is the one of a
    ``height × width`` image. For ``torch.func`` transforms and ``gradcheck``."""
    if op == "forward":
        return lambda x, w, b: fn.cinc_conv2d(x, w, b, unit_diagonal=unit_diagonal, backend=backend)
    if op == "inverse":
        return lambda y, w, b: fn.cinc_conv2d_inverse(y, w, b, unit_diagonal=unit_diagonal, backend=backend)
    if op == "inverse_transpose":
        return lambda g, w: fn.cinc_conv2d_inverse_transpose(g, w, unit_diagonal=unit_diagonal, backend=backend)
    if op == "logdet":
        return lambda w: fn.cinc_logdet(w, height, width, unit_diagonal=unit_diagonal, backend=backend)
    raise ValueError(f"op must be forward, inverse, inverse_transpose or logdet; got {op!r}")


def op_arguments(op: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 image: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """The tensors :func:`op_function` of ``op`` takes, in order."""
    return {"forward": (image, weight, bias), "inverse": (image, weight, bias), "inverse_transpose": (image, weight),
            "logdet": (weight,)}[op]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64 on the CPU (the absolute ``‖got − want‖`` when ``want`` is 0)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return float(diff / denom if denom > 0 else diff)
