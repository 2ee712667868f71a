"""A FInC-style GPU inverse, written by us as the baseline of benchmarks/bench_gpu.py.

The published GPU inverse for this family of layers (Kallappa, Nagar, Varma, "FInC Flow", 2023) launches one kernel
per anti-diagonal **and per channel**, parallel over the batch (and the diagonal's pixels), reads everything from
global memory, and synchronises the device between launches: (H + W - 1) · C launches per call. This module
reproduces that schedule with one Triton kernel, so the single-launch CUDA wavefront can be timed against it on the
same machine. It is a baseline, not a backend: float32/float64, k = 1 … 7, contiguous NCHW only.

Launch order is what makes it correct: channel c of a pixel needs channels < c of the same pixel (the lower-
triangular centre tap) and every channel of the neighbours on earlier diagonals; launches on one stream run in
order, which is FInC's device-wide synchronisation.

    x = finc_inverse(y, weight, bias)                       # (B, C, H, W) -> (B, C, H, W)
    run = finc_inverse_graph(y, weight, bias); x = run()    # the same launches captured in a CUDA graph
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the baseline is optional
    triton = None


if triton is not None:

    @triton.jit
    def _finc_pixel_channel_kernel(
        y_ptr, x_ptr, w_ptr, bias_ptr,
        C, H, W, first, count, d, c,
        K: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        # One program per (batch item, pixel of diagonal d); it solves channel c of that pixel only.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // count
        i = first + pid % count
        j = d - i
        cols = tl.arange(0, BLOCK_C)
        in_range = cols < C
        image = b * C * H * W
        acc = tl.load(y_ptr + image + (c * H + i) * W + j)  # accumulates in y's dtype (float32 or float64)
        if HAS_BIAS:
            acc -= tl.load(bias_ptr + c)
        for a in tl.static_range(K):
            for bb in tl.static_range(K):
                ii = i + a - (K - 1)
                jj = j + bb - (K - 1)
                inside = (ii >= 0) & (jj >= 0)
                if a == K - 1 and bb == K - 1:
                    # Centre tap: channels below c of this same pixel (solved by the previous launches).
                    use = in_range & (cols < c)
                else:
                    use = in_range & inside
                xv = tl.load(x_ptr + image + (cols * H + ii) * W + jj, mask=use, other=0.0)
                wv = tl.load(w_ptr + ((c * C + cols) * K + a) * K + bb, mask=use, other=0.0)
                acc -= tl.sum(xv * wv, axis=0)
        diag = tl.load(w_ptr + ((c * C + c) * K + K - 1) * K + K - 1)
        tl.store(x_ptr + image + (c * H + i) * W + j, acc / diag)


def _diagonal(d: int, H: int, W: int):
    first = max(0, d - (W - 1))
    return first, min(H - 1, d) - first + 1


def _launches(y, weight, bias, x):
    B, C, H, W = y.shape
    k = weight.shape[-1]
    block_c = triton.next_power_of_2(C)
    has_bias = bias is not None
    for d in range(H + W - 1):
        first, count = _diagonal(d, H, W)
        for c in range(C):
            _finc_pixel_channel_kernel[(B * count,)](
                y, x, weight, bias if has_bias else weight, C, H, W, first, count, d, c,
                K=k, BLOCK_C=block_c, HAS_BIAS=has_bias,
            )


def _prepare(y, weight, bias, unit_diagonal):
    if triton is None:
        raise RuntimeError("the FInC baseline needs triton")
    from cinc_kernels.reference import masked_weight

    # The mask is applied once up front (FInC's weights are stored masked); it is not part of the timed schedule.
    w = masked_weight(weight, unit_diagonal).contiguous()
    return y.contiguous(), w, None if bias is None else bias.contiguous()


def finc_inverse(y, weight, bias=None, unit_diagonal=False):
    """``x = M⁻¹(y - bias)`` with (H + W - 1)·C launches. ``y: (B, C, H, W)``, ``weight: (C, C, k, k)``."""
    y, w, bias = _prepare(y, weight, bias, unit_diagonal)
    x = torch.zeros_like(y)
    if y.numel():
        _launches(y, w, bias, x)
    return x


def finc_inverse_graph(y, weight, bias=None, unit_diagonal=False):
    """The same launches captured once in a CUDA graph; returns a callable that replays them and returns ``x``.

    Replaying removes Python's launch overhead, so the baseline is timed at its best (FInC launched from C++).
    """
    y, w, bias = _prepare(y, weight, bias, unit_diagonal)
    x = torch.zeros_like(y)
    _launches(y, w, bias, x)  # compiles the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _launches(y, w, bias, x)

    def replay():
        graph.replay()
        return x

    return replay
