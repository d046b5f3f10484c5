"""Reading `pipeline.json` files of format 1, whose sampling settings were one flat record for the whole pipeline.

    old = config_from_dict(PipelineFileV1, json.loads(text))
    overrides = v1_overrides(old)          # {"decoder.steps": 25, "upsampler.steps": [3, 2], ...}

A format-1 `sampler` was the decoder's, and the prior's and upsamplers' unless `prior_sampler` /
`upsampler_sampler` named theirs; its `upsampler_steps` was one count per upsampler, or () for each upsampler's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..diffusion import SAMPLERS, sampler_options

__all__ = ["PipelineFileV1", "v1_overrides"]


@dataclass(frozen=True)
class StagesV1:
    """Where each stage lived in a format-1 pipeline directory."""

    clip: str
    prior: str
    decoder: str
    upsamplers: tuple[str, ...] = ()


@dataclass(frozen=True)
class DefaultsV1:
    """A format-1 pipeline's generation defaults."""

    sampler: str = "ddim"
    prior_sampler: str | None = None
    upsampler_sampler: str | None = None
    prior_steps: int = 64
    prior_guidance: float = 1.0
    best_of: int = 2
    decoder_steps: int = 50
    decoder_guidance: float = 3.0
    decoder_eta: float = 0.0
    upsampler_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class PipelineFileV1:
    """The contents of a format-1 `pipeline.json`."""

    format_version: int
    stages: StagesV1
    defaults: DefaultsV1 = field(default_factory=DefaultsV1)
    clip_fingerprint: str | None = None
    image_sizes: tuple[int, ...] = ()


def v1_overrides(old: PipelineFileV1) -> dict[str, Any]:
    """The sampling overrides (`unclip.settings.with_overrides`) that say what a format-1 file's defaults said. A
    stored eta the decoder's sampler does not take was never used, and is left out."""
    d = old.defaults
    eta = d.decoder_eta if d.sampler not in SAMPLERS or "eta" in sampler_options(d.sampler) else None
    steps = list(d.upsampler_steps) or None
    if steps is not None and len(steps) != len(old.stages.upsamplers):
        raise ValueError(f"defaults.upsampler_steps gives {len(steps)} step count(s) for "
                         f"{len(old.stages.upsamplers)} upsampler(s) in stages.upsamplers")
    overrides = {"best_of": d.best_of, "prior.sampler": d.prior_sampler or d.sampler, "prior.steps": d.prior_steps,
                 "prior.guidance": d.prior_guidance, "decoder.sampler": d.sampler, "decoder.steps": d.decoder_steps,
                 "decoder.guidance": d.decoder_guidance, "decoder.eta": eta}
    if old.stages.upsamplers:
        overrides |= {"upsampler.sampler": d.upsampler_sampler or d.sampler, "upsampler.steps": steps}
    return overrides
