"""``backend="torch"``: the CInC ops in plain PyTorch, for any device torch runs on (CPU, CUDA, Apple MPS, Intel XPU).

The inverse is the wavefront of docs/spec.md §1: the pixels of one anti-diagonal ``i + j = d`` depend only on
earlier anti-diagonals, so each of the ``H + W − 1`` steps gathers the k×k windows of all its pixels at once, takes
the off-centre taps with one batched contraction, and solves the centre tap's triangular system for all of them with
``torch.linalg.solve_triangular``. The adjoint ``M⁻ᵀ`` runs the same wavefront from the bottom-right corner with the
flipped, channel-transposed taps and ``Lᵀ``. Everything stays in the input's dtype (no float64, which MPS lacks).

The forward and the log-determinant are ATen's operators (:mod:`cinc_kernels._aten`). The ops are
``torch.library`` custom ops in the namespace ``cinc_torch``, with the schemas of :mod:`cinc_kernels.contract`, so
they get the same fake implementations and the same backward formulas (:mod:`cinc_kernels.registration`) as the
compiled backends.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _aten, registration
from .backends import FLOATS, HALVES, OPS, Backend, register_backend
from .contract import custom_op
from .masks import masked_weight

__all__ = ["forward", "inverse", "inverse_transpose", "logdet"]

NAMESPACE = "cinc_torch"

def _check_nonsingular(centre: torch.Tensor) -> None:
    if bool((centre.diagonal() == 0).any()):
        raise ValueError("weight: the centre tap has a zero on its diagonal, the convolution is singular")


def _diagonal_pixels(d: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the pixels with ``i + j = d``."""
    rows = torch.arange(max(0, d - width + 1), min(d, height - 1) + 1, device=device)
    return rows, d - rows


def _wavefront(rhs: torch.Tensor, taps: torch.Tensor, centre: torch.Tensor, *, upper: bool) -> torch.Tensor:
    """Solve for ``x`` with ``x[i, j] = centre⁻¹ (rhs[i, j] − Σ_ab taps[:, :, a, b] · x[i+a−(k−1), j+b−(k−1)])``.

    ``rhs``: ``(B, C, H, W)``; ``taps``: ``(C, C, k, k)`` with a zero centre tap; ``centre``: ``(C, C)`` triangular
    (``upper`` says which). Pixels outside the image count as zero. The neighbours sit up and to the left, so the
    anti-diagonals are solved in increasing order.
    """
    B, C, H, W = rhs.shape
    k = taps.shape[-1]
    # Channels last and padded on the top and left: the window of pixel (i, j) is rows i…i+k−1, columns j…j+k−1, and
    # gathering the windows of a whole anti-diagonal gives a (B·n, k·k·C) matrix whose rows are pixels.
    solution = rhs.new_zeros(B, H + k - 1, W + k - 1, C)
    rhs_last = rhs.permute(0, 2, 3, 1)
    taps_matrix = taps.permute(2, 3, 1, 0).reshape(k * k * C, C)  # row (a, b, c), column o
    # Each pixel's row x solves x · centreᵀ = acc (a right-hand-side solve keeps the pixels as rows).
    centre_t = centre.T
    offsets = torch.arange(k, device=rhs.device)
    for d in range(H + W - 1):
        rows, cols = _diagonal_pixels(d, H, W, rhs.device)
        n = rows.numel()
        acc = rhs_last[:, rows, cols, :].reshape(B * n, C)
        if k > 1:
            window_rows = (rows[:, None] + offsets)[:, :, None]  # (n, k, 1)
            window_cols = (cols[:, None] + offsets)[:, None, :]  # (n, 1, k)
            windows = solution[:, window_rows, window_cols, :]  # (B, n, k, k, C)
            acc = acc - windows.reshape(B * n, k * k * C) @ taps_matrix
        x = torch.linalg.solve_triangular(centre_t, acc, upper=not upper, left=False)
        solution[:, rows + k - 1, cols + k - 1, :] = x.reshape(B, n, C)
    return solution[:, k - 1:, k - 1:, :].permute(0, 3, 1, 2).contiguous()


def _split_weight(weight: torch.Tensor, unit_diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Wm with its centre tap zeroed, L)`` for the masked weight ``Wm``."""
    k = weight.shape[-1]
    wm = masked_weight(weight, unit_diagonal)
    centre = wm[:, :, k - 1, k - 1].clone()
    taps = wm.clone()
    taps[:, :, k - 1, k - 1] = 0
    return taps, centre


@custom_op(NAMESPACE, "forward")
def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], unit_diagonal: bool) -> torch.Tensor:
    """``y = M x + bias`` (docs/spec.md §1) as ATen's convolution on the masked weight. ``(B, C, H, W) -> same``."""
    return _aten.forward(x, weight, bias, unit_diagonal).contiguous()


@custom_op(NAMESPACE, "inverse")
def inverse(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], unit_diagonal: bool) -> torch.Tensor:
    """``x = M⁻¹ (y − bias)`` by the anti-diagonal wavefront. ``(B, C, H, W) -> same``; ``ValueError`` if singular."""
    taps, centre = _split_weight(weight, unit_diagonal)
    _check_nonsingular(centre)
    rhs = y if bias is None else y - bias.view(1, -1, 1, 1)
    return _wavefront(rhs, taps, centre, upper=False)


@custom_op(NAMESPACE, "inverse_transpose")
def inverse_transpose(g: torch.Tensor, weight: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``u = M⁻ᵀ g``: the wavefront from the bottom-right corner. ``(B, C, H, W) -> same``."""
    taps, centre = _split_weight(weight, unit_diagonal)
    _check_nonsingular(centre)
    # Mᵀ couples pixel (i, j) to (i + k−1−a, j + k−1−b) through tap[a, b]ᵀ; on the image flipped both ways that is
    # (i + a − (k−1), j + b − (k−1)), the forward's up-left neighbourhood, with the channel-transposed taps.
    flipped = _wavefront(g.flip(2, 3), taps.transpose(0, 1), centre.T, upper=True)
    return flipped.flip(2, 3).contiguous()


@custom_op(NAMESPACE, "logdet")
def logdet(weight: torch.Tensor, height: int, width: int, unit_diagonal: bool) -> torch.Tensor:
    """``H·W·Σ_c log|L[c, c]|`` in ``weight``'s dtype (0 with ``unit_diagonal``, ``-inf`` when singular)."""
    return _aten.logdet(weight, height, width, unit_diagonal)


# float32 everywhere, float64 where the device has it (not MPS); float16 / bfloat16 for the forward on GPUs.
OP_DTYPES: dict[Union[str, tuple[str, str]], tuple[torch.dtype, ...]] = {("mps", op): (torch.float32,) for op in OPS}
OP_DTYPES.update({("mps", "forward"): (torch.float32,) + HALVES, ("cuda", "forward"): FLOATS + HALVES,
                  ("xpu", "forward"): FLOATS + HALVES})


OPS_BY_NAME = {op: getattr(getattr(torch.ops, NAMESPACE), op).default for op in OPS}
registration.register(OPS_BY_NAME)

register_backend(Backend(name="torch", ops=OPS_BY_NAME, op_dtypes=OP_DTYPES))
