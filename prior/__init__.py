"""The diffusion prior (DALL-E 2, section 2.1): a caption's CLIP text encoding -> a CLIP image embedding.

    from prior import DiffusionPriorNetwork, sample_image_embeds
    prior = DiffusionPriorNetwork.from_pretrained("runs/prior-shapes-tiny/model")
    image_embed = sample_image_embeds(prior, clip.encode_text(captions), best_of=2)   # (b, d), unit norm

Train it with `train-prior configs/prior/shapes-tiny.yaml`; see prior/model.py for the network, scaling and
classifier-free guidance, prior/sampling.py for best-of-N sampling, prior/evaluation.py for the SHAPES measures.
"""

from .config import PriorConfig, PriorDataConfig, PriorEvalConfig, TrainPriorConfig
from .evaluation import evaluate_prior_shapes, heldout_captions, triple_image_embeds
from .guided import select_best
from .model import DiffusionPriorNetwork, length_groups
from .sampling import sample_candidates, sample_image_embeds
from .training import PriorTrainTask, draw_cond_drop, prior_loss

__all__ = [
    "DiffusionPriorNetwork",
    "PriorConfig",
    "PriorDataConfig",
    "PriorEvalConfig",
    "PriorTrainTask",
    "TrainPriorConfig",
    "draw_cond_drop",
    "evaluate_prior_shapes",
    "heldout_captions",
    "length_groups",
    "prior_loss",
    "sample_candidates",
    "sample_image_embeds",
    "select_best",
    "triple_image_embeds",
]
