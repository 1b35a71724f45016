"""Argument types for the command line: every number is checked by argparse, before any model loads.

A bad value ends the command with argparse's usage message, the flag, the accepted range and exit
code 2. Checks that involve several arguments (or a file they name) raise ``UsageError`` from the
command's ``validate`` hook, which the command line reports the same way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


class UsageError(Exception):
    """Arguments that cannot work together (or with the files they name); reported like argparse errors."""


class UsageExit(SystemExit):
    """Exit code 2, as argparse's own errors, with the message (already printed) as its text."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An int in [low, high] (high: no limit when None)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be an integer {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, got {value}")
        return value
    return parse


def odd_int(low: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low or value % 2 == 0:
            raise argparse.ArgumentTypeError(f"must be an odd integer >= {low}, got {value}")
        return value
    return parse


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] with low_open); no bound where None."""
    def parse(text: str) -> float:
        value = _number(text, float)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        if not math.isfinite(value) or too_low or too_high:
            if low is not None and high is not None:
                span = f"in {'(' if low_open else '['}{low}, {high}]"
            elif low is not None:
                span = f"{'>' if low_open else '>='} {low}"
            elif high is not None:
                span = f"<= {high}"
            else:
                span = "finite"
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_real = real(0.0, low_open=True)
finite_real = real()
fraction = real(0.0, 1.0)


def choices_list(allowed: Callable[[], list[str]], what: str) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of ``allowed()``."""
    def parse(text: str) -> list[str]:
        names = [item for item in text.split(",") if item]
        known = allowed()
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown or repr(text)}: choose from {', '.join(known)}")
        return names
    return parse


def bucket_edges(text: str) -> list[int]:
    """Strictly increasing, non-negative token positions: "0,1024,2048"."""
    try:
        edges = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as 0,1024,2048, got {text!r}") from None
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise argparse.ArgumentTypeError(
            f"must be at least two strictly increasing integers >= 0, got {text!r}")
    return edges



def add_assets_dir(parser) -> None:
    """``--assets-dir``: where the fetched model and text live (``--cache``, its old name, still works)."""
    parser.add_argument("--assets-dir", default=None, metavar="DIR",
                        help="folder of the fetched model and text (default: $LOCOCO_CACHE or ~/.cache/lococo)")
    parser.add_argument("--cache", dest="assets_dir", help=argparse.SUPPRESS)


def check_writable(folder: Path, flag: str) -> None:
    """Fails now, not after hours of work, when the output folder cannot be written."""
    probe = folder / ".lococo-write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{flag} {folder} cannot be written: {exc.strerror or exc}") from None


def add_slot_storage(parser, default: str = "16") -> None:
    """--kv-bits, --kv-group, --kv-key-axis, --kv-format: how the compressed slots are stored (``slot_storage``)."""
    group = parser.add_argument_group("slot storage (docs/design.md#quantized-slots)")
    group.add_argument("--kv-bits", type=int_at_least(4, 16), choices=[16, 8, 4], default=None,
                       help=f"bits per stored slot value: 16 (the model's dtype), 8 or 4 (default: {default})")
    group.add_argument("--kv-group", type=int_at_least(1), default=None,
                       help="values per 16-bit scale (default 64 at 8 bits, 32 at 4)")
    group.add_argument("--kv-key-axis", default="token", choices=["token", "channel"],
                       help="keys scaled per token (a group of channels) or per channel (a group of slots)")
    group.add_argument("--kv-format", default="int", choices=["int", "fp8"], help="8-bit codes: int8 or fp8 e4m3")


def slot_storage(args, head_dim: int | None):
    """The storage ``add_slot_storage``'s flags ask for: None (no --kv-bits), False (--kv-bits 16) or a
    ``lococo.SlotQuantization`` that fits ``head_dim``; UsageError naming the flag otherwise."""
    from ..quantization import SlotQuantization

    given = [f"--{flag}" for flag, default in (("kv-group", None), ("kv-key-axis", "token"), ("kv-format", "int"))
             if getattr(args, flag.replace("-", "_")) != default]
    if args.kv_bits in (None, 16):
        if given:
            raise UsageError(f"{', '.join(given)} set how quantized slots are stored: give --kv-bits 8 or 4 too")
        return None if args.kv_bits is None else False
    try:
        spec = SlotQuantization(args.kv_bits, args.kv_group, args.kv_key_axis, args.kv_format)
    except ValueError as exc:
        raise UsageError(f"--kv-bits {args.kv_bits}: {exc}") from None
    try:
        if head_dim is not None:   # None: checked when the cache meets the model's keys
            spec.check(head_dim)
    except ValueError as exc:
        raise UsageError(f"--kv-group: {exc}") from None
    return spec
