"""The pipeline layer: where the stages meet (CLIP -> prior -> decoder -> upsamplers), and the public API on top.

    from unclip.pipeline import UnclipPipeline, load_pipeline
    pipe = load_pipeline()                              # the shipped SHAPES cascade
    images = pipe.generate("a red circle on a blue background", num_images=4, seed=0)

The layer imports no stage: it drives them through the stage protocol (`unclip.stage`) and finds their classes by
kind when it loads a directory.

Modules: `pipeline` (UnclipPipeline: generate, save/load, dtype), `legacy` (format-1 pipeline.json files),
`cascade` (the upsampler chain), `manipulations`
(vary, interpolate, text_diff), `evaluation` (compositional accuracy, CLIP score, FID/KID), `default` (the shipped
model), `api` (the one-call functions `unclip.generate` & co.), `serve` (the web demo).
"""

from .default import DEFAULT_PIPELINE, load_pipeline
from .pipeline import UnclipPipeline

__all__ = ["DEFAULT_PIPELINE", "UnclipPipeline", "load_pipeline"]
