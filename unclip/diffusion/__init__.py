"""The diffusion core every stage (prior, decoder, upsamplers) shares: schedules, Gaussian math, the denoiser
adapter, classifier-free guidance and samplers. It imports no stage.

    schedule = make_schedule("cosine", 1000)
    loss = diffusion_loss(model(q_sample(schedule, x0, t, noise), t), x0, x_t, t, noise, schedule, "eps")
    denoiser = make_denoiser(classifier_free_guidance(model, guidance_scale), schedule, "eps", x0_hook=static_clip)
    x0 = sample_ddim(denoiser, randn(shape, generator=g), schedule, 50, cond={...})
    x0 = sample("ddpm", denoiser, x_T, schedule, 250, options={"variance": "fixed_large"})  # any of SAMPLERS by name
"""

from unclip.diffusion.analytic import sample_analytic_ddpm
from unclip.diffusion.config import DiffusionConfig, schedule_for, training_loss
from unclip.diffusion.denoiser import (
    Denoised,
    Denoiser,
    denoised_from_output,
    dynamic_threshold,
    make_denoiser,
    norm_clip,
    static_clip,
    threshold_hook,
)
from unclip.diffusion.gaussian import (
    Objective,
    VarianceType,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    interpolate_log_variance,
    normal_kl,
    p_log_variance,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior_mean_variance,
    q_sample,
    sample_timesteps,
    snr,
    v_from_x0_eps,
    vlb_loss,
)
from unclip.diffusion.guidance import classifier_free_guidance
from unclip.diffusion.registry import SAMPLERS, SamplerName, register_sampler, sample, sampler_options
from unclip.diffusion.samplers import (
    Callback,
    Generators,
    Spacing,
    ddim_invert,
    ddim_step,
    ddpm_step,
    randn,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    seeded_generators,
    timestep_subset,
)
from unclip.diffusion.schedule import (
    NoiseSchedule,
    ScheduleConfig,
    ScheduleKind,
    alphas_cumprod_at,
    cosine_schedule,
    extract,
    linear_schedule,
    make_schedule,
    posterior_coefficients,
)

__all__ = [
    "Callback",
    "Denoised",
    "Denoiser",
    "DiffusionConfig",
    "NoiseSchedule",
    "Generators",
    "Objective",
    "SAMPLERS",
    "SamplerName",
    "ScheduleConfig",
    "ScheduleKind",
    "Spacing",
    "VarianceType",
    "alphas_cumprod_at",
    "classifier_free_guidance",
    "cosine_schedule",
    "ddim_invert",
    "ddim_step",
    "ddpm_step",
    "denoised_from_output",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "dynamic_threshold",
    "extract",
    "interpolate_log_variance",
    "linear_schedule",
    "make_denoiser",
    "make_schedule",
    "norm_clip",
    "normal_kl",
    "p_log_variance",
    "posterior_coefficients",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_posterior_mean_variance",
    "q_sample",
    "randn",
    "register_sampler",
    "sample",
    "sample_analytic_ddpm",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_timesteps",
    "seeded_generators",
    "sampler_options",
    "schedule_for",
    "snr",
    "static_clip",
    "threshold_hook",
    "timestep_subset",
    "training_loss",
    "v_from_x0_eps",
    "vlb_loss",
]
