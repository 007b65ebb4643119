"""Command-line parsers whose usage errors are one line (``hipro: error: ...
(see PROG --help)``, exit status 2), for `hipro` and the benchmark entry
points alike: argparse's default prints the whole usage block above the error,
which buries the one line that names the culprit. Also the argparse types
that check the benchmarks' option values.

This module sits below every layer and imports nothing of the package.
"""
from __future__ import annotations

import argparse
import math
import os


class OneLineUsageParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with one-line usage errors (its subparsers, of
    the parent's class by argparse's default, too)."""

    def error(self, message: str):
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"hipro: error: {' '.join(message.split())}{hint}\n")


# ------------------------------------------------------------------ option values
# argparse `type=`s for `hipro` and the benchmark entry points: a bad value is
# a one-line usage error naming the option, before any model is loaded (here,
# not in hipro_fast.cli: the benchmarks cannot import the CLI, it imports them).
def int_at_least(low: int, high: int | None = None):
    """An integer in low.. (or low..high)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value
    return parse


def finite_float(text: str) -> float:
    """A finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def float_above(low: float, *, inclusive: bool = False):
    """A finite number > low (>= low when `inclusive`)."""
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text!r}")
        return value
    return parse


def int_list(low: int, example: str):
    """A comma list of distinct integers >= low: an empty entry ("1,,2") or a repeated
    value is refused, not skipped or run twice."""
    item = int_at_least(low)

    def parse(text: str) -> list[int]:
        items = [x.strip() for x in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"expected a comma list of integers, e.g. {example}, got {text!r}")
        if not all(items):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty entry in the comma list")
        try:
            values = [item(x) for x in items]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: a value is repeated")
        return values
    return parse


def file_stem(text: str) -> str:
    """A plain file name stem: no folder part (which would write outside the
    output folder), not empty, "." or ".."."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if text in ("", ".", "..") or any(s in text for s in seps) or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a plain file name stem (no folder part), got {text!r}")
    return text
