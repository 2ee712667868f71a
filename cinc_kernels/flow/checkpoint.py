"""Files a run writes and reads back: atomic writes (a crash leaves the old file or the new one, never a torn one),
checkpoints with a sha256 of every entry, and the model saved in a checkpoint."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import io
import os
from collections.abc import Iterator
from typing import Any, BinaryIO, Optional, Protocol

import torch

from .model import CInCFlow

__all__ = [
    "CHECKPOINT_FORMAT",
    "DiskFullError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "cinc_kernels.flow/1"


class DiskFullError(RuntimeError):
    """The disk filled up while writing ``path`` (the previous version of the file, if any, is intact)."""


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: it is a temporary file in ``path``'s folder, flushed to disk and
    renamed over ``path`` when the block ends, so a crash at any moment leaves either the old file or the new one,
    never a torn one (and a file too large to hold in memory can be streamed)."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left writing {path}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_writer`."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_save(obj: object, path: str) -> None:
    """``torch.save`` through :func:`atomic_write_bytes` (serialised in memory first, so that a full disk is
    reported as such and not as a serialiser failure)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode(), path)


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _feed(h: _Hash, obj: object) -> None:
    """Hash ``obj`` (nested dicts, lists, tensors and scalars) by value, independently of how it was pickled."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())


def _digest(obj: object) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """:func:`atomic_save` of ``state`` with a sha256 of every entry (``state["checksums"]``), verified by
    :func:`load_checkpoint`: a flipped byte in a weight is caught, not evaluated."""
    state = dict(state)
    state["checksums"] = {key: _digest(value) for key, value in state.items()}
    atomic_save(state, path)


def _verify_checksums(ckpt: dict[str, Any], path: str) -> None:
    sums = ckpt.get("checksums")
    if sums is None:
        return  # written before checksums existed; nothing to compare against
    if not isinstance(sums, dict):
        raise RuntimeError(f"checkpoint {path!r} is corrupt: its checksum table is damaged")
    failed = [key for key, digest in sums.items() if key not in ckpt or _digest(ckpt[key]) != digest]
    unlisted = [key for key in ckpt if key != "checksums" and key not in sums]
    if failed or unlisted:
        what = []
        if failed:
            what.append(f"the stored {', '.join(failed)} do{'es' if len(failed) == 1 else ''} not match "
                        f"{'its' if len(failed) == 1 else 'their'} sha256")
        if unlisted:
            what.append(f"{', '.join(unlisted)} {'has' if len(unlisted) == 1 else 'have'} no checksum")
        raise RuntimeError(f"checkpoint {path!r} is corrupt: {'; '.join(what)}. It was damaged after it was "
                           f"written; restore it from a copy or retrain")


def load_checkpoint(path: str, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`~cinc_kernels.flow.train.train`, with clear errors for a missing,
    corrupt or foreign file; the checksums written by :func:`save_checkpoint` are verified."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, … for damaged files
        raise RuntimeError(f"checkpoint {path!r} is corrupt or truncated and cannot be read "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"checkpoint {path!r} is not a cinc_kernels.flow checkpoint (expected format "
                           f"{CHECKPOINT_FORMAT!r})")
    _verify_checksums(ckpt, path)
    missing = [k for k in ("model_config", "model", "step") if k not in ckpt]
    if missing:
        raise RuntimeError(f"checkpoint {path!r} is incomplete: it lacks {', '.join(missing)}")
    return ckpt


def load_model(path: str, device: torch.device | str = "cpu",
               backend: Optional[str] = None) -> tuple[CInCFlow, dict[str, Any]]:
    """The model saved in a checkpoint, in eval mode on ``device``, and the checkpoint itself."""
    ckpt = load_checkpoint(path)
    config = ckpt["model_config"]
    if not isinstance(config, dict):
        raise RuntimeError(f"checkpoint {path!r} has a damaged model configuration")
    config = CInCFlow.upgrade_config(dict(config))
    accepted = set(inspect.signature(CInCFlow).parameters)
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise RuntimeError(f"checkpoint {path!r} has model settings this version does not know: {unknown} (written "
                           f"by another version of cinc_kernels?)")
    if backend is not None:
        config["backend"] = backend
    try:
        model = CInCFlow(**config)
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"checkpoint {path!r} has a model configuration that cannot be built: {exc}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint {path!r} does not match its own model configuration: {exc}") from None
    return model.to(device).eval(), ckpt
