"""How far the inverse of a CInC convolution can be trusted: measure it, bound it, and keep it bounded.

The inverse ``x = M⁻¹ y`` is exact in exact arithmetic, but ``M⁻¹`` can amplify rounding errors exponentially in
the image size (docs/spec.md §1, "Conditioning"). This module gives

* :func:`inverse_gain`: an estimate of ``‖M⁻¹‖₂`` for one ``H × W`` image by power iteration with the backend's own
  ``inverse`` and ``inverse_transpose`` (a diagnostic: it runs ``2 · iterations`` solves and synchronises);
* :func:`contraction_bound` and :func:`gain_bound`: a cheap certificate that holds for **every** image size;
* :func:`contractive_weight` / :class:`ContractiveTaps`: a reparametrisation that keeps the certificate valid
  during training (``CInCConv2d(..., parametrization="contractive")``), together with :func:`bounded_centre`, which
  keeps ``‖L⁻¹‖₂`` bounded too, so that ``‖M⁻¹‖₂`` has a ceiling fixed at construction (:func:`gain_ceiling`).

The certificate
---------------
Norms: ``‖x‖₂`` of an image is the Euclidean norm over all its ``C·H·W`` entries; ``‖A‖₂`` of a ``C × C`` matrix is
its largest singular value. Let ``L`` be the (masked) centre tap and ``W_t`` the ``k² − 1`` other (masked) taps, and

    q = Σ_{t ≠ centre} ‖L⁻¹ W_t‖₂        (≤ ‖L⁻¹‖₂ · Σ_t ‖W_t‖₂, the coarser form).

**Claim.** If ``q < 1`` then for every image size ``H, W ≥ 1``

    ‖M⁻¹‖₂ ≤ ‖L⁻¹‖₂ / (1 − q)      and      ‖M‖₂ ≤ ‖L‖₂ + Σ_t ‖W_t‖₂,

so the condition number ``κ(M) = ‖M‖₂ ‖M⁻¹‖₂`` is bounded independently of ``H`` and ``W``.

**Proof.** On one image, ``M = D + N`` with ``D = I_{HW} ⊗ L`` (the centre tap at every pixel) and
``N = Σ_t S_t ⊗ W_t``, where ``S_t`` shifts the image by the tap's offset ``(k−1−a, k−1−b)`` down and right, filling
with zeros (the top-left padding). ``S_t`` only moves entries and drops some, so ``‖S_t‖₂ ≤ 1`` whatever ``H, W``.
Because ``D⁻¹ = I ⊗ L⁻¹`` acts on channels only, ``D⁻¹(S_t ⊗ W_t) = S_t ⊗ L⁻¹W_t``, hence
``M = D (I + K)`` with ``K = Σ_t S_t ⊗ L⁻¹W_t`` and ``‖K‖₂ ≤ Σ_t ‖S_t‖₂ ‖L⁻¹W_t‖₂ ≤ q < 1``
(``‖A ⊗ B‖₂ = ‖A‖₂ ‖B‖₂``). The Neumann series ``(I + K)⁻¹ = Σ_n (−K)ⁿ`` converges with norm ``≤ 1 / (1 − q)``, and
``M⁻¹ = (I + K)⁻¹ D⁻¹`` gives the bound; ``‖D⁻¹‖₂ = ‖L⁻¹‖₂``. The bound on ``‖M‖₂`` is the triangle inequality.
``‖M⁻ᵀ‖₂ = ‖M⁻¹‖₂``, so the adjoint solve (back-propagation through the inverse) is covered too. ∎

Read as an algorithm, the wavefront computes ``x_p = L⁻¹ (y_p − Σ_t W_t x_{p−t})``: an error made at one pixel
reaches later pixels multiplied by ``K``, so with ``q < 1`` the errors of the whole image add up to at most
``1 / (1 − q)`` times the local ones instead of compounding along every path through the image.

**A ceiling for every parameter value.** ``q < 1`` alone leaves ``‖L⁻¹‖₂`` free. Write ``L = D (I + N)`` with
``D`` its diagonal and ``N = D⁻¹ (L − D)`` strictly lower triangular (nilpotent). If every ``|L_cc| ≥ e^{−a}`` and
``‖N‖₂ ≤ β < 1`` then ``(I + N)⁻¹ = Σ_{n<C} (−N)ⁿ`` has norm ``≤ 1 / (1 − β)``, so ``‖L⁻¹‖₂ ≤ e^a / (1 − β)`` and

    ‖M⁻¹‖₂ ≤ e^a / ((1 − β)(1 − γ))      (a = 0 with a unit diagonal),

and with ``|L_cc| ≤ e^a`` also ``‖L‖₂ ≤ e^a (1 + β)`` and ``‖M‖₂ ≤ ‖L‖₂ (1 + γ)`` (each ``‖W_t‖₂ ≤ ‖L‖₂ ‖L⁻¹W_t‖₂``).
:func:`bounded_centre` enforces ``|log|L_cc|| ≤ a`` and ``‖N‖₂ ≤ β`` and :func:`contractive_weight` then ``q ≤ γ``.
With the defaults (``a = log 2``, ``β = 0.5``, ``γ = 0.9``): ``‖M⁻¹‖₂ ≤ 40`` and ``κ(M) ≤ 228`` at every image size.

The condition is sufficient, not necessary: random taps with ``q`` somewhat above 1 often still have a small gain
(benchmarks/results/conditioning.md measures where it breaks).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import functional as fn
from ._checks import Range, check_int
from .masks import masked_weight

__all__ = [
    "NonFiniteInverseWarning",
    "ContractiveTaps",
    "bounded_centre",
    "contraction_bound",
    "contractive_weight",
    "gain_bound",
    "gain_ceiling",
    "inverse_gain",
]

DEFAULT_MAX_CONTRACTION = 0.9
"""``q`` kept by the contractive parametrisation: ``‖M⁻¹‖₂ ≤ 10 ‖L⁻¹‖₂`` at every image size."""
DEFAULT_MAX_LOG_DIAGONAL = math.log(2.0)
"""``a``: the contractive parametrisation keeps every centre diagonal entry's magnitude in ``[1/2, 2]``."""
DEFAULT_MAX_CENTRE_COUPLING = 0.5
"""``β``: the contractive parametrisation keeps ``‖D⁻¹(L − D)‖₂ ≤ 0.5`` (``D``: the centre tap's diagonal)."""


