"""The default model: the SHAPES cascade trained with this repository's configs, shipped inside the package.

    pipe = load_pipeline()                       # the shipped SHAPES pipeline (cached per device and dtype)
    pipe = load_pipeline("runs/pipeline")        # any pipeline directory
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..devices import resolve_device
from .pipeline import PIPELINE_FILE, UnclipPipeline

__all__ = ["DEFAULT_PIPELINE", "load_pipeline"]

DEFAULT_PIPELINE = Path(__file__).resolve().parents[1] / "pretrained" / "shapes-tiny"

_CACHE: dict[tuple[str, str, str], UnclipPipeline] = {}


def load_pipeline(path: str | Path | UnclipPipeline | None = None, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> UnclipPipeline:
    """A pipeline from a directory (None: the shipped default), or `path` itself when it already is one.

    Loaded pipelines are cached per (directory, device, dtype), so repeated `unclip.generate` calls load once.
    """
    if isinstance(path, UnclipPipeline):
        return path if device is None and dtype is None else path.to(
            None if device is None else resolve_device(device), dtype)
    directory = Path(path) if path is not None else DEFAULT_PIPELINE
    if path is None and not (directory / PIPELINE_FILE).is_file():
        raise CheckpointError(f"the default model is missing from this installation ({directory}); reinstall unclip "
                              "or pass a pipeline directory")
    dev = resolve_device(device)
    key = (str(directory.resolve()), str(dev), str(dtype))
    if key not in _CACHE:
        _CACHE[key] = UnclipPipeline.from_pretrained(directory, device=dev, dtype=dtype)
    return _CACHE[key]
