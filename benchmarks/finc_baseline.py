"""A GPU inverse with FInC's algorithm, written by us as the baseline of benchmarks/bench_gpu.py.

FInC (Kallappa, Nagar, Varma, "FInC Flow", 2023) splits the channels into four groups, each mixed only within itself
by a corner-padded k×k convolution whose centre tap is unit lower triangular. Its CUDA inverse flips three of the
groups so that all four are top-left padded, then, for each anti-diagonal and each channel index c of a group,
launches one kernel that solves channel c of every group at every pixel of the diagonal in every image, reading
everything from global memory and synchronising the device after each launch: (H + W - 1) · C/4 launches per call,
each thread summing over the taps and the C/4 channels of its own group.

This module runs that schedule with one Triton kernel on FInC's layer as :class:`cinc_kernels.nn.FInCConv2d` holds
it: a ``(C, C, k, k)`` weight that is zero between the four groups (``tensor_split`` sizes, so ⌈C/4⌉ launches per
diagonal when 4 does not divide C) with a unit diagonal, every group already top-left padded. Two things favour the
baseline: the flips FInC makes around each call are left out, and :func:`finc_inverse_graph` replays the launches
from a CUDA graph, without the launch overhead FInC pays. Launches on one stream run in order, which is FInC's
device-wide synchronisation. A baseline, not a backend: float32/float64, k = 1 … 7, contiguous NCHW only.

    w_finc = finc_weight(w)                                 # FInC's layer from a (C, C, k, k) weight
    x = finc_inverse(y, w_finc, bias)                       # (B, C, H, W) -> (B, C, H, W)
    run = finc_inverse_graph(y, w_finc, bias); x = run()    # the same launches captured in a CUDA graph
"""
from __future__ import annotations

from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the baseline is optional
    triton = None

GROUPS = 4


if triton is not None:

    @triton.jit
    def _finc_group_channel_kernel(
        y_ptr, x_ptr, w_ptr, bias_ptr,
        C, H, W, first, count, d, c,
        K: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        # One program per (image, pixel of diagonal d) and group: channel c of that group at that pixel. Group g holds
        # the channels tensor_split(C, 4) gives it: the first C % 4 groups have one more.
        pid = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        quotient = C // 4
        remainder = C % 4
        start = g * quotient + tl.minimum(g, remainder)
        size = quotient + (g < remainder).to(tl.int32)
        if c < size:
            b = pid // count
            i = first + pid % count
            j = d - i
            o = start + c
            cols = tl.arange(0, BLOCK_C)
            in_group = cols < size
            channels = start + cols
            image = b * C * H * W
            acc = tl.load(y_ptr + image + (o * H + i) * W + j)  # accumulates in y's dtype (float32 or float64)
            if HAS_BIAS:
                acc -= tl.load(bias_ptr + o)
            for a in tl.static_range(K):
                for bb in tl.static_range(K):
                    ii = i + a - (K - 1)
                    jj = j + bb - (K - 1)
                    if a == K - 1 and bb == K - 1:
                        # Centre tap: the group's channels below c at this same pixel (the previous launches').
                        use = in_group & (cols < c)
                    else:
                        use = in_group & (ii >= 0) & (jj >= 0)
                    xv = tl.load(x_ptr + image + (channels * H + ii) * W + jj, mask=use, other=0.0)
                    wv = tl.load(w_ptr + ((o * C + channels) * K + a) * K + bb, mask=use, other=0.0)
                    acc -= tl.sum(xv * wv, axis=0)
            # Unit diagonal: nothing to divide by.
            tl.store(x_ptr + image + (o * H + i) * W + j, acc)


def group_sizes(C: int) -> list[int]:
    """The channels of each of FInC's four groups (``tensor_split``'s sizes, as in ``FInCConv2d``)."""
    return [len(g) for g in torch.arange(C).tensor_split(GROUPS)]


def launches_per_call(C: int, H: int, W: int) -> int:
    """(H + W - 1) · ⌈C/4⌉: one launch per anti-diagonal and channel index of the largest group."""
    return (H + W - 1) * max(group_sizes(C))


def finc_weight(weight: torch.Tensor) -> torch.Tensor:
    """FInC's layer from a ``(C, C, k, k)`` weight: its entries within the four groups and off the centre tap's
    diagonal and upper triangle (``FInCConv2d``'s mask), zero elsewhere. The layer is the CInC convolution with this
    weight and ``unit_diagonal=True``."""
    from cinc_kernels.nn import FInCConv2d

    C, k = weight.shape[0], weight.shape[-1]
    return weight * FInCConv2d(C, k, bias=False).mask.to(device=weight.device, dtype=weight.dtype)


def _launches(y, weight, bias, x):
    B, C, H, W = y.shape
    k = weight.shape[-1]
    block_c = triton.next_power_of_2(max(group_sizes(C)))
    has_bias = bias is not None
    for d in range(H + W - 1):
        first = max(0, d - (W - 1))
        count = min(H - 1, d) - first + 1
        for c in range(max(group_sizes(C))):
            _finc_group_channel_kernel[(B * count, GROUPS)](
                y, x, weight, bias if has_bias else weight, C, H, W, first, count, d, c,
                K=k, BLOCK_C=block_c, HAS_BIAS=has_bias,
            )


def _prepare(y, weight, bias):
    if triton is None:
        raise RuntimeError("the FInC baseline needs triton")
    return y.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()


def finc_inverse(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x = M⁻¹(y - bias)`` for FInC's layer, the CInC convolution with ``weight`` and a unit diagonal (only the
    entries that :func:`finc_weight` keeps are read), in :func:`launches_per_call` launches. ``y: (B, C, H, W)``."""
    y, w, bias = _prepare(y, weight, bias)
    x = torch.zeros_like(y)
    if y.numel():
        _launches(y, w, bias, x)
    return x


def finc_inverse_graph(y: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """The launches of :func:`finc_inverse` captured once in a CUDA graph; returns a callable that replays them and
    returns ``x``. Replaying removes the launch overhead, so the baseline is timed at its best."""
    y, w, bias = _prepare(y, weight, bias)
    x = torch.zeros_like(y)
    _launches(y, w, bias, x)  # compiles the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _launches(y, w, bias, x)

    def replay() -> torch.Tensor:
        graph.replay()
        return x

    return replay