class NonFiniteInverseWarning(RuntimeWarning):
    """A layer's inverse returned inf or NaN (see :func:`inverse_gain` for why and what to do)."""


def _centre_and_taps(weight: torch.Tensor, unit_diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` ``(C, C)`` and the off-centre masked taps ``(k² − 1, C, C)`` (``[o, c]`` per tap)."""
    C, k = weight.shape[0], weight.shape[-1]
    wm = masked_weight(weight, unit_diagonal)
    taps = wm.reshape(C, C, k * k).permute(2, 0, 1)
    return taps[-1], taps[:-1]


def contraction_bound(weight: torch.Tensor, unit_diagonal: bool = False) -> torch.Tensor:
    """``q = Σ_{t ≠ centre} ‖L⁻¹ W_t‖₂``; ``q < 1`` certifies the inverse for every image size (module docstring).

    Differentiable in ``weight`` (one batched SVD of ``k² − 1`` ``C × C`` matrices).

    Args:
        weight: ``(C, C, k, k)``; the mask is applied here.
        unit_diagonal: as for :func:`cinc_kernels.cinc_conv2d`.

    Returns:
        A 0-dim tensor of ``weight``'s dtype; ``inf`` when ``L`` is singular.
    """
    fn.check_weight(weight)
    L, taps = _centre_and_taps(weight, unit_diagonal)
    if taps.shape[0] == 0:  # k = 1: nothing couples the pixels
        return weight.new_zeros(())
    # Branch-free (torch.compile traces it without a graph break): solve with the zeros of a singular L replaced
    # by ones, then report inf for it.
    singular = (L.diagonal() == 0).any()
    safe_L = L + torch.diag_embed((L.diagonal() == 0).to(L.dtype))
    scaled = torch.linalg.solve_triangular(safe_L, taps, upper=False)  # L⁻¹ W_t for every tap at once
    q = torch.linalg.matrix_norm(scaled, ord=2).sum()
    return torch.where(singular, q.new_full((), math.inf), q)


def gain_bound(weight: torch.Tensor, unit_diagonal: bool = False) -> float:
    """``‖L⁻¹‖₂ / (1 − q)``: an upper bound of ``‖M⁻¹‖₂`` valid for every image size when ``q < 1``; ``inf``
    otherwise (no claim). ``weight``: ``(C, C, k, k)``."""
    with torch.no_grad():
        q = float(contraction_bound(weight, unit_diagonal))
        if not q < 1:
            return math.inf
        L, _ = _centre_and_taps(weight.double(), unit_diagonal)
        return float(torch.linalg.matrix_norm(torch.linalg.inv(L), ord=2)) / (1 - q)


def contractive_weight(weight: torch.Tensor, unit_diagonal: bool = False,
                       max_contraction: float = DEFAULT_MAX_CONTRACTION) -> torch.Tensor:
    """The weight with its off-centre taps scaled by ``min(1, γ / q)``, ``γ = max_contraction``.

    ``q`` is positively homogeneous in the off-centre taps for a fixed centre tap, so the result has
    ``q = min(q(weight), γ) ≤ γ < 1``: its inverse is certified at every image size with
    ``‖M⁻¹‖₂ ≤ ‖L⁻¹‖₂ / (1 − γ)``. The centre tap (and hence the log-determinant) is unchanged, and weights that
    already satisfy the bound are returned unchanged (the map is a projection). Differentiable: while the bound is
    active the gradient also flows through ``q``, like spectral normalisation.

    Args:
        weight: ``(C, C, k, k)``.
        unit_diagonal: as for :func:`cinc_kernels.cinc_conv2d`.
        max_contraction: ``γ`` in ``(0, 1)``.

    Returns:
        ``(C, C, k, k)``, same dtype and device.
    """
    if not 0 < max_contraction < 1:
        raise ValueError(f"max_contraction must be in (0, 1), got {max_contraction}")
    q = contraction_bound(weight, unit_diagonal)
    # γ / max(q, γ) is 1 below the bound and γ/q above it, without dividing by a zero q.
    scale = max_contraction / torch.maximum(q, q.new_tensor(max_contraction))
    k = weight.shape[-1]
    centre = torch.zeros_like(weight)
    centre[:, :, k - 1, k - 1] = 1
    return weight * (centre + (1 - centre) * scale)


def _check_centre_limits(max_log_diagonal: object, max_centre_coupling: object) -> None:
    if max_log_diagonal is not None:
        Range(float, 0).check("max_log_diagonal", max_log_diagonal)
    if max_centre_coupling is not None:
        if Range(float, 0, open_low=True).check("max_centre_coupling", max_centre_coupling) >= 1:
            raise ValueError(f"max_centre_coupling must be in (0, 1) or None, got {max_centre_coupling!r}")


def bounded_centre(weight: torch.Tensor, unit_diagonal: bool = False,
                   max_log_diagonal: Optional[float] = DEFAULT_MAX_LOG_DIAGONAL,
                   max_centre_coupling: Optional[float] = DEFAULT_MAX_CENTRE_COUPLING) -> torch.Tensor:
    """The weight with its centre tap ``L = D(I + N)`` projected so that ``‖L⁻¹‖₂ ≤ e^a / (1 − β)``
    (module docstring, "A ceiling for every parameter value"): each diagonal magnitude clamped to
    ``[e^{−a}, e^a]`` (sign kept, a zero counts as positive), then the strictly lower part scaled by
    ``min(1, β / ‖N‖₂)``. Other taps and masked entries are unchanged; a weight inside the limits is returned
    unchanged (a projection). ``None`` leaves that part free.

    Args:
        weight: ``(C, C, k, k)``.
        unit_diagonal: the diagonal is fixed to ones (``a`` plays no part).
        max_log_diagonal: ``a ≥ 0``.
        max_centre_coupling: ``β`` in ``(0, 1)``.

    Returns:
        ``(C, C, k, k)``, same dtype and device.
    """
    _check_centre_limits(max_log_diagonal, max_centre_coupling)
    k = weight.shape[-1]
    centre = weight[:, :, k - 1, k - 1]
    raw = centre.diagonal()
    if unit_diagonal:
        diag = torch.ones_like(raw)
    elif max_log_diagonal is None:
        diag = raw
    else:
        sign = torch.where(raw < 0, -torch.ones_like(raw), torch.ones_like(raw))
        diag = sign * raw.abs().clamp(math.exp(-max_log_diagonal), math.exp(max_log_diagonal))
    strict = centre.tril(-1)
    if max_centre_coupling is not None and centre.shape[0] > 1:
        safe = torch.where(diag == 0, torch.ones_like(diag), diag)  # only an unbounded diagonal can hold a zero
        coupling = torch.linalg.matrix_norm(strict / safe[:, None], ord=2)
        strict = strict * (max_centre_coupling / torch.maximum(coupling, coupling.new_tensor(max_centre_coupling)))
    kept_diag = raw if unit_diagonal else diag  # with a unit diagonal the stored diagonal is masked: keep it
    new_centre = strict + torch.diag_embed(kept_diag) + centre.triu(1)
    at_centre = torch.zeros(k, k, dtype=weight.dtype, device=weight.device)
    at_centre[k - 1, k - 1] = 1
    return weight * (1 - at_centre) + new_centre[:, :, None, None] * at_centre


def gain_ceiling(unit_diagonal: bool = False, max_contraction: float = DEFAULT_MAX_CONTRACTION,
                 max_log_diagonal: Optional[float] = DEFAULT_MAX_LOG_DIAGONAL,
                 max_centre_coupling: Optional[float] = DEFAULT_MAX_CENTRE_COUPLING) -> float:
    """``e^a / ((1 − β)(1 − γ))``: ``‖M⁻¹‖₂`` of every weight that :func:`bounded_centre` then
    :func:`contractive_weight` can return, at every image size (``a = 0`` with ``unit_diagonal``); ``inf`` when a
    limit is ``None``."""
    _check_centre_limits(max_log_diagonal, max_centre_coupling)
    if max_centre_coupling is None or (max_log_diagonal is None and not unit_diagonal):
        return math.inf
    a = 0.0 if unit_diagonal or max_log_diagonal is None else max_log_diagonal
    return math.exp(a) / ((1 - max_centre_coupling) * (1 - max_contraction))


class ContractiveTaps(nn.Module):
    """:func:`bounded_centre` then :func:`contractive_weight` as a ``torch.nn.utils.parametrize`` parametrisation of
    a ``(C, C, k, k)`` weight: ``‖M⁻¹‖₂ ≤`` :func:`gain_ceiling` at every image size, whatever the free parameter.

    ``right_inverse`` stores an assigned weight as it is; the layer then uses its projection.
    """

    def __init__(self, unit_diagonal: bool = False, max_contraction: float = DEFAULT_MAX_CONTRACTION,
                 max_log_diagonal: Optional[float] = DEFAULT_MAX_LOG_DIAGONAL,
                 max_centre_coupling: Optional[float] = DEFAULT_MAX_CENTRE_COUPLING):
        super().__init__()
        if not 0 < max_contraction < 1:
            raise ValueError(f"max_contraction must be in (0, 1), got {max_contraction}")
        _check_centre_limits(max_log_diagonal, max_centre_coupling)
        self.unit_diagonal, self.max_contraction = unit_diagonal, max_contraction
        self.max_log_diagonal, self.max_centre_coupling = max_log_diagonal, max_centre_coupling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        centred = bounded_centre(weight, self.unit_diagonal, self.max_log_diagonal, self.max_centre_coupling)
        return contractive_weight(centred, self.unit_diagonal, self.max_contraction)

    def gain_ceiling(self) -> float:
        """:func:`gain_ceiling` of these limits."""
        return gain_ceiling(self.unit_diagonal, self.max_contraction, self.max_log_diagonal,
                            self.max_centre_coupling)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def extra_repr(self) -> str:
        return (f"unit_diagonal={self.unit_diagonal}, max_contraction={self.max_contraction}, "
                f"max_log_diagonal={self.max_log_diagonal}, max_centre_coupling={self.max_centre_coupling}")


def _batch_norms(t: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = t.flatten(1).norm(dim=1)
    return norms


@torch.no_grad()
def inverse_gain(weight: torch.Tensor, height: int, width: int, *, unit_diagonal: bool = False,
                 iterations: int = 30, probes: int = 4, rtol: float = 1e-3, dtype: torch.dtype = torch.float64,
                 backend: str = "auto", generator: Optional[torch.Generator] = None) -> float:
    """Estimate ``‖M⁻¹‖₂`` (the largest factor by which the inverse can stretch an ``height × width`` image) by power
    iteration on ``M⁻ᵀ M⁻¹`` with :func:`cinc_conv2d_inverse` and :func:`cinc_conv2d_inverse_transpose`.

    The estimate is a lower bound that converges from below; ``probes`` independent starting images run as one
    batch and the largest is kept. A float32 inverse loses about ``log10(gain)`` of its ~7 digits; when the gain
    approaches ``1/eps`` of the dtype the result is garbage. Remedies: solve in float64
    (``cinc_conv2d_inverse(..., accumulate=torch.float64)`` removes the solver's own error, not the rounding already
    in ``y``), or train with ``CInCConv2d(..., parametrization="contractive")``, which bounds the gain at every size.

    Args:
        weight: ``(C, C, k, k)``.
        height, width: image size, ``≥ 1``.
        unit_diagonal: as for :func:`cinc_kernels.cinc_conv2d`.
        iterations: at most this many power steps (each is one inverse and one adjoint solve).
        probes: starting images run side by side.
        rtol: stop once the estimate changes by less than this, relatively.
        dtype: the dtype the iteration runs in (float64 by default, so the estimate itself survives large gains).
        backend: which backend runs the solves.
        generator: for the random starting images (seeded with 0 when ``None``, so the estimate is reproducible).

    Returns:
        The estimate as a Python float (``inf`` when the iteration overflows). Synchronises with the device.
    """
    fn.check_weight(weight)
    check_int("height", height, 1)
    check_int("width", width, 1)
    check_int("iterations", iterations, 1)
    check_int("probes", probes, 1)
    C = weight.shape[0]
    w = weight.detach().to(dtype)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    v = torch.randn(probes, C, height, width, generator=generator, dtype=torch.float64).to(dtype=dtype,
                                                                                              device=w.device)
    estimate = 0.0
    for _ in range(iterations):
        v = v / _batch_norms(v).view(-1, 1, 1, 1)
        u = fn.cinc_conv2d_inverse(v, w, unit_diagonal=unit_diagonal, backend=backend)
        new = float(_batch_norms(u).max())
        if not math.isfinite(new):
            return math.inf
        converged = abs(new - estimate) <= rtol * new
        estimate = new
        if converged:
            break
        # M⁻ᵀ M⁻¹ v points towards the top right-singular vector of M⁻¹.
        v = fn.cinc_conv2d_inverse_transpose(u, w, unit_diagonal=unit_diagonal, backend=backend)
        if not bool(torch.isfinite(v).all()):
            return math.inf
    return estimate
