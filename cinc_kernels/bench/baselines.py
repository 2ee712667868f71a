"""The inverse algorithms ours are compared with: a pure-PyTorch wavefront (the ``torch`` backend's) and the paper's
sequential raster solve."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .. import functional as fn
from .. import torch_backend
from ..masks import masked_weight

__all__ = ["inverse_algorithms", "sequential_raster_inverse", "torch_wavefront_inverse"]


def torch_wavefront_inverse(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            unit_diagonal: bool = False) -> torch.Tensor:
    """The CInC inverse as a wavefront in plain PyTorch, one set of ops per anti-diagonal: the ``torch`` backend's
    (:mod:`cinc_kernels.torch_backend`). ``(B, C, H, W) -> (B, C, H, W)``."""
    x: torch.Tensor = torch_backend.inverse(y, weight, bias, unit_diagonal)
    return x


def sequential_raster_inverse(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                              unit_diagonal: bool = False) -> torch.Tensor:
    """The paper's inverse: pixels one at a time in raster order (eager PyTorch, ``H·W`` steps), each solved with
    ``L⁻¹`` precomputed (kinder to the baseline than the channel-by-channel substitution).
    ``(B, C, H, W) -> (B, C, H, W)``.

    ``torch.compile`` does not help here: with the pixel as Python ints it recompiles per pixel (and stops at the
    recompile limit); with tensor indices each compiled step costs more than the eager one."""
    B, C, H, W = y.shape
    k = weight.shape[-1]
    wm = masked_weight(weight, unit_diagonal)
    eye = torch.eye(C, dtype=weight.dtype, device=weight.device)
    l_inv_t = torch.linalg.solve_triangular(wm[:, :, -1, -1], eye, upper=False).T
    off = wm.clone()
    off[:, :, -1, -1] = 0
    off_t = off.reshape(C, C * k * k).T
    r = y if bias is None else y - bias.view(1, C, 1, 1)
    xp = y.new_zeros(B, C, H + k - 1, W + k - 1)
    for i in range(H):
        for j in range(W):
            window = xp[:, :, i:i + k, j:j + k].reshape(B, C * k * k)
            xp[:, :, i + k - 1, j + k - 1] = (r[:, :, i, j] - window @ off_t) @ l_inv_t
    return xp[:, :, k - 1:, k - 1:]


def inverse_algorithms(w: torch.Tensor, b: Optional[torch.Tensor],
                       backends: list[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """``{label: y -> x}`` for one CInC weight and bias: ours per backend, then the baselines."""
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        be: functools.partial(fn.cinc_conv2d_inverse, weight=w, bias=b, backend=be) for be in backends}
    if "torch" not in backends:  # otherwise already timed under its backend name
        impls["torch_wavefront"] = functools.partial(torch_wavefront_inverse, weight=w, bias=b)
    impls["sequential_raster_eager"] = functools.partial(sequential_raster_inverse, weight=w, bias=b)
    return impls
