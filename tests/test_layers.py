"""The five invertible layers (docs/spec.md §2–3) on every backend present (the tests taking ``backend`` and
``device``, parametrised by ``tests/conftest.py``; Triton's under its interpreter in the second pytest process): exact
inverse, log-determinant equal to the autograd Jacobian's, gradients on exactly the free entries; the free-parameter
formulas; and a tiny run of the comparison benchmark (``python -m cinc_kernels bench``)."""
from __future__ import annotations

import csv

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import nn as cnn
from cinc_kernels import reference
from tests.cases import assert_rel_close, with_layout

# name -> (constructor keywords, formula for the free parameters given C): odd kernels, uneven groups, k ≠ 3.
CONFIGS = {
    "cinc": ({}, lambda C: 9 * C * C - C * (C - 1) // 2 + C),
    "cinc_k2_unit": (dict(kernel_size=2, unit_diagonal=True), lambda C: 4 * C * C - C * (C - 1) // 2 - C + C),
    "emerging": ({}, lambda C: C * C + 2 * (4 * C * C - C * (C - 1) // 2) + C),
    "emerging_k3_unit": (dict(kernel_size=3, unit_diagonal=True),
                         lambda C: C * C + 2 * (9 * C * C - C * (C - 1) // 2 - C) + C),
    "autoregressive": ({}, lambda C: 4 * C * C + C * (C + 1) // 2 + C),
    "autoregressive_k5": (dict(kernel_size=5), lambda C: 12 * C * C + C * (C + 1) // 2 + C),
    "1x1": ({}, lambda C: C * C),
    "1x1_bias": (dict(bias=True), lambda C: C * C + C),
    "finc": ({}, None),
}


def _finc_formula(C, k=3):
    sizes = [len(g) for g in torch.arange(C).tensor_split(4)]
    return sum(k * k * c * c - c * (c - 1) // 2 - c for c in sizes) + C


def make_layer(config: str, channels: int, backend: str = "cpu", device="cpu", dtype=torch.float64, seed=0,
               scale=0.15):
    """A layer of ``config`` moved away from its near-identity initialisation (so every tap and the log-determinant
    matter), still well conditioned."""
    name = config.split("_")[0]
    kwargs, _ = CONFIGS[config]
    torch.manual_seed(seed)
    layer = ck.LAYERS[name](channels, backend=backend, **kwargs).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    return layer


def _image(B, C, H, W, dtype, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------ inverse


@pytest.mark.parametrize("config", list(CONFIGS))
def test_inverse_of_forward_is_identity(config, backend, device):
    dtypes = (torch.float64,) if backend == "reference" else (torch.float64, torch.float32)
    for dtype in dtypes:
        layer = make_layer(config, 5, backend, device, dtype)
        x = _image(2, 5, 5, 7, dtype, device)
        y, logdet = layer(x)
        assert y.shape == x.shape and logdet.shape == (2,)
        assert torch.isfinite(logdet).all()
        assert_rel_close(layer.inverse(y), x, dtype, factor=30, what=f"{config} {backend} {dtype}")


@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
@pytest.mark.parametrize("name", list(ck.LAYERS))
def test_inverse_in_other_layouts(name, layout):
    layer = make_layer(name, 6, dtype=torch.float32)
    x = _image(3, 6, 7, 4, torch.float32, "cpu")
    y, _ = layer(with_layout(x, layout))
    assert_rel_close(y, layer(x)[0], torch.float32, what=f"{name} forward, {layout}")
    assert_rel_close(layer.inverse(with_layout(y, layout)), x, torch.float32, factor=30, what=f"{name} {layout}")


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 4, 1, 1), (1, 4, 1, 6), (1, 4, 5, 1)], ids=str)
@pytest.mark.parametrize("name", list(ck.LAYERS))
def test_degenerate_shapes(name, shape):
    layer = make_layer(name, 4)
    x = _image(*shape, torch.float64, "cpu")
    y, logdet = layer(x)
    assert y.shape == x.shape and logdet.shape == (shape[0],)
    assert_rel_close(layer.inverse(y), x, torch.float64, what=f"{name} {shape}")


# ------------------------------------------------------------------------------------------------ log-determinant


def _jacobian(layer, x):
    """Dense ``∂y/∂x`` of one image, ``(n, n)`` with ``n = C·H·W``."""
    shape = x.shape
    return torch.autograd.functional.jacobian(lambda v: layer(v.view(shape))[0].reshape(-1), x.reshape(-1))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_logdet_equals_slogdet_of_jacobian(config, backend, device):
    layer = make_layer(config, 3, backend, device, scale=0.3)
    x = _image(1, 3, 3, 4, torch.float64, device)
    sign, logabsdet = torch.linalg.slogdet(_jacobian(layer, x))
    assert sign != 0
    _, logdet = layer(x)
    assert abs(logdet.item() - logabsdet.item()) <= 1e-8 * max(1.0, abs(logabsdet.item())), (logdet, logabsdet)
    assert abs(layer.logdet(3, 4).item() - logabsdet.item()) <= 1e-8 * max(1.0, abs(logabsdet.item()))
    if config not in ("finc", "cinc_k2_unit"):  # those two have log-determinant 0 by construction
        assert abs(logabsdet.item()) > 1e-3, "a log-determinant of 0 would not test anything"


# ------------------------------------------------------------------------------------------------ parameters


@pytest.mark.fast_paths
@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradients_reach_free_entries_only(config, backend, device):
    layer = make_layer(config, 4, backend, device)
    masks = layer.free_masks()
    assert set(masks) == {n for n, _ in layer.named_parameters()}
    x = _image(2, 4, 5, 6, torch.float64, device, seed=3)
    y_in = _image(2, 4, 5, 6, torch.float64, device, seed=4)
    y, logdet = layer(x)
    # Through the forward, the log-determinant and the inverse (sampling is trained through too).
    loss = (y * _image(2, 4, 5, 6, torch.float64, device, seed=5)).sum() + logdet.sum()
    loss = loss + (layer.inverse(y_in) * _image(2, 4, 5, 6, torch.float64, device, seed=6)).sum()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{config}: no gradient reaches {name}"
        free = masks[name].bool()
        assert free.shape == p.shape
        assert (p.grad[~free] == 0).all(), f"{config}: a fixed entry of {name} gets a gradient"
        assert (p.grad[free] != 0).all(), f"{config}: a free entry of {name} gets no gradient"


@pytest.mark.parametrize("channels", [1, 3, 4, 6, 13])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_free_parameter_count(config, channels):
    layer = make_layer(config, channels)
    formula = CONFIGS[config][1] or _finc_formula
    assert layer.num_parameters() == formula(channels)
    assert layer.num_parameters() == sum(int(m.sum()) for m in layer.free_masks().values())
    assert f"free_parameters={layer.num_parameters()}" in repr(layer)


def test_cinc_count_matches_the_issue_formula():
    for C in (1, 2, 12, 48):
        assert ck.CInCConv2d(C, bias=False).num_parameters() == 9 * C * C - C * (C - 1) // 2
        assert ck.CInCConv2d(C, bias=False, unit_diagonal=True).num_parameters() == 9 * C * C - C * (C - 1) // 2 - C


# ------------------------------------------------------------------------------------------------ structure


def test_emerging_bottom_right_conv_is_the_flipped_cinc_conv():
    """``R·M(W)·R`` (R reverses channels, rows and columns) is the bottom-right padded correlation with kernel
    ``W.flip(0, 1, 2, 3)``, whose centre tap is upper triangular."""
    C, k = 4, 2
    g = torch.Generator().manual_seed(7)
    w = torch.randn(C, C, k, k, generator=g, dtype=torch.float64)
    x = _image(2, C, 5, 6, torch.float64, "cpu")
    via_flip = reference.forward(x.flip(1, 2, 3), w).flip(1, 2, 3)
    v = reference.masked_weight(w).flip(0, 1, 2, 3)
    direct = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, k - 1, 0, k - 1)), v)
    assert_rel_close(via_flip, direct, torch.float64)
    assert torch.equal(v[:, :, 0, 0], v[:, :, 0, 0].triu())


def _pixel_dependencies(layer, C, H, W):
    """``dep[o_pixel, i_pixel]``: whether any output channel of pixel ``o`` depends on any input of pixel ``i``."""
    J = _jacobian(layer, _image(1, C, H, W, torch.float64, "cpu")).abs()
    return J.view(C, H * W, C, H * W).amax(dim=(0, 2)) > 0, J.view(C, H * W, C, H * W)


def test_autoregressive_jacobian_is_lower_triangular_in_raster_order():
    C, H, W = 3, 4, 5
    dep, J = _pixel_dependencies(make_layer("autoregressive", C), C, H, W)
    assert torch.equal(dep, dep.tril()), "an output depends on a later pixel in raster order"
    centre = J[:, torch.arange(H * W), :, torch.arange(H * W)]  # (HW, C, C): the same-pixel blocks
    assert torch.equal(centre, centre.tril()), "the centre tap is not lower triangular"
    # The up-right tap is there (it is what the CInC wavefront could not handle): (1, 0) depends on (0, 1).
    assert dep[1 * W + 0, 0 * W + 1]


def test_finc_groups_see_only_their_corner():
    C, H, W, k = 4, 4, 4, 3
    dep_any, J = _pixel_dependencies(make_layer("finc", C), C, H, W)
    J = J.view(C, H, W, C, H, W)
    for g, (corner, _) in enumerate(cnn.FInCConv2d.CORNERS):
        others = [c for c in range(C) if c != g]
        assert (J[g][..., others, :, :] == 0).all(), f"group {corner} mixes with other groups"
        for i in range(H):
            for j in range(W):
                seen = J[g, i, j, g] != 0
                ii, jj = torch.nonzero(seen, as_tuple=True)
                up = corner.startswith("top")   # padded on the top: sees rows above
                left = corner.endswith("left")
                assert ((ii <= i) if up else (ii >= i)).all() and ((jj <= j) if left else (jj >= j)).all(), corner
                assert ((i - ii).abs() < k).all() and ((j - jj).abs() < k).all()
                assert J[g, i, j, g, i, j] == 1, f"{corner}: the diagonal is not 1"


# ------------------------------------------------------------------------------------------------ interface


@pytest.mark.parametrize("name", list(ck.LAYERS))
def test_registry_and_errors(name):
    layer = ck.LAYERS[name](4, backend="cpu")
    assert layer.num_parameters() == sum(int(m.sum()) for m in layer.free_masks().values())
    assert name == "1x1" or "backend='cpu'" in repr(layer)
    with pytest.raises(ValueError, match=r"\bx\b"):
        layer(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\by\b"):
        layer.inverse(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        ck.LAYERS[name](0)


# Layers that take init_scale (the 1×1 starts from a random rotation instead).
INIT_SCALED = [name for name in ck.LAYERS if name != "1x1"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.5])
@pytest.mark.parametrize("name", INIT_SCALED)
def test_init_scale_out_of_range_is_refused(name, value):
    """A NaN or infinite ``init_scale`` trained to NaN and wrote a checkpoint without a word; a negative one is
    not a standard deviation."""
    with pytest.raises(ValueError, match="init_scale"):
        ck.LAYERS[name](4, init_scale=value)


@pytest.mark.parametrize("name", INIT_SCALED)
def test_init_scale_of_the_wrong_type_is_refused(name):
    for value in ("0.1", True, None):
        with pytest.raises(TypeError, match="init_scale"):
            ck.LAYERS[name](4, init_scale=value)
    assert ck.LAYERS[name](4, init_scale=0) is not None  # zero: the layer starts at its fixed initial taps


@pytest.mark.parametrize("name", list(ck.LAYERS))
def test_bias_must_be_a_bool(name):
    """``bias="no"`` is truthy: it would add the bias it means to leave out."""
    with pytest.raises(TypeError, match="bias must be a bool"):
        ck.LAYERS[name](4, bias="no")


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_check_finite_must_be_a_bool(value):
    """``check_finite="no"`` (e.g. from ``--conv-kwargs``) was taken as true."""
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        ck.CInCConv2d(4, check_finite=value)


@pytest.mark.parametrize("option", [{"max_contraction": float("nan")}, {"max_log_diagonal": float("nan")},
                                    {"max_centre_coupling": float("nan")}])
def test_contractive_limits_refuse_nan(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        ck.CInCConv2d(4, parametrization="contractive", **option)


def test_autoregressive_rejects_even_kernel():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ck.AutoregressiveConv2d(4, kernel_size=2)


# ------------------------------------------------------------------------------------------------ the benchmark


def test_bench_tiny_run_writes_long_format_csv(tmp_path):
    from cinc_kernels import bench

    config = bench.BenchConfig(device="cpu", backends=["cpu"], dtypes=[torch.float32], batch=2, size_sweep=[4, 5],
                               channel_sweep=[3], base_channels=4, base_size=5, min_time=0.0, min_reps=2,
                               max_reps=2, warmup=0, out_dir=str(tmp_path), plots=True, progress=False)
    rows = bench.run(config)
    paths = bench.write_results(rows, config, quiet=True)
    bench.write_results(rows, config, quiet=True)  # appends, one header
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * len(rows)
    assert set(bench.CSV_COLUMNS) <= set(table[0])
    layers = {r["layer"] for r in table}
    assert set(ck.LAYERS) <= layers
    ops = {(r["layer"], r["op"]) for r in table}
    for name in ck.LAYERS:
        assert {(name, op) for op in ("forward", "inverse", "logdet", "fwd+bwd")} <= ops
    algos = {r["provider"] for r in table if r["suite"] == "inverse_algorithms"}
    assert {"cpu", "torch_wavefront"} <= algos and any(a.startswith("sequential_raster") for a in algos)
    for r in table:
        assert float(r["median_ms"]) >= 0 and float(r["p20_ms"]) >= 0 and float(r["p80_ms"]) >= 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["device"] and r["torch"] and r["date"]
    for key in ("markdown", "plot_size", "plot_channels", "plot_algorithms"):
        assert paths[key].exists() and paths[key].stat().st_size > 0


class _BrokenLayer(ck.CInCConv2d):
    """Right forward, wrong inverse: what the correctness check must catch before anything is timed."""

    def inverse(self, y):
        return y


def test_bench_correctness_check_catches_a_wrong_inverse():
    from cinc_kernels import bench

    config = bench.BenchConfig(device="cpu", backends=["cpu"], layers=["broken"], dtypes=[torch.float32], batch=1,
                               size_sweep=[5], channel_sweep=[], base_channels=3, base_size=5, algorithms=False,
                               progress=False, plots=False)
    with pytest.raises(bench.CorrectnessError, match="broken"):
        bench.run(config, layer_classes={"broken": _BrokenLayer})


def test_inverse_algorithms_agree_with_the_reference():
    from cinc_kernels import bench

    g = torch.Generator().manual_seed(9)
    for C, H, W, k in [(3, 5, 7, 3), (2, 1, 4, 2), (4, 6, 3, 5)]:
        w = torch.randn(C, C, k, k, generator=g, dtype=torch.float64) * 0.1
        w[:, :, -1, -1] += torch.eye(C, dtype=torch.float64) * 1.5
        b = torch.randn(C, generator=g, dtype=torch.float64)
        y = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
        want = reference.inverse(y, w, b)
        assert_rel_close(bench.torch_wavefront_inverse(y, w, b), want, torch.float64, what="wavefront")
        assert_rel_close(bench.sequential_raster_inverse(y, w, b), want, torch.float64, what="raster")
