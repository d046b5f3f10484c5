"""Small pieces every command-line entry point shares: errors, device choice, tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import devices

__all__ = ["CliError", "add_device_argument", "resolve_device", "print_table", "int_at_least", "positive_int",
           "image_path", "file_path", "check_writable", "save_image", "read_image", "parse_assignment"]


class CliError(Exception):
    """An error to show the user as one clear line (no traceback), with exit status 2."""


def parse_assignment(item: str, example: str) -> tuple[str, Any]:
    """A `--set KEY=VALUE` item as (KEY, VALUE), the value read as YAML ("[3, 2]" -> [3, 2], "1e-3" -> 0.001); a
    malformed item is a CliError that shows `example` (such as "train.lr=1e-3")."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise CliError(f"--set expects KEY=VALUE (e.g. {example}), got {item!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise CliError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None


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
    """An argparse type: an output image file in a format PIL can write RGB images in (checked before any work)."""
    import io

    from PIL import Image

    path = Path(text)
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text!r} has no image file extension PIL can write (e.g. .png, .jpg)")
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, KeyError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: PIL cannot write RGB images as {fmt} ({e}); use .png or .jpg") \
            from None
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give an image file name")
    return path


def file_path(text: str) -> Path:
    """An argparse type: an output file (not an existing directory)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    return path


def check_writable(path: Path, *, directory: bool = False) -> None:
    """Make sure `path` (a file, or with `directory` a directory) can be written, before any work is done, without
    creating anything: its nearest existing directory must be one where a probe file can be written (and
    removed). A CliError says why not."""
    import tempfile

    folder = path if directory else path.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor or "."))
    if existing.exists() and not existing.is_dir():
        raise CliError(f"cannot write {path}: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".unclip-write-check-"):
            pass
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e} ({existing})") from None


def save_image(image, path: Path) -> None:
    """Write a PIL image to `path` atomically (a temporary file, then a rename): a failed write leaves an existing
    file as it was. An OSError is a CliError naming the file."""
    import os
    import uuid

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CliError(f"could not write {path}: {e}") from None


def read_image(path: Path):
    """An input image file as an RGB PIL image; a missing or unreadable file is a CliError naming it."""
    from ..images import open_image

    try:
        return open_image(path)
    except ValueError as e:
        raise CliError(str(e)) from None


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")


def resolve_device(name: str) -> torch.device:
    """--device's value as a device (`unclip.devices.resolve_device`); one it cannot be is a CliError saying why."""
    try:
        return devices.resolve_device(name)
    except ValueError as e:
        raise CliError(str(e)) from None


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a plain aligned table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(f"{str(x):<{w}}" for x, w in zip(row, widths)).rstrip())
