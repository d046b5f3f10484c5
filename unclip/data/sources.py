"""The training rows a stage's data config names: the SHAPES training split or a user's image-text dataset."""

from __future__ import annotations

from typing import Protocol

import datasets

from .image_text import load_image_text_dataset
from .shapes import make_shapes

__all__ = ["DataSource", "training_rows"]


class DataSource(Protocol):
    """The fields every stage's data config shares (see e.g. `ClipDataConfig`)."""

    source: str  # "shapes" or a path / hub name for load_image_text_dataset
    image_column: str
    caption_column: str
    split: str
    shapes_samples: int
    shapes_seed: int
    shapes_resolution: int


def training_rows(data: DataSource) -> datasets.Dataset:
    """`make_shapes(...)` of the training split when `data.source == "shapes"`, else the loaded dataset."""
    if data.source == "shapes":
        return make_shapes(data.shapes_samples, split="train", seed=data.shapes_seed,
                           resolution=data.shapes_resolution)
    return load_image_text_dataset(data.source, image_column=data.image_column, caption_column=data.caption_column,
                                   split=data.split)
