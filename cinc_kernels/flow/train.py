"""Training the flow: bits/dim with uniform dequantisation, Adam(ax) with warm-up and gradient clipping, a progress
bar, plots, sample grids, atomic checkpoints with exact resume, and DDP under ``torchrun``.

Single process::

    python -m cinc_kernels.flow train                     # digits, preset digits-small, into runs/digits

Several processes or machines (one per GPU; on CPUs the gloo backend)::

    torchrun --nproc-per-node=8 -m cinc_kernels.flow train --data cifar10 --data-root ~/data --preset cifar10

``batch_size`` is per process. Every process draws its own share of each epoch (``DistributedSampler``), gradients
are averaged by DDP, metrics are all-reduced, and only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .._optional import optional_import
from .data import ImageData, dequantize, describe, load_data, random_horizontal_flip
from .model import CInCFlow, build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "FIELD_RANGES",
    "RunInterrupted",
    "TrainConfig",
    "atomic_save",
    "check_config",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "resolve_device",
    "save_checkpoint",
    "save_grid",
    "train",
]

CHECKPOINT_FORMAT = "cinc_kernels.flow/1"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` beside the checkpoint."""

    name: str = "digits"
    out_dir: Optional[str] = None  # default runs/<name>
    data: str = "digits"
    data_root: Optional[str] = None
    n_bits: Optional[int] = None
    image_size: Optional[int] = None
    preset: Optional[str] = "digits-small"
    levels: Optional[int] = None
    steps_per_level: Optional[int] = None
    hidden_channels: Optional[int] = None
    conv: str = "cinc"
    coupling: str = "quad"
    backend: str = "auto"
    conv_kwargs: dict = dataclasses.field(default_factory=dict)
    permutation: str = "reverse"
    steps: int = 2500
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    warmup: int = 200
    grad_clip: float = 50.0
    eval_every: int = 500
    sample_every: int = 1000
    checkpoint_every: int = 500
    temperatures: tuple = (0.5, 0.7, 1.0)
    n_samples: int = 64
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int = 1  # torch intra-op CPU threads (0: PyTorch's default)
    flip: bool = False  # random horizontal flips of the training images
    tensorboard: bool = False  # also log to <out_dir>/tensorboard

    def resolved_out_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.name)


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: ``kind`` (int or float) from ``low`` to ``high`` (``None``: unbounded);
    floats must be finite unless ``allow_inf``; ``open_low`` excludes ``low`` itself."""

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    allow_inf: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else ("a number" if self.allow_inf else "a finite number")
        if self.low is not None and self.high is not None:
            return f"{what} in {self.low}…{self.high}"
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {self.low}"
        return what

    def check(self, name: str, value):
        """``value`` if it is in range; otherwise ``TypeError``/``ValueError`` naming ``name``."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            raise TypeError(f"{name} must be {self.describe()}, got {value!r}")
        bad = (math.isnan(value) or (math.isinf(value) and not self.allow_inf)
               or (self.low is not None and (value <= self.low if self.open_low else value < self.low))
               or (self.high is not None and value > self.high))
        if bad:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str):
        """``text`` as a value of this range (for command lines)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        try:
            return self.check("value", value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None


# One table for the command line (argparse types) and for :func:`check_config` (the Python API).
FIELD_RANGES: dict[str, Range] = {
    "n_bits": Range(int, 1, 8),
    "image_size": Range(int, 1),
    "levels": Range(int, 1),
    "steps_per_level": Range(int, 1),
    "hidden_channels": Range(int, 1),
    "steps": Range(int, 1),
    "batch_size": Range(int, 1),
    "lr": Range(float, 0, open_low=True),
    "warmup": Range(int, 0),
    # inf means "do not clip"; a negative or NaN threshold would flip or poison the gradient.
    "grad_clip": Range(float, 0, open_low=True, allow_inf=True),
    "eval_every": Range(int, 1),
    "sample_every": Range(int, 1),
    "checkpoint_every": Range(int, 1),
    "n_samples": Range(int, 1),
    "seed": Range(int, 0),
    "num_workers": Range(int, 0),
    "threads": Range(int, 0),
}
TEMPERATURE = Range(float, 0)

OPTIMIZERS = ("adam", "adamax")

# Settings a resumed run may change without changing its arithmetic (when, where and how much it reports, and how
# far it goes); every other setting must equal the saved one for the resumed run to continue the same run exactly.
RESUMABLE_CHANGES = frozenset({"name", "out_dir", "data_root", "steps", "eval_every", "sample_every",
                               "checkpoint_every", "temperatures", "n_samples", "num_workers", "threads",
                               "tensorboard"})
# Settings that change the rounding but not the run: allowed, with a note that the result is not bitwise the same.
HARDWARE_CHANGES = frozenset({"device", "backend"})


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_name(name) -> str:
    """A run name is one folder inside ``runs/``: no separators, not ``.``/``..``, not empty."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name) \
            or "\0" in name:
        raise ValueError(f"name must be a plain folder name inside runs/ (no '/', not '.' or '..'), got {name!r}; "
                         f"use --out-dir to write elsewhere")
    return name


