"""Argument checks shared by the whole package, with one rule: a value of the wrong type is a ``TypeError``, a value
of the right type outside its range a ``ValueError``; both name the argument."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

__all__ = ["Range"]


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

    def check(self, name: str, value: Any) -> Any:
        """``value`` if it is in range; otherwise ``TypeError``/``ValueError`` naming ``name``."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            raise TypeError(f"{name} must be {self.describe()}, got {value!r}")
        bad = (math.isnan(value) or (math.isinf(value) and not self.allow_inf)
               or (self.low is not None and (value <= self.low if self.open_low else value < self.low))
               or (self.high is not None and value > self.high))
        if bad:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """``text`` as a value of this range (for command lines)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        try:
            return self.check("value", value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
