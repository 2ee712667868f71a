"""Shared helpers of the test suite: well-conditioned random weights, memory layouts, per-dtype tolerances.

Every test draws fresh inputs from a seeded generator so failures reproduce.
"""
from __future__ import annotations

import torch

# Relative tolerances (on the norm of the difference) per dtype, for well-conditioned weights.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

LAYOUTS = ("contiguous", "noncontiguous", "channels_last")


def make_weight(C, k, dtype=torch.float64, device="cpu", *, off_centre=0.3, generator=None, unit_diagonal=False):
    """A ``(C, C, k, k)`` weight whose inverse is well conditioned: the centre tap's diagonal is 1.5…2.5 in
    magnitude with random sign, the other entries ``off_centre / (k·√C)`` scaled normals."""
    w = torch.randn(C, C, k, k, generator=generator, dtype=torch.float64) * off_centre / (k * C**0.5)
    sign = torch.randint(0, 2, (C,), generator=generator).double() * 2 - 1
    diag = sign * (1.5 + torch.rand(C, generator=generator, dtype=torch.float64))
    w[:, :, k - 1, k - 1] += torch.diag(diag)
    return w.to(dtype=dtype, device=device)


def make_image(B, C, H, W, dtype=torch.float64, device="cpu", *, generator=None):
    return torch.randn(B, C, H, W, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (the values, not the strides, are what the ops must respect)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "noncontiguous":
        # Every second element of a tensor twice as wide along W: strided, not a permutation.
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        out = wide[..., ::2]
        assert out.numel() == 0 or out.shape[-1] <= 1 or not out.is_contiguous()
        return out
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64 (absolute when ``want`` is 0)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(got, want, dtype, factor=1.0, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_error(got, want)
    tol = RTOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
