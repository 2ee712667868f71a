"""What the package's command lines share: a parser that reports a mistake as one ``error:`` line naming the option
(exit code 2, no usage dump, no traceback), and argparse types built from the package's checkers."""
from __future__ import annotations

import argparse
from typing import Any, Callable, NoReturn

from ._checks import Range

__all__ = ["ArgumentParser", "argument_type", "range_type"]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes are one ``error: ...`` line (exit code 2); its sub-command parsers
    are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def argument_type(check: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse ``type`` from a function that raises ``ValueError``/``TypeError`` on bad text; ``name`` is what
    argparse calls the type in its messages."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


def range_type(rng: Range) -> Callable[[str], Any]:
    """An argparse ``type`` accepting the numbers in ``rng``."""
    return argument_type(rng.parse, rng.kind.__name__)
