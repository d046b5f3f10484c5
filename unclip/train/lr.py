"""Optimisation: AdamW over the trainable parameters, and the learning-rate schedule as a `LambdaLR`
(linear warm-up, then cosine decay to a floor, or constant).

The factor is a pure function of the number of updates already applied, so the scheduler's whole state is
its step count (saved as JSON in training checkpoints). It is computed from the current config: a run resumed
with a larger max_steps re-stretches the cosine over the new total from the step reached (no new warm-up), so
the LR jumps up at the resume; the trainer warns with the values (see `Trainer`).

    update s (0-based) < warmup_steps:  lr * (s + 1) / warmup_steps
    cosine afterwards:                  lr * (m + (1 - m) * (1 + cos(pi * p)) / 2),  p = (s - W) / (max_steps - W)
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_optimizer", "lr_factor", "build_lr_scheduler", "scheduled_lrs"]


def build_optimizer(model: nn.Module, cfg, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters as `cfg` (a `TrainConfig`) says; weight decay only on >= 2-D ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the task's model has no trainable parameters (all have requires_grad=False)")
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    schedule: Literal["cosine", "constant"],
    min_lr_ratio: float = 0.0,
) -> float:
    """The multiplier of the peak lr for update number `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}; expected 'cosine' or 'constant'")
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg) -> LambdaLR:
    """A `LambdaLR` over `optimizer` following `cfg` (a `TrainConfig`); step it once per applied update."""
    factor = functools.partial(
        lr_factor,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        schedule=cfg.lr_schedule,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    return LambdaLR(optimizer, factor)


def scheduled_lrs(scheduler: LambdaLR) -> list[float]:
    """Each param group's LR for the next update (number `scheduler.last_epoch`, 0-based) under the scheduler's
    factor, computed as `LambdaLR.step` does (the same floats)."""
    return [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
