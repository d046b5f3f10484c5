"""The decoder (DALL-E 2, section 2.1): a GLIDE-style UNet generating an image from a CLIP image embedding.

    decoder = Decoder(DecoderConfig(image_size=16, embed_dim=128, text_width=128, ...))
    eps = decoder(x_t, t, image_embed=e, text_tokens=enc.text_tokens, text_mask=enc.text_mask)   # (b, 3, 16, 16)
    decoder.save_pretrained("runs/decoder/model"); Decoder.from_pretrained("runs/decoder/model")

CLIP conditioning as in the paper: the image embedding e (b, d) is projected and added to the timestep
embedding (the UNet's `cond`), and projected into `num_image_tokens` context tokens that are concatenated with the
projected per-token CLIP text states; every attention layer attends to that context (after a LayerNorm).
Classifier-free guidance: a row marked in `image_drop` uses a learned null embedding instead of its own, a row
marked in `text_drop` has its text tokens masked out; `cond_drop` (the `unclip.diffusion.cfg` convention) marks
rows that drop both, the unconditional branch. Without text (text_tokens None) the context is the image tokens.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from unclip.checkpoint import load_pretrained_dir, load_state_dict_strict, save_pretrained_dir
from unclip.config import config_to_dict, load_config
from unclip.diffusion import NoiseSchedule, schedule_for
from unclip.nn import UNet

from .config import DecoderConfig

__all__ = ["KIND", "Decoder"]

KIND = "decoder"


def _rows(mask: Tensor | None, b: int, device: torch.device) -> Tensor:
    """A (b,) bool mask, all False when None."""
    if mask is None:
        return torch.zeros(b, dtype=torch.bool, device=device)
    assert mask.shape == (b,), f"drop masks must be (b,) = ({b},), got {tuple(mask.shape)}"
    return mask.to(device=device, dtype=torch.bool)


class Decoder(nn.Module):
    """UNet + CLIP conditioning + learned null embedding. See the module doc; `config` says every size."""

    def __init__(self, config: DecoderConfig, clip_info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        self.clip_info = dict(clip_info) if clip_info else None  # which CLIP made the embeddings (saved, not used)
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

    def forward(self, x_t: Tensor, t: Tensor, *, image_embed: Tensor, text_tokens: Tensor | None = None,
                text_mask: Tensor | None = None, cond_drop: Tensor | None = None, image_drop: Tensor | None = None,
                text_drop: Tensor | None = None) -> Tensor:
        """The raw UNet output (b, 3 or 6, s, s) for x_t (b, 3, s, s) at timesteps t (b,).

        image_embed: (b, d) L2-normalised CLIP image embeddings. text_tokens: (b, l, w) CLIP per-token states with
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
        if text_tokens is not None and self.text_proj is not None:
            assert text_tokens.ndim == 3 and text_tokens.shape[0] == b and text_tokens.shape[2] == cfg.text_width, (
                f"text_tokens must be (b, l, {cfg.text_width}), got {tuple(text_tokens.shape)}")
            l = text_tokens.shape[1]  # noqa: E741
            text_mask = torch.ones(b, l, dtype=torch.bool, device=x_t.device) if text_mask is None else text_mask
            assert text_mask.shape == (b, l), f"text_mask must be (b, l) = ({b}, {l}), got {tuple(text_mask.shape)}"
            keep_text = text_mask.bool() & ~(both | _rows(text_drop, b, x_t.device))[:, None]  # (b, l)
            context = torch.cat([context, self.text_proj(text_tokens.to(context.dtype))], dim=1)  # (b, n + l, c)
            image_ok = torch.ones(b, cfg.num_image_tokens, dtype=torch.bool, device=x_t.device)
            mask = torch.cat([image_ok, keep_text], dim=1)  # (b, n + l)
        context = self.context_norm(context)
        return self.unet(x_t, t, cond=embed, context=context, context_mask=mask)

    # ----- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json (kind "decoder": the DecoderConfig and the CLIP info) + model.safetensors, atomically."""
        return save_state(path, self.config, self.state_dict(), self.clip_info)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Decoder:
        """Load a directory written by `save_pretrained` (or by `train-decoder` as OUTPUT_DIR/model)."""
        meta, state = load_pretrained_dir(path, kind=KIND)
        config = load_config(DecoderConfig, meta["config"]["model"])
        decoder = cls(config, clip_info=meta["config"].get("clip"))
        load_state_dict_strict(decoder, state, source=path)
        return decoder.to(map_location).eval()


def save_state(path: str | Path, config: DecoderConfig, state_dict: dict[str, Tensor],
               clip_info: dict[str, Any] | None = None) -> Path:
    """Write a decoder directory from a config and a state dict (the trainer's EMA weights, for instance)."""
    return save_pretrained_dir(path, kind=KIND, config={"model": config_to_dict(config), "clip": clip_info},
                               state_dict=state_dict)
