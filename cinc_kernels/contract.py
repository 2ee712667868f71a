"""The op contract of docs/spec.md §2 in code: the four op names, their schemas, the dtypes a backend may declare
and the kernel-size limit, in one place for every backend.

The ``cinc::`` schemas are defined once in C++ (``csrc/cinc_ops.cpp``, which ``csrc/cinc_checks.h`` backs with the
same kernel-size limit); the namespaces defined in Python (``cinc_torch::``, ``cinc_triton::``) take theirs from
:data:`SIGNATURES` through :func:`custom_op`, and ``tests/test_architecture.py`` checks that every namespace's
schemas equal ``cinc::``'s.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["FLOATS", "HALVES", "MAX_KERNEL_SIZE", "OP_NAMES", "SIGNATURES", "custom_op"]

# The ops, in the order every backend lists them.
OP_NAMES = ("forward", "inverse", "inverse_transpose", "logdet")

# Each op's schema without its namespace and name (what ``torch.library.custom_op(schema=...)`` takes).
SIGNATURES = {
    "forward": "(Tensor x, Tensor weight, Tensor? bias, bool unit_diagonal) -> Tensor",
    "inverse": "(Tensor y, Tensor weight, Tensor? bias, bool unit_diagonal) -> Tensor",
    "inverse_transpose": "(Tensor g, Tensor weight, bool unit_diagonal) -> Tensor",
    "logdet": "(Tensor weight, SymInt height, SymInt width, bool unit_diagonal) -> Tensor",
}

# What every backend takes unless it declares otherwise, and the half-precision dtypes some forwards add.
FLOATS = (torch.float32, torch.float64)
HALVES = (torch.float16, torch.bfloat16)

# The largest k of a (C, C, k, k) weight: the C++ ops check the same bound (csrc/cinc_checks.h).
MAX_KERNEL_SIZE = 7


def custom_op(namespace: str, op: str) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.custom_op`` for ``namespace::op`` with the contract's schema, so that a backend written in
    Python declares exactly the ``cinc::`` signature::

        @custom_op("cinc_torch", "forward")
        def forward(x, weight, bias, unit_diagonal): ...
    """
    if op not in SIGNATURES:
        raise ValueError(f"op must be one of {', '.join(OP_NAMES)}; got {op!r}")
    return torch.library.custom_op(f"{namespace}::{op}", mutates_args=(), schema=SIGNATURES[op])
