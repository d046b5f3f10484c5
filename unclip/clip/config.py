"""Which CLIP to build, and where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from .model import check_architecture  # open_clip's own keys, from the one module that imports open_clip


@dataclass(frozen=True)
class ClipConfig:
    """A CLIP model: an open_clip architecture plus an optional source of weights.

    Give the architecture by `model_name` (any name in `open_clip.list_models()`) or as an explicit
    open_clip model config in `architecture` (embed_dim, vision_cfg, text_cfg: open_clip's own keys, checked
    by open_clip's dataclasses). Weights come from at most one of `pretrained` (an open_clip tag such as
    "openai" or "laion2b_s34b_b79k", downloaded, so it needs internet) and `checkpoint` (a local file in
    open_clip's format, or a directory in ours); with neither, the model is randomly initialised for
    training from scratch.
    """

    model_name: str | None = None  # open_clip architecture name, e.g. "ViT-L-14"
    architecture: Annotated[dict[str, Any], check_architecture] | None = None  # explicit open_clip model config
    # (overrides model_name's); its keys are checked against open_clip's CLIP, CLIPVisionCfg and CLIPTextCfg
    pretrained: str | None = None  # open_clip pretrained tag for model_name (needs internet)
    checkpoint: str | None = None  # local weights: an open_clip .pt/.bin/.safetensors file or our directory
    preprocess: dict[str, Any] | None = None  # overrides of open_clip's PreprocessCfg: size, mean, std, ...

    def __post_init__(self) -> None:
        if self.model_name is None and self.architecture is None and self.checkpoint is None:
            raise ValueError("a CLIP config needs a model_name, an architecture, or a checkpoint directory")
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError("give either 'pretrained' (an open_clip tag) or 'checkpoint' (a local file), not both")
        if self.pretrained is not None and self.model_name is None:
            raise ValueError("'pretrained' is an open_clip tag for a named model: set 'model_name' too")
