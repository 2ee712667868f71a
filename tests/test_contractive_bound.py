"""The contractive parametrisation's guarantee (docs/spec.md §1, "Conditioning"): ‖M⁻¹‖₂ stays under
``CInCConv2d.gain_ceiling()`` for every value of the free parameter, not only near the initialisation."""
from __future__ import annotations

import math

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import conditioning as cond


# Tiny problems: extra OpenMP threads only spin on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _pushed_layer(seed: int, channels: int = 8, k: int = 3, unit_diagonal: bool = False, scale: float = 3.0,
                  **limits) -> ck.CInCConv2d:
    """A float64 contractive layer whose free parameter was moved by ``scale``·N(0, 1) everywhere (centre too)."""
    torch.manual_seed(seed)
    layer = ck.CInCConv2d(channels, kernel_size=k, unit_diagonal=unit_diagonal, parametrization="contractive",
                          **limits).double()
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        raw = layer.parametrizations.weight.original
        raw.add_(scale * torch.randn(raw.shape, generator=g, dtype=raw.dtype))
    return layer


def test_default_ceiling_is_the_documented_number():
    assert ck.CInCConv2d(4, parametrization="contractive").gain_ceiling() == pytest.approx(40.0)
    assert ck.CInCConv2d(4, parametrization="contractive", unit_diagonal=True).gain_ceiling() == pytest.approx(20.0)
    assert ck.CInCConv2d(4).gain_ceiling() == math.inf
    assert ck.CInCConv2d(4, parametrization="contractive", max_log_diagonal=None).gain_ceiling() == math.inf


@pytest.mark.parametrize("unit_diagonal", [False, True])
def test_certified_gain_stays_under_the_ceiling_for_many_pushed_parameters(unit_diagonal):
    # gain_bound is the exact certificate ‖L⁻¹‖₂ / (1 − q) ≥ ‖M⁻¹‖₂ at every size: checking it checks all sizes.
    worst = 0.0
    for seed in range(60):
        layer = _pushed_layer(seed, unit_diagonal=unit_diagonal)
        worst = max(worst, cond.gain_bound(layer.weight.detach(), unit_diagonal))
        assert layer.contraction_bound() <= 0.9 * (1 + 1e-9)
    assert worst <= layer.gain_ceiling() * (1 + 1e-9), worst


@pytest.mark.parametrize("seed", range(2))
def test_measured_gain_and_float32_round_trip_at_64x64(seed):
    layer = _pushed_layer(seed)
    ceiling = layer.gain_ceiling()
    assert layer.inverse_gain(64, 64, iterations=5, probes=1) <= ceiling
    f32 = layer.float()
    x = torch.randn(1, 8, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y, _ = f32(x)
        back = f32.inverse(y)
    # Rounding in y and in the solve is amplified by at most κ(M) ≤ ceiling · ‖M‖₂ (≤ 228 with the defaults);
    # a few float32 epsilons per tap on top leave this far from the 1e-3…1e-2 an unbounded centre tap gave.
    assert float((back - x).norm() / x.norm()) <= 228 * 9 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("k", [1, 2, 5])
def test_bounded_centre_is_a_projection_that_keeps_masked_entries(k):
    w = 3 * torch.randn(5, 5, k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    once = cond.bounded_centre(w)
    assert torch.allclose(cond.bounded_centre(once), once, rtol=1e-12, atol=0)
    centre = once[:, :, k - 1, k - 1]
    assert (centre.diagonal().abs() >= 0.5 - 1e-12).all() and (centre.diagonal().abs() <= 2 + 1e-12).all()
    d = centre.diagonal()
    assert torch.linalg.matrix_norm(centre.tril(-1) / d[:, None], ord=2) <= 0.5 * (1 + 1e-12)
    assert torch.equal(once[:, :, k - 1, k - 1].triu(1), w[:, :, k - 1, k - 1].triu(1))  # masked: untouched
    if k > 1:
        assert torch.equal(once[:, :, 0], w[:, :, 0])  # other taps: untouched here


def test_bounded_centre_gradient_flows_and_limits_are_validated():
    w = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cond.bounded_centre(t, False, 0.3, 0.2), (w,))
    with pytest.raises(ValueError, match="max_centre_coupling"):
        ck.CInCConv2d(3, parametrization="contractive", max_centre_coupling=1.0)
    with pytest.raises(ValueError, match="max_log_diagonal"):
        ck.CInCConv2d(3, parametrization="contractive", max_log_diagonal=-1.0)


@pytest.mark.parametrize("bad", [2.5, "4", True])
def test_channels_must_be_an_int(bad):
    with pytest.raises(TypeError, match="channels"):
        ck.CInCConv2d(bad)
