"""What only the C++ CPU kernels have: a dense grid of shapes over their schedules (per-pixel and tiled,
one thread or many), the two schedules against each other, and the 8-pixel block substitution against the
one-pixel one. The properties every backend shares run on ``cpu`` from ``test_backend_contract.py``.
"""
import itertools
import zlib

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import reference
from tests.cases import LAYOUTS, RTOL, assert_ops_match_reference, make_image, make_weight, rel_error

CHANNELS = [1, 2, 5, 12, 48]
KERNELS = [1, 2, 3, 5]
SIZES = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 17), (17, 2), (7, 7), (32, 17), (17, 32), (32, 32)]
BATCHES = [1, 3]
DTYPES = [torch.float32, torch.float64]


def _grid():
    """Every (C, k, size) once; batch, dtype, layout, bias and unit diagonal cycle through their values so each
    combination of any two of them appears many times."""
    cases = []
    for n, (C, k, (H, W)) in enumerate(itertools.product(CHANNELS, KERNELS, SIZES)):
        if C * H * W > 48 * 17 * 17 and n % 3:  # keep two thirds of the biggest images out, for CI time
            continue
        cases.append((BATCHES[n % 2], C, H, W, k, DTYPES[(n // 2) % 2], LAYOUTS[n % 3], bool(n // 6 % 2),
                      bool(n // 12 % 2)))
    return cases


CASES = _grid()


def _ids(case):
    B, C, H, W, k, dtype, layout, bias, unit = case
    return f"B{B}C{C}_{H}x{W}_k{k}_{str(dtype)[6:]}_{layout}{'_bias' if bias else ''}{'_unit' if unit else ''}"


def _inputs(case, seed):
    B, C, H, W, k, dtype, layout, bias, unit = case
    g = torch.Generator().manual_seed(seed)
    w = make_weight(C, k, dtype, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype) if bias else None
    x = make_image(B, C, H, W, dtype, generator=g)
    return w, b, x


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_cpu_kernels_match_reference(case):
    """Every (C, k, size) of the grid, so each CPU schedule (the tiled schedule, every vector width it picks;
    one thread or many) meets odd and degenerate sizes."""
    B, C, H, W, k, dtype, layout, bias, unit = case
    w, b, x = _inputs(case, seed=zlib.crc32(_ids(case).encode()))
    assert_ops_match_reference("cpu", x, w, b, unit, layout=layout, what=_ids(case))


@pytest.mark.parametrize("C,k", [(1, 2), (5, 3), (12, 3), (9, 5)])
def test_direct_and_tiled_schedules_agree(C, k, monkeypatch):
    """The per-pixel schedule (tap loop of cinc_math.h) and the tiled one (register-blocked tap micro-kernel), forced
    on the same inputs."""
    g = torch.Generator().manual_seed(C + k)
    w = make_weight(C, k, generator=g)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    x = make_image(3, C, 9, 6, generator=g)
    results = {}
    for schedule in ("direct", "tiled"):
        monkeypatch.setenv("CINC_CPU_SCHEDULE", schedule)
        results[schedule] = (ck.cinc_conv2d(x, w, b, backend="cpu"), ck.cinc_conv2d_inverse(x, w, b, backend="cpu"),
                             ck.cinc_conv2d_inverse_transpose(x, w, backend="cpu"))
    for direct, tiled in zip(results["direct"], results["tiled"]):
        torch.testing.assert_close(direct, tiled, rtol=1e-12, atol=1e-12)
    y_ref = reference.forward(x, w, b)
    assert rel_error(results["direct"][0], y_ref) <= RTOL[torch.float64]


def test_auto_backend_on_cpu_matches_reference():
    g = torch.Generator().manual_seed(3)
    w = make_weight(6, 3, torch.float32, generator=g)
    x = make_image(2, 6, 8, 9, torch.float32, generator=g)
    y = ck.cinc_conv2d(x, w)
    assert rel_error(y, reference.forward(x.double(), w.double())) <= RTOL[torch.float32]
    assert rel_error(ck.cinc_conv2d_inverse(y, w), x) <= 20 * RTOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [7, 48])
def test_block_and_single_pixel_substitutions_are_bitwise_equal(C, dtype):
    """The CPU solve substitutes 8 pixels at once (vectorised across them) and the remainder one by one; both must
    round identically. With k = 1 every pixel is solved independently: 9 copies of one pixel give 8 in a block and 1
    alone, and all 9 solutions must be the same bits."""
    g = torch.Generator().manual_seed(C)
    w = make_weight(C, 1, dtype, generator=g, off_centre=1.0)
    w[:, :, 0, 0] += torch.randn(C, C, generator=g, dtype=torch.float64).to(dtype).tril(-1)
    pixel = torch.randn(1, C, 1, 1, generator=g, dtype=torch.float64).to(dtype)
    for adjoint in (False, True):
        y = pixel.expand(1, C, 3, 3).contiguous()
        fn = ck.cinc_conv2d_inverse_transpose if adjoint else ck.cinc_conv2d_inverse
        x = fn(y, w, backend="cpu")
        flat = x.permute(0, 2, 3, 1).reshape(9, C)
        assert torch.equal(flat, flat[:1].expand(9, C)), f"adjoint={adjoint}"
        want = (reference.inverse_transpose if adjoint else reference.inverse)(pixel.double(), w.double())
        assert rel_error(flat[0], want.reshape(C)) <= 20 * RTOL[dtype]


@pytest.mark.parametrize("vector_bytes", ["16", "32", "64"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 5, 12, 24])
def test_tiled_schedule_on_every_vector_width(C, dtype, vector_bytes, monkeypatch):
    """The tap micro-kernel is built for 16-, 32- and 64-byte vectors (baseline, AVX2 + FMA, AVX-512) and picks one
    at run time; capping the width runs the narrower builds on this CPU too. C = 1, 5, 12, 24 cover vectors with
    padding lanes and several vectors per tap row."""
    monkeypatch.setenv("CINC_CPU_MAX_VECTOR_BYTES", vector_bytes)
    g = torch.Generator().manual_seed(C)
    w = make_weight(C, 3, dtype, generator=g, off_centre=1.0)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    x = make_image(3, C, 7, 5, dtype, generator=g)
    y = ck.cinc_conv2d(x, w, b, backend="cpu")
    assert rel_error(y, reference.forward(x.double(), w.double(), b.double())) <= RTOL[dtype]
    assert rel_error(ck.cinc_conv2d_inverse(y, w, b, backend="cpu"), x) <= 20 * RTOL[dtype]
    u = ck.cinc_conv2d_inverse_transpose(x, w, backend="cpu")
    assert rel_error(u, reference.inverse_transpose(x.double(), w.double())) <= 20 * RTOL[dtype]
