"""A GPU kernel that has never met this GPU checks itself before ``backend="auto"`` trusts it.

The CUDA and Triton kernels are tested on CPU threads and under Triton's interpreter, but a GPU architecture they
were never run on can still compute something else (a race the emulation does not schedule, a compiler that reads
the code differently). So the first time ``auto`` would run one of them for a ``(device, op, dtype)``, it runs a
small random case (two shapes, milliseconds) and compares the result with the portable ``torch`` backend solving the
same case in float64. On disagreement beyond the dtype's tolerance — or if the kernel raises — it warns once, naming
the device, the op and the error, and ``auto`` moves on to the next backend of its order for that combination (each
checked the same way; the portable ``torch`` backend at the latest). An explicit ``backend="cuda"``/``"triton"``
is taken at its word.

Set ``CINC_TRUST_KERNELS=1`` to skip the check. It is not run inside ``torch.compile`` tracing, ``torch.jit.trace``
or CUDA graph capture (it must read a result): there the verdict of an earlier eager call is used, and a kernel
without one is trusted, so run one eager call (a warm-up) first.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from . import _extension
from ._symbolic import tracing
from .finite_check import _capturing

if TYPE_CHECKING:
    from .backends import Backend

__all__ = ["ENV", "TOLERANCE", "trusted"]

ENV = "CINC_TRUST_KERNELS"
# The backends whose kernels are compiled for (or generated on) the GPU they run on, and the devices where they do.
CHECKED_BACKENDS = frozenset({"cuda", "triton"})
CHECKED_DEVICE_TYPES = frozenset({"cuda"})
PORTABLE = "torch"
# Relative error (on the norm) allowed against the float64 solve. float32 leaves room for TF32 in the Triton
# forward (torch.backends.cuda.matmul.allow_tf32); a wrong kernel misses by far more (one wrong pixel of the case
# is a relative error of about 0.05).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 3e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (batch, channels, height, width, kernel size): the paper's k = 3 and a k = 2 case with more channels.
CASES = ((2, 5, 7, 6, 3), (1, 12, 5, 4, 2))

# (backend, device, op, dtype) -> whether auto may use it.
_verdicts: dict[tuple[str, str, str, torch.dtype], bool] = {}


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _cannot_check_now(device: torch.device) -> bool:
    return torch.compiler.is_compiling() or tracing() or _capturing(device)


def trusted(backend: Backend, op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``auto`` may run ``backend``'s ``op`` for ``dtype`` tensors on ``device`` (module docstring); checks
    it on first use."""
    if backend.name not in CHECKED_BACKENDS or device.type not in CHECKED_DEVICE_TYPES:
        return True
    key = (backend.name, _device_key(device), op, dtype)
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    if _cannot_check_now(device) or os.environ.get(ENV) == "1":
        return True
    error = _self_check(backend, op, torch.device(key[1]), dtype)
    _verdicts[key] = error is None
    if error is not None:
        _extension.warn_once(
            f"backend='auto' does not use {backend.name!r} for {op} in {str(dtype).removeprefix('torch.')} on "
            f"{_device_name(torch.device(key[1]))}: its first-use check against the portable {PORTABLE!r} backend "
            f"failed ({error}); using the next backend instead. Set {ENV}=1 to skip the check.")
    return error is None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, compute capability {props.major}.{props.minor})"
    return str(device)


def _case(case: tuple[int, ...], device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    """A well-conditioned float64 case: the weights and images the test suite uses (:mod:`cinc_kernels.testing`)."""
    from .testing import make_image, make_weight  # testing imports functional, which imports this module

    B, C, H, W, k = case
    weight = make_weight(C, k, device=device, generator=generator)
    image = make_image(B, C, H, W, device=device, generator=generator)
    bias = torch.randn(C, generator=generator, dtype=torch.float64).to(device)
    return {"image": image, "weight": weight, "bias": bias, "size": (H, W)}


def _arguments(op: str, case: dict[str, Any], dtype: torch.dtype) -> tuple[Any, ...]:
    image, weight, bias = (case[name].to(dtype) for name in ("image", "weight", "bias"))
    if op == "logdet":
        return (weight, *case["size"], False)
    if op == "inverse_transpose":
        return (image, weight, False)
    return (image, weight, bias, False)


def _self_check(backend: Backend, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when ``backend``'s ``op`` agrees with the portable backend on :data:`CASES`, else what went wrong."""
    from .backends import get_backend  # backends imports this module
    from .testing import rel_error

    portable = get_backend(PORTABLE).ops[op]
    generator = torch.Generator().manual_seed(0)
    tolerance = TOLERANCE[dtype]
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for shape in CASES:
            case = _case(shape, device, generator)
            try:
                got = backend.ops[op](*_arguments(op, case, dtype))
            # Whatever an untried kernel raises (a CUDA error, a Triton compilation error...) means: do not use it.
            except Exception as exc:  # noqa: BLE001
                return f"{type(exc).__name__}: {exc}"
            want = portable(*_arguments(op, case, torch.float64))
            error = rel_error(got, want)
            if not error <= tolerance:  # NaN fails too
                B, C, H, W, k = shape
                return f"relative error {error:.1e} > {tolerance:.0e} at B={B}, C={C}, {H}×{W}, k={k}"
    return None
