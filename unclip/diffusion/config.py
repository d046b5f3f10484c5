"""`DiffusionConfig`: how an image stage's diffusion is parameterised and trained, and the loss it implies.

    diffusion = DiffusionConfig(objective="v", min_snr_gamma=5.0)
    schedule = schedule_for(diffusion)                  # built once per distinct schedule config
    loss, metrics = training_loss(diffusion, model_output, x0, x_t, t, noise, schedule)

Shared by the decoder and the upsamplers (each stores it with its model, so a checkpoint samples on its own).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from torch import Tensor

from unclip.diffusion.denoiser import denoised_from_output
from unclip.diffusion.gaussian import Objective, VarianceType, diffusion_loss, vlb_loss
from unclip.diffusion.schedule import NoiseSchedule, ScheduleConfig, make_schedule

__all__ = ["DiffusionConfig", "schedule_for", "training_loss"]


@dataclass(frozen=True)
class DiffusionConfig:
    """How a stage's diffusion is parameterised and trained; stored with the model so it samples on its own."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # noise schedule (cosine, T = 1000)
    objective: Objective = "eps"  # what the UNet predicts: "eps" (GLIDE, DALL-E 2), "v" or "x0"
    variance: VarianceType = "fixed_small"  # reverse-step variance; "learned_range" adds output channels + vlb loss
    min_snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023), e.g. 5.0; None: plain MSE
    vlb_weight: float = 0.001  # learned_range only: lambda of L_hybrid = L_simple + lambda * L_vlb (Nichol & Dhariwal)

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or null, got {self.min_snr_gamma}")
        if self.vlb_weight < 0:
            raise ValueError(f"vlb_weight must be >= 0, got {self.vlb_weight}")

    @property
    def out_channels_factor(self) -> int:
        """How many times the image's channels the network outputs: 2 with a learned variance, else 1."""
        return 2 if self.variance == "learned_range" else 1


def training_loss(diffusion: DiffusionConfig, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor,
                  schedule: NoiseSchedule) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar training loss of a raw network output (b, c or 2c, ...) for x0, x_t, noise (b, c, ...), t (b,).

    L_simple (the objective's MSE, min-SNR weighted if set), plus with a learned variance the vlb term, which
    trains only the variance (the mean is detached): L_hybrid of improved DDPM. Metrics: "mse" and maybe "vlb", as
detached 0-d tensors (the trainer reads them without a host sync per step).
    """
    var_interp = None
    if diffusion.variance == "learned_range":
        output, var_interp = output.chunk(2, dim=1)  # (b, 2c, ...) -> 2 x (b, c, ...)
    mse = diffusion_loss(output, x0, x_t, t, noise, schedule, diffusion.objective, diffusion.min_snr_gamma)
    loss = mse.mean()
    metrics = {"mse": mse.detach().mean()}
    if var_interp is not None:
        x0_pred = denoised_from_output(output.detach(), x_t, t, schedule, diffusion.objective).x0
        vlb = vlb_loss(schedule, x0, x_t, t, x0_pred, "learned_range", var_interp)
        loss = loss + diffusion.vlb_weight * schedule.num_timesteps * vlb.mean()
        metrics["vlb"] = vlb.detach().mean()
    return loss, metrics


@functools.cache
def _schedule(config: ScheduleConfig) -> NoiseSchedule:
    return make_schedule(config.kind, config.num_timesteps)


def schedule_for(diffusion: DiffusionConfig) -> NoiseSchedule:
    """The noise schedule of a diffusion config (float64, CPU), built once per distinct schedule and shared:
    treat it as read-only."""
    return _schedule(diffusion.schedule)
