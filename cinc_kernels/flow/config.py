"""The settings of a training run: :class:`TrainConfig`, the range of every numeric setting (one table for the
command line and the Python API) and :func:`check_config`, which checks them all without touching a file."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import types
import typing
from typing import Any, Optional

from .._checks import Range, check_bool, check_choice

__all__ = [
    "FIELD_RANGES",
    "HARDWARE_CHANGES",
    "OPTIMIZERS",
    "RESUMABLE_CHANGES",
    "TEMPERATURE",
    "Range",
    "TrainConfig",
    "check_config",
    "check_name",
    "resume_differences",
]


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
    conv_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
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
    temperatures: tuple[float, ...] = (0.5, 0.7, 1.0)
    n_samples: int = 64
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int = 1  # torch intra-op CPU threads (0: PyTorch's default)
    flip: bool = False  # random horizontal flips of the training images
    tensorboard: bool = False  # also log to <out_dir>/tensorboard

    def resolved_out_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.name)


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


def check_name(name: object) -> str:
    """A run name is one folder inside ``runs/``: no separators, not ``.``/``..``, not empty."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name) \
            or "\0" in name:
        raise ValueError(f"name must be a plain folder name inside runs/ (no '/', not '.' or '..'), got {name!r}; "
                         f"use --out-dir to write elsewhere")
    return name


def check_config(cfg: TrainConfig) -> None:
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
    check_choice("data", cfg.data, DATASETS)
    check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    check_choice("coupling", cfg.coupling, COUPLINGS)
    check_choice("conv", cfg.conv, sorted(LAYERS))
    check_choice("permutation", cfg.permutation, PERMUTATIONS)
    if cfg.preset is not None:
        check_choice("preset", cfg.preset, list(PRESETS))
    if not isinstance(cfg.conv_kwargs, dict):
        raise TypeError(f"conv_kwargs must be a dict, got {type(cfg.conv_kwargs).__name__}")
    _check_conv_kwargs(cfg.conv, cfg.conv_kwargs)
    if not isinstance(cfg.temperatures, (tuple, list)) or not cfg.temperatures:
        raise ValueError(f"temperatures must be a non-empty list of numbers, got {cfg.temperatures!r}")
    for t in cfg.temperatures:
        TEMPERATURE.check("temperatures", t)
    for name in ("flip", "tensorboard"):
        check_bool(name, getattr(cfg, name))
    if cfg.out_dir is not None and os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"out_dir {cfg.out_dir!r} is a file, not a folder")


def _check_conv_kwargs(conv: str, kwargs: dict[str, Any]) -> None:
    from ..nn import LAYERS

    layer: type = LAYERS[conv]
    params = inspect.signature(layer).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    # channels and backend come from the flow itself.
    accepted = sorted(n for n, p in params.items() if n not in ("self", "channels", "backend")
                      and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"conv_kwargs: {conv} does not take {', '.join(map(repr, unknown))}; it accepts "
                         f"{', '.join(accepted)}")
    try:
        constructor = next(vars(c)["__init__"] for c in layer.__mro__ if "__init__" in vars(c))
        hints = typing.get_type_hints(constructor)
    except (NameError, TypeError, AttributeError):
        # An annotation this Python cannot evaluate: the layer checks that argument itself.
        hints = {}
    for key, value in kwargs.items():
        _check_annotated(f"conv_kwargs: {key}", value, hints.get(key))


def _check_annotated(name: str, value: Any, hint: Any) -> None:
    """``value`` against a constructor annotation (``bool``, ``int``, ``float``, ``str`` or an optional one), so that
    a JSON value of the wrong kind is refused by name instead of being taken for true (``"no"``) or truncated;
    floats must be finite. Other annotations are left to the layer."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return
    kinds = [k for k in allowed if k in (bool, int, float, str)]
    if not kinds or len(kinds) != len([k for k in allowed if k is not type(None)]):
        return
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    expected = " or ".join([words[k] for k in kinds] + (["null"] if type(None) in allowed else []))
    raise TypeError(f"{name} must be {expected}, got {value!r}")


def _plain(value: object) -> Any:
    """``value`` as JSON would give it back (tuples become lists), to compare saved and current settings."""
    return json.loads(json.dumps(value))


def resume_differences(saved: dict[str, Any], cfg: TrainConfig) -> tuple[list[str], list[str]]:
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