def check_config(cfg: "TrainConfig") -> None:
    """Every setting of ``cfg`` in range, by name (``TypeError``/``ValueError``); touches no file."""
    from ..nn import LAYERS
    from .data import DATASETS
    from .layers import COUPLINGS, PERMUTATIONS
    from .model import PRESETS

    unknown = sorted(set(vars(cfg)) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    for name, rng in FIELD_RANGES.items():
        value = getattr(cfg, name)
        if value is not None:
            rng.check(name, value)
    check_name(cfg.name)
    _check_choice("data", cfg.data, DATASETS)
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _check_choice("coupling", cfg.coupling, COUPLINGS)
    _check_choice("conv", cfg.conv, sorted(LAYERS))
    _check_choice("permutation", cfg.permutation, PERMUTATIONS)
    if cfg.preset is not None:
        _check_choice("preset", cfg.preset, list(PRESETS))
    if not isinstance(cfg.conv_kwargs, dict):
        raise TypeError(f"conv_kwargs must be a dict, got {type(cfg.conv_kwargs).__name__}")
    _check_conv_kwargs(cfg.conv, cfg.conv_kwargs)
    if not isinstance(cfg.temperatures, (tuple, list)) or not cfg.temperatures:
        raise ValueError(f"temperatures must be a non-empty list of numbers, got {cfg.temperatures!r}")
    for t in cfg.temperatures:
        TEMPERATURE.check("temperatures", t)
    for name in ("flip", "tensorboard"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(cfg, name)!r}")
    if cfg.out_dir is not None and os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"out_dir {cfg.out_dir!r} is a file, not a folder")


def _check_conv_kwargs(conv: str, kwargs: dict) -> None:
    import inspect

    from ..nn import LAYERS

    params = inspect.signature(LAYERS[conv]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    # channels and backend come from the flow itself.
    accepted = sorted(n for n, p in params.items() if n not in ("self", "channels", "backend")
                      and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"conv_kwargs: {conv} does not take {', '.join(map(repr, unknown))}; it accepts "
                         f"{', '.join(accepted)}")


# ------------------------------------------------------------------------------------------------------------
# files


class DiskFullError(RuntimeError):
    """The disk filled up while writing ``path`` (the previous version of the file, if any, is intact)."""


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder, flush it to disk, then rename it over ``path``: a
    crash at any moment leaves either the old file or the new one, never a torn one."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
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


def atomic_save(obj, path: str) -> None:
    """``torch.save`` through :func:`atomic_write_bytes` (serialised in memory first, so that a full disk is
    reported as such and not as a serialiser failure)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def _atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode(), path)


def _feed(h, obj) -> None:
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


def _digest(obj) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_checkpoint(state: dict, path: str) -> None:
    """:func:`atomic_save` of ``state`` with a sha256 of every entry (``state["checksums"]``), verified by
    :func:`load_checkpoint`: a flipped byte in a weight is caught, not evaluated."""
    state = dict(state)
    state["checksums"] = {key: _digest(value) for key, value in state.items()}
    atomic_save(state, path)


def _verify_checksums(ckpt: dict, path: str) -> None:
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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`train`, with clear errors for a missing, corrupt or foreign file;
    the checksums written by :func:`save_checkpoint` are verified."""
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


def load_model(path: str, device="cpu", backend: Optional[str] = None) -> tuple[CInCFlow, dict]:
    """The model saved in a checkpoint, in eval mode on ``device``, and the checkpoint itself."""
    import inspect

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


def _grid_tensor(images: torch.Tensor, nrow: Optional[int], padding: int, scale: int) -> torch.Tensor:
    make_grid = optional_import("torchvision.utils", "flow", "saving sample grids").make_grid

    images = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    return make_grid(images, nrow=nrow, padding=padding * scale, pad_value=1.0)


def save_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None, padding: int = 1,
              scale: int = 1) -> None:
    """Write ``(N, C, H, W)`` images in ``[0, 1]`` (clamped) as one PNG grid, ``nrow`` images a row (default:
    square), each pixel ``scale × scale``; written atomically."""
    save_image = optional_import("torchvision.utils", "flow", "saving sample grids").save_image

    buffer = io.BytesIO()
    save_image(_grid_tensor(images, nrow, padding, scale), buffer, format="png", padding=0)
    atomic_write_bytes(buffer.getvalue(), path)


