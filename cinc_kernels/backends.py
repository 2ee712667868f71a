"""The backends behind the public functions, and how ``backend="auto"`` chooses among them.

A backend is four callables with the signatures of the ``cinc`` ops plus what it runs on. The C++ extension
provides ``cpu`` (and ``cuda`` when built with CUDA); ``reference`` is the float64 oracle; other backends (Triton)
register themselves with :func:`register_backend`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import reference
from ._autograd import register_autograd_formulas, register_fake_impls

OPS = ("forward", "inverse", "inverse_transpose", "logdet")
FLOATS = (torch.float32, torch.float64)

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.cinc.*)

    _EXTENSION_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only on an unbuilt checkout
    _EXTENSION_ERROR = str(exc)

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make build`) in the repository root"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the CInC ops.

    ``ops`` maps an op name of :data:`OPS` to a callable with the ``cinc`` op's signature, e.g.
    ``forward(x, weight, bias, unit_diagonal)``; an op it lacks is absent. ``device_types`` lists the tensor device
    types it accepts (empty: any). ``dtypes(op, device_type)`` gives the dtypes it accepts for an op.
    ``unavailable()`` returns ``None`` when the backend works on this install, else why not and how to fix it.
    """

    name: str
    ops: dict
    device_types: tuple = ()
    dtypes: Callable[[str, str], tuple] = lambda op, device_type: FLOATS
    unavailable: Callable[[], Optional[str]] = lambda: None
    public: bool = True

    def runs_on(self, device_type: str) -> bool:
        return not self.device_types or device_type in self.device_types


_REGISTRY: dict[str, Backend] = {}

# Preference order of backend="auto", per device type and op; the first available one that takes the tensors wins.
# CPU forward: ATen's own convolution (oneDNN) on the masked weight beats our gathered GEMM at every shape of
# benchmarks/bench_cpu_ops.py (results/cpu_ops.md), so auto uses it; the inverse has no ATen counterpart.
AUTO_ORDER: dict[tuple[str, str], list[str]] = {
    ("cpu", "forward"): ["_aten", "cpu", "reference"],
    ("cpu", "inverse"): ["cpu", "reference"],
    ("cpu", "inverse_transpose"): ["cpu", "reference"],
    ("cpu", "logdet"): ["cpu", "reference"],
    # CUDA forward: cuDNN on the masked weight first until benchmarks/gpu_check.sh has measured our direct kernel
    # against it on the H200 (no GPU was available when the kernels were written; see results/gpu/ once it ran).
    # Inverse: both the CUDA and the Triton backends solve in one launch per call; CUDA first is a guess until
    # benchmarks/bench_gpu.py (which times both side by side) has run on a GPU.
    ("cuda", "forward"): ["_aten", "cuda", "triton", "reference"],
    ("cuda", "inverse"): ["cuda", "triton", "reference"],
    ("cuda", "inverse_transpose"): ["cuda", "triton", "reference"],
    ("cuda", "logdet"): ["cuda", "triton", "reference"],
}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend by name."""
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in _REGISTRY:
        known = ", ".join(["auto"] + sorted(n for n, b in _REGISTRY.items() if b.public))
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    return _REGISTRY[name]


def available_backends() -> list[str]:
    """The public backends that work on this install, e.g. ``["reference", "cpu", "triton", "cuda"]``."""
    return [n for n, b in _REGISTRY.items() if b.public and b.unavailable() is None]


def select(name: str, op: str, device: torch.device, dtype: torch.dtype, arg: str = "x") -> Backend:
    """The backend that runs ``op`` for tensors of ``device`` and ``dtype``.

    Explicit names are checked (installed, right device, dtype supported) and raise a clear error otherwise;
    ``"auto"`` walks :data:`AUTO_ORDER`.
    """
    if name == "auto":
        for candidate in AUTO_ORDER.get((device.type, op), ["reference"]):
            b = _REGISTRY.get(candidate)
            if (b is not None and op in b.ops and b.runs_on(device.type) and b.unavailable() is None
                    and dtype in b.dtypes(op, device.type)):
                return b
        raise ValueError(f"{arg}: no backend runs {op} for dtype {dtype} on {device.type}")
    b = get_backend(name)
    why = b.unavailable()
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available on this install: {why}")
    if op not in b.ops:
        raise ValueError(f"backend {name!r} has no {op}")
    if not b.runs_on(device.type):
        raise ValueError(
            f"backend {name!r} runs on {'/'.join(b.device_types)} tensors, but {arg} is on {device.type}"
        )
    accepted = b.dtypes(op, device.type)
    if dtype not in accepted:
        names = ", ".join(str(d).replace("torch.", "") for d in accepted)
        raise ValueError(f"{arg}: backend {name!r} supports {names} for {op} on {device.type}, got {dtype}")
    return b


# --------------------------------------------------------------------------------------------------------------
# built-in backends


def _reference_logdet(weight, height, width, unit_diagonal):
    return reference.logdet(weight, height, width, unit_diagonal).to(weight.dtype)


register_backend(
    Backend(
        name="reference",
        ops={
            "forward": reference.forward,
            "inverse": reference.inverse,
            "inverse_transpose": reference.inverse_transpose,
            "logdet": _reference_logdet,
        },
    )
)


def _aten_forward(x, weight, bias, unit_diagonal):
    """The forward through ATen's convolution (oneDNN / cuDNN) on the masked weight; differentiable by ATen."""
    k = weight.shape[-1]
    wm = reference.masked_weight(weight, unit_diagonal)
    if x.numel() == 0:
        # ATen's convolution refuses an image without pixels or channels; the result is just as empty.
        return x + 0 * wm.sum() + (0 if bias is None else 0 * bias.sum())
    return F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), wm, bias)


