"""Decoder training as a task for the shared Trainer (used by `train-decoder`).

Each batch: images at the data's side S (at least the CLIP's input side), their frozen-CLIP image embeddings and
caption token states (computed on the fly, optionally cached per sample, or read from `unclip embed` shards),
and x0 = the images resized to the decoder's side s, in [-1, 1]. The loss is the shared `diffusion_loss` on a
uniformly drawn timestep, with the image embedding replaced by the learned null for a fraction `image_drop` of
the rows and the caption dropped for a fraction `text_drop`, independently (classifier-free guidance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import Dataset

from unclip.clip import Clip, load_clip
from unclip.config import config_to_dict
from unclip.data import ImageTextDataset, collate_image_text, load_image_text_dataset, make_shapes
from unclip.data.embeddings import EmbeddingShards, check_shards_clip, clip_fingerprint, read_manifest
from unclip.diffusion import q_sample, sample_timesteps, training_loss
from unclip.images import SquareImage, resize_images, to_signed_range
from unclip.train import unwrap_model

from .config import TrainDecoderConfig
from .model import Decoder, save_state
from .sampling import decode

__all__ = ["DecoderTrainTask", "check_clip"]


def check_clip(clip: Clip, cfg: TrainDecoderConfig) -> None:
    """Refuse a CLIP whose embedding or token width differs from what the decoder config expects."""
    model = cfg.model
    if clip.embed_dim != model.embed_dim:
        raise ValueError(f"the CLIP {cfg.clip!r} embeds into {clip.embed_dim} dimensions, the decoder config says "
                         f"model.embed_dim={model.embed_dim}")
    if model.text_width is not None and clip.text_width != model.text_width:
        raise ValueError(f"the CLIP {cfg.clip!r} has text width {clip.text_width}, the decoder config says "
                         f"model.text_width={model.text_width}")


class _WithShards(Dataset):
    """`unclip embed` shard rows joined with their source images: the ImageTextDataset item plus the embeddings."""

    def __init__(self, shards: EmbeddingShards, images: ImageTextDataset) -> None:
        self.shards, self.images = shards, images

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.shards[i]
        item = self.images[int(row["index"])]
        return {**item, "index": i, "image_embed": row["image_embed"].float(),
                "text_states": row["text_states"].float(), "text_mask": row["text_mask"]}


class _EmbeddingCache:
    """Per-sample CLIP conditioning kept on the device after its first computation (deterministic data only)."""

    def __init__(self, size: int) -> None:
        self.size, self.store = size, None  # store: {"image_embed": (N, d), "text_states": (N, l, w), ...}

    def get(self, index: Tensor, compute) -> dict[str, Tensor]:
        """Rows `index` (b,); `compute(rows (k,) long) -> dict of (k, ...)` fills the missing ones."""
        if self.store is not None:
            missing = (~self.store["filled"][index]).nonzero().flatten()
        else:
            missing = torch.arange(len(index), device=index.device)
        if len(missing):
            fresh = compute(missing)
            if self.store is None:
                self.store = {k: v.new_zeros((self.size, *v.shape[1:])) for k, v in fresh.items()}
                self.store["filled"] = torch.zeros(self.size, dtype=torch.bool, device=index.device)
            for k, v in fresh.items():
                self.store[k][index[missing]] = v
            self.store["filled"][index[missing]] = True
        return {k: v[index] for k, v in self.store.items() if k != "filled"}


class DecoderTrainTask:
    """Trains a `Decoder` on images conditioned by a frozen CLIP. `clip` may be passed in (tests) or is loaded."""

    def __init__(self, cfg: TrainDecoderConfig, clip: Clip | None = None) -> None:
        self.cfg = cfg
        self.clip = (clip or load_clip(cfg.clip, cfg.clip_pretrained)).freeze()
        check_clip(self.clip, cfg)
        self.clip_fingerprint = clip_fingerprint(self.clip)
        if cfg.data.embeddings is not None:
            check_shards_clip(cfg.data.embeddings, read_manifest(cfg.data.embeddings).get("clip"),
                              cfg.clip, self.clip_fingerprint)
        self.model: nn.Module = Decoder(cfg.model, clip_source=cfg.clip, clip_fingerprint=self.clip_fingerprint)
        self.load_side = max(self.clip.image_size, cfg.model.image_size)
        self._dataset: Dataset | None = None
        self._cache: _EmbeddingCache | None = None
        self._grid: dict[str, Tensor] | None = None

    # ----- data ---------------------------------------------------------------------------------------------
    def _source(self):
        data = self.cfg.data
        if data.source == "shapes":
            return make_shapes(data.shapes_samples, split="train", seed=data.shapes_seed,
                               resolution=data.shapes_resolution)
        return load_image_text_dataset(data.source, image_column=data.image_column,
                                       caption_column=data.caption_column, split=data.split)

    def train_dataset(self) -> Dataset:
        data = self.cfg.data
        images = ImageTextDataset(self._source(), SquareImage(self.load_side), image_column=data.image_column,
                                  caption_column=data.caption_column)
        if data.embeddings is not None:
            self._dataset = _WithShards(EmbeddingShards(data.embeddings), images)
        else:
            self._dataset = images
        if data.cache_embeddings and data.embeddings is None:
            self._cache = _EmbeddingCache(len(self._dataset))
        return self._dataset

    def collate_fn(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_image_text(items)

    def _clip_conditioning(self, images: Tensor, captions: list[str], rows: Tensor) -> dict[str, Tensor]:
        """Frozen-CLIP conditioning of images (k, 3, S, S) in [0, 1] and their k captions, of dataset rows (k,)."""
        if self.clip.device != images.device:
            self.clip.to(images.device)
        out = {"image_embed": self.clip.encode_image(images)}
        if self.cfg.model.text_width is not None:
            enc = self.clip.encode_text(captions, rows=rows)
            out["text_states"], out["text_mask"] = enc.text_states, enc.text_mask
        return out

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """image_embed (b, d) and, when the decoder reads text, text_states (b, l, w) and text_mask (b, l)."""
        images, captions = batch["images"], batch["captions"]
        if "image_embed" in batch:  # from shards
            keys = ("image_embed", "text_states", "text_mask") if self.cfg.model.text_width else ("image_embed",)
            return {k: batch[k].to(images.device) for k in keys}
        if self._cache is None:
            return self._clip_conditioning(images, captions, batch["index"])
        index = batch["index"].to(images.device)
        return self._cache.get(index, lambda rows: self._clip_conditioning(
            images[rows], [captions[int(r)] for r in rows], index[rows]))

    # ----- loss ---------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg.model
        decoder: Decoder = unwrap_model(model)
        schedule, diffusion = decoder.schedule, cfg.diffusion
        images = batch["images"]  # (b, 3, S, S) in [0, 1]
        with torch.no_grad():
            cond = self.conditioning(batch)
        x0 = to_signed_range(resize_images(images, cfg.image_size))  # (b, 3, s, s)
        b = x0.shape[0]
        t = sample_timesteps(b, schedule, device=x0.device)
        noise = torch.randn_like(x0)
        x_t = q_sample(schedule, x0, t, noise)
        image_drop = torch.rand(b, device=x0.device) < cfg.image_drop
        text_drop = torch.rand(b, device=x0.device) < cfg.text_drop
        out = model(x_t, t, image_drop=image_drop, text_drop=text_drop, **cond)
        loss, metrics = training_loss(diffusion, out, x0, x_t, t, noise, schedule)
        metrics.update(image_drop_frac=image_drop.float().mean(), text_drop_frac=text_drop.float().mean())  # no sync
        return loss, metrics

    # ----- side outputs -------------------------------------------------------------------------------------
    def _grid_inputs(self) -> dict[str, Tensor]:
        if self._grid is None:
            k, ev = self.cfg.eval.sample_grid, self.cfg.eval
            if self.cfg.data.source == "shapes":
                rows = make_shapes(k, split="heldout", seed=ev.seed, resolution=self.cfg.data.shapes_resolution)
                images = torch.stack([SquareImage(self.load_side)(im) for im in rows["image"]])
            else:
                dataset = self._dataset if self._dataset is not None else self.train_dataset()
                images = torch.stack([dataset[i]["image"] for i in range(k)])
            self._grid = {"images": images, "image_embed": self.clip.encode_image(images).cpu()}
        return self._grid

    def sample_images(self, model: nn.Module, step: int) -> Tensor:
        """Triplets (source, decoded at each guidance scale in eval.guidance_scales) of held-out images, from their
        CLIP image embeddings alone: (k * (1 + scales), 3, side, side) in [0, 1], side >= 64 (nearest upscale)."""
        decoder: Decoder = unwrap_model(model)
        device = next(decoder.parameters()).device
        grid, ev = self._grid_inputs(), self.cfg.eval
        generator = torch.Generator(device).manual_seed(ev.seed)
        side = max(64, self.cfg.model.image_size)
        columns = [resize_images(grid["images"], side)]
        for scale in ev.guidance_scales:
            generator.manual_seed(ev.seed)
            out = decode(decoder, grid["image_embed"].to(device), None, steps=ev.steps, sampler=ev.sampler,
                         eta=ev.eta, guidance_scale=scale, generator=generator)
            columns.append(torch.nn.functional.interpolate(out.float().cpu(), size=side, mode="nearest"))
        return rearrange(torch.stack(columns), "c k ch h w -> (k c) ch h w")

    def export(self, model: nn.Module, out_dir: Path, state_dict: dict[str, Tensor]) -> None:
        """Write the trained decoder: `state_dict` is the full weights (the EMA's when EMA is on)."""
        save_state(out_dir, self.cfg.model, state_dict, self.cfg.clip, self.clip_fingerprint)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    def identity(self) -> dict[str, str]:
        """The CLIP whose image embeddings the decoder inverts: a resumed run must have the same (see `Trainer`)."""
        return {"clip_fingerprint": self.clip_fingerprint}
