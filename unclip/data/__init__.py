"""Datasets: the synthetic SHAPES set and a robust image-text loader over Hugging Face `datasets`."""

from unclip.data.image_text import (
    DataError,
    ImageTextDataset,
    collate_image_text,
    decode_image,
    load_image_text_dataset,
)
from unclip.data.shapes import (
    ATTRIBUTES,
    CAPTION_TEMPLATES,
    COLORS,
    PALETTE,
    SHAPES,
    ShapeScene,
    all_triples,
    caption_for,
    is_heldout,
    make_shapes,
    render_scene,
    sample_scene,
    split_triples,
    write_image_folder,
)

__all__ = [
    "ATTRIBUTES",
    "CAPTION_TEMPLATES",
    "COLORS",
    "PALETTE",
    "SHAPES",
    "DataError",
    "ImageTextDataset",
    "ShapeScene",
    "all_triples",
    "caption_for",
    "collate_image_text",
    "decode_image",
    "is_heldout",
    "load_image_text_dataset",
    "make_shapes",
    "render_scene",
    "sample_scene",
    "split_triples",
    "write_image_folder",
]
