"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper: one batched forward, cond and uncond together.

The convention every stage's network follows (the same keyword trains the null conditioning by dropout):

    model_fn(x_t, t, *, cond_drop=None, **cond)

where x_t is (b, *), t is (b,), every conditioning tensor in `cond` has the batch first, and `cond_drop` is a
(b,) bool tensor (or None, meaning all False) marking the rows that must use the null (learned) conditioning
instead of their own. `classifier_free_guidance` calls the wrapped function once on a batch of 2b rows: rows
0..b-1 are the conditional branch (the caller's own `cond_drop`, if any, kept), rows b..2b-1 the unconditional one
(`cond_drop` all True), every tensor in `cond` repeated along the batch; non-tensor values are passed as they are.
With `split=True` it makes the two calls of b rows instead.

Guidance is applied to the raw network output, before a denoiser splits off a learned-variance channel:

    denoiser = make_denoiser(classifier_free_guidance(model, guidance_scale, learned_variance=True), schedule, "eps",
                             variance="learned_range", x0_hook=static_clip)

The guided output is uncond + s * (cond - uncond). For an eps, x0 or v output this is the same guidance (each is
affine in the others at fixed x_t and t, and the weights sum to one), so it is guiding eps; the x0 hook then runs
on the guided x0. A learned variance channel is not guided: the conditional branch's is kept. It also wraps
a `Denoiser`: x0 and eps are both combined by the formula (which keeps them consistent) and the conditional
`var_interp` is kept; any x0 hook inside that denoiser will then have run per branch, before guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from unclip.diffusion.denoiser import Denoised

__all__ = ["classifier_free_guidance"]

F = TypeVar("F", bound=Callable[..., Any])


def classifier_free_guidance(fn: F, guidance_scale: float, *, learned_variance: bool = False, split: bool = False) -> F:
    """Classifier-free guidance around `fn(x_t, t, *, cond_drop=None, **cond)` (a network or a `Denoiser`).

    Returns `fn` itself at guidance_scale == 1. Otherwise a function with the same signature that makes one
    call of batch 2b and returns uncond + guidance_scale * (cond - uncond): a tensor (b, *) for a network, a
    `Denoised` for a denoiser. learned_variance: the network's output carries a variance channel as the second
    half of dim 1, which is taken from the conditional branch unguided. split: two calls of batch b instead (the
    same numbers; half the peak activation memory, and faster for large UNet batches on a CPU, see the decoder).
    """
    if guidance_scale == 1.0:
        return fn

    def guided(x_t: Tensor, t: Tensor, *, cond_drop: Tensor | None = None, **cond: Any) -> Any:
        b = x_t.shape[0]
        assert t.shape == (b,), f"t must be (b,) = ({b},), got {tuple(t.shape)}"
        own_drop = torch.zeros(b, dtype=torch.bool, device=x_t.device) if cond_drop is None else cond_drop.bool()
        all_drop = torch.ones(b, dtype=torch.bool, device=x_t.device)
        if split:
            cond_out, uncond_out = fn(x_t, t, cond_drop=own_drop, **cond), fn(x_t, t, cond_drop=all_drop, **cond)
        else:
            out = fn(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_drop=torch.cat([own_drop, all_drop]),
                     **_repeat_cond(cond, b))
            if isinstance(out, Denoised):
                cond_out, uncond_out = _halves(out, b)
            else:
                assert out.shape[0] == 2 * b, f"the wrapped function returned batch {out.shape[0]}, expected {2 * b}"
                cond_out, uncond_out = out.chunk(2, dim=0)  # (2b, *) -> 2 x (b, *)
        if isinstance(cond_out, Denoised):
            return _guide_denoised(cond_out, uncond_out, guidance_scale)
        if not learned_variance:
            return _combine(cond_out, uncond_out, guidance_scale)
        cond_mean, cond_var = cond_out.chunk(2, dim=1)  # (b, 2c, ...) -> 2 x (b, c, ...)
        uncond_mean, _ = uncond_out.chunk(2, dim=1)
        return torch.cat([_combine(cond_mean, uncond_mean, guidance_scale), cond_var], dim=1)

    return guided  # type: ignore[return-value]


def _combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    return uncond + scale * (cond - uncond)


def _halves(out: Denoised, b: int) -> tuple[Denoised, Denoised]:
    """A Denoised of 2b rows -> (the first b rows, the last b rows)."""
    var = out.var_interp
    return (Denoised(x0=out.x0[:b], eps=out.eps[:b], var_interp=var[:b] if var is not None else None),
            Denoised(x0=out.x0[b:], eps=out.eps[b:], var_interp=var[b:] if var is not None else None))


def _guide_denoised(cond: Denoised, uncond: Denoised, scale: float) -> Denoised:
    """x0 and eps guided by the formula; the conditional branch's var_interp kept."""
    return Denoised(x0=_combine(cond.x0, uncond.x0, scale), eps=_combine(cond.eps, uncond.eps, scale),
                    var_interp=cond.var_interp)


def _repeat_cond(cond: dict[str, Any], b: int) -> dict[str, Any]:
    """Every tensor value (b, *) -> (2b, *): the same conditioning for both branches; others pass through."""
    repeated = {}
    for name, value in cond.items():
        if isinstance(value, Tensor):
            assert value.shape[0] == b, f"conditioning '{name}' has batch {value.shape[0]}, expected {b}"
            value = torch.cat([value, value])
        repeated[name] = value
    return repeated
