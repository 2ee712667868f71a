"""``backend="triton"``: the CInC ops as Triton kernels (forward as an implicit GEMM, the inverse and its adjoint as
a one-launch wavefront, the log-determinant as a reduction); see :mod:`.kernels` and :mod:`.ops`.

:mod:`cinc_kernels.backends` imports this package the first time the ``triton`` backend is asked for (``import
cinc_kernels`` alone never imports Triton). Importing it registers the backend whether or not Triton imports;
``unavailable()`` then says why it cannot run. Triton kernels need a CUDA GPU, or Triton's CPU interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported), which runs them on CPU tensors; that is how the
test suite checks them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import FLOATS, HALVES, Backend, register_backend

try:
    from . import kernels, ops

    _IMPORT_ERROR: Optional[str] = None
    INTERPRETED: bool = kernels.INTERPRETED
except ImportError as exc:  # triton missing (or too old for torch.library.triton_op)
    ops = None  # type: ignore[assignment]
    _IMPORT_ERROR = str(exc)
    INTERPRETED = False


def unavailable() -> Optional[str]:
    """``None`` when the Triton kernels can run here, else why not and what to do about it."""
    if _IMPORT_ERROR is not None:
        return f"triton did not import ({_IMPORT_ERROR}); `pip install triton` (it comes with CUDA builds of torch)"
    if INTERPRETED or torch.cuda.is_available():
        return None
    return ("no CUDA GPU is visible and Triton's interpreter is off; set TRITON_INTERPRET=1 before the Triton "
            "backend is first used to run the Triton kernels (slowly) on CPU tensors")


register_backend(
    Backend(
        name="triton",
        ops=dict(ops.OPS) if ops is not None else {},
        # The interpreter runs the kernels on CPU tensors; compiled kernels need CUDA ones.
        device_types=("cuda", "cpu") if INTERPRETED else ("cuda",),
        # float32 / float64 for every op; the forward also takes float16 / bfloat16 (float32 accumulation).
        op_dtypes={"forward": FLOATS + HALVES},
        unavailable=unavailable,
    )
)
