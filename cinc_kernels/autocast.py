"""The CInC ops under ``torch.autocast``: they run in float32 (docs/spec.md §2, "dtypes").

Autocast lowers convolutions and matrix products inside its region to float16 / bfloat16. The CInC ops keep at
least float32 there: the inverse is a chain of ``H + W − 1`` dependent solves that amplifies rounding
(docs/conditioning.md) and accumulates in at least float32, and a forward that rounded to bfloat16 would no longer
be inverted by it. So on every backend, inside an autocast region: floating inputs narrower than float32 are cast
to float32, float32 and float64 ones are kept (inputs of mixed widths are promoted to the widest), the op runs with
autocast off (so that a backend written in plain PyTorch does not drop to bfloat16 inside) and returns that dtype.
Gradients flow back through the casts to the inputs' own dtypes.

Two places apply the rule:

* :func:`runs_outside_autocast` wraps the public functions (:mod:`cinc_kernels.functional`): their dtype checks
  would otherwise refuse the mix autocast produces (a bfloat16 image from an autocast layer before, a float32
  weight), and the reference and ATen paths are not custom ops;
* :func:`register` gives each backend's custom ops an ``Autocast<Device>`` kernel, so a direct
  ``torch.ops.<namespace>.<op>`` call, ``opcheck`` and ``torch.compile`` follow the same rule.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

import torch

__all__ = ["compute_dtype", "register", "runs_outside_autocast"]

P = ParamSpec("P")
R = TypeVar("R")

# The device types whose autocast a kernel is registered for, where this torch has that autocast.
DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The dtype an op runs in under autocast: the widest floating dtype among ``tensors``, at least float32."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point() and torch.finfo(t.dtype).bits > torch.finfo(dtype).bits:
            dtype = t.dtype
    return dtype


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def runs_outside_autocast(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` (a public op) run by the rule above when autocast is on for its tensors' device; unchanged
    otherwise. The device is the first tensor argument's (the op's own checks then refuse tensors on others)."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # On every call of every op: the device is found without building a list (the common case, autocast off,
        # then costs one loop step and one C call).
        first = None
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                first = a
                break
        if first is None:
            return function(*args, **kwargs)
        device_type = first.device.type
        if not _autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
            return function(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        dtype = compute_dtype(tensors)
        cast_args = [_cast(a, dtype) for a in args]
        cast_kwargs = {name: _cast(v, dtype) for name, v in kwargs.items()}
        with torch.autocast(device_type, enabled=False):
            return function(*cast_args, **cast_kwargs)

    return wrapper


def _has_autocast(device_type: str) -> bool:
    try:
        return bool(torch.amp.is_autocast_available(device_type))
    except RuntimeError:  # a device type this torch does not know
        return False


# Decided once at import: the question is a C call that torch.compile would not trace.
_AUTOCAST_DEVICE_TYPES = frozenset(d for d in DEVICE_TYPES if _has_autocast(d))


def _autocast_available(device_type: str) -> bool:
    return device_type in _AUTOCAST_DEVICE_TYPES


def _autocast_keys() -> list[tuple[str, str]]:
    """``(device type, dispatch key name)`` of every autocast this torch has among :data:`DEVICE_TYPES`."""
    keys = []
    for device_type in DEVICE_TYPES:
        if not _autocast_available(device_type):
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        if hasattr(torch._C.DispatchKey, key):
            keys.append((device_type, key))
    return keys


def _autocast_kernel(op: Any, key: str) -> Callable[..., Any]:
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset: Any, *args: Any) -> Any:
        dtype = compute_dtype(a for a in args if isinstance(a, torch.Tensor))
        # Excluding the autocast key (as torch.library.register_autocast does) also keeps autocast off inside the
        # backend's implementation.
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*(_cast(a, dtype) for a in args))

    return kernel


# Libraries that own the registered kernels: a Library that is garbage-collected takes its kernels with it.
_LIBRARIES: list[torch.library.Library] = []


def register(ops: Mapping[str, Any]) -> None:
    """An autocast kernel for each of one backend's custom ops (``{op name: torch.ops.<ns>.<op>.default}``), for
    every device type whose autocast this torch has."""
    for op in ops.values():
        lib = torch.library.Library(op._namespace, "IMPL")
        for _, key in _autocast_keys():
            lib.impl(op._opname, _autocast_kernel(op, key), key, with_keyset=True)
        _LIBRARIES.append(lib)
