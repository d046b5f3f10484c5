"""The unCLIP pipeline: caption -> CLIP text encoding -> prior -> CLIP image embedding -> decoder -> upsamplers.

    pipe = UnclipPipeline.from_pretrained("runs/pipeline")          # or load_default_pipeline()
    images = pipe.generate(["a red circle on a blue background"], num_images=4, seed=0)   # PIL images
    pipe.save_pretrained("my-pipeline", dtype=torch.float16)

A pipeline directory holds `pipeline.json` (which sub-directory is which stage, and the generation defaults)
and one sub-directory per stage, each a `config.json` + `model.safetensors` written by the stage itself:
`clip/`, `prior/`, `decoder/`, `upsampler-1/`, `upsampler-2/`, ... Weights may be stored in half precision;
they are loaded into the modules' own dtype (float32 unless `dtype` says otherwise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from decoder import Decoder, decode
from prior import DiffusionPriorNetwork, sample_image_embeds
from prior.config import PRIOR_SAMPLERS
from prior.config import Sampler as PriorSampler
from prior.model import EPS_MOMENTS
from upsamplers import Upsampler

from ..checkpoint import CheckpointError, atomic_directory, write_json_atomic
from ..clip import CaptionError, Clip
from ..config import ConfigError, config_from_dict, config_to_dict
from ..data.embeddings import clip_fingerprint
from ..diffusion import SAMPLER_NAMES, SamplerName
from ..images import tensor_to_pil
from .cascade import check_chain, run_cascade

__all__ = ["GenerationDefaults", "UnclipPipeline", "PIPELINE_FILE", "SamplerName"]

PIPELINE_FILE = "pipeline.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling settings a pipeline directory ships with (each `generate` argument left as None takes these)."""

    sampler: SamplerName = "ddim"  # "ddim", "ddpm", "dpmpp_2m" or "dpmpp_2m_sde": the decoder's, the others' default
    prior_sampler: PriorSampler | None = None  # the prior's (None: `sampler`); also "analytic_ddpm", the paper's
    upsampler_sampler: SamplerName | None = None  # every upsampler's (None: `sampler`; the paper: DDIM)
    prior_steps: int = 64  # the paper's prior used 64 steps
    prior_guidance: float = 1.0  # 1: no guidance (on SHAPES, guidance 2 gave the same cosine, 4 a lower one)
    best_of: int = 2  # prior samples per image; the one closest to the caption's text embedding is kept
    decoder_steps: int = 50  # the paper: 250 for the decoder
    decoder_guidance: float = 3.0
    decoder_eta: float = 0.0  # DDIM noise of the decoder (0: deterministic given x_T); other samplers ignore it
    upsampler_steps: tuple[int, ...] = ()  # per upsampler; () : each upsampler's own default (paper: 27 and 15)

    def __post_init__(self) -> None:
        """Every value in range, so that a bad setting fails before any sampling, naming the setting."""
        for name in ("sampler", "prior_sampler", "upsampler_sampler"):
            value, allowed = getattr(self, name), PRIOR_SAMPLERS if name == "prior_sampler" else SAMPLER_NAMES
            if value not in allowed and not (value is None and name != "sampler"):
                none = "" if name == "sampler" else " (or None: use `sampler`)"
                raise ValueError(f"{name} must be one of {', '.join(allowed)}{none}, got {value!r}")
        counts = {"prior_steps": self.prior_steps, "decoder_steps": self.decoder_steps, "best_of": self.best_of,
                  **{f"upsampler_steps[{i}]": n for i, n in enumerate(self.upsampler_steps)}}
        for name, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {n!r}")
        for name in ("prior_guidance", "decoder_guidance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (1: no guidance), got {value!r}")
        if not (isinstance(self.decoder_eta, (int, float)) and 0 <= self.decoder_eta <= 1):
            raise ValueError(f"decoder_eta (DDIM noise) must lie in [0, 1], got {self.decoder_eta!r}")

    def sampler_of(self, stage: Literal["prior", "decoder", "upsampler"]) -> PriorSampler:
        """The sampler `stage` runs with: its own setting when given, else `sampler`."""
        own = {"prior": self.prior_sampler, "decoder": None, "upsampler": self.upsampler_sampler}[stage]
        return own or self.sampler


