"""The stage protocol: what the prior, the decoder and the upsamplers implement, and any new kind of stage.

    state = CascadeState(text=clip.encode_text(captions))
    for name, stage in pipeline.named_stages():                        # prior, decoder, upsampler-1, ...
        state = stage.sample(state, sampling.of(name), run, name=name)
    images = state.images                                              # (b, 3, S, S) in [0, 1]

A stage has a `role`, which says what it reads from the `CascadeState` and what it writes there:

    "prior"      text (caption encodings)            -> image_embed (b, d)
    "decoder"    image_embed (and text, if it reads it) -> images (b, 3, s, s)
    "upsampler"  images (b, 3, s, s)                 -> images (b, 3, s * k, s * k)

and a `kind`, the name its `config.json` is saved under and its class is found by (`register_stage`, or the
`unclip.stages` entry points that this package's own stages are declared under in pyproject.toml). Its sampling
turns the state into its conditioning, makes a `Denoiser` of that conditioning under a `StageSampling`
(`Stage.denoiser`: the one place guidance, thresholding and the network's parameterisation meet), and walks it with
a registered sampler (`run_sampler`, shared by every stage). `SamplingRun` carries what the stages of one generation
share: the generators (one per image, so that an image does not depend on the others in its batch), the per-step
callback and the progress bars.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from .checkpoint import CONFIG_NAME, CheckpointError
from .clip import TextEncoding
from .diffusion import Callback, Denoised, Denoiser, Generators, NoiseSchedule, sample
from .nn import eval_mode
from .settings import StageSampling, sampling_fields

__all__ = [
    "CascadeState",
    "Role",
    "SamplingRun",
    "Stage",
    "StepCallback",
    "register_stage",
    "run_sampler",
    "stage_class",
    "stage_kind",
    "unregister_stage",
]

Role = Literal["prior", "decoder", "upsampler"]
StepCallback = Callable[[str, int, int, Tensor, Denoised], None]  # (stage name, step index, t, x_t (b, *), denoised)
ENTRY_POINT_GROUP = "unclip.stages"
STAGE_FIELDS = ("sampler", "steps", "guidance")  # the StageSampling fields the stage itself reads


@dataclass(frozen=True)
class CascadeState:
    """What the stages hand each other, one row per image (caption-major)."""

    text: TextEncoding | None = None  # the captions' CLIP encoding
    image_embed: Tensor | None = None  # (b, d) unit-norm CLIP image embeddings: the prior's output
    images: Tensor | None = None  # (b, 3, s, s) in [0, 1]: the decoder's and then each upsampler's output

    def but(self, **changes: Any) -> CascadeState:
        """A copy with `changes`."""
        return replace(self, **changes)


@dataclass(frozen=True)
class SamplingRun:
    """What the stages of one generation share."""

    generator: Generators = None  # one per image (each image's rows drawn from its own), one for all, or None
    callback: StepCallback | None = None  # called after every denoiser call of every stage
    progress: bool = False  # a progress bar per stage
    best_of: int = 1  # prior samples per image (the closest to its caption's text embedding is kept)

    def step_callback(self, stage: str) -> Callback | None:
        """The sampler's callback for the stage called `stage` (None without a callback)."""
        if self.callback is None:
            return None
        callback = self.callback
        return lambda i, t, x_t, denoised: callback(stage, i, t, x_t, denoised)


