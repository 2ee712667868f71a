"""Loading the compiled extension ``cinc_kernels._C``, and what the build recorded about itself.

Three ways an install goes wrong, each with its own answer:

* the extension was built by another torch than the one running (a plain ``pip install`` builds against the torch it
  downloads into an isolated environment): C++ torch extensions have no stable ABI across torch versions, so loading
  it could crash; ``import cinc_kernels`` refuses with both versions and the fix (:class:`TorchMismatchError`);
* the extension does not load (not built, missing libraries): ``backend="auto"`` falls back to the portable and
  reference backends with a one-time warning that carries the load error and the fix;
* the GPU is not one the CUDA kernels were compiled for: ``auto`` skips the CUDA backend for it, warning once,
  instead of failing with "no kernel image is available".
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Any, Optional

import torch

from .contract import OP_NAMES

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make build`) in the repository root"
REINSTALL_HINT = (
    "rebuild it against the running torch: `pip install --no-build-isolation --no-deps --force-reinstall "
    "cinc_kernels` (from the wheel or sdist you installed), or `make build` in a checkout"
)
# Set to 1 to leave the compiled extension unloaded (the portable "torch" and "reference" backends still work).
SKIP_ENV = "CINC_NO_EXTENSION"


class TorchMismatchError(ImportError):
    """The compiled extension was built against a torch other than the running one."""


def build_info() -> dict[str, Any]:
    """What the extension was built with (written by setup.py), or ``{}`` for an unbuilt checkout."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def check_torch_version(info: dict[str, Any], running: str) -> None:
    """Raise :class:`TorchMismatchError` when ``info`` records another torch than ``running``."""
    built = info.get("torch")
    if built is not None and built != running:
        raise TorchMismatchError(
            f"cinc_kernels' C++ extension was built against torch {built}, but torch {running} is running; "
            f"{REINSTALL_HINT}. (Set {SKIP_ENV}=1 to import without the compiled backends.)"
        )


def load() -> Optional[str]:
    """Load ``cinc_kernels._C`` (which registers ``torch.ops.cinc.*``); ``None`` on success, else why it did not.

    Raises :class:`TorchMismatchError` before loading a library built by another torch.
    """
    if os.environ.get(SKIP_ENV) == "1":
        return f"{SKIP_ENV}=1 is set"
    check_torch_version(build_info(), torch.__version__)
    try:
        importlib.import_module("cinc_kernels._C")
    except ImportError as exc:
        return str(exc)
    return None


def parse_archs(archs: Optional[str]) -> list[tuple[int, int, bool]]:
    """``"8.0;8.6;9.0+PTX"`` -> ``[(8, 0, False), (8, 6, False), (9, 0, True)]`` (``True``: PTX as well as SASS).

    Entries it cannot read (torch's named archs such as ``"Ampere"``) are left out.
    """
    out = []
    for entry in (archs or "").replace(",", ";").replace(" ", ";").split(";"):
        name, _, suffix = entry.strip().partition("+")
        major, _, minor = name.partition(".")
        if major.isdigit() and minor[:1].isdigit():
            out.append((int(major), int(minor[:1]), suffix.upper() == "PTX"))
    return out


def archs_cover(archs: list[tuple[int, int, bool]], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a GPU of ``capability``.

    SASS for ``X.Y`` runs on ``X.Z`` with ``Z ≥ Y`` (same major); PTX for ``X.Y`` is JIT-compiled by the driver for
    any capability ``≥ X.Y``.
    """
    major, minor = capability
    for a_major, a_minor, ptx in archs:
        if a_major == major and a_minor <= minor:
            return True
        if ptx and (a_major, a_minor) <= (major, minor):
            return True
    return False


_BUILT_ARCHS_TEXT: Optional[str] = build_info().get("cuda_archs")
_BUILT_ARCHS = parse_archs(_BUILT_ARCHS_TEXT)
_device_verdicts: dict[int, Optional[str]] = {}


def cuda_device_unsupported(device: torch.device) -> Optional[str]:
    """``None`` when the CUDA kernels can run on ``device``, else why not (device name, capability, built archs).

    Decided once per device (``get_device_properties`` is also what ``torch.compile`` can evaluate while tracing).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_verdicts:
        _device_verdicts[index] = _verdict(torch.cuda.get_device_properties(index), _BUILT_ARCHS, _BUILT_ARCHS_TEXT)
    return _device_verdicts[index]


def _verdict(props: Any, archs: list[tuple[int, int, bool]], archs_text: Optional[str]) -> Optional[str]:
    if not archs or archs_cover(archs, (props.major, props.minor)):
        return None
    capability = f"{props.major}.{props.minor}"
    return (
        f"the CUDA kernels were compiled for {archs_text}, which do not run on {props.name} (compute capability "
        f"{capability}); rebuild with TORCH_CUDA_ARCH_LIST including {capability} to use them"
    )


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One ``RuntimeWarning`` per distinct message per process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# Why the extension did not load (``None`` when it did); loading registers ``torch.ops.cinc.*``.
ERROR: Optional[str] = load()

# The ``torch.ops.cinc.*`` overloads by op name; empty when the extension did not load.
OPS: dict[str, Any] = {} if ERROR is not None else {op: getattr(torch.ops.cinc, op).default for op in OP_NAMES}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the build registered a kernel for ``cinc::op`` under ``dispatch_key`` (``"CPU"``, ``"CUDA"``)."""
    return ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"cinc::{op}", dispatch_key)