@dataclass(frozen=True)
class PipelineStages:
    """Where each stage lives in a pipeline directory (paths relative to it)."""

    clip: str
    prior: str
    decoder: str
    upsamplers: tuple[str, ...] = ()  # lowest resolution first


@dataclass(frozen=True)
class PipelineFile:
    """The contents of `pipeline.json`, read as strictly as a config file (unknown keys and wrong types are errors)."""

    format_version: int
    stages: PipelineStages
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    clip_fingerprint: str | None = None  # of the CLIP the stages were assembled with (informational)
    image_sizes: tuple[int, ...] = ()  # side of the decoder's images, then of each upsampler's (informational)


def _read_pipeline_file(path: Path) -> PipelineFile:
    """Read and check `pipeline.json`; anything malformed is a one-line CheckpointError naming the file and key."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the top level must be a mapping of keys to values, got {type(meta).__name__}")
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer unclip (format {version} > {FORMAT_VERSION}); "
                              "upgrade unclip")
    try:
        parsed = config_from_dict(PipelineFile, meta)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    steps, ups = parsed.defaults.upsampler_steps, parsed.stages.upsamplers
    if steps and len(steps) != len(ups):
        raise CheckpointError(f"{path}: defaults.upsampler_steps gives {len(steps)} step count(s) for "
                              f"{len(ups)} upsampler(s) in stages.upsamplers")
    return parsed


class UnclipPipeline(nn.Module):
    """CLIP + prior + decoder + upsamplers (any number, possibly none). Build from modules or `from_pretrained`."""

    def __init__(self, clip: Clip, prior: DiffusionPriorNetwork, decoder: Decoder,
                 upsamplers: Sequence[Upsampler] = (), defaults: GenerationDefaults | None = None) -> None:
        super().__init__()
        self.clip, self.prior, self.decoder = clip.freeze(), prior.eval(), decoder.eval()
        self.upsamplers = nn.ModuleList(list(upsamplers)).eval()
        self.defaults = defaults or GenerationDefaults()
        self._check_stages()
        self._check_prior_sampler(self.defaults)

    # ----- construction -------------------------------------------------------------------------------------
    def _check_stages(self) -> None:
        d = self.clip.embed_dim
        if self.prior.config.embed_dim != d:
            raise ValueError(f"the prior maps into {self.prior.config.embed_dim}-d embeddings, the CLIP's are {d}-d")
        if self.decoder.config.embed_dim != d:
            raise ValueError(f"the decoder reads {self.decoder.config.embed_dim}-d embeddings, the CLIP's are {d}-d")
        check_chain(self.upsamplers, self.decoder.config.image_size, "the decoder")
        steps = self.defaults.upsampler_steps
        if steps and len(steps) != len(self.upsamplers):
            raise ValueError(f"the generation defaults give upsampler_steps for {len(steps)} upsampler(s), the "
                             f"pipeline has {len(self.upsamplers)}")

    @property
    def image_size(self) -> int:
        """Side of the images `generate` returns (the last stage's)."""
        return self.upsamplers[-1].config.image_size if len(self.upsamplers) else self.decoder.config.image_size

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the diffusion stages (the CLIP always runs in float32 for its embeddings)."""
        return next(self.decoder.parameters()).dtype

    def autocast(self) -> torch.autocast:
        """Autocast to the pipeline's dtype on its device (disabled in float32): mixed-precision pieces inside the
        stages (x-transformers' float32 buffers, for instance) then meet half-precision weights safely."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UnclipPipeline:
        """Move every stage to `device`; cast the prior, decoder and upsamplers to `dtype` (e.g. torch.bfloat16 on
        CUDA). The CLIP stays float32 (tiny next to the rest; its normalised embeddings are what everything reads)."""
        if dtype is not None and device is not None and torch.device(device).type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is not supported on the CPU; use torch.float32 or torch.bfloat16 there")
        self.clip.to(device)
        for module in (self.prior, self.decoder, self.upsamplers):
            module.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> UnclipPipeline:
        """Load a pipeline directory (see the module doc); `device`/`dtype` as in `to`."""
        path = Path(path)
        meta_path = path / PIPELINE_FILE
        if not meta_path.is_file():
            if not path.exists():
                raise CheckpointError(f"pipeline directory not found: {path}")
            raise CheckpointError(f"{path} is not a pipeline directory: {PIPELINE_FILE} is missing")
        meta = _read_pipeline_file(meta_path)
        stages = meta.stages
        pipe = cls(
            Clip.from_pretrained(path / stages.clip),
            DiffusionPriorNetwork.from_pretrained(path / stages.prior),
            Decoder.from_pretrained(path / stages.decoder),
            [Upsampler.from_pretrained(path / p) for p in stages.upsamplers],
            meta.defaults,
        )
        return pipe.to(device, dtype)

    @classmethod
    def from_stages(cls, clip: str | Path, prior: str | Path, decoder: str | Path,
                    upsamplers: Sequence[str | Path] = (),
                    defaults: GenerationDefaults | None = None) -> UnclipPipeline:
        """Assemble a pipeline from stage directories written by the train-* scripts (each OUTPUT_DIR/model).

        Refuses a prior or a decoder trained on another CLIP's embeddings (the weights' fingerprint differs; stages
        saved before fingerprints were recorded are not checked)."""
        clip_model = Clip.from_pretrained(clip)
        prior_model, dec = DiffusionPriorNetwork.from_pretrained(prior), Decoder.from_pretrained(decoder)
        have = clip_fingerprint(clip_model)
        for name, where, want in (("prior", prior, prior_model.clip_fingerprint),
                                  ("decoder", decoder, (dec.clip_info or {}).get("fingerprint"))):
            if want is not None and want != have:
                raise CheckpointError(f"the {name} {where} was trained on the embeddings of another CLIP "
                                      f"(fingerprint {want}) than {clip} ({have})")
        return cls(clip_model, prior_model, dec, [Upsampler.from_pretrained(p) for p in upsamplers], defaults)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the pipeline directory atomically; `dtype` (e.g. torch.float16) casts the stored float weights.
        An existing `path` is replaced only if it is empty or holds a pipeline (pipeline.json)."""
        with atomic_directory(path, replaces=PIPELINE_FILE) as tmp:
            stages = PipelineStages("clip", "prior", "decoder",
                                    tuple(f"upsampler-{i}" for i in range(1, len(self.upsamplers) + 1)))
            self.clip.save_pretrained(tmp / stages.clip, dtype=dtype)  # a cast copy keeps its fingerprint
            self.prior.save_pretrained(tmp / stages.prior)
            self.decoder.save_pretrained(tmp / stages.decoder)
            for name, up in zip(stages.upsamplers, self.upsamplers):
                up.save_pretrained(tmp / name)
            if dtype is not None:
                for name in (stages.prior, stages.decoder, *stages.upsamplers):
                    _cast_safetensors(tmp / name / "model.safetensors", dtype)
            write_json_atomic(tmp / PIPELINE_FILE, config_to_dict(PipelineFile(
                FORMAT_VERSION, stages, self.defaults, clip_fingerprint(self.clip),
                (self.decoder.config.image_size, *(u.config.image_size for u in self.upsamplers)))))
        return Path(path)

    # ----- generation ---------------------------------------------------------------------------------------
    def settings(self, **overrides: Any) -> GenerationDefaults:
        """The pipeline's defaults with the non-None `overrides` applied (unknown names are errors).

        A non-zero `decoder_eta` given here with a decoder sampler (`sampler`, given or the default) other than DDIM
        is an error: only DDIM has that noise. A stored default eta is simply not used when the sampler given is not
        DDIM. `prior_sampler` / `upsampler_sampler` have nothing to do with eta (their stages never take it)."""
        unknown = sorted(set(overrides) - set(GenerationDefaults.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown generation settings {unknown}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(given.get("upsampler_steps"), int):
            given["upsampler_steps"] = (given["upsampler_steps"],) * len(self.upsamplers)
        if "upsampler_steps" in given:
            given["upsampler_steps"] = tuple(given["upsampler_steps"])
            if given["upsampler_steps"] and len(given["upsampler_steps"]) != len(self.upsamplers):
                raise ValueError(f"upsampler_steps has {len(given['upsampler_steps'])} entries for "
                                 f"{len(self.upsamplers)} upsampler(s)")
        s = replace(self.defaults, **given)
        if s.sampler != "ddim" and s.decoder_eta:
            if "decoder_eta" in given:
                raise ValueError(f"decoder_eta (DDIM's noise) applies to the ddim sampler only; the sampler is "
                                 f"{s.sampler}")
            s = replace(s, decoder_eta=0.0)  # a stored eta does not carry over to a sampler without that noise
        self._check_prior_sampler(s)
        return s

    def _check_prior_sampler(self, s: GenerationDefaults) -> None:
        if s.sampler_of("prior") == "analytic_ddpm" and self.prior.eps_moments is None:
            raise ValueError("the prior sampler analytic_ddpm needs the prior's Analytic-DPM moments, which this "
                             "pipeline's prior lacks (train-prior stores them; prior.analytic.calibrate_prior adds "
                             "them to any prior); choose another prior_sampler")

    def encode_text(self, captions: Sequence[str]):
        """The CLIP's `TextEncoding` of the captions, on the pipeline's device and dtype."""
        return self.clip.encode_text(list(captions)).to(self.device, self.dtype)

    @torch.no_grad()
    def generate_tensors(self, texts: str | Sequence[str], num_images: int = 1, *, seed: int | None = None,
                         progress: bool = False, **settings: Any) -> Tensor:
        """Images (len(texts) * num_images, 3, S, S) in [0, 1], caption-major; see `generate` for the arguments."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise CaptionError("no captions given")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        s = self.settings(**settings)
        device = self.device
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        captions = [t for t in texts for _ in range(num_images)]
        text = self.encode_text(captions)  # (n, ...), caption-major
        with self.autocast():
            image_embed = sample_image_embeds(self.prior, text, best_of=s.best_of, steps=s.prior_steps,
                                              sampler=s.sampler_of("prior"), guidance_scale=s.prior_guidance,
                                              generator=generator, progress=progress)
            base = decode(self.decoder, image_embed.to(self.dtype), text if self.decoder.text_proj else None,
                          steps=s.decoder_steps, sampler=s.sampler_of("decoder"), eta=s.decoder_eta,
                          guidance_scale=s.decoder_guidance, generator=generator, progress=progress)
        return self.upsample(base, generator=generator, progress=progress, settings=s)

    def upsample(self, base: Tensor, *, generator: torch.Generator | None = None, progress: bool = False,
                 settings: GenerationDefaults | None = None) -> Tensor:
        """Run the upsamplers on base images (b, 3, s, s) in [0, 1]: (b, 3, S, S) in [0, 1]. Steps and sampler are
        `settings`' (default: the pipeline's defaults): `upsampler_steps`, and `upsampler_sampler`, else `sampler`."""
        if not len(self.upsamplers):
            return base
        s = settings or self.defaults
        steps = list(s.upsampler_steps) or None
        with self.autocast():
            outputs = run_cascade(base.to(self.dtype), list(self.upsamplers), steps=steps,
                                  sampler=s.sampler_of("upsampler"), generator=generator, progress=progress)
        return outputs[-1].float()

    def generate(self, texts: str | Sequence[str], num_images: int = 1, *, seed: int | None = None,
                 sampler: SamplerName | None = None, prior_sampler: SamplerName | None = None,
                 upsampler_sampler: SamplerName | None = None, prior_steps: int | None = None,
                 prior_guidance: float | None = None, best_of: int | None = None, decoder_steps: int | None = None,
                 decoder_guidance: float | None = None, decoder_eta: float | None = None,
                 upsampler_steps: int | Sequence[int] | None = None, progress: bool = False) -> list[Image.Image]:
        """Generate `num_images` PIL images per caption (len(texts) * num_images, caption-major).

        Every setting left None takes the pipeline's `defaults`; `seed` makes the whole run reproducible. `sampler`
        is the decoder's, and the prior's and upsamplers' too unless `prior_sampler` / `upsampler_sampler` (given
        here or stored in the defaults) name their own.
        """
        images = self.generate_tensors(texts, num_images, seed=seed, progress=progress, sampler=sampler,
                                       prior_sampler=prior_sampler, upsampler_sampler=upsampler_sampler,
                                       prior_steps=prior_steps, prior_guidance=prior_guidance, best_of=best_of,
                                       decoder_steps=decoder_steps, decoder_guidance=decoder_guidance,
                                       decoder_eta=decoder_eta, upsampler_steps=upsampler_steps)
        return [tensor_to_pil(im) for im in images]


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with its floating-point weights cast to `dtype` (in place; the caller's
    directory is a temporary one that is renamed into place only when everything is written). A prior's
    Analytic-DPM moments keep their precision: 1 - Gamma_t near 0 would not survive float16."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = {k: v.to(dtype) if v.is_floating_point() and k != EPS_MOMENTS else v
               for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)