@runtime_checkable
class Stage(Protocol):
    """A diffusion stage of the cascade (an `nn.Module`). See the module doc.

    Its `config` says its sizes, which the pipeline checks when it chains stages: `embed_dim` (the CLIP embedding
    size a prior makes and a decoder reads), `image_size` (the side a decoder or an upsampler makes) and an
    upsampler's `low_res_size` (the side it takes)."""

    role: ClassVar[Role]
    kind: ClassVar[str]
    config: Any

    @property
    def clip_fingerprint(self) -> str | None:
        """The fingerprint of the CLIP whose embeddings the stage was trained on (`Clip.fingerprint`); None when it
        reads no CLIP embedding (an upsampler) or was saved without one."""

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule it was trained with."""

    def default_sampling(self) -> StageSampling:
        """How it samples when nothing else is said."""

    def check_sampling(self, spec: StageSampling) -> None:
        """A ValueError for settings it cannot sample with (e.g. guidance for a stage without a caption), so that
        a pipeline refuses them before any stage runs."""

    def sampler_options(self) -> dict[str, Any]:
        """What it offers the samplers beyond the common convention, e.g. {"variance": "learned_range"}."""

    def denoiser(self, cond: Mapping[str, Any], spec: StageSampling) -> Denoiser:
        """Its network under the conditioning `cond` (as `sample` builds it) and the settings `spec` (guidance):
        a `Denoiser` (x_t (b, *), t (b,)) -> Denoised for the shared samplers."""

    def sample(self, state: CascadeState, spec: StageSampling, run: SamplingRun, *, name: str,
               x_T: Tensor | None = None) -> CascadeState:
        """The state with this stage's output added; x_T: the starting noise (None: drawn from run.generator)."""

    def save_pretrained(self, path: str | Path, dtype: Any = None) -> Path:
        """Write `config.json` (with `kind`) and `model.safetensors`; dtype: of the stored float weights."""

    @classmethod
    def from_pretrained(cls, path: str | Path, device: Any = None, dtype: Any = None) -> Stage:
        """Load what `save_pretrained` wrote, in eval mode, on `device` in `dtype`."""


@torch.no_grad()
def run_sampler(stage: Stage, name: str, spec: StageSampling, x_T: Tensor, cond: Mapping[str, Any],
                run: SamplingRun) -> Tensor:
    """Walk `stage`'s denoiser under `cond` and `spec` from x_T (b, *) to x0 (b, *) with `spec.sampler`, after
    `stage.check_sampling(spec)`. The sampler is offered every field of `spec` beyond those every stage reads
    (sampler, steps, guidance: e.g. DDIM's eta) and the stage's own options; it takes those it has. The progress bar
    and the callback are named `name`."""
    stage.check_sampling(spec)
    offered = {f.name: getattr(spec, f.name) for f in sampling_fields() if f.name not in STAGE_FIELDS}
    with eval_mode(stage):
        denoiser = stage.denoiser(cond, spec)
        return sample(spec.sampler, denoiser, x_T, stage.schedule, spec.steps,
                      options={**offered, **stage.sampler_options()}, generator=run.generator,
                      callback=run.step_callback(name), progress=run.progress, label=name)


_REGISTERED: dict[str, type] = {}


def register_stage(cls: type) -> type:
    """Make a stage class loadable by its `kind` (usable as a class decorator); a kind taken by another class is a
    ValueError. This package's own stages are found through the `unclip.stages` entry points instead."""
    kind = cls.kind
    if _REGISTERED.get(kind, cls) is not cls:
        raise ValueError(f"a stage of kind {kind!r} is registered already ({_REGISTERED[kind].__qualname__})")
    _REGISTERED[kind] = cls
    return cls


def unregister_stage(kind: str) -> None:
    """Forget a kind `register_stage` registered (nothing happens for one it did not)."""
    _REGISTERED.pop(kind, None)


def stage_class(kind: str) -> type:
    """The class of stages of `kind`: registered with `register_stage`, or declared as an `unclip.stages` entry
    point (the prior, the decoder and the upsampler are). An unknown kind is a CheckpointError naming the known."""
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if kind in found:
        return found[kind].load()
    known = sorted({*_REGISTERED, *found})
    raise CheckpointError(f"no stage of kind {kind!r} is known (known: {', '.join(known) or 'none'}); register its "
                          "class with unclip.stage.register_stage or install the package that provides it")


def stage_kind(path: str | Path) -> str:
    """The `kind` a stage directory's config.json names (CheckpointError when it has none)."""
    config = Path(path) / CONFIG_NAME
    try:
        kind = json.loads(config.read_text()).get("kind")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a stage directory: {CONFIG_NAME} is missing") from None
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{config} cannot be read: {e}") from None
    if not isinstance(kind, str):
        raise CheckpointError(f"{config} names no stage kind")
    return kind
