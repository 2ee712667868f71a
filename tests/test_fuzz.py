"""Property-based tests (hypothesis) of every fast backend present against the float64 reference.

Random shapes (1×1 images, H ≠ W, B = 0, k = 1…7), every dtype the backend takes, contiguous / strided /
channels-last images, strided weights, bias and unit_diagonal. Each example measures the condition number
``κ(M) = ‖M‖₂ ‖M⁻¹‖₂`` of its own map (dense SVD: the shapes are tiny) and scales the tolerance of every solve by it,
so an ill-conditioned draw is judged by what any algorithm could achieve, not by a fixed number.

Bounded and reproducible by default (``derandomize=True``); a deeper run::

    CINC_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cinc_kernels as ck
from cinc_kernels import reference as ref
from cinc_kernels.backends import get_backend

from .cases import LAYOUTS, RTOL, make_image, make_weight, runnable_cases, with_layout

EXAMPLES = int(os.environ.get("CINC_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

CASES = runnable_cases(reference=False)

# Multiplies RTOL[dtype] · κ (solves) or RTOL[dtype] · ‖|M||x| + |bias|‖ (forward). RTOL is ~170 eps for float32 and
# ~3 eps for float16; on the CPU backend 200 examples pass with 0.05 here (the errors sit near eps · κ), so 4 leaves
# room for other summation orders (GPU reductions, fp16 outputs) while a wrong tap or index still fails by far.
SLACK = 4.0


def dtypes_of(backend: str, device: str) -> list:
    return [d for d in get_backend(backend).dtypes("forward", device) if d in RTOL]


@dataclasses.dataclass
class Case:
    B: int
    C: int
    H: int
    W: int
    k: int
    dtype: torch.dtype
    layout: str
    strided_weight: bool
    bias: bool
    unit_diagonal: bool
    off_centre: float
    seed: int


def cases(dtypes):
    return st.builds(
        Case,
        B=st.integers(0, 3),
        C=st.integers(1, 6),
        H=st.integers(1, 9),
        W=st.integers(1, 9),
        k=st.integers(1, 7),
        dtype=st.sampled_from(dtypes),
        layout=st.sampled_from(LAYOUTS),
        strided_weight=st.booleans(),
        bias=st.booleans(),
        unit_diagonal=st.booleans(),
        # 3.0 reaches condition numbers of 10³…10⁶ on the larger draws: float32 then keeps few digits.
        off_centre=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
        seed=st.integers(0, 2**31 - 1),
    )


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, every second element along the last axis of a wider buffer."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    # cases.with_layout asserts its strided copy is non-contiguous, which an empty (B = 0) tensor always is.
    return strided(t) if layout == "noncontiguous" else with_layout(t, layout)


def conditioning(w64, H, W, unit_diagonal):
    """``(‖M⁻¹‖₂, κ(M))`` of one image's dense matrix."""
    s = torch.linalg.svdvals(ref.dense_matrix(w64, H, W, unit_diagonal))
    return (1 / s[-1]).item(), (s[0] / s[-1]).item()


def err(got, want) -> float:
    return (got.detach().double().cpu() - want.detach().double().cpu()).norm().item()


def check_output(out, like, what):
    assert out.shape == like.shape, f"{what}: shape {tuple(out.shape)} != {tuple(like.shape)}"
    assert out.dtype == like.dtype, f"{what}: dtype {out.dtype} != {like.dtype}"
    assert out.device == like.device, f"{what}: device {out.device} != {like.device}"


@pytest.mark.parametrize("backend,device", [(c.name, c.device) for c in CASES],
                         ids=[f"{c.name}-{c.device}" for c in CASES])
def test_fuzz_against_reference(backend, device):
    @FUZZ
    @given(case=cases(dtypes_of(backend, device)))
    def run(case: Case):
        check_case(backend, device, case)

    run()


def check_case(backend: str, dev: str, c: Case) -> None:
    g = torch.Generator().manual_seed(c.seed)
    inverse_dtypes = get_backend(backend).dtypes("inverse", dev)
    # Half-precision forwards have no native inverse; theirs runs through accumulate=float32.
    accumulate = None if c.dtype in inverse_dtypes else torch.float32
    unit, eps = c.unit_diagonal, RTOL[c.dtype]

    w = make_weight(c.C, c.k, c.dtype, dev, off_centre=c.off_centre, generator=g, unit_diagonal=unit)
    b = torch.randn(c.C, generator=g, dtype=torch.float64).to(c.dtype).to(dev) if c.bias else None
    x = make_image(c.B, c.C, c.H, c.W, c.dtype, dev, generator=g)
    grad = make_image(c.B, c.C, c.H, c.W, c.dtype, dev, generator=g)
    # The reference sees exactly the (rounded) values the backend sees.
    w64, b64, x64 = w.double().cpu(), None if b is None else b.double().cpu(), x.double().cpu()
    w_in = strided(w) if c.strided_weight else w
    gain, kappa = conditioning(w64, c.H, c.W, unit)
    solve_tol = SLACK * eps * max(kappa, 1.0)
    meaningful = solve_tol < 0.1  # otherwise no dtype can promise digits for this draw

    # forward: error against the componentwise scale |M||x| + |bias|
    y = ck.cinc_conv2d(laid_out(x, c.layout), w_in, b, unit_diagonal=unit, backend=backend)
    check_output(y, x, "forward")
    y_ref = ref.forward(x64, w64, b64, unit)
    scale = ref.forward(x64.abs(), ref.masked_weight(w64, unit).abs(), None if b64 is None else b64.abs())
    assert err(y, y_ref) <= SLACK * eps * scale.norm().item() + 1e-300, f"forward {c}"

    # inverse of a given y
    y_in = y_ref.to(c.dtype).to(dev)
    xs = ck.cinc_conv2d_inverse(laid_out(y_in, c.layout), w_in, b, unit_diagonal=unit, backend=backend,
                                accumulate=accumulate)
    check_output(xs, y_in, "inverse")
    x_ref = ref.inverse(y_in.double().cpu(), w64, b64, unit)
    if meaningful:
        assert err(xs, x_ref) <= solve_tol * x_ref.norm().item() + 1e-300, f"inverse {c} κ={kappa:.3g}"

    # inverse ∘ forward ≈ id, through the backend's own forward output
    x_back = ck.cinc_conv2d_inverse(y, w_in, b, unit_diagonal=unit, backend=backend, accumulate=accumulate)
    if meaningful:
        assert err(x_back, x64) <= solve_tol * x64.norm().item() + 1e-300, f"inverse∘forward {c} κ={kappa:.3g}"

    # adjoint solve
    u = ck.cinc_conv2d_inverse_transpose(laid_out(grad, c.layout), w_in, unit_diagonal=unit, backend=backend,
                                         accumulate=accumulate)
    check_output(u, grad, "inverse_transpose")
    u_ref = ref.inverse_transpose(grad.double().cpu(), w64, unit)
    if meaningful:
        assert err(u, u_ref) <= solve_tol * u_ref.norm().item() + 1e-300, f"inverse_transpose {c} κ={kappa:.3g}"

    # the diagnostic on this backend never overshoots the exact gain (power iteration approaches from below)
    if torch.float64 in inverse_dtypes and kappa < 1e10:
        estimate = ck.inverse_gain(w64.to(dev), c.H, c.W, unit_diagonal=unit, iterations=4, backend=backend)
        assert estimate <= gain * (1 + 1e-6), f"inverse_gain {estimate:.6g} > exact {gain:.6g} for {c}"
