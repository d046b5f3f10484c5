"""The adapter between a raw network and the samplers: whatever the network predicts, a `Denoised`.

    denoiser = make_denoiser(model, schedule, "v", x0_hook=dynamic_threshold)
    d = denoiser(x_t, t, image_embed=e)     # Denoised(x0=(b, *), eps=(b, *), var_interp=None)

A network is any `model_fn(x_t, t, **cond) -> (b, *)` (or (b, 2c, ...) with a learned variance: the first half
of dim 1 is the prediction, the second half the variance interpolation v in [-1, 1]). The denoiser turns the
prediction into x0 and eps that agree with each other and with x_t: x_t = sqrt(alpha-bar) x0 + sqrt(1-alpha-bar) eps.
An `x0_hook` (clipping, thresholding) edits x0 first and eps is then recomputed from it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from unclip.diffusion.gaussian import (
    Objective,
    VarianceType,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
)
from unclip.diffusion.schedule import NoiseSchedule

__all__ = [
    "Denoised",
    "Denoiser",
    "make_denoiser",
    "denoised_from_output",
    "static_clip",
    "dynamic_threshold",
    "norm_clip",
    "threshold_hook",
]


@dataclass(frozen=True, eq=False)
class Denoised:
    """What a denoiser says about x_t: the clean sample and the noise it implies, and maybe a variance."""

    x0: Tensor  # (b, *) predicted clean sample (after the x0 hook)
    eps: Tensor  # (b, *) the noise consistent with x0 and x_t
    var_interp: Tensor | None = None  # (b, *) learned_range v in [-1, 1]; the sampler maps it to a log-variance


Denoiser = Callable[..., Denoised]  # denoiser(x_t (b, *), t (b,) long, **cond) -> Denoised


def make_denoiser(
    model_fn: Callable[..., Tensor],
    schedule: NoiseSchedule,
    objective: Objective,
    *,
    variance: VarianceType = "fixed_small",
    x0_hook: Callable[[Tensor], Tensor] | None = None,
) -> Denoiser:
    """Wrap `model_fn(x_t, t, **cond)` predicting eps, x0 or v (`objective`) into a `Denoiser`.

    With variance="learned_range" the network's output has twice x_t's channels (dim 1): the prediction, then v
    in [-1, 1] (returned as `var_interp`). Fixed variances need nothing from the network; the sampler is told
    which one to use. x0_hook: (b, *) -> (b, *) applied to the predicted x0, after which eps is recomputed.
    """
    if objective not in ("eps", "x0", "v"):
        raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'x0' or 'v'")
    if variance not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"unknown variance {variance!r}; expected 'fixed_small', 'fixed_large' or 'learned_range'")

    def denoiser(x_t: Tensor, t: Tensor, **cond: Any) -> Denoised:
        assert t.ndim == 1 and t.shape[0] == x_t.shape[0], f"t must be (b,) = ({x_t.shape[0]},), got {tuple(t.shape)}"
        out = model_fn(x_t, t, **cond)
        var_interp = None
        if variance == "learned_range":
            c = x_t.shape[1]
            assert out.shape[1] == 2 * c, f"learned_range: expected 2 x {c} channels, got {out.shape[1]}"
            out, var_interp = out.chunk(2, dim=1)  # (b, 2c, ...) -> 2 x (b, c, ...)
        assert out.shape == x_t.shape, f"model output {tuple(out.shape)} does not match x_t {tuple(x_t.shape)}"
        return denoised_from_output(out, x_t, t, schedule, objective, x0_hook=x0_hook, var_interp=var_interp)

    return denoiser


def denoised_from_output(
    out: Tensor,
    x_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    objective: Objective,
    *,
    x0_hook: Callable[[Tensor], Tensor] | None = None,
    var_interp: Tensor | None = None,
) -> Denoised:
    """Convert one prediction (b, *) of kind `objective` at (x_t (b, *), t (b,)) into a consistent `Denoised`."""
    if objective == "eps":
        x0, eps = predict_x0_from_eps(schedule, x_t, t, out), out
    elif objective == "x0":
        x0, eps = out, predict_eps_from_x0(schedule, x_t, t, out)
    else:
        x0, eps = predict_x0_from_v(schedule, x_t, t, out), predict_eps_from_v(schedule, x_t, t, out)
    if x0_hook is not None:
        x0 = x0_hook(x0)
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    return Denoised(x0=x0, eps=eps, var_interp=var_interp)


def static_clip(x0: Tensor) -> Tensor:
    """Clamp x0 (b, *) to [-1, 1] (DDPM's clipping for data scaled to [-1, 1])."""
    return x0.clamp(-1.0, 1.0)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding of x0 (b, *).

    Per sample s = max(1, quantile(|x0|, percentile)); x0 -> clamp(x0, -s, s) / s. A sample already inside
    [-1, 1] is left as it is; any other is pulled into [-1, 1] with its signs kept. Use
    `functools.partial(dynamic_threshold, percentile=0.99)` for another percentile.
    """
    flat = rearrange(x0.abs(), "b ... -> b (...)").float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0.dtype)  # (b,)
    s = s.view(-1, *([1] * (x0.ndim - 1)))  # (b,) -> (b, 1, ..., 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def norm_clip(x0: Tensor, max_norm: float = 1.0) -> Tensor:
    """Scale every sample of x0 (b, *) whose L2 norm (over all non-batch dims) exceeds max_norm down to max_norm.

    For embedding-valued diffusion (the prior) where x0 has a known norm; use `functools.partial` to set it.
    """
    norm = rearrange(x0, "b ... -> b (...)").norm(dim=1).clamp(min=1e-12)  # (b,)
    scale = (max_norm / norm).clamp(max=1.0).view(-1, *([1] * (x0.ndim - 1)))  # (b,) -> (b, 1, ..., 1)
    return x0 * scale


def threshold_hook(threshold: str | float | None) -> Callable[[Tensor], Tensor] | None:
    """The x0 hook an image sampler asks for by name: a percentile in (0, 1] for `dynamic_threshold`, "static"
    for `static_clip` (clamp to [-1, 1]), None for no hook."""
    if threshold is None:
        return None
    if threshold == "static":
        return static_clip
    return functools.partial(dynamic_threshold, percentile=float(threshold))
