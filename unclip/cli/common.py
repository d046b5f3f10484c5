"""Small pieces every command-line entry point shares: errors, device choice, tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

__all__ = ["CliError", "add_device_argument", "resolve_device", "print_table"]


class CliError(Exception):
    """An error to show the user as one clear line (no traceback), with exit status 2."""


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
