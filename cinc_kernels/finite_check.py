"""Whether a layer's inverse returned inf/NaN from a finite input, found without stalling a GPU stream.

:class:`cinc_kernels.CInCConv2d` checks each inverse (``check_finite=True``, the default) so that an ill-conditioned
map (docs/conditioning.md) does not hand out inf/NaN in silence. Reading the answer on the host is free for CPU
tensors, but for a GPU tensor it would wait for the whole stream (one synchronisation per layer: 24 per sample of a
3 × 8 flow) and break CUDA graph capture. So the check depends on where the tensors are:

* **CPU**: read at once; the warning comes with the inverse that failed.
* **CUDA**: the flag ``isfinite(y).all() & ~isfinite(x).all()`` stays on the device, ORed into one flag per layer
  (asynchronous, capturable), which an asynchronous copy mirrors into pinned host memory. Each later inverse reads
  the mirror (plain host memory, no synchronisation) before queueing its own copy, so the warning comes a few calls
  after the failure, as soon as the copy has landed. Inside CUDA graph capture only the device flag is updated (each
  replay ORs into it); the next inverse outside the graph copies it out.
* **other devices** (MPS, XPU, …): no check (no asynchronous host mirror there); call ``layer.inverse`` with
  ``check_finite`` on a CPU copy, or test ``torch.isfinite`` yourself, where it matters.

The flag only ever turns on, so reading a mirror that a copy is still writing gives the old or the new answer, both
true at some moment.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["NonFiniteMonitor"]

# Device types whose flag is read at once (reading it costs no synchronisation).
IMMEDIATE_DEVICE_TYPES = frozenset({"cpu"})
# Device types whose flag is mirrored to the host asynchronously; pinned host memory where the device type has it.
MIRRORED_DEVICE_TYPES = frozenset({"cuda"})


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is being captured into a CUDA graph. Asking needs a working CUDA runtime:
    where it has none (no driver, or a test that only pretends to have a GPU) nothing can be capturing."""
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        return False


class NonFiniteMonitor:
    """One layer's record of "a finite input came back inf/NaN" (module docstring).

    :meth:`observe` after every inverse returns ``True`` once the host knows of such a result; it never waits for
    the device. Copies and pickles of a layer start with a fresh record.
    """

    def __init__(self) -> None:
        self._flag: torch.Tensor | None = None  # 0-dim bool on the device: any failure observed so far
        self._mirror: torch.Tensor | None = None  # 0-dim bool on the host, written by asynchronous copies of _flag
        self._mirror_view: Any = None  # the mirror as a NumPy array: reading it is a plain host read

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Record the inverse ``x`` of ``y``; ``True`` when a failure (this one or an earlier one) is known now."""
        failed = torch.isfinite(y).all() & ~torch.isfinite(x).all()
        if x.device.type in IMMEDIATE_DEVICE_TYPES:
            return bool(failed)
        if x.device.type not in MIRRORED_DEVICE_TYPES:
            return False
        if self._flag is None or self._flag.device != failed.device:
            self._flag = failed.clone()
        else:
            self._flag.logical_or_(failed)
        if _capturing(x.device):
            return False
        if self._mirror is None:
            self._mirror = torch.zeros((), dtype=torch.bool, pin_memory=x.device.type == "cuda")
            self._mirror_view = self._mirror.numpy()
        known = bool(self._mirror_view)
        self._mirror.copy_(self._flag, non_blocking=True)
        return known

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> NonFiniteMonitor:
        return NonFiniteMonitor()
