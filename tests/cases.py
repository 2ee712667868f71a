"""Shared helpers of the test suite: the backends every backend-parametrised test runs on (the one place that lists
them), memory layouts, per-dtype tolerances, and the check of all four ops against the float64 reference. Weights,
images and the error measure come from :mod:`cinc_kernels.testing`, which the self-check and the benchmarks use too.

Every test draws fresh inputs from a seeded generator so failures reproduce.
"""
from __future__ import annotations

import dataclasses
import os

import torch

import cinc_kernels as ck
from cinc_kernels import reference
from cinc_kernels.testing import make_image, make_weight, rel_error

__all__ = ["BIAS_LAYOUTS", "INTERPRETER_PROCESS_BACKENDS", "LAYOUTS", "MAIN_PROCESS_BACKENDS", "RTOL",
           "TINY_TRAIN_ARGS", "BackendCase", "adjoint_apply", "assert_one_error_line", "assert_ops_match_reference",
           "assert_rel_close", "backend_case", "backends_on", "bias_with_layout", "folder_snapshot", "make_image",
           "make_weight", "rel_error", "runnable_cases", "with_layout"]


@dataclasses.dataclass(frozen=True)
class BackendCase:
    """A backend on one device, as the shared test bodies (any test taking ``backend`` and ``device``) see it."""

    name: str
    device: str
    # Its ops are torch.library custom ops: opcheck and torch.compile(fullgraph=True) apply.
    custom_ops: bool = True
    # The inverse raises ValueError on a singular centre tap; CUDA cannot check without a device-to-host sync.
    refuses_singular: bool = True
    # Triton's CPU interpreter pays per operation: gradcheck projects the Jacobian on the bigger inputs.
    interpreted: bool = False


# One line per backend and device. The first list runs in the main pytest process; Triton's interpreter must be
# switched on before triton is imported, so its cases run in a second process started with TRITON_INTERPRET=1.
MAIN_PROCESS_BACKENDS = [
    BackendCase("reference", "cpu", custom_ops=False),
    BackendCase("cpu", "cpu"),
    BackendCase("cuda", "cuda", refuses_singular=False),
    BackendCase("triton", "cuda", refuses_singular=False),
    BackendCase("torch", "cpu"),
    BackendCase("torch", "cuda"),
]
INTERPRETER_PROCESS_BACKENDS = [
    BackendCase("triton", "cpu", interpreted=True),
]


def backend_case(name: str, device: str) -> BackendCase:
    """The declared case of ``backend`` on ``device`` (what a shared body needs beyond the two names); ``"auto"``,
    which picks among the declared backends per op, as a case with the defaults."""
    for case in MAIN_PROCESS_BACKENDS + INTERPRETER_PROCESS_BACKENDS:
        if (case.name, case.device) == (name, device):
            return case
    if name == "auto":
        return BackendCase(name, device)
    raise KeyError(f"no backend case {name!r} on {device!r}")


def runnable_cases(*, reference: bool = True) -> list[BackendCase]:
    """The main-process cases that run on this machine: the backend is available and its device is present. For
    tests that pick their backends themselves instead of taking the ``backend``/``device`` parametrisation of
    ``tests/conftest.py``."""
    from cinc_kernels.backends import get_backend

    return [case for case in MAIN_PROCESS_BACKENDS
            if (reference or case.name != "reference") and (case.device != "cuda" or torch.cuda.is_available())
            and get_backend(case.name).unavailable() is None]


def backends_on(device: str = "cpu", *, reference: bool = True, auto: bool = False) -> list[str]:
    """The names of the :func:`runnable_cases` on ``device``, with ``"auto"`` first when asked."""
    return (["auto"] if auto else []) + [case.name for case in runnable_cases(reference=reference)
                                         if case.device == device]


# The smallest training run of the flow command line (tests of the CLI and the trainer).
TINY_TRAIN_ARGS = ["--preset", "digits-tiny", "--no-progress", "--n-samples", "2", "--temperatures", "1.0",
                   "--eval-every", "1000", "--sample-every", "1000"]

