"""Training the prior: its diffusion loss, and the TrainTask the shared Trainer runs (used by `train-prior`).

    loss, metrics = prior_loss(model, image_embed, text_embed, text_states, text_mask)
    Trainer(PriorTrainTask(load_config(TrainPriorConfig, "configs/prior/shapes-tiny.yaml")), cfg.train, out).train()

Data (see `PriorDataConfig.source`): an embeddings directory written by `unclip embed` is read as it is (the
scalable path: no CLIP forward passes while training; the CLIP of `clip:` is loaded once, to check that it made
them); SHAPES or any image-text dataset is encoded by the frozen
CLIP on the fly, in the training process, on the training device.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from unclip.clip import Clip, ClipWeightsError, TextEncoding, load_clip
from unclip.config import ConfigError, config_to_dict
from unclip.data import DataError, ImageTextDataset, collate_image_text
from unclip.data.embeddings import EmbeddingShards, check_shards_clip, clip_fingerprint, read_manifest
from unclip.data.sources import training_rows
from unclip.diffusion import denoised_from_output, diffusion_loss, q_sample, sample_timesteps
from unclip.train import unwrap_model

from .config import PriorConfig, TrainPriorConfig
from .model import EPS_MOMENTS, DiffusionPriorNetwork

__all__ = ["prior_loss", "draw_cond_drop", "is_embeddings_dir", "check_dims", "calibration_pairs", "encode_image_text",
           "PriorTrainTask"]

EMBEDDING_FIELDS = ("image_embed", "text_embed", "text_states", "text_mask")


def draw_cond_drop(batch: int, prob: float, device: torch.device | str | None = None) -> Tensor:
    """(batch,) bool, each True with probability `prob` (global torch RNG): the captions to replace by null."""
    return torch.rand(batch, device=device) < prob


def prior_loss(
    model: nn.Module, image_embed: Tensor, text_embed: Tensor, text_states: Tensor, text_mask: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The prior's diffusion loss on a batch: mean MSE to the objective's target, and metrics (0-d tensors).

    image_embed, text_embed: (b, d) unit-norm CLIP embeddings; text_states: (b, l, w); text_mask: (b, l) bool.
    Draws t uniformly, the noise and the CFG dropout (rate `cond_drop_prob`) from the global RNG. `model` may
    be DDP-wrapped. Metrics: `x0_cos`, the mean cosine between the predicted and the true x0, and `cond_drop`,
    the fraction of captions dropped.
    """
    prior: DiffusionPriorNetwork = unwrap_model(model)
    b, device = image_embed.shape[0], image_embed.device
    x0 = image_embed.float() * prior.scale  # (b, d), norm sqrt(d)
    t = sample_timesteps(b, prior.schedule, device=device)
    noise = torch.randn_like(x0)
    x_t = q_sample(prior.schedule, x0, t, noise)
    cond_drop = draw_cond_drop(b, prior.config.cond_drop_prob, device)
    out = model(x_t, t, text_embed=text_embed.float(), text_states=text_states.float(), text_mask=text_mask.bool(),
                cond_drop=cond_drop)
    loss = diffusion_loss(out, x0, x_t, t, noise, prior.schedule, prior.config.objective).mean()
    with torch.no_grad():  # metrics stay 0-d tensors on the device: the trainer reads them when it logs
        x0_pred = denoised_from_output(out.detach().float(), x_t, t, prior.schedule, prior.config.objective).x0
        x0_cos = F.cosine_similarity(x0_pred, x0, dim=-1).mean()
    return loss, {"x0_cos": x0_cos, "cond_drop": cond_drop.float().mean()}


def is_embeddings_dir(source: str) -> bool:
    """Whether `source` is a directory written by `unclip embed` (it holds manifest.json)."""
    return (Path(source) / "manifest.json").is_file()


def check_dims(model: PriorConfig, embed_dim: int, text_width: int, text_length: int, where: str) -> None:
    """Raise ConfigError naming every dimension of `model` that differs from the data's / CLIP's."""
    found = {"embed_dim": embed_dim, "text_width": text_width, "text_length": text_length}
    wrong = [f"model.{k} = {getattr(model, k)} but {where} has {v}" for k, v in found.items() if getattr(model, k) != v]
    if wrong:
        raise ConfigError("the prior does not fit its CLIP: " + "; ".join(wrong))


@torch.no_grad()
def encode_image_text(clip: Clip, batch: dict[str, Any]) -> dict[str, Tensor]:
    """A `collate_image_text` batch -> the embedding fields (EMBEDDING_FIELDS), with `clip` moved to its device."""
    if clip.device != batch["images"].device:
        clip.to(batch["images"].device)
    enc = clip.encode_text(batch["captions"], rows=batch["index"])
    return {"image_embed": clip.encode_pixels(batch["images"]), "text_embed": enc.text_embed,
            "text_states": enc.text_states, "text_mask": enc.text_mask}


