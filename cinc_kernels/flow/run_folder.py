"""The run folder: one run at a time (an ``flock`` held for the whole run), never overwritten by accident, resumed
only when that continues the run exactly."""
from __future__ import annotations

import glob
import os
import socket
from typing import Any, Optional

from .config import TrainConfig, resume_differences

__all__ = ["LOCK_FILE", "RUN_FILES", "RunLock", "check_resume", "claim_run_folder", "refuse_existing_run",
           "release_unused_folder", "remove_previous_run"]

RUN_FILES = ("checkpoint.pt", "config.json", "metrics.json", "loss.png")
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held for the whole run; the kernel drops it when the process
    dies, so a killed run never leaves the folder locked. The file names the holder for whoever is refused."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: Optional[int] = None
        try:
            import fcntl
        except ImportError:  # not a POSIX system: runs cannot be locked there
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "holder unknown"
            os.close(self.fd)
            raise RuntimeError(f"run folder {folder!r} is in use by another train process ({holder}); wait for it "
                               f"to finish or choose another --name/--out-dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def claim_run_folder(out_dir: str, resume: bool, overwrite: bool) -> tuple[RunLock, bool]:
    """Create ``out_dir`` if needed and lock it; refuse a folder that holds a run unless resuming or
    overwriting. Returns the lock and whether the folder was created here."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file, not a folder")
    created = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot create the run folder {out_dir!r}: {exc.strerror}") from None
    lock = RunLock(out_dir)
    try:
        refuse_existing_run(out_dir, resume, overwrite)  # again, now that no other run can start here
    except ValueError:
        lock.release()
        raise
    _remove_stale_temporaries(out_dir)
    return lock, created


def _remove_stale_temporaries(out_dir: str) -> None:
    """Temporary files of :func:`~cinc_kernels.flow.checkpoint.atomic_write_bytes` that a killed run left behind
    (under the lock nobody else writes here, so every one of them is stale)."""
    for pattern in (".*.tmp-*", os.path.join("samples", ".*.tmp-*")):
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            if os.path.isfile(path):
                os.remove(path)


def refuse_existing_run(out_dir: str, resume: bool, overwrite: bool) -> None:
    """``ValueError`` if ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is given."""
    present = [f for f in RUN_FILES if os.path.isfile(os.path.join(out_dir, f))]
    if present and not (resume or overwrite):
        raise ValueError(f"{out_dir!r} already holds a run ({', '.join(present)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --name/--out-dir")


def release_unused_folder(lock: RunLock, out_dir: str, created: bool) -> None:
    """Undo :func:`claim_run_folder` when the run stopped before writing anything."""
    lock.release()
    if created:
        try:
            os.remove(lock.path)
            os.rmdir(out_dir)
        except OSError:
            pass


def remove_previous_run(out_dir: str) -> None:
    """``--overwrite``: delete what an earlier run wrote here (and only that), so no stale file survives."""
    paths = [os.path.join(out_dir, f) for f in RUN_FILES]
    paths += glob.glob(os.path.join(out_dir, "samples", "step_*_T*.png"))
    paths += glob.glob(os.path.join(out_dir, "tensorboard", "events.out.tfevents.*"))
    for path in paths:
        if os.path.isfile(path):
            os.remove(path)


def check_resume(ckpt: dict[str, Any], cfg: TrainConfig, ckpt_path: str) -> list[str]:
    """Refuse (``ValueError``, listing every difference) a resume that would not continue the saved run exactly;
    return notes about allowed changes."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"cannot resume: {ckpt_path} has no readable run settings")
    refused, notes = resume_differences(saved, cfg)
    if ckpt["step"] > cfg.steps:
        refused.append(f"steps: the run is already at step {ckpt['step']}, --steps {cfg.steps} would end before it")
    if refused:
        raise ValueError(f"cannot resume {ckpt_path} exactly, these settings differ from the run's: "
                         + "; ".join(refused)
                         + ". Use the run's own settings (its config.json), or --overwrite / another --out-dir "
                           "to start afresh")
    return notes
