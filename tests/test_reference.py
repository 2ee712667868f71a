"""The float64 reference against the dense matrix M it claims to apply (docs/spec.md §1)."""
import pytest
import torch

from cinc_kernels import masks, reference
from tests.cases import make_image, make_weight

# (B, C, H, W, k): k = 1, 2, 3, 5; H ≠ W; 1×1 images.
SHAPES = [(2, 2, 3, 4, 3), (1, 3, 1, 1, 3), (2, 1, 4, 1, 2), (1, 2, 5, 3, 5), (3, 3, 2, 2, 1), (1, 2, 1, 5, 2)]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("unit_diagonal", [False, True])
@pytest.mark.parametrize("B,C,H,W,k", SHAPES)
def test_reference_matches_dense_matrix(B, C, H, W, k, unit_diagonal, gen):
    w = make_weight(C, k, off_centre=1.0, generator=gen)
    x = make_image(B, C, H, W, generator=gen)
    M = reference.dense_matrix(w, H, W, unit_diagonal)
    flat = lambda t: t.reshape(B, -1)  # noqa: E731

    y = reference.forward(x, w, None, unit_diagonal)
    torch.testing.assert_close(flat(y), flat(x) @ M.T, rtol=1e-12, atol=1e-12)

    sign, logabs = torch.linalg.slogdet(M)
    assert sign != 0
    torch.testing.assert_close(reference.logdet(w, H, W, unit_diagonal), logabs, rtol=1e-10, atol=1e-10)

    want_x = torch.linalg.solve(M, flat(y).T).T
    torch.testing.assert_close(flat(reference.inverse(y, w, None, unit_diagonal)), want_x, rtol=1e-9, atol=1e-9)

    want_u = torch.linalg.solve(M.T, flat(x).T).T
    got_u = reference.inverse_transpose(x, w, unit_diagonal)
    torch.testing.assert_close(flat(got_u), want_u, rtol=1e-9, atol=1e-9)


def test_dense_matrix_is_block_triangular_with_L_on_the_diagonal(gen):
    C, H, W, k = 3, 3, 4, 3
    w = make_weight(C, k, off_centre=1.0, generator=gen)
    M = reference.dense_matrix(w, H, W)
    # Reorder NCHW flattening to pixel-major (raster pixel, then channel): then M is lower triangular.
    perm = torch.arange(C * H * W).view(C, H * W).T.reshape(-1)
    P = M[perm][:, perm]
    assert torch.equal(P, P.tril())
    L = reference.centre_tap(w)
    for p in range(H * W):
        assert torch.equal(P[p * C:(p + 1) * C, p * C:(p + 1) * C], L)


def test_bias_is_added_once_and_removed_by_the_inverse(gen):
    w = make_weight(2, 3, generator=gen)
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    x = make_image(2, 2, 3, 3, generator=gen)
    y = reference.forward(x, w, b)
    torch.testing.assert_close(y - reference.forward(x, w), b.view(1, 2, 1, 1).expand_as(y))
    torch.testing.assert_close(reference.inverse(y, w, b), x, rtol=1e-12, atol=1e-12)


def test_mask_and_free_parameter_count():
    for C, k, unit in [(1, 1, False), (4, 3, False), (4, 3, True), (5, 2, True)]:
        mask = reference.weight_mask(C, k, unit)
        free = int(mask.sum().item())
        assert free == masks.free_parameters(C, k, unit) == k * k * C * C - C * (C - 1) // 2 - (C if unit else 0)
        # the masked weight ignores every masked entry, whatever its value
        w = torch.randn(C, C, k, k, dtype=torch.float64)
        w2 = w + 100.0 * (1 - mask)
        assert torch.equal(reference.masked_weight(w, unit), reference.masked_weight(w2, unit))


def test_singular_weight_is_refused_and_has_minus_infinite_logdet(gen):
    w = make_weight(3, 3, generator=gen)
    w[1, 1, 2, 2] = 0.0
    y = make_image(1, 3, 2, 2, generator=gen)
    with pytest.raises(ValueError, match="weight"):
        reference.inverse(y, w)
    assert reference.logdet(w, 2, 2).item() == float("-inf")