@torch.no_grad()
def calibration_pairs(cfg: TrainPriorConfig, n: int, clip: Clip | None = None, *, seed: int = 0,
                      batch_size: int = 256) -> tuple[TextEncoding, Tensor]:
    """Up to n (caption encoding, image embedding) pairs drawn at random (seeded) from `cfg`'s training data, for
    `prior.analytic.calibrate_prior`: (TextEncoding of n captions, (n, d) image embeddings), on the CPU.

    Embedding shards are read as they are; SHAPES and image-text datasets are encoded by `clip` (loaded from
    `cfg.clip` when not given). Samples the data loader would skip (unreadable images) are skipped here too."""
    if is_embeddings_dir(cfg.data.source):
        dataset: Dataset = EmbeddingShards(cfg.data.source)
    else:
        clip = clip if clip is not None else load_clip(cfg.clip, cfg.clip_pretrained)
        dataset = ImageTextDataset(training_rows(cfg.data), clip.image_transform, image_column=cfg.data.image_column,
                                   caption_column=cfg.data.caption_column)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    parts: dict[str, list[Tensor]] = {name: [] for name in EMBEDDING_FIELDS}
    for start in range(0, len(order), batch_size):
        items = [dataset[i] for i in order[start:start + batch_size]]
        if isinstance(dataset, EmbeddingShards):
            fields = {name: torch.stack([it[name] for it in items]) for name in EMBEDDING_FIELDS}
        else:
            batch = collate_image_text(items)
            fields = encode_image_text(clip, batch) if batch["captions"] else {}
        for name, value in fields.items():
            parts[name].append(value.cpu())
    if not parts["image_embed"]:
        raise DataError(f"no usable training pairs in {cfg.data.source} to calibrate the prior with")
    image_embed, text_embed, text_states, text_mask = (torch.cat(parts[name]) for name in EMBEDDING_FIELDS)
    return TextEncoding(text_embed.float(), text_states.float(), text_mask.bool()), image_embed.float()


class PriorTrainTask:
    """Trains a `DiffusionPriorNetwork` on (CLIP image embedding, caption encoding) pairs."""

    def __init__(self, cfg: TrainPriorConfig, clip: Clip | None = None) -> None:
        self.cfg = cfg
        self.model: nn.Module = DiffusionPriorNetwork(cfg.model, clip=cfg.clip)
        self.model.train()
        self.embeddings = is_embeddings_dir(cfg.data.source)
        self._clip = clip
        if self.embeddings:
            manifest = read_manifest(cfg.data.source)
            check_dims(cfg.model, manifest["embed_dim"], manifest["text_width"], manifest["context_length"],
                       f"the embeddings in {cfg.data.source}")
            fingerprint = manifest.get("clip")  # the CLIP the shards were made with
            self._check_shards_clip(fingerprint)
        else:
            c = self.clip
            check_dims(cfg.model, c.embed_dim, c.text_width, c.context_length, f"the CLIP {cfg.clip}")
            fingerprint = clip_fingerprint(c)
        self.model.clip_fingerprint = fingerprint  # saved with the prior; assembling a pipeline checks it

    def _check_shards_clip(self, fingerprint: str | None) -> None:
        """Refuse shards embedded by another CLIP than `cfg.clip` (`check_shards_clip`). Loads the CLIP for its
        fingerprint (kept only if passed in); when its weights cannot be had here (a pretrained tag offline, say),
        warns and trusts the manifest, as training from shards needs no CLIP."""
        passed_in = self._clip is not None
        try:
            ours = clip_fingerprint(self.clip)
        except ClipWeightsError as e:
            warnings.warn(f"cannot check that {self.cfg.data.source} was embedded by clip: {self.cfg.clip} ({e}); "
                          "training on the shards as they are", stacklevel=3)
            return
        finally:
            if not passed_in:
                self._clip = None  # training from shards needs no CLIP; the evaluation loads its own
        check_shards_clip(self.cfg.data.source, fingerprint, self.cfg.clip, ours)

    @property
    def clip(self) -> Clip:
        """The frozen CLIP of `cfg.clip`, loaded on first use (not needed to train from embeddings)."""
        if self._clip is None:
            self._clip = load_clip(self.cfg.clip, self.cfg.clip_pretrained)
        return self._clip

    def train_dataset(self) -> Dataset:
        data = self.cfg.data
        if self.embeddings:
            return EmbeddingShards(data.source)
        hf = training_rows(data)
        return ImageTextDataset(hf, self.clip.image_transform, image_column=data.image_column,
                                caption_column=data.caption_column)

    def collate_fn(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Embedding rows -> {image_embed (b, d), text_embed (b, d), text_states (b, l, w), text_mask (b, l)};
        image-text rows -> `collate_image_text`'s batch (encoded in `loss`)."""
        if not self.embeddings:
            return collate_image_text(items)
        return {name: torch.stack([it[name] for it in items]) for name in EMBEDDING_FIELDS}

    def encode(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """An image-text batch -> the embedding fields, with the frozen CLIP on the batch's device."""
        return encode_image_text(self.clip, batch)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        fields = batch if self.embeddings else self.encode(batch)
        return prior_loss(model, *(fields[name] for name in EMBEDDING_FIELDS))

    def export(self, model: nn.Module, out_dir: Path, state_dict: dict[str, Tensor]) -> None:
        """Write the trained prior as a `DiffusionPriorNetwork` directory: `state_dict` is the full weights (the
        EMA's when EMA is on)."""
        prior: DiffusionPriorNetwork = unwrap_model(model)
        prior.save_pretrained(out_dir, state_dict=state_dict)

    def pretrained_weights(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The network's weights of a stored prior that a fine-tune starts from (`train.init_from`), without its
        calibrated eps moments: training changes the network they describe (train-prior calibrates anew)."""
        return {k: v for k, v in state.items() if k != EPS_MOMENTS}

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    def identity(self) -> dict[str, str]:
        """The CLIP the prior learns the embeddings of: a resumed run must have the same (see `Trainer`)."""
        fingerprint = self.model.clip_fingerprint
        return {"clip_fingerprint": fingerprint} if fingerprint else {}
