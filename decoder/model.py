"""The decoder (DALL-E 2, section 2.1): a GLIDE-style UNet generating an image from a CLIP image embedding.

    decoder = Decoder(DecoderConfig(image_size=16, embed_dim=128, text_width=128, ...))
    eps = decoder(x_t, t, image_embed=e, text_states=enc.text_states, text_mask=enc.text_mask)   # (b, 3, 16, 16)
    decoder.save_pretrained("runs/decoder/model"); Decoder.from_pretrained("runs/decoder/model")

CLIP conditioning as in the paper: the image embedding e (b, d) is projected and added to the timestep
embedding (the UNet's `cond`), and projected into `num_image_tokens` context tokens that are concatenated with the
projected per-token CLIP text states; every attention layer attends to that context (after a LayerNorm).
Classifier-free guidance: a row marked in `image_drop` uses a learned null embedding instead of its own, a row
marked in `text_drop` has its text tokens masked out; `cond_drop` (the convention of
`unclip.diffusion.classifier_free_guidance`) marks rows that drop both, the unconditional branch. Without text
(text_states None) the context is the image tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from unclip.checkpoint import load_pretrained_dir, load_state_dict_strict, save_pretrained_dir
from unclip.config import config_to_dict, load_config
from unclip.diffusion import (
    Denoiser,
    NoiseSchedule,
    classifier_free_guidance,
    ddim_invert,
    make_denoiser,
    randn,
    schedule_for,
    threshold_hook,
)
from unclip.images import resize_images, to_signed_range, to_unit_range
from unclip.nn import UNet, eval_mode
from unclip.settings import StageSampling
from unclip.stage import CascadeState, Role, SamplingRun, run_sampler

from .config import DecoderConfig

__all__ = ["KIND", "Decoder", "save_state"]

DEFAULT_THRESHOLD = 0.995  # the x0 hook of sampling: Imagen's dynamic thresholding at this percentile

KIND = "decoder"


def _rows(mask: Tensor | None, b: int, device: torch.device) -> Tensor:
    """A (b,) bool mask, all False when None."""
    if mask is None:
        return torch.zeros(b, dtype=torch.bool, device=device)
    assert mask.shape == (b,), f"drop masks must be (b,) = ({b},), got {tuple(mask.shape)}"
    return mask.to(device=device, dtype=torch.bool)


class Decoder(nn.Module):
    """UNet + CLIP conditioning + learned null embedding. See the module doc; `config` says every size.

    `clip_source` and `clip_fingerprint` name the CLIP whose embeddings it was trained on (saved in config.json;
    assembling a pipeline checks the fingerprint). As a stage of the cascade (`unclip.stage.Stage`) it maps image
    embeddings (and the captions' token states, when it reads text) to images.
    """

    role: ClassVar[Role] = "decoder"
    kind: ClassVar[str] = KIND

    def __init__(self, config: DecoderConfig, clip_source: str | None = None,
                 clip_fingerprint: str | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        self.clip_source, self.clip_fingerprint = clip_source, clip_fingerprint
        out = 6 if cfg.diffusion.variance == "learned_range" else 3
        self.unet = UNet(replace(cfg.unet, out_channels=out, cond_dim=cfg.embed_dim, context_dim=cfg.context_dim))
        d = cfg.embed_dim
        self.null_image_embed = nn.Parameter(torch.randn(d) / math.sqrt(d))  # unit norm, like a CLIP embedding
        self.image_to_tokens = nn.Linear(d, cfg.num_image_tokens * cfg.context_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.context_dim) if cfg.text_width is not None else None
        self.context_norm = nn.LayerNorm(cfg.context_dim)

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule of `config.diffusion` (float64, CPU; shared, read-only)."""
        return schedule_for(self.config.diffusion)

    @property
    def learned_variance(self) -> bool:
        return self.config.diffusion.variance == "learned_range"

    def forward(self, x_t: Tensor, t: Tensor, *, image_embed: Tensor, text_states: Tensor | None = None,
                text_mask: Tensor | None = None, cond_drop: Tensor | None = None, image_drop: Tensor | None = None,
                text_drop: Tensor | None = None) -> Tensor:
        """The raw UNet output (b, 3 or 6, s, s) for x_t (b, 3, s, s) at timesteps t (b,).

        image_embed: (b, d) L2-normalised CLIP image embeddings. text_states: (b, l, w) CLIP per-token states with
        text_mask (b, l) bool (True at real tokens), or None. cond_drop / image_drop / text_drop: (b,) bool or None.
        """
        cfg = self.config
        b = x_t.shape[0]
        d = cfg.embed_dim
        assert image_embed.shape == (b, d), f"image_embed must be (b, {d}), got {tuple(image_embed.shape)}"
        both = _rows(cond_drop, b, x_t.device)
        drop_image = both | _rows(image_drop, b, x_t.device)
        embed = torch.where(drop_image[:, None], self.null_image_embed.to(image_embed.dtype)[None], image_embed)
        embed = embed * math.sqrt(d)  # unit-norm embeddings -> about unit variance per component
        context = rearrange(self.image_to_tokens(embed), "b (n c) -> b n c", n=cfg.num_image_tokens)
        mask = None
        if text_states is not None and self.text_proj is not None:
            assert text_states.ndim == 3 and text_states.shape[0] == b and text_states.shape[2] == cfg.text_width, (
                f"text_states must be (b, l, {cfg.text_width}), got {tuple(text_states.shape)}")
            l = text_states.shape[1]  # noqa: E741
            text_mask = torch.ones(b, l, dtype=torch.bool, device=x_t.device) if text_mask is None else text_mask
            assert text_mask.shape == (b, l), f"text_mask must be (b, l) = ({b}, {l}), got {tuple(text_mask.shape)}"
            keep_text = text_mask.bool() & ~(both | _rows(text_drop, b, x_t.device))[:, None]  # (b, l)
            context = torch.cat([context, self.text_proj(text_states.to(context.dtype))], dim=1)  # (b, n + l, c)
            image_ok = torch.ones(b, cfg.num_image_tokens, dtype=torch.bool, device=x_t.device)
            mask = torch.cat([image_ok, keep_text], dim=1)  # (b, n + l)
        context = self.context_norm(context)
        return self.unet(x_t, t, cond=embed, context=context, context_mask=mask)

    # ----- the stage protocol (unclip.stage) ------------------------------------------------------------
    def default_sampling(self) -> StageSampling:
        """Ancestral DDPM (it reconstructs SHAPES best), 50 steps (the paper: 250), guidance 3."""
        return StageSampling(sampler="ddpm", steps=50, guidance=3.0)

    def check_sampling(self, spec: StageSampling) -> None:
        """Every sampler, step count, guidance and eta the settings allow is fine."""

    def sampler_options(self) -> dict[str, Any]:
        """The reverse-step variance the decoder was trained for (a learned range needs its output channels)."""
        return {"variance": self.config.diffusion.variance}

    def denoiser(self, cond: Mapping[str, Any], spec: StageSampling, *,
                 threshold: str | float | None = DEFAULT_THRESHOLD) -> Denoiser:
        """The decoder under cond = {"image_embed": (b, d), and maybe "text_states" (b, l, w), "text_mask" (b, l)},
        guided by `spec.guidance` (the unconditional branch drops both the image embedding and the text), x0
        thresholded by `threshold` (a dynamic-threshold percentile, "static" or None; `threshold_hook`).

        The conditional and unconditional rows run as one batch of 2b on an accelerator and as two batches of b on
        the CPU, where one UNet forward of 2b measured up to 30% slower than two of b (BENCHMARKS.md, "Decoder UNet")
        and never more than 3% faster."""
        on_cpu = next(self.parameters()).device.type == "cpu"
        guided = classifier_free_guidance(self, spec.guidance, learned_variance=self.learned_variance, split=on_cpu)
        diffusion = self.config.diffusion
        return make_denoiser(functools.partial(guided, **cond), self.schedule, diffusion.objective,
                             variance=diffusion.variance, x0_hook=threshold_hook(threshold))

    def conditioning(self, state: CascadeState) -> dict[str, Tensor]:
        """The network's conditioning from the state: its image embeddings, and its captions' token states when the
        decoder reads text (and the state has them), on the decoder's device and dtype."""
        param = next(self.parameters())
        b, d = state.image_embed.shape[0], self.config.embed_dim
        assert state.image_embed.shape == (b, d), f"image_embed must be (b, {d}), got {tuple(state.image_embed.shape)}"
        cond = {"image_embed": state.image_embed.to(param.device, param.dtype)}
        if state.text is not None and self.text_proj is not None:
            assert state.text.text_states.shape[0] == b, f"text has {state.text.text_states.shape[0]} rows, not {b}"
            cond["text_states"] = state.text.text_states.to(param.device, param.dtype)
            cond["text_mask"] = state.text.text_mask.to(param.device)
        return cond

    def sample(self, state: CascadeState, spec: StageSampling, run: SamplingRun, *, name: str = "decoder",
               x_T: Tensor | None = None, threshold: str | float | None = DEFAULT_THRESHOLD) -> CascadeState:
        """`state.images` (b, 3, s, s) in [0, 1] decoded from `state.image_embed` (b, d) (and `state.text`, if the
        decoder reads text). x_T: the starting noise (b, 3, s, s); drawn from `run.generator` when None."""
        param = next(self.parameters())
        cond = self.conditioning(state)
        b, s = cond["image_embed"].shape[0], self.config.image_size
        if x_T is None:
            x_T = randn((b, 3, s, s), generator=run.generator, device=param.device, dtype=param.dtype)
        assert x_T.shape == (b, 3, s, s), f"x_T must be (b, 3, {s}, {s}), got {tuple(x_T.shape)}"
        x0 = run_sampler(self, name, spec, x_T, cond, run)
        return state.but(images=to_unit_range(x0.float()).clamp(0, 1))

    @torch.no_grad()
    def invert(self, pixels: Tensor, image_embed: Tensor, *, steps: int = 50, progress: bool = False) -> Tensor:
        """The decoder latents x_T (b, 3, s, s) of images pixels (b, 3, h, w) in [0, 1] under their CLIP image
        embeddings image_embed (b, d): deterministic DDIM run forward (unguided, no thresholding), so that DDIM with
        eta = 0 and the same `steps` maps x_T back to (about) the image at the decoder's side s."""
        param = next(self.parameters())
        x0 = to_signed_range(resize_images(pixels.to(param.device), self.config.image_size)).clamp(-1, 1)
        cond = {"image_embed": image_embed.to(param.device, param.dtype)}
        with eval_mode(self):
            denoiser = self.denoiser(cond, StageSampling(guidance=1.0), threshold=None)
            return ddim_invert(denoiser, x0.to(param.dtype), self.schedule, steps, progress=progress, label="decoder")

    # ----- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write config.json (kind "decoder": the DecoderConfig and the CLIP) + model.safetensors, atomically;
        `dtype` casts the stored float weights."""
        state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                 for k, v in self.state_dict().items()}
        return save_state(path, self.config, state, self.clip_source, self.clip_fingerprint)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> Decoder:
        """Load a directory written by `save_pretrained` (or by `train-decoder` as OUTPUT_DIR/model) onto `device`
        in `dtype` (default: float32), in eval mode."""
        meta, state = load_pretrained_dir(path, kind=KIND)
        config = load_config(DecoderConfig, meta["config"]["model"])
        clip = meta["config"].get("clip") or {}
        decoder = cls(config, clip_source=clip.get("source"), clip_fingerprint=clip.get("fingerprint"))
        load_state_dict_strict(decoder, state, source=path)
        return decoder.to(device=device, dtype=dtype).eval()


def save_state(path: str | Path, config: DecoderConfig, state_dict: dict[str, Tensor],
               clip_source: str | None = None, clip_fingerprint: str | None = None) -> Path:
    """Write a decoder directory from a config and a state dict (the trainer's EMA weights, for instance)."""
    clip = {"source": clip_source, "fingerprint": clip_fingerprint} if clip_source or clip_fingerprint else None
    return save_pretrained_dir(path, kind=KIND, config={"model": config_to_dict(config), "clip": clip},
                               state_dict=state_dict)
