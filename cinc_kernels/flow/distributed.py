"""Where a run computes: the device a ``--device`` value names, and the process group under ``torchrun`` (every
helper is a no-op in a single process)."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "barrier", "gather", "init_distributed", "rank_and_world", "resolve_device"]


def init_distributed() -> tuple[int, int]:
    """``(rank, world_size)``; starts the process group under torchrun (``WORLD_SIZE`` > 1) if nobody has."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, ``(0, 1)`` without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(spec: object) -> torch.device:
    """The device a ``--device`` value names, checked against this machine: ``"auto"`` is ``cuda:LOCAL_RANK``
    (modulo the GPU count; ``LOCAL_RANK`` is set by torchrun) when there is a GPU, else ``cpu``. ``ValueError``
    naming ``device`` for an unknown name or a GPU that is not there."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {spec!r}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r} is not a device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: no CUDA GPU is visible to torch on this machine (use --device cpu "
                             f"or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {spec!r}: only cpu and cuda are supported")
    return device


def all_reduce_sum(values: list[float], device: torch.device | str) -> list[float]:
    """The sums of ``values`` over all processes (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    sums: list[float] = t.tolist()
    return sums


def gather(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
