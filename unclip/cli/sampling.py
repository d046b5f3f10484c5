"""The sampling flags of `unclip generate` and `unclip eval`, built from the fields of `unclip.settings.StageSampling`.

    unclip generate "a red circle" --sampler ddim --prior-steps 6 --decoder-guidance 3 --upsampler-steps 3 2
    unclip generate "a red circle" --set decoder.guidance=4 --set "upsampler.steps=[3, 2]" --set best_of=4

Each field of `StageSampling` is a flag for each of the prior, the decoder and the upsamplers (`--prior-steps`,
`--decoder-eta`, `--upsampler-sampler`, ...), typed and explained by the field itself; an upsampler flag takes one
value for every upsampler or one per upsampler. `--sampler` is every stage's sampler but for a stage whose own flag
names one, `--best-of` the prior's best-of, and `--set KEY=VALUE` any setting `unclip.settings.with_overrides`
reads. `sampling_overrides(args)` gathers them, in command-line order (a later one wins), into the one overrides
mapping that `UnclipPipeline.generate(sampling=...)` takes. A field added to `StageSampling` is a flag here too.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import yaml

from ..diffusion import SAMPLERS
from ..settings import UPSAMPLER_GROUP, SamplerField, StageSampling, sampling_fields
from .common import parse_assignment

__all__ = ["STAGE_GROUPS", "add_sampling_arguments", "sampling_overrides"]

STAGE_GROUPS = ("prior", "decoder", UPSAMPLER_GROUP)  # each field's flags: --prior-FIELD, --decoder-FIELD, ...
DEST = "sampling_overrides"  # where the flags gather (key, value) pairs on the parsed namespace
SET_EXAMPLE = "decoder.guidance=3"


class _Override(argparse.Action):
    """Appends (setting key, value) to the namespace's list at `dest`; `key` None: a raw --set item, read later."""

    def __init__(self, option_strings: Sequence[str], dest: str, key: str | None = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if isinstance(values, list) and len(values) == 1:
            values = values[0]  # one value for every upsampler
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (self.key, values)])


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Add the sampling flags (module doc) to `p`; the sampler flags offer the samplers registered now."""
    g = p.add_argument_group("sampling (default: the pipeline's own settings)")
    g.add_argument("--sampler", action=_Override, dest=DEST, key="sampler", choices=list(SAMPLERS),
                   help="every stage's sampler, but for a stage whose own --STAGE-sampler is given")
    g.add_argument("--best-of", action=_Override, dest=DEST, key="best_of", type=int, metavar="N",
                   help="prior samples per image; the one closest to the caption's text embedding is kept")
    hints = get_type_hints(StageSampling, include_extras=True)
    for group in STAGE_GROUPS:
        for f in sampling_fields():
            _add_field_flag(g, group, f, hints[f.name])
    g.add_argument("--set", action=_Override, dest=DEST, metavar="KEY=VALUE",
                   help=f"any sampling setting, the value read as YAML (repeatable): {SET_EXAMPLE}, "
                        "upsampler-2.steps=2, 'upsampler.steps=[3, 2]', sampler=ddim, best_of=4")


def _add_field_flag(g: argparse._ArgumentGroup, group: str, f: dataclasses.Field, hint: Any) -> None:
    """--GROUP-FIELD for the field `f` of `StageSampling` (of type `hint`)."""
    is_sampler = hint == SamplerField
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    kind = base if base in (int, float, str) else _yaml_value
    many = group == UPSAMPLER_GROUP
    text = f.metadata["help"] + ("; one value for every upsampler, or one per upsampler" if many else "")
    g.add_argument(f"--{group}-{f.name.replace('_', '-')}", action=_Override, dest=DEST, key=f"{group}.{f.name}",
                   type=kind, choices=list(SAMPLERS) if is_sampler else None, nargs="+" if many else None,
                   metavar=None if is_sampler else f.name.upper(),  # a sampler flag shows its choices
                   help=text.replace("%", "%%"))  # argparse formats help with %


def _yaml_value(text: str) -> Any:
    """An argparse type: the value read as YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not a valid YAML value: {text!r}") from None


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags and --set items given, as one overrides mapping ({"decoder.guidance": 3.0, ...}) in
    command-line order; a malformed --set item is a CliError."""
    overrides: dict[str, Any] = {}
    for key, value in getattr(args, DEST) or ():
        if key is None:
            key, value = parse_assignment(value, SET_EXAMPLE)
        overrides.pop(key, None)  # a later one wins, also over another spelling given before it
        overrides[key] = value
    return overrides
