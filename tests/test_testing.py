"""``cinc_kernels.testing``, shared by the tests, ``python -m cinc_kernels check`` and the benchmarks: its docstring
example runs, its weights are what it promises, and its error measure is the one the tolerances assume."""
from __future__ import annotations

import doctest

import torch

from cinc_kernels import reference, testing


def test_docstring_examples_run():
    result = doctest.testmod(testing)
    assert result.attempted > 0 and result.failed == 0


def test_make_weight_is_well_conditioned_and_reproducible():
    for C, k in [(1, 1), (3, 2), (7, 3), (4, 5)]:
        w = testing.make_weight(C, k, generator=torch.Generator().manual_seed(C + k))
        assert w.shape == (C, C, k, k) and w.dtype == torch.float64
        off_centre = 0.3 / (k * C**0.5)  # the scale of the noise on every entry
        diagonal = w[:, :, k - 1, k - 1].diagonal().abs()
        assert bool((diagonal >= 1.5 - 5 * off_centre).all() and (diagonal <= 2.5 + 5 * off_centre).all())
        again = testing.make_weight(C, k, generator=torch.Generator().manual_seed(C + k))
        assert torch.equal(w, again)
        # The dense map of a small image is far from singular.
        M = reference.dense_matrix(w, 3, 4)
        assert torch.linalg.cond(M).item() < 20
    half = testing.make_weight(3, 3, torch.float16, generator=torch.Generator().manual_seed(0))
    assert half.dtype == torch.float16


def test_make_image_draws_in_float64_then_casts():
    a = testing.make_image(2, 3, 4, 5, torch.float32, generator=torch.Generator().manual_seed(1))
    b = testing.make_image(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 4, 5) and a.dtype == torch.float32
    assert torch.equal(a, b.float())


def test_rel_error_is_relative_and_absolute_against_zero():
    want = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert testing.rel_error(want, want) == 0.0
    assert abs(testing.rel_error(want * 1.01, want) - 0.01) < 1e-12
    assert testing.rel_error(want, torch.zeros(2)) == 5.0
