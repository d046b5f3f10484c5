"""Small pieces every command-line entry point shares: errors, device choice, tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["CliError", "add_device_argument", "resolve_device", "print_table", "int_at_least", "positive_int",
           "image_path", "read_image"]


class CliError(Exception):
    """An error to show the user as one clear line (no traceback), with exit status 2."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum` (argparse then names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)  # an argparse type: a whole number >= 1


def image_path(text: str) -> Path:
    """An argparse type: an output image file whose extension PIL can write (checked before any work is done)."""
    path = Path(text)
    from PIL import Image

    Image.init()
    if path.suffix.lower() not in Image.EXTENSION:
        raise argparse.ArgumentTypeError(f"{text!r} has no image file extension PIL can write (e.g. .png, .jpg)")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give an image file name")
    return path


def read_image(path: Path):
    """An input image file as an RGB PIL image; a missing or unreadable file is a CliError naming it."""
    from ..images import open_image

    try:
        return open_image(path)
    except ValueError as e:
        raise CliError(str(e)) from None


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; a CUDA device that is not there is a clear error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return str(device)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a plain aligned table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(f"{str(x):<{w}}" for x, w in zip(row, widths)).rstrip())
