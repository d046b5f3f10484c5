"""The samplers by name: the one place a name maps to a sampler function, for stages that let their caller choose.

    x0 = sample("ddpm", denoiser, x_T, schedule, 250, options={"variance": "learned_range"}, generator=g)

Every registered sampler follows the common calling convention (`unclip.diffusion.samplers`),
`fn(denoiser, x_T, schedule, steps, *, spacing, generator, cond, callback, progress, label, **options)`, where the
options are its own keyword arguments (DDIM's `eta`, DDPM's `variance`, Analytic-DPM's `moments`). A new sampler is
one such function and one `register_sampler` line:

    @register_sampler("euler")
    def sample_euler(denoiser, x_T, schedule, steps, *, spacing="trailing", generator=None, cond=None,
                     callback=None, progress=True, label=None): ...

A stage offers the options it has (`options={"variance": ..., "moments": ...}`); `sample` passes each sampler the
ones it takes, ignores the rest, and refuses to run a sampler whose required option is missing (None counts as
missing).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from unclip.diffusion.analytic import sample_analytic_ddpm
from unclip.diffusion.denoiser import Denoiser
from unclip.diffusion.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde
from unclip.diffusion.schedule import NoiseSchedule

__all__ = ["SAMPLERS", "SamplerName", "register_sampler", "sample", "sampler_options"]

SamplerName = str  # any key of SAMPLERS
CONVENTION = ("spacing", "generator", "cond", "callback", "progress", "label")  # every sampler's common keywords

SAMPLERS: dict[SamplerName, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "analytic_ddpm": sample_analytic_ddpm,
}


def register_sampler(
    name: SamplerName, fn: Callable[..., Tensor] | None = None, *, replace: bool = False
) -> Callable[..., Any]:
    """Add `fn` to SAMPLERS as `name` and return it; without `fn`, a decorator that does so.

    A name already taken by another function is an error unless `replace`. The function must take the common
    keywords (module doc).
    """
    if fn is None:
        return lambda f: register_sampler(name, f, replace=replace)
    missing = [k for k in CONVENTION if k not in inspect.signature(fn).parameters]
    if missing:
        raise ValueError(f"sampler {name!r} does not take the common keyword(s) {', '.join(missing)}")
    if SAMPLERS.get(name, fn) is not fn and not replace:
        raise ValueError(f"sampler {name!r} is already registered (to {SAMPLERS[name].__qualname__}); "
                         "pass replace=True to replace it")
    SAMPLERS[name] = fn
    return fn


def _lookup(name: SamplerName) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_options(name: SamplerName) -> dict[str, bool]:
    """The keyword options sampler `name` takes beyond the common convention, each mapped to whether it is required
    (has no default): {"eta": False} for "ddim", {"moments": True} for "analytic_ddpm"."""
    params = inspect.signature(_lookup(name)).parameters.values()
    return {p.name: p.default is p.empty for p in params if p.kind is p.KEYWORD_ONLY and p.name not in CONVENTION}


def sample(
    name: SamplerName,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    options: Mapping[str, Any] | None = None,
    **common: Any,
) -> Tensor:
    """Run the sampler registered as `name` for `steps` steps from x_T (b, *) to x0 (b, *).

    options: what the caller offers (module doc); a value of None is not offered. common: the convention's keywords
    (spacing, generator, cond, callback, progress, label), passed through.
    """
    fn = _lookup(name)
    unknown = sorted(set(common) - set(CONVENTION))
    if unknown:
        raise TypeError(f"sample() got unexpected keyword(s) {', '.join(unknown)}; a sampler's own options go in "
                        "`options`")
    offered = {k: v for k, v in (options or {}).items() if v is not None}
    takes = sampler_options(name)
    for option, required in takes.items():
        if required and option not in offered:
            raise ValueError(f"sampler {name!r} needs `{option}`, which was not provided")
    return fn(denoiser, x_T, schedule, steps, **common, **{k: v for k, v in offered.items() if k in takes})
