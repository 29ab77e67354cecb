"""Argument value types: a count or a seed out of range is an argparse error (exit 2) naming the flag, before
anything is created, rather than a raw error from deep inside a job."""

from __future__ import annotations

import argparse


def _bounded_int(low: int, high: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


positive_int = _bounded_int(1, None, ">= 1")
non_negative_int = _bounded_int(0, None, ">= 0")
port = _bounded_int(1, 65536, "a port number in [1, 65535]")
seed_int = _bounded_int(0, 2**32, "in [0, 2**32) (numpy's seed range)")
