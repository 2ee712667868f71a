"""The registry of backends behind the public functions, and how ``backend="auto"`` chooses among them.

A backend is four callables with the signatures of the ``cinc`` ops plus what it runs on and which dtypes each op
takes, declared once next to it. The C++ extension provides ``cpu`` (and ``cuda`` when built with CUDA);
``reference`` is the float64 oracle; ``triton`` is registered the first time it is asked for (importing Triton costs
seconds and is never needed on a CPU-only path); other backends add themselves with :func:`register_backend`.
Fake and autograd implementations of the custom ops live in :mod:`cinc_kernels.registration`.
"""
from __future__ import annotations

import dataclasses
import importlib
import operator
from typing import Callable, Mapping, Optional, Union

import torch

from . import _aten, _extension, reference, trust
from .contract import FLOATS, HALVES
from .contract import OP_NAMES as OPS

__all__ = ["OPS", "FLOATS", "HALVES", "AUTO_ORDER", "Backend", "all_backends", "available_backends", "get_backend",
           "register_backend", "select"]

@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the CInC ops.

    ``ops`` maps an op name of :data:`OPS` to a callable with the ``cinc`` op's signature, e.g.
    ``forward(x, weight, bias, unit_diagonal)``; an op it lacks is absent. ``device_types`` lists the tensor device
    types it accepts (empty: any). ``op_dtypes`` declares the dtypes of the ops that take more than :data:`FLOATS`,
    keyed by op name or by ``(device_type, op)``. ``unavailable()`` returns ``None`` when the backend works on this
    install, else why not and how to fix it. ``device_unsupported(device)`` returns ``None`` when it can run on that
    device, else why not (``auto`` then skips it with a one-time warning). ``skip_warning()`` returns what ``auto``
    warns once when it passes over an unavailable backend that should have been there (a compiled extension that did
    not load), else ``None``. ``auto_declines(op, dtype)`` returns ``True`` where ``auto`` should pass it over for the
    next backend of the order, which is faster there (asked at every call, so it can follow run-time switches).
    """

    name: str
    ops: Mapping[str, Callable[..., torch.Tensor]]
    device_types: tuple[str, ...] = ()
    op_dtypes: Mapping[Union[str, tuple[str, str]], tuple[torch.dtype, ...]] = dataclasses.field(default_factory=dict)
    unavailable: Callable[[], Optional[str]] = lambda: None
    public: bool = True
    device_unsupported: Callable[[torch.device], Optional[str]] = lambda device: None
    skip_warning: Callable[[], Optional[str]] = lambda: None
    auto_declines: Callable[[str, torch.dtype], bool] = lambda op, dtype: False

    def runs_on(self, device_type: str) -> bool:
        return not self.device_types or device_type in self.device_types

    def dtypes(self, op: str, device_type: str) -> tuple[torch.dtype, ...]:
        """The dtypes ``op`` takes on tensors of ``device_type``."""
        return self.op_dtypes.get((device_type, op), self.op_dtypes.get(op, FLOATS))


_REGISTRY: dict[str, Backend] = {}

# Backends whose module registers them on import, loaded the first time they are asked for.
_LAZY: dict[str, str] = {"triton": "cinc_kernels.triton"}

# Preference order of backend="auto", per device type and op; the first available one that takes the tensors wins.
# A device type not listed gets the reference alone.
# - Forward and log-determinant: ATen's own operators ("_aten": oneDNN / cuDNN on the masked weight, and a
#   log-determinant that autograd differentiates) first, but for the CUDA forward. On the CPU our tiled forward is
#   no faster (benchmarks/results/cpu_ops.md). On CUDA our direct forward comes first except where cuDNN has faster
#   arithmetic to use (float16/bfloat16, TF32: _cudnn_forward_is_faster); benchmarks/bench_gpu.py times the two.
# - Inverse and adjoint: the compiled wavefronts. On CUDA both the CUDA and the Triton backend solve in one launch
#   per call; CUDA comes first until benchmarks/bench_gpu.py, which times them side by side, says otherwise.
# - "torch" (plain PyTorch, any device) after the compiled backends, before the float64 reference (slower, and
#   impossible on devices without float64); on devices no compiled backend serves (MPS, XPU) the only choice.
AUTO_ORDER: dict[tuple[str, str], list[str]] = {
    ("cpu", "forward"): ["_aten", "cpu", "torch", "reference"],
    ("cpu", "inverse"): ["cpu", "torch", "reference"],
    ("cpu", "inverse_transpose"): ["cpu", "torch", "reference"],
    ("cpu", "logdet"): ["_aten", "cpu", "torch", "reference"],
    ("cuda", "forward"): ["cuda", "_aten", "triton", "torch", "reference"],
    ("cuda", "inverse"): ["cuda", "triton", "torch", "reference"],
    ("cuda", "inverse_transpose"): ["cuda", "triton", "torch", "reference"],
    ("cuda", "logdet"): ["_aten", "cuda", "triton", "torch", "reference"],
    **{(device_type, op): ["torch", "reference"] for device_type in ("mps", "xpu") for op in OPS},
}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend by name."""
    _REGISTRY[backend.name] = backend


