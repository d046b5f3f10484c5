"""Why a row of an image-text dataset cannot be used, in words a skip warning can show.

    caption_problem(42)                          # ("", "not a string caption: 42")
    unreadable_image_reason("data/cat.png")      # "data/cat.png: file not found (relative paths are read from ...)"

`ImageTextDataset` asks these only about the rows it skips: decoding stays `decode_image`'s job, which answers
None for any failure; `unreadable_image_reason` looks again at such an image to say what is wrong with it.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..text import has_printable

__all__ = ["caption_problem", "unreadable_image_reason"]

_URL_SCHEMES = ("http://", "https://", "s3://", "gs://")


def caption_problem(value: Any) -> tuple[str, str | None]:
    """(the stripped caption, None), or ("", why it cannot be used) for a missing, non-string or empty caption."""
    if value is None:
        return "", "caption is missing"
    if not isinstance(value, str):
        return "", f"not a string caption: {_shorten(repr(value))}"
    value = value.strip()
    if value and not has_printable(value):
        return "", f"caption has no printable characters ({_shorten(repr(value))})"
    return value, (None if value else "caption is empty")


def unreadable_image_reason(value: Any) -> str:
    """Why an image value (a {"bytes", "path"} dict, bytes, a path, a PIL image or an array) cannot be read: the file
    when there is one, and the cause, e.g. "/data/cat.png: file not found" or "/data/a.png: truncated PNG (...)"."""
    path = None
    if isinstance(value, dict):
        path = value.get("path")
        value = value.get("bytes") if value.get("bytes") is not None else path
    if isinstance(value, (str, os.PathLike)):
        value = path = os.fspath(value)
        problem = _file_problem(path)
        if problem is not None:
            return f"{path}: {problem}"
    elif value is None:
        return "no image in this row (its image value is empty)"
    elif not isinstance(value, (bytes, bytearray, memoryview, Image.Image, np.ndarray)):
        return f"the image value is of type {type(value).__name__}, not image bytes, a file path or an image"
    problem = _decode_problem(value)
    return f"{path}: {problem}" if path else problem


def _file_problem(path: str) -> str | None:
    """What keeps the file at `path` from being read (None: it is a readable file of at least one byte)."""
    if path.startswith(_URL_SCHEMES):
        return "a URL, not a local file (download the images first)"
    if not os.path.exists(path):
        if os.path.islink(path):
            return "file not found (a link to a missing file)"
        if not os.path.isabs(path):
            return f"file not found (a relative path is read from the current directory, {os.getcwd()})"
        return "file not found"
    if os.path.isdir(path):
        return "a directory, not an image file"
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        return (e.strerror or str(e)).lower()
    return "empty file (0 bytes)" if empty else None


def _decode_problem(value: str | bytes | bytearray | memoryview | Image.Image | np.ndarray) -> str:
    """Read `value` as an RGB image the way `decode_image` does, and say why that fails."""
    head, fmt = b"", None
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            return "empty image bytes"
        head, value = bytes(value[:64]), io.BytesIO(bytes(value))
    elif isinstance(value, str):
        with open(value, "rb") as f:
            head = f.read(64)
    try:
        if isinstance(value, (Image.Image, np.ndarray)):
            (value if isinstance(value, Image.Image) else Image.fromarray(value)).convert("RGB")
        else:
            with Image.open(value) as img:
                fmt = img.format
                img.load()
                ImageOps.exif_transpose(img).convert("RGB")
    except Image.DecompressionBombError as e:
        return f"image too large: {e}"
    except Image.UnidentifiedImageError:
        return "cannot identify image file" + _sniff(head)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error ... on bad files
        if fmt and "truncated" in str(e):
            return f"truncated {fmt} ({e})"
        return f"{fmt + ' ' if fmt else ''}{type(e).__name__}: {e}"
    return "image could not be decoded"


def _sniff(head: bytes) -> str:
    """What the first bytes of a file no image reader identifies look like, as the end of its reason."""
    text = head.strip()
    shown = _shorten(text.decode("ascii", "replace"), 40)
    if text[:1] == b"<":
        return f": it holds HTML or XML text ({shown!r}), not an image"
    if text and all(32 <= c < 127 or c in b"\t\r\n" for c in text):
        return f": it holds text ({shown!r}), not an image"
    return " (not an image, or a format PIL cannot read)"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