def _plot_history(history: dict, path: str, title: str) -> None:
    matplotlib = optional_import("matplotlib", "flow", "the training-curve plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, bpd = history["train_step"], history["train_bpd"]
    if steps:
        ax.plot(steps, bpd, color="tab:blue", alpha=0.25, linewidth=0.8)
        k = max(1, len(bpd) // 50)
        smooth = [sum(bpd[max(0, i - k + 1):i + 1]) / len(bpd[max(0, i - k + 1):i + 1]) for i in range(len(bpd))]
        ax.plot(steps, smooth, color="tab:blue", label="train (running mean)")
    if history["test_step"]:
        ax.plot(history["test_step"], history["test_bpd"], "o-", color="tab:red", label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.set_title(title)
    finite = [b for b in bpd[len(bpd) // 10:] + history["test_bpd"] if math.isfinite(b)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)


# ------------------------------------------------------------------------------------------------------------
# the run folder: one run at a time, never overwritten by accident, resumed only when that is exact

RUN_FILES = ("checkpoint.pt", "config.json", "metrics.json", "loss.png")
LOCK_FILE = ".lock"


class RunInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint from which ``--resume`` continues exactly."""

    def __init__(self, step: int, path: str, signum: int):
        self.step, self.path, self.signum = step, path, signum
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}; saved {path} "
                         f"(continue with --resume)")


class _RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held for the whole run; the kernel drops it when the process
    dies, so a killed run never leaves the folder locked. The file names the holder for whoever is refused."""

    def __init__(self, folder: str):
        self.path, self.fd = os.path.join(folder, LOCK_FILE), None
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


def _claim_run_folder(out_dir: str, resume: bool, overwrite: bool) -> tuple[_RunLock, bool]:
    """Create ``out_dir`` if needed and lock it; refuse a folder that holds a run unless resuming or
    overwriting. Returns the lock and whether the folder was created here."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file, not a folder")
    created = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot create the run folder {out_dir!r}: {exc.strerror}") from None
    lock = _RunLock(out_dir)
    try:
        _refuse_existing_run(out_dir, resume, overwrite)  # again, now that no other run can start here
    except ValueError:
        lock.release()
        raise
    _remove_stale_temporaries(out_dir)
    return lock, created


def _remove_stale_temporaries(out_dir: str) -> None:
    """Temporary files of :func:`atomic_write_bytes` that a killed run left behind (under the lock nobody else
    writes here, so every one of them is stale)."""
    import glob

    for pattern in (".*.tmp-*", os.path.join("samples", ".*.tmp-*")):
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            if os.path.isfile(path):
                os.remove(path)


def _refuse_existing_run(out_dir: str, resume: bool, overwrite: bool) -> None:
    present = [f for f in RUN_FILES if os.path.isfile(os.path.join(out_dir, f))]
    if present and not (resume or overwrite):
        raise ValueError(f"{out_dir!r} already holds a run ({', '.join(present)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --name/--out-dir")


def _release_unused_folder(lock: _RunLock, out_dir: str, created: bool) -> None:
    """Undo :func:`_claim_run_folder` when the run stopped before writing anything."""
    lock.release()
    if created:
        try:
            os.remove(lock.path)
            os.rmdir(out_dir)
        except OSError:
            pass


def _remove_previous_run(out_dir: str) -> None:
    """``--overwrite``: delete what an earlier run wrote here (and only that), so no stale file survives."""
    import glob

    paths = [os.path.join(out_dir, f) for f in RUN_FILES]
    paths += glob.glob(os.path.join(out_dir, "samples", "step_*_T*.png"))
    paths += glob.glob(os.path.join(out_dir, "tensorboard", "events.out.tfevents.*"))
    for path in paths:
        if os.path.isfile(path):
            os.remove(path)


def _plain(value):
    """``value`` as JSON would give it back (tuples become lists), to compare saved and current settings."""
    return json.loads(json.dumps(value))


def resume_differences(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """``(refused, notes)``: the settings in which ``cfg`` differs from the ``saved`` run's in a way that would not
    continue it exactly, and those that only change the rounding (device, backend)."""
    current, defaults = dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig())
    refused: list[str] = []
    notes: list[str] = []
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            refused.append(f"{key} (a setting this version does not know, = {saved[key]!r})")
            continue
        old, new = _plain(saved.get(key, defaults[key])), _plain(current[key])
        if old == new or key in RESUMABLE_CHANGES:
            continue
        line = f"{key}: {old!r} in the run, {new!r} now"
        (notes if key in HARDWARE_CHANGES else refused).append(line)
    return refused, notes


def _check_resume(ckpt: dict, cfg: TrainConfig, ckpt_path: str) -> list[str]:
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


# ------------------------------------------------------------------------------------------------------------
# distributed helpers


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``; starts the process group under torchrun (``WORLD_SIZE`` > 1) if nobody has."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(spec) -> torch.device:
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


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# evaluation


def _eval_noise(indices: list[int], shape, seed: int) -> torch.Tensor:
    """Dequantisation noise for test images ``indices``: image ``i`` always gets the noise of seed ``seed + i``,
    so test bits/dim do not depend on the batch size or the number of processes."""
    g = torch.Generator()
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        g.manual_seed(seed * 1_000_003 + i)
        out[row] = torch.rand(shape, generator=g)
    return out


@torch.no_grad()
def evaluate(model: CInCFlow, dataset, num_levels: int, batch_size: int = 256, device="cpu", seed: int = 0) -> float:
    """Mean test bits/dim of ``dataset``, over all processes when distributed (each rank takes every
    ``world``-th image, the sums are all-reduced). The dequantisation noise is fixed per image (see
    :func:`_eval_noise`), so the result is the same for any batch size and number of processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    indices = list(range(rank, len(dataset), world))
    total, count = 0.0, 0
    n_bits = math.log2(num_levels)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        levels = torch.stack([dataset[i][0] for i in chunk])
        u = _eval_noise(chunk, levels.shape[1:], seed)
        x = ((levels.float() + u) / num_levels).to(device)
        bpd = model.bits_per_dim(x, n_bits)
        total += float(bpd.double().sum())
        count += x.shape[0]
    total, count = _all_reduce_sum([total, count], device)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def reconstruction_error(model: CInCFlow, dataset, num_levels: int, batch_size: int = 256, device="cpu",
                         seed: int = 0, limit: Optional[int] = None) -> dict:
    """How exactly ``decode(encode(x))`` returns the test images ``x`` (dequantised as in :func:`evaluate`):
    ``{"images", "max_abs_error", "mean_abs_error", "non_finite"}``, errors in data units (one level is
    ``1 / num_levels``), ``non_finite`` the number of images whose reconstruction holds inf/NaN."""
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    worst, total, count, non_finite = 0.0, 0.0, 0, 0
    for start in range(0, n, batch_size):
        chunk = list(range(start, min(start + batch_size, n)))
        levels = torch.stack([dataset[i][0] for i in chunk])
        x = ((levels.float() + _eval_noise(chunk, levels.shape[1:], seed)) / num_levels).to(device)
        error = (model.decode(model.encode(x)) - x).abs().flatten(1).double()
        finite = torch.isfinite(error).all(dim=1)
        non_finite += int((~finite).sum())
        if bool(finite.any()):
            worst = max(worst, float(error[finite].max()))
            total += float(error[finite].sum())
            count += int(finite.sum()) * error.shape[1]
    model.train(was_training)
    return {"images": n, "max_abs_error": worst, "mean_abs_error": total / max(count, 1), "non_finite": non_finite}


# ------------------------------------------------------------------------------------------------------------
# training


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr)
    raise ValueError(f"optimizer must be adam or adamax, got {cfg.optimizer!r}")


def _warmup_factor(cfg: TrainConfig):
    # Linear warm-up from lr/warmup to lr, then constant: a schedule that depends on the step alone, so that
    # extending a run (resume with more steps) changes nothing before the old end.
    return lambda step: min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0


def _epoch_batches(dataset, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded shuffle shared by all ranks, cut by ``DistributedSampler``."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def build_from_config(cfg: TrainConfig, data: ImageData) -> CInCFlow:
    c, h, w = data.shape
    if h != w:
        raise ValueError(f"the data's images are {h}×{w}; square images are expected")
    try:
        return build_model(cfg.preset, in_channels=c, image_size=h, levels=cfg.levels,
                           steps_per_level=cfg.steps_per_level, hidden_channels=cfg.hidden_channels, conv=cfg.conv,
                           coupling=cfg.coupling, backend=cfg.backend,
                           conv_kwargs=dict(cfg.conv_kwargs) or None, permutation=cfg.permutation)
    except TypeError as exc:  # a conv_kwargs value of the wrong type
        raise ValueError(f"conv_kwargs {cfg.conv_kwargs}: {exc}") from None


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          data: Optional[ImageData] = None) -> dict:
    """Train (or, with ``resume``, continue) the run of ``cfg``; returns its history and final test bits/dim.

    Writes into ``cfg.out_dir``, every file atomically: ``checkpoint.pt`` (with checksums), ``config.json``,
    ``metrics.json``, ``loss.png``, ``samples/step_<N>_T<t>.png`` and, with ``cfg.tensorboard``, ``tensorboard/``.

    - A folder that already holds a run is refused unless ``resume`` (continue it) or ``overwrite`` (delete what
      it wrote, then start afresh). The folder is locked for the whole run: a second run into it fails at once,
      naming the holder.
    - With ``resume`` the run restarts from ``checkpoint.pt`` exactly where it stopped (model, optimiser,
      schedule, data order, dequantisation noise): the next steps equal those of a run that never stopped. Settings
      that would change that are refused before anything is written, each named (:func:`resume_differences`).
    - SIGINT/SIGTERM finish the current step, save a checkpoint and raise :class:`RunInterrupted`; a second signal
      stops at once (the files on disk stay whole).
    """
    check_config(cfg)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if cfg.threads > 0:
        # One thread is the fastest for the small presets, and on a shared machine two OpenMP threads that
        # spin-wait for a busy core made a digits step 15× slower (0.07 s → 1.5 s, 2 cores at load 6).
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    rank, world = _distributed()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = cfg.resolved_out_dir()
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    lock, created = None, False
    if rank == 0:
        # Refusals that need no lock come first, so that a refused command touches nothing in the folder.
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ValueError(f"out_dir {out_dir!r} is a file, not a folder")
        _refuse_existing_run(out_dir, resume, overwrite)
        if resume and os.path.isfile(ckpt_path):
            _check_resume(load_checkpoint(ckpt_path), cfg, ckpt_path)
        lock, created = _claim_run_folder(out_dir, resume, overwrite)
    signals = _StopSignals()
    writer = None
    try:
        try:
            data = data or load_data(cfg.data, cfg.data_root, n_bits=cfg.n_bits, image_size=cfg.image_size)
            state = _start(cfg, data, device, rank, world, resume, ckpt_path)
        except BaseException:
            if lock is not None:
                _release_unused_folder(lock, out_dir, created)
            raise
        if rank == 0:
            if overwrite:
                _remove_previous_run(out_dir)
            os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
            saved = dataclasses.asdict(cfg)
            if data.info:
                saved["data_info"] = data.info
                print(describe(data), file=sys.stderr)
            _atomic_write_text(json.dumps(saved, indent=2) + "\n", os.path.join(out_dir, "config.json"))
            if cfg.tensorboard:
                writer = _tensorboard_writer(out_dir, state["step"])
        signals.install()
        return _run(cfg, data, device, rank, world, state, out_dir, ckpt_path, progress, signals, writer)
    finally:
        signals.restore()
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.release()


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (it then saves); a second one interrupts at
    once. Installed only in the main thread (Python delivers signals there)."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _tensorboard_writer(out_dir: str, step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    # purge_step drops events a killed run logged after its last checkpoint, which the resumed run logs again.
    return SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step if step > 0 else None)


def _start(cfg: TrainConfig, data: ImageData, device, rank: int, world: int, resume: bool, ckpt_path: str) -> dict:
    """The model, optimiser, schedule, noise and history to train from: new, or restored from the checkpoint
    after checking that resuming continues the run exactly. Writes nothing."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_from_config(cfg, data).to(device)
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(cfg))
    # Dequantisation noise has its own generator per rank, saved in the checkpoint: resuming replays it exactly.
    noise = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    history = {"train_step": [], "train_bpd": [], "test_step": [], "test_bpd": [], "images_per_s": []}
    step = 0
    if resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        notes = _check_resume(ckpt, cfg, ckpt_path)
        if CInCFlow.upgrade_config(ckpt["model_config"]) != model.config:
            raise ValueError(f"cannot resume: {ckpt_path} holds a model with {ckpt['model_config']}, these settings "
                             f"build {model.config}; use the run's own settings (its config.json) or another out_dir")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            step, history = ckpt["step"], ckpt["history"]
            states = ckpt["rng"]
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"cannot resume: {ckpt_path} does not hold a complete training state "
                             f"({type(exc).__name__}: {exc})") from None
        if states["world_size"] == world:
            noise.set_state(states["noise"][rank].cpu())
            torch.set_rng_state(states["torch"][rank].cpu())
        elif rank == 0:
            notes.append(f"{world} processes instead of {states['world_size']}: the data order is kept, the "
                         f"dequantisation noise is not")
        if rank == 0:
            for note in notes:
                print(f"note: resuming with {note}; the run continues, not bitwise as it would have",
                      file=sys.stderr)
    elif resume and rank == 0:
        print(f"no checkpoint at {ckpt_path}; starting a new run", file=sys.stderr)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "noise": noise, "history": history,
            "step": step}


def _run(cfg: TrainConfig, data: ImageData, device, rank: int, world: int, state: dict, out_dir: str,
         ckpt_path: str, progress: bool, signals: _StopSignals, writer) -> dict:
    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    noise, history, step = state["noise"], state["history"], state["step"]
    n_bits = data.n_bits
    dims = math.prod(data.shape)
    batches_per_epoch = len(data.train) // (cfg.batch_size * world)
    if batches_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} × {world} processes exceeds the {len(data.train)} "
                         f"training images")

    def batches_from(start: int):
        epoch, offset = divmod(start, batches_per_epoch)
        while True:
            lists = _epoch_batches(data.train, cfg.batch_size, epoch, cfg.seed, rank, world)[offset:]
            loader = DataLoader(data.train, batch_sampler=lists, num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda")
            for levels, _ in loader:
                yield levels
            epoch, offset = epoch + 1, 0

    if step == 0:
        # ActNorm's data-dependent initialisation, before DDP wraps the model: DDP then broadcasts rank 0's
        # statistics to every rank. Its own noise generator keeps the training noise stream untouched.
        first = next(batches_from(0)).to(device)
        init_noise = torch.Generator(device=device).manual_seed(cfg.seed)
        with torch.no_grad():
            model.train()(dequantize(first, data.num_levels, init_noise))

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    net.train()
    sample_generator_seed = cfg.seed + 12345

    def write_outputs():
        """Checkpoint, metrics, plot (rank 0 writes; every rank contributes its RNG state)."""
        states = {"world_size": world, "noise": _gather(noise.get_state().cpu()),
                  "torch": _gather(torch.get_rng_state())}
        if rank == 0:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(cfg),
                "model_config": model.config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "history": history,
                "rng": states,
                "data": {"name": data.name, "num_levels": data.num_levels, "shape": list(data.shape),
                         "classes": data.classes, "info": data.info},
            }, ckpt_path)
            _atomic_write_text(json.dumps(history) + "\n", os.path.join(out_dir, "metrics.json"))
            _plot_history(history, os.path.join(out_dir, "loss.png"),
                          f"{cfg.name}: {cfg.conv} + {cfg.coupling} on {cfg.data}")
        _barrier()

    def write_samples():
        if rank == 0:
            model.eval()
            for t in cfg.temperatures:
                g = torch.Generator(device=device).manual_seed(sample_generator_seed)
                images = model.sample(cfg.n_samples, t, generator=g)
                scale = max(1, 64 // data.shape[1])
                save_grid(images, os.path.join(out_dir, "samples", f"step_{step:06d}_T{t:.2f}.png"), scale=scale)
                if writer is not None:
                    writer.add_image(f"samples/T{t:.2f}", _grid_tensor(images, None, 1, 1), step)
            model.train()
        _barrier()

    bar = None
    if progress and rank == 0:
        tqdm = optional_import("tqdm", "flow", "the progress bar").tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, unit="step", dynamic_ncols=True)
    stream = batches_from(step)
    smoothed_bpd, smoothed_rate, skipped = None, None, 0
    while step < cfg.steps:
        tic = time.perf_counter()
        levels = next(stream).to(device, non_blocking=True)
        if cfg.flip:
            levels = random_horizontal_flip(levels, noise)
        x = dequantize(levels, data.num_levels, noise)
        bpd = CInCFlow.bits_per_dim_from_log_prob(net(x), dims, n_bits)
        loss = bpd.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        # Gradients are identical on all ranks after DDP's all-reduce, so every rank takes the same decision.
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        # The stop request rides on the loss's all-reduce: every rank stops after the same step.
        loss_sum, stop = _all_reduce_sum([float(loss.detach()), float(signals.signum != 0)], device)
        mean_bpd = loss_sum / world
        rate = cfg.batch_size * world / max(time.perf_counter() - tic, 1e-9)
        history["train_step"].append(step)
        history["train_bpd"].append(mean_bpd)
        history["images_per_s"].append(rate)
        if writer is not None:
            writer.add_scalar("train/bits_per_dim", mean_bpd, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/images_per_s", rate, step)
        if math.isfinite(mean_bpd):
            smoothed_bpd = mean_bpd if smoothed_bpd is None else 0.95 * smoothed_bpd + 0.05 * mean_bpd
        smoothed_rate = rate if smoothed_rate is None else 0.9 * smoothed_rate + 0.1 * rate
        if bar is not None:
            postfix = {"bpd": f"{smoothed_bpd:.3f}" if smoothed_bpd is not None else "nan",
                       "img/s": f"{smoothed_rate:.0f}"}
            if history["test_bpd"]:
                postfix["test"] = f"{history['test_bpd'][-1]:.3f}"
            if skipped:
                postfix["skipped"] = skipped
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        last = step == cfg.steps
        if step % cfg.eval_every == 0 or last:
            history["test_step"].append(step)
            history["test_bpd"].append(evaluate(model, data.test, data.num_levels, device=device, seed=cfg.seed))
            if writer is not None:
                writer.add_scalar("test/bits_per_dim", history["test_bpd"][-1], step)
        if step % cfg.sample_every == 0 or last:
            write_samples()
        if step % cfg.checkpoint_every == 0 or last or stop:
            write_outputs()
        if stop and not last:
            if bar is not None:
                bar.close()
            raise RunInterrupted(step, ckpt_path, signals.signum or signal.SIGINT)
    if bar is not None:
        bar.close()
    if not history["test_bpd"]:  # resumed a finished run
        history["test_step"].append(step)
        history["test_bpd"].append(evaluate(model, data.test, data.num_levels, device=device, seed=cfg.seed))
    return {"history": history, "test_bpd": history["test_bpd"][-1], "out_dir": out_dir, "step": step,
            "skipped_steps": skipped, "model": model}