def _lookup(name: str) -> Optional[Backend]:
    module = _LAZY.pop(name, None)
    if module is not None:
        importlib.import_module(module)
    return _REGISTRY.get(name)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the known ones otherwise."""
    b = _lookup(name)
    if b is None:
        known = ", ".join(["auto"] + sorted({n for n, b in _REGISTRY.items() if b.public} | set(_LAZY)))
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    return b


def all_backends() -> list[Backend]:
    """Every registered backend, available or not, private ones included (loads the lazy ones)."""
    for name in list(_LAZY):
        _lookup(name)
    return list(_REGISTRY.values())


def available_backends() -> list[str]:
    """The public backends that work on this install, e.g. ``["reference", "cpu", "cuda", "triton"]``."""
    return [b.name for b in all_backends() if b.public and b.unavailable() is None]


def select(name: str, op: str, device: torch.device, dtype: torch.dtype, arg: str = "x") -> Backend:
    """The backend that runs ``op`` for tensors of ``device`` and ``dtype``.

    Explicit names are checked (installed, right device, dtype supported) and raise a clear error otherwise;
    ``"auto"`` walks :data:`AUTO_ORDER`.
    """
    if name == "auto":
        for candidate in AUTO_ORDER.get((device.type, op), ["reference"]):
            b = _lookup(candidate)
            if b is None or op not in b.ops or not b.runs_on(device.type):
                continue
            if b.unavailable() is not None:
                warning = b.skip_warning()
                if warning is not None:
                    _extension.warn_once(warning)
                continue
            if dtype not in b.dtypes(op, device.type) or b.auto_declines(op, dtype):
                continue
            why = b.device_unsupported(device)
            if why is not None:
                _extension.warn_once(f"backend='auto' does not use {candidate!r} on {device}: {why}")
                continue
            # A GPU kernel checks itself against the portable backend on first use (cinc_kernels/trust.py).
            if not trust.trusted(b, op, device, dtype):
                continue
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
    why = b.device_unsupported(device)
    if why is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {why}")
    accepted = b.dtypes(op, device.type)
    if dtype not in accepted:
        names = ", ".join(str(d).replace("torch.", "") for d in accepted)
        raise ValueError(f"{arg}: backend {name!r} supports {names} for {op} on {device.type}, got {dtype}")
    return b


# --------------------------------------------------------------------------------------------------------------
# built-in backends


def _reference_logdet(weight: torch.Tensor, height: int, width: int, unit_diagonal: bool) -> torch.Tensor:
    ld: torch.Tensor = reference.logdet(weight, height, width, unit_diagonal)
    return ld.to(weight.dtype)


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


# ATen's operators on any device; in half precision only where its convolution has half kernels (CUDA).
register_backend(
    Backend(
        name="_aten",
        ops={"forward": _aten.forward, "logdet": _aten.logdet},
        op_dtypes={("cuda", "forward"): FLOATS + HALVES, ("cuda", "logdet"): FLOATS + HALVES},
        public=False,
    )
)


def _cpu_unavailable() -> Optional[str]:
    if _extension.ERROR is not None:
        return f"the C++ extension cinc_kernels._C did not load ({_extension.ERROR}); {_extension.BUILD_HINT}"
    return None


def _cuda_unavailable() -> Optional[str]:
    if _extension.ERROR is not None:
        return f"the C++ extension cinc_kernels._C did not load ({_extension.ERROR}); {_extension.BUILD_HINT}"
    if not _extension.has_kernel("inverse", "CUDA"):
        if torch.version.cuda is None:
            return "this torch has no CUDA; install a CUDA build of torch, then rebuild with CINC_CUDA=1"
        return "the extension was built without its CUDA kernels; rebuild with CINC_CUDA=1 and a CUDA toolkit"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def _extension_skip_warning() -> Optional[str]:
    if _extension.ERROR is None:
        return None
    return (f"backend='auto' falls back to slower backends: the C++ extension cinc_kernels._C did not load "
            f"({_extension.ERROR}); {_extension.BUILD_HINT}")


def _cudnn_conv_allows_tf32() -> bool:
    """Whether cuDNN may run float32 convolutions in TF32 (torch's default): the most specific ``fp32_precision``
    setting that is not ``"none"`` decides (convolutions, then cuDNN, then every backend); all ``"none"`` means IEEE
    float32, which is also what ``torch.backends.cudnn.allow_tf32 = False`` sets."""
    # (torch's type stubs do not declare these settings, so they are read by name.)
    settings = operator.attrgetter("cudnn.conv.fp32_precision", "cudnn.fp32_precision", "fp32_precision")
    for precision in settings(torch.backends):
        if precision != "none":
            return bool(precision == "tf32")
    return False


def _cudnn_forward_is_faster(op: str, dtype: torch.dtype) -> bool:
    """Where ``auto`` leaves the CUDA forward to cuDNN: float16/bfloat16, which cuDNN multiplies on tensor cores and
    our forward on CUDA cores, and float32 when TF32 is allowed (tensor cores again, at TF32's precision, which the
    user chose). Float32 in IEEE and float64 have no faster arithmetic than ours."""
    return op == "forward" and (dtype in HALVES or (dtype == torch.float32 and _cudnn_conv_allows_tf32()))


# The dtypes mirror the AT_DISPATCH lists of csrc/cpu/ and csrc/cuda/.
register_backend(Backend(name="cpu", ops=_extension.OPS, device_types=("cpu",), unavailable=_cpu_unavailable,
                         skip_warning=_extension_skip_warning))
register_backend(
    Backend(
        name="cuda",
        ops=_extension.OPS,
        device_types=("cuda",),
        op_dtypes={"forward": FLOATS + HALVES},
        unavailable=_cuda_unavailable,
        device_unsupported=_extension.cuda_device_unsupported,
        skip_warning=_extension_skip_warning,
        auto_declines=_cudnn_forward_is_faster,
    )
)
