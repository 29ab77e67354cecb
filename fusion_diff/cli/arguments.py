"""argparse value types shared by the commands: counts, seeds, ports and finite numbers.

A count of -3 or a guidance scale of nan is not a value the command can run with; argparse reports
it (exit 2, naming the flag) before anything is created, rather than a raw error from deep inside a job.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _bounded_int(low: int, high: int | None, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _parse(text, int, "an integer")
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


positive_int = _bounded_int(1, None, "an integer >= 1")  # items, queries, steps, workers, a batch size
non_negative_int = _bounded_int(0, None, "an integer >= 0")  # a count where 0 means none
port = _bounded_int(1, 65536, "a port number in [1, 65535]")
seed_int = _bounded_int(0, 2**32, "in [0, 2**32) (numpy's seed range)")


def finite_float(text: str) -> float:
    """A real number that is not NaN or infinite."""
    value = _parse(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _parse(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