register_backend(
    Backend(
        name="_aten",
        ops={"forward": _aten_forward},
        dtypes=lambda op, dev: FLOATS + ((torch.float16, torch.bfloat16) if dev == "cuda" else ()),
        public=False,
    )
)


def build_info() -> dict:
    """What the extension was built with (written by setup.py), or ``{}`` for an unbuilt checkout."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _has_kernel(op: str, key: str) -> bool:
    return _EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"cinc::{op}", key)


def _cpu_unavailable():
    if _EXTENSION_ERROR is not None:
        return f"the C++ extension cinc_kernels._C did not load ({_EXTENSION_ERROR}); {_BUILD_HINT}"
    return None


def _cuda_unavailable():
    if _EXTENSION_ERROR is not None:
        return f"the C++ extension cinc_kernels._C did not load ({_EXTENSION_ERROR}); {_BUILD_HINT}"
    if not _has_kernel("inverse", "CUDA"):
        if torch.version.cuda is None:
            return "this torch has no CUDA; install a CUDA build of torch, then rebuild with CINC_CUDA=1"
        return "the extension was built without its CUDA kernels; rebuild with CINC_CUDA=1 and a CUDA toolkit"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


if _EXTENSION_ERROR is None:
    _EXTENSION_OPS = {op: getattr(torch.ops.cinc, op).default for op in OPS}
    register_fake_impls(*(_EXTENSION_OPS[op] for op in OPS))
    register_autograd_formulas(*(_EXTENSION_OPS[op] for op in OPS))
else:  # pragma: no cover
    _EXTENSION_OPS = {}

register_backend(Backend(name="cpu", ops=_EXTENSION_OPS, device_types=("cpu",), unavailable=_cpu_unavailable))
register_backend(
    Backend(
        name="cuda",
        ops=_EXTENSION_OPS,
        device_types=("cuda",),
        dtypes=lambda op, dev: FLOATS + ((torch.float16, torch.bfloat16) if op == "forward" else ()),
        unavailable=_cuda_unavailable,
    )
)
