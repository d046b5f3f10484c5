"""unclip: the unCLIP (DALL-E 2) text-to-image system, every stage trainable on its own.

    import unclip
    images = unclip.generate("a red circle on a blue background", num_images=4, seed=0)   # PIL images
    variations = unclip.vary(images[0], n=4)
    pipe = unclip.load_pipeline("runs/pipeline")       # any pipeline directory; None: the shipped SHAPES model

The foundation (CLIP wrapper, diffusion math and samplers, sampling settings, the stage protocol, data, trainer,
checkpoints) lives in sub-modules of this package; the stages live in the sibling packages `prior`, `decoder` and
`upsamplers`, which import the foundation only. The pipeline layer on top imports no stage either (it finds stages
by kind, `unclip.stage`), so importing this package never imports a stage.
"""

from .clip import Clip, TextEncoding, classify, zero_shot_classifier
from .config import load_config
from .pipeline.api import generate, interpolate, text_diff, vary
from .pipeline.default import load_pipeline
from .pipeline.pipeline import UnclipPipeline
from .settings import Sampling, StageSampling

__version__ = "0.1.0"

__all__ = [
    "Clip",
    "Sampling",
    "StageSampling",
    "TextEncoding",
    "UnclipPipeline",
    "__version__",
    "classify",
    "generate",
    "interpolate",
    "load_config",
    "load_pipeline",
    "text_diff",
    "vary",
    "zero_shot_classifier",
]
