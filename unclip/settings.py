"""Sampling settings, defined once: one typed record per diffusion stage, plus the pipeline-wide best-of.

    spec = StageSampling(sampler="ddpm", steps=25, guidance=3.0)        # how one stage samples
    sampling = Sampling(best_of=2, stages={"prior": ..., "decoder": spec, "upsampler-1": ...})
    sampling = with_overrides(sampling, {"decoder.guidance": 4, "upsampler.steps": [3, 2], "best_of": 4})

Every place that takes sampling settings reads them from these two records: `pipeline.json` (through the strict
config loader), `UnclipPipeline.generate(...)` keywords, the CLI's flags and `--set`, the demo and `unclip.generate`;
a field other than sampler, steps and guidance reaches every sampler that has a keyword of its name (eta: DDIM's).
An override names a stage and a field of `StageSampling`, dotted (`decoder.guidance`) or as a keyword
(`decoder_guidance`); `upsampler` (or `upsamplers`) means every upsampler, with one value for all or a list with
one per upsampler; `sampler` alone sets every stage's sampler (except a stage whose sampler the same overrides set);
`best_of` is the pipeline-wide one. Adding a setting is adding a field to `StageSampling`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from .config import ConfigError, config_from_dict, config_to_dict
from .diffusion import SAMPLERS, sampler_options

__all__ = ["Sampling", "SamplerField", "StageSampling", "check_sampler", "flatten_sampling", "read_sampling_file",
           "sampling_fields", "with_overrides", "UPSAMPLER_GROUP"]

UPSAMPLER_GROUP = "upsampler"  # names every stage called "upsampler-<i>" in an override


def check_sampler(name: str, where: str = "sampler") -> None:
    """ConfigError unless `name` is a registered sampler (`unclip.diffusion.SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ConfigError(f"{where}: {name!r} is not a registered sampler; expected one of {', '.join(SAMPLERS)}")


SamplerField = Annotated[str, check_sampler]  # a config field naming a sampler, checked when the config is read


@dataclass(frozen=True)
class StageSampling:
    """How one diffusion stage samples. Each field's `help` is what the CLI shows for it."""

    sampler: SamplerField = field(default="ddim", metadata={
        "help": "a registered sampler (unclip.diffusion.SAMPLERS; analytic_ddpm needs a calibrated prior)"})
    steps: int = field(default=50, metadata={"help": "denoiser calls (the stage's timesteps respaced)"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance scale (1: none)"})
    eta: float = field(default=0.0, metadata={
        "help": "DDIM's noise in [0, 1] (0: deterministic given x_T); only samplers that take eta"})

    def __post_init__(self) -> None:
        check_sampler(self.sampler)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if not (_is_number(self.guidance) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0 (1: no guidance), got {self.guidance!r}")
        if not (_is_number(self.eta) and 0 <= self.eta <= 1):
            raise ValueError(f"eta (DDIM's noise) must lie in [0, 1], got {self.eta!r}")
        if self.eta and "eta" not in sampler_options(self.sampler):
            raise ValueError(f"eta applies to samplers that take it (ddim); the sampler is {self.sampler}")

    def given(self, **changes: Any) -> StageSampling:
        """A copy with the `changes` that are not None (a one-call function's arguments over a stage's defaults)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Sampling:
    """Every sampling setting of a pipeline: best-of for the prior, and one `StageSampling` per stage by name."""

    best_of: int = 2  # prior samples per image; the one closest to the caption's text embedding is kept (paper: 2)
    stages: dict[str, StageSampling] = field(default_factory=dict)  # "prior", "decoder", "upsampler-1", ...

    def __post_init__(self) -> None:
        if isinstance(self.best_of, bool) or not isinstance(self.best_of, int) or self.best_of < 1:
            raise ValueError(f"best_of must be a whole number >= 1, got {self.best_of!r}")

    def of(self, stage: str) -> StageSampling:
        """The settings of the stage called `stage`."""
        if stage not in self.stages:
            raise KeyError(f"no sampling settings for a stage {stage!r}; stages: {', '.join(self.stages)}")
        return self.stages[stage]


def sampling_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of `StageSampling`: what each stage can be told (the CLI builds its flags from them)."""
    return dataclasses.fields(StageSampling)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _upsamplers(names: Sequence[str]) -> list[str]:
    """The names of the upsampler stages ("upsampler-1", ...) among `names`."""
    return [n for n in names if n.startswith(UPSAMPLER_GROUP + "-")]


def _groups(names: Sequence[str]) -> list[str]:
    """What an override's STAGE may be: a stage's name, or the upsampler group when there are upsamplers."""
    return [*names, UPSAMPLER_GROUP] if _upsamplers(names) else list(names)


def _targets(target: str, names: Sequence[str]) -> list[str]:
    if target in names:
        return [target]
    if target in (UPSAMPLER_GROUP, UPSAMPLER_GROUP + "s"):
        return _upsamplers(names)
    raise KeyError(target)


def _split_key(key: str) -> tuple[str, str] | None:
    """'decoder.guidance' or 'decoder_guidance' -> ('decoder', 'guidance'); None if no field name ends it."""
    fields = "|".join(f.name for f in sampling_fields())
    match = re.fullmatch(rf"(.+?)[._]({fields})", key)
    return (match[1], match[2]) if match else None


def _known_keys(names: Sequence[str]) -> list[str]:
    return ["best_of", "sampler", *(f"{g}.{f.name}" for g in _groups(names) for f in sampling_fields())]


def _valid_keys(names: Sequence[str]) -> str:
    return (f"best_of, sampler, or STAGE.FIELD with STAGE one of {', '.join(_groups(names))} and FIELD one of "
            f"{', '.join(f.name for f in sampling_fields())}")


def with_overrides(sampling: Sampling, overrides: Mapping[str, Any]) -> Sampling:
    """`sampling` with `overrides` applied (see the module doc; None values are not given). Unknown keys, a list
    for one stage, a list whose length is not the number of upsamplers, and values out of range are ValueErrors
    naming the setting. A stage whose sampler is overridden without its eta keeps eta only if the new sampler
    takes it."""
    names = list(sampling.stages)
    given: dict[str, dict[str, Any]] = {name: {} for name in names}
    best_of, every_sampler = sampling.best_of, None
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "best_of":
            best_of = value
            continue
        if key == "sampler":
            every_sampler = value
            continue
        split = _split_key(key)
        try:
            targets = _targets(split[0], names) if split else None
        except KeyError:
            targets = None
        if not targets:
            close = difflib.get_close_matches(key, _known_keys(names), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown sampling setting {key!r}.{hint} Expected {_valid_keys(names)}")
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(targets)
        if isinstance(value, (list, tuple)) and split[0] in names:
            raise ValueError(f"{key} gives {len(values)} values for one stage")
        if len(values) != len(targets):
            raise ValueError(f"{key} gives {len(values)} values for {len(targets)} upsampler(s)")
        for name, v in zip(targets, values, strict=True):
            given[name][split[1]] = v
    stages = {}
    for name, spec in sampling.stages.items():
        changes = given[name]
        if every_sampler is not None:
            changes.setdefault("sampler", every_sampler)
        new_sampler = changes.get("sampler")
        if new_sampler in SAMPLERS and "eta" not in changes and "eta" not in sampler_options(new_sampler):
            changes["eta"] = 0.0  # a stored eta does not carry over to a sampler without that noise
        if changes:  # read as strictly as a config file: types, then the record's own checks
            stages[name] = config_from_dict(StageSampling, {**config_to_dict(spec), **changes}, where=name)
        else:
            stages[name] = spec
    return Sampling(best_of=best_of, stages=stages)


def flatten_sampling(data: Mapping[str, Any], where: str = "sampling") -> dict[str, Any]:
    """The overrides a `Sampling`-shaped mapping gives ({"best_of": 4, "stages": {"decoder": {"steps": 10}}} ->
    {"best_of": 4, "decoder.steps": 10}): how a file's sampling settings apply over each stage's own defaults, so
    that a stage named with some of its fields keeps its defaults for the others. Keys other than best_of and stages
    are ConfigErrors naming them; unknown stages and fields are refused when the overrides are applied."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with best_of and stages, got {data!r}")
    unknown = sorted(set(data) - {"best_of", "stages"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected best_of and stages")
    stages = data.get("stages") or {}
    if not isinstance(stages, Mapping) or not all(isinstance(v, Mapping) for v in stages.values()):
        raise ConfigError(f"{where}.stages: expected a mapping of stage names to their settings, got {stages!r}")
    flat = {f"{name}.{key}": value for name, spec in stages.items() for key, value in spec.items()}
    return {"best_of": data.get("best_of"), **flat}


def read_sampling_file(path: str | Path) -> dict[str, Any]:
    """The overrides a `Sampling`-shaped YAML file gives (configs/pipeline/*.yaml; `flatten_sampling`): a stage it
    names keeps its own defaults for the fields the file leaves out. A missing file or malformed YAML is a
    ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sampling file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return flatten_sampling(data, where=str(path))
