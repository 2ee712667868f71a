"""The compiled extension ``cinc_kernels._C`` and what it was built with, loaded in one place.

Loading the library defines the ``cinc`` ops (schemas in csrc/cinc_ops.cpp) and registers their CPU and CUDA kernels.
An unbuilt checkout still imports the package: :data:`ERROR` then says why, and the ``cpu`` and ``cuda`` backends
report it as unavailable.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

OP_NAMES = ("forward", "inverse", "inverse_transpose", "logdet")

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make build`) in the repository root"

try:
    from . import _C  # noqa: F401

    ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only on an unbuilt checkout
    ERROR = str(exc)

# The ``torch.ops.cinc.*`` overloads by op name; empty when the extension did not load.
OPS: dict = {} if ERROR is not None else {op: getattr(torch.ops.cinc, op).default for op in OP_NAMES}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the build registered a kernel for ``cinc::op`` under ``dispatch_key`` (``"CPU"``, ``"CUDA"``)."""
    return ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"cinc::{op}", dispatch_key)


def build_info() -> dict:
    """What the extension was built with (written by setup.py), or ``{}`` for an unbuilt checkout."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
