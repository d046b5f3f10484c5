"""The pipeline layer: where the stages meet (CLIP -> prior -> decoder -> upsamplers), and the public API on top.

    from unclip.pipeline import UnclipPipeline, load_pipeline
    pipe = load_pipeline()                              # the shipped SHAPES cascade
    images = pipe.generate("a red circle on a blue background", num_images=4, seed=0)

Modules: `pipeline` (UnclipPipeline: generate, save/load, dtype), `cascade` (the upsampler chain), `manipulations`
(vary, interpolate, text_diff), `evaluation` (compositional accuracy, CLIP score, FID/KID), `default` (the shipped
model), `api` (the one-call functions `unclip.generate` & co.), `serve` (the web demo).
"""

from .default import DEFAULT_PIPELINE, load_pipeline
from .pipeline import GenerationDefaults, UnclipPipeline

__all__ = ["DEFAULT_PIPELINE", "GenerationDefaults", "UnclipPipeline", "load_pipeline"]
