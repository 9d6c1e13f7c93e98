"""Argument types for `herd bench`'s flags, checked when the command line is parsed, so a bad value is a usage
error naming the flag (`argument --minutes: must be > 0, got -1`, exit 2), never a traceback at start.

Each is an argparse `type=`: it takes the flag's text and returns its value, or raises
argparse.ArgumentTypeError saying what is wanted and what was given. Only the standard library at import:
`herd --help` registers every bench, and benchmarks/gpu_check.py runs on a GPU node without herd's pins.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, TypeVar

T = TypeVar("T", int, float)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):       # nan and inf parse, but no count, duration or fraction is either
        raise ValueError(text)
    return value


def _number(name: str, parse: Callable[[str], T], noun: str, bound: str,
            ok: Callable[[T], bool]) -> Callable[[str], T]:
    """An argparse type named `name`: `parse(text)` (int, or a finite float), kept when `ok(value)`; `noun` and
    `bound` ("an integer", "> 0") say in the error what is wanted."""
    def check(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    check.__name__ = check.__qualname__ = name
    check.__doc__ = f"{noun} {bound}"
    return check


positive_int = _number("positive_int", int, "an integer", "> 0", lambda v: v > 0)
non_negative_int = _number("non_negative_int", int, "an integer", ">= 0", lambda v: v >= 0)
positive_float = _number("positive_float", _finite_float, "a number", "> 0", lambda v: v > 0)
non_negative_float = _number("non_negative_float", _finite_float, "a number", ">= 0", lambda v: v >= 0)
fraction = _number("fraction", _finite_float, "a number", "in [0, 1]", lambda v: 0 <= v <= 1)
# --max-tokens-range-ratio R: lengths in [max_tokens·(1-R), max_tokens·(1+R)], so R = 1 would allow 0 tokens
range_ratio = _number("range_ratio", _finite_float, "a number", "in [0, 1)", lambda v: 0 <= v < 1)


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= `low` (e.g. soak's --max-prompt: prompts are 8..this many tokens)."""
    return _number(f"int_at_least_{low}", int, "an integer", f">= {low}", lambda v: v >= low)


def concurrency_levels(text: str) -> list[int]:
    """Comma-separated stream counts (`--concurrency 1,8,32`): integers > 0, in the order given; empty items
    between commas are skipped."""
    try:
        levels = [positive_int(part) for part in str(text).split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        levels = []
    if not levels:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers > 0 (e.g. 1,8,32), got {text!r}")
    return levels


def cpu_list_arg(text: str) -> str:
    """A cpu list flag, checked when the command line is parsed (a usage error, not a traceback at start)."""
    from workers.cpu_affinity import parse_cpu_list

    try:
        parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def usage_error(bench: str, message: str) -> int:
    """A constraint between flags, found where the bench starts: said as argparse says its errors; exit code 2."""
    print(f"herd bench {bench}: error: {message}", file=sys.stderr)
    return 2
