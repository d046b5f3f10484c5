"""The full-scale configs against DALL-E 2's Table 3 (Ramesh et al. 2022, appendix C): every hyperparameter the
table gives and the configs can express, except the differences README "Where this differs from the paper" lists
(text conditioning through CLIP's 77 tokens, the decoder's fixed variance, the prior's sampler)."""

from __future__ import annotations

from pathlib import Path

import pytest

from decoder.config import TrainDecoderConfig
from prior.config import TrainPriorConfig
from unclip.config import load_config
from upsamplers.config import TrainUpsamplerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _common(c) -> dict:
    return {"timesteps": c.schedule.num_timesteps, "schedule": c.schedule.kind}


def prior_values(cfg: TrainPriorConfig) -> dict:
    m, t = cfg.model, cfg.train
    return {**_common(m), "objective": m.objective, "sampling steps": cfg.eval.steps, "width": m.width,
            "depth": m.depth, "heads": m.heads, "cond drop": m.cond_drop_prob, "batch": t.batch_size,
            "iterations": t.max_steps, "lr": t.lr, "weight decay": t.weight_decay, "betas": t.betas, "eps": t.eps,
            "ema": t.ema_decay}


def decoder_values(cfg: TrainDecoderConfig) -> dict:
    m, u, t = cfg.model, cfg.model.unet, cfg.train
    return {**_common(m.diffusion), "sampling steps": cfg.eval.steps, "channels": u.model_channels,
            "res blocks": u.num_res_blocks, "channel mult": tuple(u.channel_mult), "head channels": u.head_channels,
            "attention at": tuple(u.attention_resolutions), "dropout": u.dropout, "image tokens": m.num_image_tokens,
            "image drop": m.image_drop, "text drop": m.text_drop, "batch": t.batch_size, "iterations": t.max_steps,
            "lr": t.lr, "betas": t.betas, "eps": t.eps, "ema": t.ema_decay}


def upsampler_values(cfg: TrainUpsamplerConfig) -> dict:
    m, u, t = cfg.model, cfg.model.unet, cfg.train
    return {**_common(m.diffusion), "sampling steps": m.sample_steps, "crop fraction": cfg.crop_size / m.image_size,
            "augmentation": m.augmentation, "channels": u.model_channels, "res blocks": u.num_res_blocks,
            "channel mult": tuple(u.channel_mult), "attention at": tuple(u.attention_resolutions),
            "dropout": u.dropout, "batch": t.batch_size, "iterations": t.max_steps, "lr": t.lr, "betas": t.betas,
            "eps": t.eps, "ema": t.ema_decay}


TABLE_3 = {
    "prior/vit-l-14.yaml": (TrainPriorConfig, prior_values, {
        "timesteps": 1000, "schedule": "cosine", "objective": "x0", "sampling steps": 64, "width": 2048, "depth": 24,
        "heads": 32, "cond drop": 0.1, "batch": 4096, "iterations": 600_000, "lr": 1.1e-4, "weight decay": 6.0e-2,
        "betas": (0.9, 0.96), "eps": 1e-6, "ema": 0.9999}),
    "decoder/full-64.yaml": (TrainDecoderConfig, decoder_values, {
        "timesteps": 1000, "schedule": "cosine", "sampling steps": 250, "channels": 512, "res blocks": 3,
        "channel mult": (1, 2, 3, 4), "head channels": 64, "attention at": (32, 16, 8), "dropout": 0.1,
        "image tokens": 4, "image drop": 0.1, "text drop": 0.5, "batch": 2048, "iterations": 800_000, "lr": 1.2e-4,
        "betas": (0.9, 0.999), "eps": 1e-8, "ema": 0.9999}),
    "upsamplers/full-64-256.yaml": (TrainUpsamplerConfig, upsampler_values, {
        "timesteps": 1000, "schedule": "cosine", "sampling steps": 27, "crop fraction": 0.25, "augmentation": "blur",
        "channels": 320, "res blocks": 3, "channel mult": (1, 2, 3, 4), "attention at": (), "dropout": 0.1,
        "batch": 1024, "iterations": 1_000_000, "lr": 1.2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "ema": 0.9999}),
    "upsamplers/full-256-1024.yaml": (TrainUpsamplerConfig, upsampler_values, {
        "timesteps": 1000, "schedule": "linear", "sampling steps": 15, "crop fraction": 0.25, "augmentation": "bsr",
        "channels": 192, "res blocks": 2, "channel mult": (1, 1, 2, 2, 4, 4), "attention at": (), "dropout": 0.0,
        "batch": 512, "iterations": 1_000_000, "lr": 1.0e-4, "betas": (0.9, 0.999), "eps": 1e-8, "ema": 0.9999}),
}


@pytest.mark.parametrize("name", list(TABLE_3))
def test_full_scale_config_follows_table_3(name):
    config_cls, values, paper = TABLE_3[name]
    ours = values(load_config(config_cls, CONFIGS / name))
    differ = {key: (ours[key], want) for key, want in paper.items() if ours[key] != want}
    assert not differ, f"{name} differs from Table 3 (ours, paper): {differ}"
