"""The conditioning diagnostic, the certificate q < 1, the contractive parametrisation, float64 accumulation and the
layer's non-finite warning (cinc_kernels/conditioning.py)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import conditioning as cond
from cinc_kernels import reference as ref

from .cases import RTOL, backends_on, make_image, make_weight, rel_error

CPU_BACKENDS = backends_on("cpu")


def dense_inverse_norm(weight, H, W, unit_diagonal=False) -> float:
    """``‖M⁻¹‖₂ = 1 / σ_min(M)`` from the dense matrix (tiny shapes only)."""
    M = ref.dense_matrix(weight.double(), H, W, unit_diagonal)
    return 1.0 / torch.linalg.svdvals(M)[-1].item()


def weight_with_bound(C, k, q_target, seed, unit_diagonal=False):
    """A float64 weight whose certificate ``q`` is exactly ``q_target`` (``q`` is homogeneous in the off-centre
    taps)."""
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, generator=g, off_centre=1.0, unit_diagonal=unit_diagonal)
    if unit_diagonal:
        w[:, :, k - 1, k - 1] += 0.3 * torch.randn(C, C, generator=g, dtype=torch.float64).tril(-1)
    q = cond.contraction_bound(w, unit_diagonal).item()
    off = torch.ones_like(w)
    off[:, :, k - 1, k - 1] = 0
    return w * (1 - off) + w * off * (q_target / q)


def blow_up_weight(C=8, k=3, magnitude=1.0, seed=0, dtype=torch.float64):
    """Off-centre taps as large as the (unit) diagonal: the case of SPEC §1 where the gain explodes with size."""
    g = torch.Generator().manual_seed(seed)
    w = magnitude * torch.randn(C, C, k, k, generator=g, dtype=torch.float64)
    w[:, :, k - 1, k - 1] = torch.eye(C, dtype=torch.float64)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------ inverse_gain


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,H,W,unit", [(3, 1, 1, False), (3, 2, 5, False), (2, 4, 4, True), (4, 3, 2, False),
                                        (1, 3, 3, False)])
def test_inverse_gain_matches_dense_svd(backend, k, H, W, unit):
    C = 3
    w = weight_with_bound(C, k, 2.5, seed=10 * k + H, unit_diagonal=unit) if k > 1 else make_weight(C, k)
    want = dense_inverse_norm(w, H, W, unit)
    got = ck.inverse_gain(w, H, W, unit_diagonal=unit, iterations=300, rtol=1e-10, backend=backend)
    # Power iteration approaches from below.
    assert got <= want * (1 + 1e-9)
    assert got >= want * 0.99, f"estimate {got:.4g} vs exact {want:.4g}"


def test_inverse_gain_of_one_pixel_is_that_of_the_centre_tap():
    w = make_weight(5, 3, generator=torch.Generator().manual_seed(1))
    L = ref.centre_tap(w)
    want = torch.linalg.matrix_norm(torch.linalg.inv(L), ord=2).item()
    assert ck.inverse_gain(w, 1, 1, iterations=200, rtol=1e-12) == pytest.approx(want, rel=1e-6)


def test_inverse_gain_default_settings_are_close_enough_at_moderate_size():
    w = weight_with_bound(4, 3, 3.0, seed=3)
    want = dense_inverse_norm(w, 6, 7)
    got = ck.inverse_gain(w, 6, 7)
    assert want / 1.5 <= got <= want * (1 + 1e-9)


def test_inverse_gain_argument_errors_name_the_argument():
    w = make_weight(2, 3)
    with pytest.raises(ValueError, match="height"):
        ck.inverse_gain(w, 0, 3)
    with pytest.raises(TypeError, match="width"):
        ck.inverse_gain(w, 3, 2.5)
    with pytest.raises(ValueError, match="weight"):
        ck.inverse_gain(w[:, :1], 3, 3)


def test_inverse_gain_grows_exponentially_without_the_certificate():
    w = blow_up_weight()
    assert cond.contraction_bound(w).item() > 1
    assert cond.gain_bound(w) == math.inf
    gains = [ck.inverse_gain(w, s, s) for s in (2, 4, 8)]
    assert gains[1] > 30 * gains[0] and gains[2] > 1e4 * gains[1], gains


# ------------------------------------------------------------------------------------------------ the certificate


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("q_target", [0.3, 0.8, 0.97])
def test_certificate_bounds_the_exact_gain_at_every_size(q_target, unit):
    C, k = 3, 3
    w = weight_with_bound(C, k, q_target, seed=int(100 * q_target) + unit, unit_diagonal=unit)
    assert cond.contraction_bound(w, unit).item() == pytest.approx(q_target, rel=1e-12)
    bound = cond.gain_bound(w, unit)
    L = ref.centre_tap(w, unit)
    assert bound == pytest.approx(torch.linalg.matrix_norm(torch.linalg.inv(L), ord=2).item() / (1 - q_target))
    for H, W in [(1, 1), (1, 7), (5, 2), (6, 6)]:
        assert dense_inverse_norm(w, H, W, unit) <= bound * (1 + 1e-9), (H, W)
    # Sizes too large for a dense matrix: the power-iteration estimate (a lower bound) must stay below it as well.
    assert ck.inverse_gain(w, 40, 33, unit_diagonal=unit) <= bound * (1 + 1e-9)


def test_certificate_is_at_most_the_coarse_product_form():
    w = weight_with_bound(6, 5, 0.7, seed=4)
    L, taps = ref.centre_tap(w), ref.masked_weight(w).reshape(6, 6, 25).permute(2, 0, 1)[:-1]
    coarse = torch.linalg.matrix_norm(torch.linalg.inv(L), ord=2) * torch.linalg.matrix_norm(taps, ord=2).sum()
    assert cond.contraction_bound(w).item() <= coarse.item() * (1 + 1e-12)


def test_certificate_edge_cases():
    assert cond.contraction_bound(make_weight(4, 1)).item() == 0  # k = 1: no coupling between pixels
    w = make_weight(3, 3)
    w[1, 1, 2, 2] = 0
    assert cond.contraction_bound(w).item() == math.inf
    assert cond.gain_bound(w) == math.inf


# ------------------------------------------------------------------------------------------------ contractive


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_contractive_weight_keeps_the_bound_and_the_centre(k, unit):
    w = blow_up_weight(C=4, k=k, seed=k)
    gamma = 0.8
    wc = cond.contractive_weight(w, unit, gamma)
    assert cond.contraction_bound(wc, unit).item() <= gamma * (1 + 1e-12)
    assert torch.equal(wc[:, :, k - 1, k - 1], w[:, :, k - 1, k - 1])
    assert ref.logdet(wc, 7, 5, unit) == ref.logdet(w, 7, 5, unit)
    # A projection: already-contractive weights pass unchanged.
    assert torch.allclose(cond.contractive_weight(wc, unit, gamma), wc, rtol=1e-12, atol=0)
    small = weight_with_bound(4, k, 0.5, seed=1, unit_diagonal=unit) if k > 1 else make_weight(4, 1)
    assert torch.equal(cond.contractive_weight(small, unit, gamma), small)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 10.0])
def test_contractive_weight_gradient_is_finite(scale):
    w = make_weight(3, 3, off_centre=1.0)
    off = torch.ones_like(w)
    off[:, :, 2, 2] = 0
    w = (w * (1 - off) + scale * w * off).requires_grad_()
    out = cond.contractive_weight(w)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(w.grad).all()


def test_contractive_weight_gradcheck_where_the_bound_is_active():
    w = weight_with_bound(2, 2, 2.0, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cond.contractive_weight(t, False, 0.6), (w,))


def test_contractive_weight_rejects_bad_gamma():
    with pytest.raises(ValueError, match="max_contraction"):
        cond.contractive_weight(make_weight(2, 3), max_contraction=1.0)


# ------------------------------------------------------------------------------------------------ accumulate


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_accumulate_float64_rescues_an_ill_conditioned_float32_inverse(backend):
    w64 = blow_up_weight(C=4, magnitude=1.0, seed=2)
    H = W = 8
    gain = ck.inverse_gain(w64, H, W)
    assert 1e5 < gain < 1e11, gain  # float32 loses most digits, float64 keeps several
    x = make_image(2, 4, H, W, generator=torch.Generator().manual_seed(0))
    y32 = ref.forward(x, w64).float()
    want = ref.inverse(y32, w64.float())  # the float64 solve of the float32 input, rounded
    plain = ck.cinc_conv2d_inverse(y32, w64.float(), backend=backend)
    wide = ck.cinc_conv2d_inverse(y32, w64.float(), backend=backend, accumulate=torch.float64)
    assert wide.dtype == torch.float32 and wide.shape == y32.shape
    assert rel_error(wide, want) <= 1e-6
    if backend != "reference":  # the reference already works in float64
        assert rel_error(plain, want) > 1e3 * rel_error(wide, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_accumulate_inverse_transpose_and_bias(backend):
    g = torch.Generator().manual_seed(3)
    w = make_weight(3, 3, generator=g)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    y = make_image(2, 3, 5, 4, generator=g)
    got = ck.cinc_conv2d_inverse(y.float(), w.float(), b.float(), backend=backend, accumulate=torch.float64)
    assert rel_error(got, ref.inverse(y.float(), w.float(), b.float())) <= RTOL[torch.float32]
    got_t = ck.cinc_conv2d_inverse_transpose(y.float(), w.float(), backend=backend, accumulate=torch.float64)
    assert got_t.dtype == torch.float32
    assert rel_error(got_t, ref.inverse_transpose(y.float(), w.float())) <= RTOL[torch.float32]
    # Same dtype: a no-op switch.
    assert torch.equal(ck.cinc_conv2d_inverse(y, w, b, backend=backend, accumulate=torch.float64),
                       ck.cinc_conv2d_inverse(y, w, b, backend=backend))


def test_accumulate_is_differentiable():
    g = torch.Generator().manual_seed(4)
    w = make_weight(3, 2, generator=g).float().requires_grad_()
    y = make_image(1, 3, 4, 3, generator=g).float().requires_grad_()
    ck.cinc_conv2d_inverse(y, w, accumulate=torch.float64).pow(2).sum().backward()
    gy, gw = y.grad.clone(), w.grad.clone()
    y.grad = w.grad = None
    ck.cinc_conv2d_inverse(y, w).pow(2).sum().backward()
    assert gy.dtype == torch.float32 and gw.dtype == torch.float32
    assert rel_error(gy, y.grad) <= 1e-5 and rel_error(gw, w.grad) <= 1e-5


def test_accumulate_rejects_narrowing_and_non_float_types():
    w, y = make_weight(2, 3), make_image(1, 2, 3, 3)
    with pytest.raises(ValueError, match="accumulate"):
        ck.cinc_conv2d_inverse(y, w, accumulate=torch.float32)
    with pytest.raises(ValueError, match="accumulate"):
        ck.cinc_conv2d_inverse(y.float(), w.float(), accumulate=torch.float16)
    with pytest.raises(ValueError, match="accumulate"):
        ck.cinc_conv2d_inverse_transpose(y.float(), w.float(), accumulate=torch.int64)


# ------------------------------------------------------------------------------------------------ the layer


def test_layer_contractive_parametrization():
    torch.manual_seed(0)
    layer = ck.CInCConv2d(6, parametrization="contractive", max_contraction=0.7, init_scale=1.0)
    assert layer.contraction_bound() <= 0.7 * (1 + 1e-6)
    raw = layer.parametrizations.weight.original
    assert cond.contraction_bound(raw.detach()).item() > 0.7  # init_scale=1 is far outside: the bound is active
    x = torch.randn(2, 6, 9, 7)
    y, logdet = layer(x)
    assert rel_error(layer.inverse(y), x) <= 1e-5
    # The log-determinant is that of the projected weight (its centre tap is bounded too).
    assert torch.allclose(logdet, ck.cinc_logdet(layer.weight, 9, 7).expand(2))
    (y.square().sum() - logdet.sum()).backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    # state_dict round trip through a fresh layer.
    other = ck.CInCConv2d(6, parametrization="contractive", max_contraction=0.7)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.weight, layer.weight)
    assert "parametrization='contractive'" in repr(layer)
    with pytest.raises(ValueError, match="parametrization"):
        ck.CInCConv2d(4, parametrization="spectral")


def test_layer_inverse_gain_and_bound():
    layer = ck.CInCConv2d(4, init_scale=0.02)
    gain = layer.inverse_gain(12, 10)
    assert 0.5 < gain <= cond.gain_bound(layer.weight.detach()) * (1 + 1e-9)
    assert 0 < layer.contraction_bound() < 1


def _exploding_layer(**kwargs):
    layer = ck.CInCConv2d(8, bias=False, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(blow_up_weight(magnitude=2.0).float())
    return layer


def test_layer_warns_once_on_non_finite_inverse_naming_the_layer():
    layer = _exploding_layer()
    layer.name = "level2.step5.conv"
    y = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(cond.NonFiniteInverseWarning, match=r"level2\.step5\.conv.*32x32"):
        x = layer.inverse(y)
    assert not torch.isfinite(x).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.inverse(y)  # once per layer
        _exploding_layer(check_finite=False).inverse(y)  # switched off
        layer_off = _exploding_layer()
        layer_off.check_finite = False
        layer_off.inverse(y)
        # A non-finite input is not the layer's fault.
        ck.CInCConv2d(8).inverse(torch.full((1, 8, 3, 3), math.nan))
        # Finite output: nothing to say.
        ck.CInCConv2d(8).inverse(y)


def test_layer_inverse_accumulate_keyword():
    layer = _exploding_layer(check_finite=False)
    with torch.no_grad():
        layer.weight.copy_(blow_up_weight(magnitude=0.6, seed=2).float())
    x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    y = ref.forward(x, layer.weight.detach().double()).float()
    want = ref.inverse(y, layer.weight.detach())
    assert rel_error(layer.inverse(y, accumulate=torch.float64), want) <= 1e-6


# ------------------------------------------------------------------------------------------------ a small flow


def _correlated_images(n, C, H, W, generator):
    """Images with strong neighbour correlations: whitening them needs large off-centre taps."""
    e = torch.randn(n, C, H + 4, W + 4, generator=generator)
    return torch.nn.functional.avg_pool2d(e, 5, stride=1) * 5 + 0.1 * torch.randn(n, C, H, W, generator=generator)


def test_contractive_stack_trains_and_inverts_accurately_at_large_size():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    C, gamma = 4, 0.9
    layers = torch.nn.ModuleList(
        ck.CInCConv2d(C, parametrization="contractive", max_contraction=gamma) for _ in range(3))

    def run(x):
        logdet = x.new_zeros(x.shape[0])
        for i, layer in enumerate(layers):
            x, ld = layer(x)
            logdet = logdet + ld
            x = x.flip(2, 3) if i % 2 == 0 else x  # alternate the causal direction; a flip has log-determinant 0
        return x, logdet

    def inverse(z):
        for i, layer in reversed(list(enumerate(layers))):
            z = layer.inverse(z.flip(2, 3) if i % 2 == 0 else z)
        return z

    def nll(x):  # per dimension, standard-normal base density, constants dropped
        z, logdet = run(x)
        return (0.5 * z.square().flatten(1).sum(1) - logdet).mean() / x[0].numel()

    opt = torch.optim.Adam(layers.parameters(), lr=0.05)
    data = _correlated_images(16, C, 8, 8, g)
    first = nll(data).item()
    for _ in range(40):
        opt.zero_grad()
        loss = nll(data)
        loss.backward()
        opt.step()
    last = nll(data).item()
    assert last < first - 0.5, (first, last)  # it learned something
    bounds = [layer.contraction_bound() for layer in layers]
    assert all(q <= gamma * (1 + 1e-5) for q in bounds), bounds
    assert max(bounds) > 0.8 * gamma, bounds  # the taps grew up to the constraint: it binds

    # Far larger than the training images: still certified and accurate in float32.
    big = _correlated_images(2, C, 96, 80, g)
    with torch.no_grad():
        z, _ = run(big)
        assert rel_error(inverse(z), big) <= 1e-5
        for layer in layers:
            assert layer.inverse_gain(96, 80, iterations=6, probes=1) <= cond.gain_bound(layer.weight) * (1 + 1e-6)


def test_unconstrained_layer_with_large_off_centre_taps_does_not_invert_at_large_size():
    layer = _exploding_layer(check_finite=False)
    with torch.no_grad():
        layer.weight.copy_(blow_up_weight(magnitude=1.0).float())
    small, large = torch.randn(1, 8, 3, 3), torch.randn(1, 8, 24, 24)
    with torch.no_grad():
        assert rel_error(layer.inverse(layer(small)[0]), small) <= 1e-4  # fine on a tiny image
        assert not rel_error(layer.inverse(layer(large)[0]), large) <= 1e-1  # garbage (or inf) at 24×24
    assert layer.inverse_gain(24, 24) > 1e20
    # The same taps under the contractive parametrisation invert fine at that size.
    fixed = ck.CInCConv2d(8, bias=False, parametrization="contractive")
    with torch.no_grad():
        fixed.parametrizations.weight.original.copy_(layer.weight)
        assert rel_error(fixed.inverse(fixed(large)[0]), large) <= 1e-5


@pytest.mark.parametrize("parametrization", ["none", "contractive"])
def test_layer_traces_with_torch_compile_fullgraph(parametrization):
    # The contractive weight and the finite check must not break the graph (the check is skipped when compiling).
    layer = ck.CInCConv2d(4, parametrization=parametrization, init_scale=0.1)
    x = torch.randn(2, 4, 5, 6)
    forward = torch.compile(lambda t: layer(t), fullgraph=True, backend="eager")
    inverse = torch.compile(lambda t: layer.inverse(t, accumulate=torch.float64), fullgraph=True, backend="eager")
    y, logdet = forward(x)
    assert torch.equal(y, layer(x)[0]) and torch.equal(logdet, layer(x)[1])
    assert rel_error(inverse(y), x) <= 1e-5
