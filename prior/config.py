"""The prior's configs: `PriorConfig` (network + diffusion, saved with every prior) and `TrainPriorConfig`
(everything `train-prior` reads from `configs/prior/*.yaml`).

    cfg = load_config(TrainPriorConfig, "configs/prior/shapes-tiny.yaml")
    prior = DiffusionPriorNetwork(cfg.model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from unclip.diffusion import Objective, ScheduleConfig, sampler_options
from unclip.settings import SamplerField
from unclip.train.config import TrainConfig

__all__ = ["PriorConfig", "PriorDataConfig", "PriorEvalConfig", "TrainPriorConfig"]


@dataclass(frozen=True)
class PriorConfig:
    """The diffusion prior: a causal transformer over [text tokens, text embed, timestep, x_t, query].

    Defaults are the paper's prior for a ViT-L/14 CLIP (d = 768, 77 tokens): width 2048, 24 layers (~1B params).
    """

    embed_dim: int = 768  # d: CLIP's joint embedding size (the text embedding and the image embedding)
    text_width: int = 768  # w: width of CLIP's per-token text encodings
    text_length: int = 77  # l: CLIP's text context length (token encodings per caption)
    width: int = 2048  # transformer width
    depth: int = 24  # transformer layers
    heads: int = 32  # attention heads
    dim_head: int = 64  # width of one attention head
    ff_mult: int = 4  # feed-forward hidden width as a multiple of `width`
    dropout: float = 0.0  # attention and feed-forward dropout while training
    objective: Objective = "x0"  # what the network predicts: the clean image embedding (paper), eps or v
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # noise schedule (cosine, 1000 steps)
    cond_drop_prob: float = 0.1  # training: fraction of captions replaced by the learned null text conditioning
    embed_scale: float | None = None  # unit-norm CLIP embeddings are multiplied by this; None: sqrt(embed_dim)
    length_buckets: int = 4  # `forward` runs the rows, sorted by caption length, in this many groups (at most b),
    #   each cut to its longest caption: padding is masked out, so the result is the same. It reads the groups'
    #   lengths on the host, the prior step's one device sync on a GPU (0: every row at full length, no read)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "text_width", "text_length", "width", "depth", "heads", "dim_head", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1), got {self.cond_drop_prob}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.length_buckets < 0:
            raise ValueError(f"length_buckets must be >= 0, got {self.length_buckets}")
        if self.embed_scale is not None and self.embed_scale <= 0:
            raise ValueError(f"embed_scale must be > 0 or null, got {self.embed_scale}")

    @property
    def scale(self) -> float:
        """The factor between a unit-norm CLIP embedding and the diffusion's x0: each coordinate ~unit variance."""
        return self.embed_scale if self.embed_scale is not None else math.sqrt(self.embed_dim)


@dataclass(frozen=True)
class PriorDataConfig:
    """Where the (text, image embedding) pairs come from.

    `source` is one of: "shapes" (the built-in SHAPES training split, encoded by the CLIP on the fly); a
    directory written by `unclip embed` (it holds manifest.json; the scalable path, no CLIP forward passes);
    anything else is an image-text dataset for `load_image_text_dataset` (folder, files or hub name), encoded
    by the CLIP on the fly.
    """

    source: str = "shapes"  # "shapes", an embeddings directory, or an image-text dataset path / hub name
    image_column: str = "image"  # image-text datasets: column holding the images
    caption_column: str = "caption"  # image-text datasets: column holding the captions
    split: str = "train"  # hub datasets: split to read
    shapes_samples: int = 20000  # SHAPES only: training images generated
    shapes_seed: int = 0  # SHAPES only: generation seed
    shapes_resolution: int = 64  # SHAPES only: image side in pixels


@dataclass(frozen=True)
class PriorEvalConfig:
    """The SHAPES evaluation run after training (held-out captions; see prior/evaluation.py)."""

    enabled: bool = True  # run it at all (only with data.source "shapes")
    images_per_triple: int = 8  # rendered images per (shape, fg, bg) triple for the true image embeddings
    guidance_scales: tuple[float, ...] = (1.0,)  # one evaluation per scale; 1 = no guidance (paper's default)
    best_of: int = 2  # samples per caption; the one closest to the text embedding is kept
    steps: int = 64  # sampler steps
    sampler: SamplerField = "ddim"  # "ddim" (eta 0), "ddpm" (ancestral, respaced), "dpmpp_2m", "dpmpp_2m_sde" or
    #   "analytic_ddpm" (ancestral with Analytic-DPM's variances; needs the calibration below)
    seed: int = 1234  # seed of the rendered images and of the sampling noise

    def __post_init__(self) -> None:
        if self.images_per_triple < 1 or self.best_of < 1 or self.steps < 1:
            raise ValueError("images_per_triple, best_of and steps must be >= 1")
        if not self.guidance_scales:
            raise ValueError("guidance_scales needs at least one scale")


@dataclass(frozen=True)
class TrainPriorConfig:
    """Everything `train-prior` reads from `configs/prior/*.yaml`."""

    clip: str  # the CLIP: a directory written by train-clip / save_pretrained, or an open_clip model name
    model: PriorConfig  # the network and its diffusion (dims must match the CLIP's)
    clip_pretrained: str | None = None  # with an open_clip name: pretrained tag (e.g. "openai") or local file
    data: PriorDataConfig = field(default_factory=PriorDataConfig)  # training pairs
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, logging, checkpoints
    eval: PriorEvalConfig = field(default_factory=PriorEvalConfig)  # SHAPES evaluation after training
    calibration_samples: int = 512  # training pairs for the Analytic-DPM moments stored with the model (0: none)

    def __post_init__(self) -> None:
        if self.calibration_samples < 0:
            raise ValueError(f"calibration_samples must be >= 0, got {self.calibration_samples}")
        if sampler_options(self.eval.sampler).get("moments") and self.calibration_samples == 0:
            raise ValueError(f"eval.sampler {self.eval.sampler!r} needs the Analytic-DPM moments that "
                             "calibration_samples > 0 estimates")
