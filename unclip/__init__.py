"""unclip: the unCLIP (DALL-E 2) text-to-image system, every stage trainable on its own.

    import unclip
    images = unclip.generate("a red circle on a blue background", num_images=4, seed=0)   # PIL images
    variations = unclip.vary(images[0], n=4)
    pipe = unclip.load_pipeline("runs/pipeline")       # any pipeline directory; None: the shipped SHAPES model

The foundation (CLIP wrapper, diffusion math and samplers, data, trainer, checkpoints) lives in
sub-modules of this package; the stages live in the sibling packages `prior`, `decoder` and
`upsamplers`. The public API below is loaded lazily, so that a stage importing the foundation does not
pull in everything else.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Clip": "unclip.clip",
    "TextEncoding": "unclip.clip",
    "zero_shot_classifier": "unclip.clip",
    "classify": "unclip.clip",
    "load_config": "unclip.config",
    "generate": "unclip.pipeline.api",
    "vary": "unclip.pipeline.api",
    "interpolate": "unclip.pipeline.api",
    "text_diff": "unclip.pipeline.api",
    "load_pipeline": "unclip.pipeline.default",
    "UnclipPipeline": "unclip.pipeline.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")