# Relative tolerances (on the norm of the difference) per dtype, for well-conditioned weights.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

LAYOUTS = ("contiguous", "noncontiguous", "channels_last")


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


BIAS_LAYOUTS = ("strided", "expanded")


def bias_with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A ``(C,)`` bias that is not a contiguous vector: ``"strided"`` holds ``values`` as every second element of a
    vector twice as long (what ``torch.func.vmap`` over a bias can hand a kernel); ``"expanded"`` is ``values[0]``
    broadcast with stride 0 from a one-element allocation, so reading it as contiguous runs past the end."""
    if layout == "strided":
        wide = torch.full((2 * values.numel(),), float("nan"), dtype=values.dtype, device=values.device)
        wide[::2] = values
        return wide[::2]
    if layout == "expanded":
        return values[:1].clone().reshape(()).expand(values.numel())
    raise ValueError(layout)


def assert_rel_close(got, want, dtype, factor=1.0, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_error(got, want)
    tol = RTOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def adjoint_apply(u: torch.Tensor, w: torch.Tensor, unit_diagonal: bool) -> torch.Tensor:
    """``Mᵀ u`` in float64: the vector-Jacobian product of the reference forward."""
    zeros = torch.zeros(u.shape, dtype=torch.float64, device=u.device, requires_grad=True)
    (mt_u,) = torch.autograd.grad(reference.forward(zeros, w.double(), None, unit_diagonal), zeros, u.double())
    return mt_u


def assert_ops_match_reference(backend, x, w, b, unit_diagonal, layout="contiguous", factor=1.0, what=""):
    """All four ops of ``backend`` against the float64 reference on ``x``'s dtype, inputs laid out as ``layout``.

    The forward against the reference; the inverse solves the reference's own output (``x`` is then known exactly)
    and may amplify rounding by the conditioning of ``M`` (modest for :func:`make_weight`'s weights); the adjoint's
    result, multiplied by ``Mᵀ``, must give back its input; the log-determinant against the reference.
    """
    dtype = x.dtype
    tol = RTOL[dtype] * factor
    b64 = None if b is None else b.double()
    B, C, H, W = x.shape

    y = ck.cinc_conv2d(with_layout(x, layout), w, b, unit_diagonal=unit_diagonal, backend=backend)
    y_ref = reference.forward(x.double(), w.double(), b64, unit_diagonal)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device, what
    assert rel_error(y, y_ref) <= tol, f"forward {what}: {rel_error(y, y_ref):.2e}"

    y_in = with_layout(y_ref.to(dtype=dtype, device=x.device), layout)
    x_hat = ck.cinc_conv2d_inverse(y_in, w, b, unit_diagonal=unit_diagonal, backend=backend)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape, what
    assert rel_error(x_hat, x) <= 20 * tol, f"inverse {what}: {rel_error(x_hat, x):.2e}"

    u = ck.cinc_conv2d_inverse_transpose(with_layout(x, layout), w, unit_diagonal=unit_diagonal, backend=backend)
    assert u.dtype == dtype and u.shape == x.shape, what
    mt_u = adjoint_apply(u, w, unit_diagonal)
    assert rel_error(mt_u, x) <= 20 * tol, f"inverse_transpose {what}: {rel_error(mt_u, x):.2e}"

    ld = ck.cinc_logdet(w, H, W, unit_diagonal=unit_diagonal, backend=backend)
    assert ld.dtype == dtype and ld.dim() == 0 and ld.device == w.device, what
    torch.testing.assert_close(ld.double().cpu(), reference.logdet(w.double(), H, W, unit_diagonal).cpu(),
                               rtol=tol, atol=tol * H * W)


def assert_one_error_line(text: str, *needles: str) -> None:
    """A command line's mistake: exactly one non-blank line, ``error: ...``, containing every needle (no usage dump,
    no traceback)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    for needle in needles:
        assert needle in lines[0], (needle, text)
    assert "Traceback" not in text


def folder_snapshot(folder, ignore: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` (by path relative to it) and its bytes, but the file names in ``ignore``: to
    check that a command left a user's folder exactly as it was."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f in ignore:
                continue
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out

