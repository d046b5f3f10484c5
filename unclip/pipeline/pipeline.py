"""The unCLIP pipeline: caption -> CLIP text encoding -> prior -> CLIP image embedding -> decoder -> upsamplers.

    pipe = UnclipPipeline.from_pretrained("runs/pipeline")          # or load_pipeline()
    images = pipe.generate(["a red circle on a blue background"], num_images=4, seed=0)   # PIL images
    images = pipe.generate("a red circle", decoder_guidance=4, sampling={"upsampler.steps": [3, 2]})
    pipe.save_pretrained("my-pipeline", dtype=torch.float16)

A pipeline is a CLIP and a list of stages (`unclip.stage.Stage`): at most one prior, one decoder, then any number of
upsamplers, lowest resolution first. `generate` is a loop over them: each reads the `CascadeState` the stages
before it left (captions, image embeddings, images) and adds its output. The stages are found by their kind
(`unclip.stage.stage_class`), so a stage of a new kind plugs in without a change here. Stages are named by role and
place ("prior", "decoder", "upsampler-1", ...), and `Sampling` holds one `StageSampling` per name.

A pipeline directory holds `pipeline.json` (the CLIP's and the stages' sub-directories and the sampling settings)
and one sub-directory per stage, each a `config.json` (naming its kind) + `model.safetensors` written by the stage
itself. Weights may be stored in half precision; they are loaded into the modules' own dtype (float32 unless
`dtype` says otherwise). Directories in format 1 (one flat set of sampling defaults) load too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..checkpoint import CheckpointError, atomic_directory, write_json_atomic
from ..clip import CaptionError, Clip
from ..config import ConfigError, config_from_dict, config_to_dict
from ..diffusion import Generators, sampler_options, seeded_generators
from ..images import tensor_to_pil
from ..settings import Sampling, flatten_sampling, with_overrides
from ..stage import CascadeState, SamplingRun, Stage, StepCallback, stage_class, stage_kind
from .legacy import PipelineFileV1, v1_overrides

__all__ = ["PIPELINE_FILE", "PipelineFile", "UnclipPipeline", "image_generators", "stage_names"]

PIPELINE_FILE = "pipeline.json"
FORMAT_VERSION = 2
ROLE_ORDER = {"prior": 0, "decoder": 1, "upsampler": 2}


@dataclass(frozen=True)
class PipelineFile:
    """The contents of `pipeline.json`, read as strictly as a config file (unknown keys and wrong types are errors)."""

    format_version: int
    clip: str  # the CLIP's sub-directory
    stages: tuple[str, ...]  # the stages' sub-directories, in cascade order (each config.json names its kind)
    sampling: dict[str, Any] = field(default_factory=dict)  # Sampling-shaped: best_of, and stages' settings over their
    # own defaults (`unclip.settings.flatten_sampling`)
    clip_fingerprint: str | None = None  # of the CLIP the stages were assembled with (informational)
    image_sizes: tuple[int, ...] = ()  # side of the decoder's images, then of each upsampler's (informational)


def stage_names(stages: Sequence[Stage]) -> list[str]:
    """Each stage's name: "prior", "decoder", and "upsampler-1", "upsampler-2", ... in order. Refuses an order
    other than [prior], decoder, upsampler... (a ValueError naming it)."""
    roles = [stage.role for stage in stages]
    if roles.count("decoder") != 1 or roles.count("prior") > 1 or any(r not in ROLE_ORDER for r in roles) or \
            roles != sorted(roles, key=ROLE_ORDER.__getitem__):
        raise ValueError(f"a pipeline's stages go: an optional prior, one decoder, then upsamplers; got {roles}")
    names, upsamplers = [], 0
    for role in roles:
        upsamplers += role == "upsampler"
        names.append(f"upsampler-{upsamplers}" if role == "upsampler" else role)
    return names


def image_generators(n: int, device: torch.device | str, seed: int | None = None,
                     generator: Generators = None) -> Generators:
    """The generators of n images: `generator` as given (one for all, or a list of n), else one per image seeded
    from (seed, image index), so that an image depends on its index alone; None without seed or generator."""
    if generator is not None:
        if not isinstance(generator, torch.Generator) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} images: give one per image")
        return generator
    return None if seed is None else seeded_generators(n, seed, device)


def _read_pipeline_file(path: Path) -> tuple[PipelineFile, dict[str, Any]]:
    """Read and check `pipeline.json`: the file, and the sampling overrides it gives (applied over the stages' own
    defaults once they are loaded). Anything malformed is a one-line CheckpointError naming the file."""
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
        if version == 1:
            old = config_from_dict(PipelineFileV1, meta)
            stages = (old.stages.prior, old.stages.decoder, *old.stages.upsamplers)
            return PipelineFile(FORMAT_VERSION, old.stages.clip, stages, {}, old.clip_fingerprint,
                                old.image_sizes), v1_overrides(old)
        parsed = config_from_dict(PipelineFile, meta)
        return parsed, flatten_sampling(parsed.sampling)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


class UnclipPipeline(nn.Module):
    """A CLIP and its stages (see the module doc). Build from modules, `from_stages` or `from_pretrained`."""

    def __init__(self, clip: Clip, stages: Sequence[Stage], sampling: Sampling | None = None) -> None:
        super().__init__()
        self.clip = clip.freeze()
        self.stages = nn.ModuleList(list(stages)).eval()
        self.names = stage_names(list(self.stages))
        self._check_stages()
        self.sampling = self.complete_sampling(sampling or Sampling())

    # ----- construction -------------------------------------------------------------------------------------
    def _check_stages(self) -> None:
        """The stages' sizes chain: the prior and the decoder use the CLIP's embedding size, and each upsampler
        takes the side the stage before it makes."""
        d = self.clip.embed_dim
        for name, stage in self.named_stages():
            if stage.role != "upsampler" and stage.config.embed_dim != d:
                raise ValueError(f"the {name} uses {stage.config.embed_dim}-d embeddings, the CLIP's are {d}-d")
        side = self.decoder.config.image_size
        for name, stage in self.named_stages():
            if stage.role != "upsampler":
                continue
            low = stage.config.low_res_size
            if low != side:
                hint = " (upsamplers go lowest resolution first)" if low < side and name != "upsampler-1" else ""
                raise ValueError(f"{name} takes {low}px images but the stage before it makes {side}px ones{hint}")
            side = stage.config.image_size

    def complete_sampling(self, sampling: Sampling) -> Sampling:
        """`sampling` with every stage it does not name at that stage's own defaults; a name that is not one of the
        pipeline's stages is a ValueError, and so is a sampler that needs what its stage does not offer."""
        unknown = sorted(set(sampling.stages) - set(self.names))
        if unknown:
            raise ValueError(f"sampling settings for {unknown}, which this pipeline does not have (its stages: "
                             f"{', '.join(self.names)})")
        stages = {name: sampling.stages.get(name) or stage.default_sampling() for name, stage in self.named_stages()}
        for name, stage in self.named_stages():
            try:
                stage.check_sampling(stages[name])
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            offered = {k for k, v in stage.sampler_options().items() if v is not None}
            missing = [k for k, required in sampler_options(stages[name].sampler).items()
                       if required and k not in offered]
            if missing:
                raise ValueError(f"the {name}'s sampler {stages[name].sampler} needs {', '.join(missing)}, which this "
                                 f"{name} does not offer; choose another sampler")
        return replace(sampling, stages=stages)

    def named_stages(self) -> list[tuple[str, Stage]]:
        """(name, stage) in cascade order."""
        return list(zip(self.names, self.stages, strict=True))

    def _role(self, role: str) -> list[Stage]:
        return [stage for stage in self.stages if stage.role == role]

    @property
    def prior(self) -> Stage | None:
        """The prior (None in a pipeline without one, which decodes given image embeddings only)."""
        return next(iter(self._role("prior")), None)

    @property
    def decoder(self) -> Stage:
        return self._role("decoder")[0]

    @property
    def upsamplers(self) -> list[Stage]:
        """The upsamplers, lowest resolution first."""
        return self._role("upsampler")

    @property
    def image_size(self) -> int:
        """Side of the images `generate` returns (the last stage's)."""
        return self.stages[-1].config.image_size

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
        """Move every stage to `device`; cast the stages to `dtype` (e.g. torch.bfloat16 on CUDA). The CLIP stays
        float32 (tiny next to the rest; its normalised embeddings are what everything reads)."""
        if dtype is not None and device is not None and torch.device(device).type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 is not supported on the CPU; use torch.float32 or torch.bfloat16 there")
        self.clip.to(device)
        self.stages.to(device=device, dtype=dtype)
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
        meta, overrides = _read_pipeline_file(meta_path)
        stages = [_load_stage(path / sub, device, dtype) for sub in meta.stages]
        try:
            pipe = cls(Clip.from_pretrained(path / meta.clip), stages)
            pipe.sampling = pipe.complete_sampling(with_overrides(pipe.sampling, overrides))
        except ValueError as e:
            raise CheckpointError(f"{meta_path}: {e}") from None
        return pipe.to(device, dtype)

    @classmethod
    def from_stages(cls, clip: str | Path, stages: Sequence[str | Path],
                    sampling: Sampling | None = None) -> UnclipPipeline:
        """Assemble a pipeline from a CLIP directory and stage directories written by the train-* scripts (each
        OUTPUT_DIR/model), in cascade order. Refuses a stage trained on another CLIP's embeddings (its recorded
        fingerprint differs; stages saved without one are not checked)."""
        clip_model = Clip.from_pretrained(clip)
        loaded = [_load_stage(Path(p)) for p in stages]
        have = clip_model.fingerprint()
        for where, stage in zip(stages, loaded, strict=True):
            want = stage.clip_fingerprint
            if want is not None and want != have:
                raise CheckpointError(f"the {stage.role} {where} was trained on the embeddings of another CLIP "
                                      f"(fingerprint {want}) than {clip} ({have})")
        return cls(clip_model, loaded, sampling)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the pipeline directory atomically; `dtype` (e.g. torch.float16) casts the stored float weights.
        An existing `path` is replaced only if it is empty or holds a pipeline (pipeline.json)."""
        with atomic_directory(path, replaces=PIPELINE_FILE) as tmp:
            self.clip.save_pretrained(tmp / "clip", dtype=dtype)  # a cast copy keeps its fingerprint
            for name, stage in self.named_stages():
                stage.save_pretrained(tmp / name, dtype=dtype)
            sizes = tuple(s.config.image_size for s in self.stages if s.role != "prior")
            write_json_atomic(tmp / PIPELINE_FILE, config_to_dict(PipelineFile(
                FORMAT_VERSION, "clip", tuple(self.names), config_to_dict(self.sampling), self.clip.fingerprint(),
                sizes)))
        return Path(path)

    # ----- generation ---------------------------------------------------------------------------------------
    def resolve_sampling(self, sampling: Sampling | Mapping[str, Any] | None = None, **settings: Any) -> Sampling:
        """The settings one call samples with: `sampling` (a whole `Sampling`, or overrides such as
        {"decoder.guidance": 4}) over the pipeline's own, then the keyword `settings` (`decoder_guidance=4`,
        `upsampler_steps=[3, 2]`, `sampler="ddim"`, `best_of=4`; None: not given). See `unclip.settings`."""
        if isinstance(sampling, Sampling):
            base, overrides = self.complete_sampling(sampling), {}
        else:
            base, overrides = self.sampling, dict(sampling or {})
        return self.complete_sampling(with_overrides(base, {**overrides, **settings}))

    def encode_text(self, captions: Sequence[str]):
        """The CLIP's `TextEncoding` of the captions, on the pipeline's device and dtype."""
        return self.clip.encode_text(list(captions)).to(self.device, self.dtype)

    @torch.no_grad()
    def generate_tensors(self, texts: str | Sequence[str], num_images: int = 1, *, seed: int | None = None,
                         generator: Generators = None, sampling: Sampling | Mapping[str, Any] | None = None,
                         callback: StepCallback | None = None, progress: bool = False, **settings: Any) -> Tensor:
        """Images (len(texts) * num_images, 3, S, S) in [0, 1], caption-major; see `generate` for the arguments."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise CaptionError("no captions given")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a whole number >= 1, got {num_images!r}")
        if self.prior is None:
            raise ValueError("this pipeline has no prior, so it cannot turn captions into images; it decodes image "
                             "embeddings (vary, interpolate, text_diff)")
        s = self.resolve_sampling(sampling, **settings)
        captions = [t for t in texts for _ in range(num_images)]
        run = SamplingRun(generator=image_generators(len(captions), self.device, seed, generator), callback=callback,
                          progress=progress, best_of=s.best_of)
        state = CascadeState(text=self.encode_text(captions))  # one row per image, caption-major
        with self.autocast():
            for name, stage in self.named_stages():
                state = stage.sample(state, s.of(name), run, name=name)
        return state.images.float()

    @torch.no_grad()
    def upsample(self, images: Tensor, *, sampling: Sampling | Mapping[str, Any] | None = None,
                 generator: Generators = None, callback: StepCallback | None = None, progress: bool = False) -> Tensor:
        """Run the upsamplers on decoder-side images (b, 3, s, s) in [0, 1]: (b, 3, S, S) in [0, 1], with
        `sampling` (as in `resolve_sampling`; default: the pipeline's)."""
        s = self.resolve_sampling(sampling)
        run = SamplingRun(generator=generator, callback=callback, progress=progress)
        state = CascadeState(images=images.to(self.device, self.dtype))
        with self.autocast():
            for name, stage in self.named_stages():
                if stage.role == "upsampler":
                    state = stage.sample(state, s.of(name), run, name=name)
        return state.images.float()

    def generate(self, texts: str | Sequence[str], num_images: int = 1, *, seed: int | None = None,
                 generator: Generators = None, sampling: Sampling | Mapping[str, Any] | None = None,
                 callback: StepCallback | None = None, progress: bool = False,
                 **settings: Any) -> list[Image.Image]:
        """Generate `num_images` PIL images per caption (len(texts) * num_images, caption-major).

        seed: each image gets its own generator seeded from (seed, its index), so an image does not change when
        captions are added after it; generator: one per image (or one for all) instead. sampling / settings: see
        `resolve_sampling` (unset settings take the pipeline's `sampling`). callback(stage, step, t, x_t, denoised)
        is called after every denoiser call of every stage; progress: a progress bar per stage.
        """
        images = self.generate_tensors(texts, num_images, seed=seed, generator=generator, sampling=sampling,
                                       callback=callback, progress=progress, **settings)
        return [tensor_to_pil(im) for im in images]


def _load_stage(path: Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Stage:
    """The stage in `path`, of the kind its config.json names."""
    return stage_class(stage_kind(path)).from_pretrained(path, device, dtype)

