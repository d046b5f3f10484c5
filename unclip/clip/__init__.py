"""The CLIP stage: encoders for captions and images, contrastive training, zero-shot classification."""

from .config import ClipConfig
from .model import (
    CaptionError,
    Clip,
    ClipNotFoundError,
    ClipWeightsError,
    TextEncoding,
    contrastive_loss,
    load_clip,
    read_open_clip_state_dict,
)
from .zero_shot import DEFAULT_TEMPLATES, classify, zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "CaptionError",
    "Clip",
    "ClipConfig",
    "ClipNotFoundError",
    "ClipWeightsError",
    "DEFAULT_TEMPLATES",
    "TextEncoding",
    "classify",
    "contrastive_loss",
    "load_clip",
    "read_open_clip_state_dict",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
