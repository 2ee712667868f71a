"""Argument checks shared by the whole package, with one rule: a value of the wrong type is a ``TypeError``, a value
of the right type that is out of range a ``ValueError``; both name the argument. The public functions, the layers,
the flow's settings, the command lines and the adapters all check through these."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Optional

import torch

__all__ = ["Range", "check_bool", "check_choice", "check_batch", "check_int", "check_tensor"]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: ``kind`` (int or float) from ``low`` to ``high`` (``None``: unbounded);
    floats must be finite unless ``allow_inf``; ``open_low`` excludes ``low`` itself. A symbolic size
    (``torch.SymInt``, while tracing) passes as an int without a range check, which would fix it to one value."""

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

    def check(self, name: str, value: Any) -> Any:
        """``value`` if it is in range; otherwise ``TypeError``/``ValueError`` naming ``name``."""
        if self.kind is int and isinstance(value, torch.SymInt):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            raise TypeError(f"{name} must be {self.describe()}, got {value!r}")
        bad = (math.isnan(value) or (math.isinf(value) and not self.allow_inf)
               or (self.low is not None and (value <= self.low if self.open_low else value < self.low))
               or (self.high is not None and value > self.high))
        if bad:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """``text`` as a value of this range (for command lines); ``ValueError`` otherwise."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        try:
            return self.check("value", value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None


def check_int(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` if it is an int (not a bool) in ``low…high``."""
    if type(value) is int and (low is None or value >= low) and (high is None or value <= high):
        return value  # the common case, on every call of the ops: no Range built
    checked: int = Range(int, low, high).check(name, value)
    return checked


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a real ``bool``: a truthy string or number would pick a branch silently."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_tensor(t: Any, name: str) -> torch.Tensor:
    """``t`` if it is a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {t.dtype}")
    return t


def check_batch(x: Any, name: str, channels: Optional[int] = None) -> torch.Tensor:
    """``x`` if it is a floating-point ``(B, C, H, W)`` batch, with ``C = channels`` when given."""
    check_tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W) for this layer, got {tuple(x.shape)}")
    batch: torch.Tensor = x
    return batch
