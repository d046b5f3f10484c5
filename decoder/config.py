"""Configs of the decoder: the model (saved with every checkpoint) and everything `train-decoder` reads.

    cfg = load_config(TrainDecoderConfig, "configs/decoder/shapes-tiny.yaml")
    decoder = Decoder(cfg.model)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unclip.diffusion import DiffusionConfig
from unclip.nn import UNetConfig
from unclip.settings import SamplerField
from unclip.train import TrainConfig

__all__ = ["DecoderConfig", "DecoderDataConfig", "DecoderEvalConfig", "TrainDecoderConfig"]


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder: a UNet generating image_size x image_size RGB images from a CLIP image embedding (and text).

    The UNet section gives the architecture only: the decoder sets its channels (3 in; 3, or 6 with a learned
    variance, out), its `cond_dim` (the CLIP embedding) and its `context_dim`, so those keys stay unset here.
    """

    image_size: int = 64  # side of the generated images (the UNet's attention placement refers to it)
    embed_dim: int = 768  # d of the CLIP image embedding (must match the CLIP)
    text_width: int | None = 768  # w of CLIP's per-token text states; None: the decoder ignores text
    num_image_tokens: int = 4  # context tokens projected from the image embedding (DALL-E 2: 4)
    context_dim: int = 512  # width of the context tokens the attention layers attend to
    image_drop: float = 0.1  # training: probability of replacing the image embedding by the learned null (CFG)
    text_drop: float = 0.5  # training: probability of dropping the caption tokens (CFG)
    unet: UNetConfig = field(default_factory=UNetConfig)  # architecture (see the class doc for what is set here)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # objective, variance, schedule

    def __post_init__(self) -> None:
        for name in ("image_drop", "text_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.num_image_tokens < 1 or self.embed_dim < 1 or self.context_dim < 1:
            raise ValueError("num_image_tokens, embed_dim and context_dim must be positive")
        if self.unet.image_size != self.image_size:
            raise ValueError(f"unet.image_size ({self.unet.image_size}) must equal image_size ({self.image_size})")
        if self.unet.cond_dim is not None or self.unet.context_dim is not None:
            raise ValueError("leave unet.cond_dim and unet.context_dim unset: the decoder sets them")
        if (self.unet.in_channels, self.unet.out_channels) != (3, 3):
            raise ValueError("leave unet.in_channels and unet.out_channels at 3: the decoder sets them")


@dataclass(frozen=True)
class DecoderDataConfig:
    """Training images and captions; CLIP embeddings computed on the fly or read from `unclip embed` shards."""

    source: str = "shapes"  # "shapes" (built-in training split) or a path / hub name for load_image_text_dataset
    image_column: str = "image"  # column holding the images
    caption_column: str = "caption"  # column holding the captions
    split: str = "train"  # split to read from a hub dataset
    embeddings: str | None = None  # an `unclip embed` directory of this source made with this CLIP; None: on the fly
    cache_embeddings: bool = False  # on the fly: keep each sample's embeddings on the device after its first use
    shapes_samples: int = 20000  # SHAPES only: number of training images generated
    shapes_seed: int = 0  # SHAPES only: generation seed
    shapes_resolution: int = 64  # SHAPES only: rendering side (the CLIP sees it; the decoder gets it resized)


@dataclass(frozen=True)
class DecoderEvalConfig:
    """The held-out SHAPES reconstruction evaluation run after training (and by `decoder.evaluation`)."""

    samples: int = 200  # held-out SHAPES images decoded (0: skip the evaluation)
    guidance_scales: tuple[float, ...] = (1.0, 3.0)  # each scale is evaluated
    steps: int = 50  # sampler steps
    sampler: SamplerField = "ddpm"  # which registered sampler (ancestral DDPM reconstructs SHAPES best)
    eta: float = 0.0  # DDIM noise (0: deterministic)
    seed: int = 1234  # data and sampling seed
    batch_size: int = 100  # images decoded per batch
    sample_grid: int = 16  # held-out images in the periodic training grids, each beside its decodes (from the
    #   image embedding alone) at every guidance scale in `guidance_scales`

    def __post_init__(self) -> None:  # checked when the config is read, not after a whole training run
        if self.samples < 0 or self.steps < 1 or self.batch_size < 1 or self.sample_grid < 0:
            raise ValueError("eval.samples and eval.sample_grid must be >= 0, eval.steps and eval.batch_size >= 1")
        if not self.guidance_scales or not 0 <= self.eta <= 1:
            raise ValueError("eval.guidance_scales needs at least one scale and eval.eta must lie in [0, 1]")


@dataclass(frozen=True)
class TrainDecoderConfig:
    """Everything `train-decoder` reads from configs/decoder/*.yaml for the base (CLIP-embedding -> image) stage."""

    stage: Literal["base"] = "base"  # which cascade stage this file trains (the upsamplers add theirs)
    clip: str = "runs/clip-shapes-tiny/model"  # the frozen CLIP: our directory or an open_clip model name
    clip_pretrained: str | None = None  # open_clip pretrained tag when `clip` is a name (e.g. "openai")
    model: DecoderConfig = field(default_factory=DecoderConfig)  # architecture, conditioning and diffusion
    data: DecoderDataConfig = field(default_factory=DecoderDataConfig)  # training data
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, logging, checkpoints
    eval: DecoderEvalConfig = field(default_factory=DecoderEvalConfig)  # reconstruction accuracy on SHAPES
