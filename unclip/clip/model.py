"""The CLIP stage: one class around an open_clip model, its tokenizer and its preprocessing.

This is the only module in unclip that imports `open_clip`.

    clip = Clip.from_pretrained("runs/clip-shapes/model")          # our format: config.json + model.safetensors
    clip = Clip.from_open_clip("ViT-L-14", pretrained="openai")    # open_clip name + tag (downloads)
    clip = Clip.from_open_clip("ViT-B-32", pretrained="ckpt.pt")   # open_clip name + a local open_clip file
    clip = Clip.from_config(load_config(ClipConfig, "configs/clip/shapes-tiny.yaml"))  # from scratch
    enc = clip.encode_text(["a red circle on a blue background"])   # enc.text_embed (b, d), enc.text_states (b, l, w)
    image_embed = clip.encode_image(pil_images)                     # (b, d), L2-normalised
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import nn

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_pretrained_dir, load_state_dict_strict, save_pretrained_dir
from ..config import check_keys, config_to_dict
from ..hub import hub_file
from ..images import to_rgb
from ..text import has_printable
from .weights import ClipNotFoundError, ClipWeightsError, read_cast_from, read_open_clip_state_dict, weights_fingerprint

if TYPE_CHECKING:
    from .config import ClipConfig  # which imports this module, for `check_architecture`

__all__ = ["Clip", "TextEncoding", "CaptionError", "ClipNotFoundError", "ClipWeightsError", "check_architecture",
           "contrastive_loss", "load_clip", "read_open_clip_state_dict", "weights_fingerprint"]

KIND = "clip"


class CaptionError(ValueError):
    """A caption that cannot be encoded (empty, or too long when truncation is off)."""


@dataclass
class TextEncoding:
    """CLIP's view of a batch of captions.

    text_embed:  (b, d) pooled, projected and L2-normalised embedding (what CLIP matches against images).
    text_states: (b, l, w) final-layer per-token states (after the final layer norm, before pooling).
    text_mask:   (b, l) bool, True at real tokens (start, words, end), False at padding.
    """

    text_embed: torch.Tensor
    text_states: torch.Tensor
    text_mask: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoding:
        """Move to `device`; cast the float tensors to `dtype` (the mask stays bool)."""
        return TextEncoding(self.text_embed.to(device=device, dtype=dtype),
                            self.text_states.to(device=device, dtype=dtype), self.text_mask.to(device=device))


class Clip(nn.Module):
    """An open_clip model with its tokenizer and preprocessing; frozen and in eval mode by default.

    `model` is the open_clip module (trainable through it when unfrozen); `architecture` is its full
    open_clip model config, stored in our checkpoints so they load without any registry lookup.
    """

    def __init__(self, model: nn.Module, architecture: dict[str, Any], preprocess: dict[str, Any],
                 model_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.architecture = copy.deepcopy(architecture)
        self.preprocess_cfg = PreprocessCfg(**preprocess)
        self.model_name = model_name
        self.tokenizer = _make_tokenizer(model_name, architecture)
        self.image_transform = image_transform_v2(self.preprocess_cfg, is_train=False)
        # Set when loaded from a copy stored at lower precision: {"fingerprint": of the weights it was cast from,
        # "weights": of the weights as loaded}; see `fingerprint`.
        self.cast_from: dict[str, str] | None = None
        self.freeze()

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ClipConfig) -> Clip:
        """Build from a `ClipConfig` (`load_config(ClipConfig, dict_or_path)` reads one); see it for the sources."""
        checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else None
        if checkpoint is not None and not checkpoint.exists():
            raise ClipWeightsError(f"CLIP checkpoint not found: {checkpoint}")
        if checkpoint is not None and checkpoint.is_dir():
            return cls.from_pretrained(checkpoint)
        if cfg.architecture is None:
            return cls.from_open_clip(cfg.model_name, pretrained=cfg.pretrained or cfg.checkpoint,
                                      preprocess=cfg.preprocess)
        clip = cls.from_architecture(cfg.architecture, preprocess=cfg.preprocess, model_name=cfg.model_name)
        if checkpoint is not None:
            state = read_open_clip_state_dict(checkpoint)
            load_state_dict_strict(clip.model, state, source=checkpoint)
        return clip

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | Path | None = None,
                       preprocess: dict[str, Any] | None = None) -> Clip:
        """An open_clip architecture by name, with weights from a pretrained tag or a local open_clip file (random
        weights without `pretrained`).

        A file that is missing or holds no weights, a tag the model does not have, or a tag whose weights cannot be
        downloaded (offline) is a ClipWeightsError; files and unknown tags are refused before any download."""
        if model_name not in open_clip.list_models() and ":" not in model_name:
            raise ValueError(f"unknown open_clip model '{model_name}'; see open_clip.list_models()")
        architecture = open_clip.get_model_config(model_name)
        file = _pretrained_file(model_name, str(pretrained)) if pretrained is not None else None
        if file is not None:
            clip = cls.from_architecture(architecture, preprocess=preprocess, model_name=model_name)
            load_state_dict_strict(clip.model, read_open_clip_state_dict(file), source=file)
            return clip
        tag = open_clip.get_pretrained_cfg(model_name, str(pretrained)) if pretrained and ":" not in model_name else {}
        weights = None
        if tag:
            weights = _tag_weights(tag, f"the open_clip weights {str(pretrained)!r} of {model_name}")
            if tag.get("quick_gelu", False) != architecture.get("quick_gelu", False):  # as open_clip warns for a tag
                warnings.warn(f"QuickGELU mismatch between {model_name} and its pretrained tag {str(pretrained)!r}",
                              UserWarning, stacklevel=2)
            # the tag's preprocessing, as open_clip gives a tag's model (its size is the model's)
            preprocess = {k: v for k, v in tag.items() if k in _PREPROCESS_FIELDS - {"size"}} | (preprocess or {})
        model = open_clip.create_model(model_name, pretrained=weights and str(weights), weights_only=True,
                                       force_preprocess_cfg=preprocess)
        return cls(model, architecture or {}, dict(model.visual.preprocess_cfg), model_name)

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any], preprocess: dict[str, Any] | None = None,
                          model_name: str | None = None) -> Clip:
        """A randomly initialised model of an explicit open_clip model config (training from scratch)."""
        check_architecture(architecture)
        arch = copy.deepcopy(architecture)
        custom_text = arch.pop("custom_text", False) or "hf_model_name" in arch.get("text_cfg", {})
        model_cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        try:
            model = model_cls(**arch)
        except TypeError as e:
            raise ValueError(f"invalid open_clip architecture: {e}") from None
        pp = {**dataclasses.asdict(PreprocessCfg()), "size": model.visual.image_size, **(preprocess or {})}
        return cls(model, architecture, pp, model_name)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Clip:
        """Load a directory written by `save_pretrained` (config.json + model.safetensors)."""
        path = Path(path)
        if path.is_file() and path.name not in (CONFIG_NAME, WEIGHTS_NAME):
            raise ClipNotFoundError(
                f"{path} is a file, not a CLIP directory ({CONFIG_NAME} + {WEIGHTS_NAME}): an open_clip weights file "
                f"loads with its architecture, Clip.from_open_clip(NAME, pretrained={str(path)!r}) (on the command "
                f"line: --clip NAME --pretrained {path})")
        meta, state = load_pretrained_dir(path, kind=KIND)
        cfg = meta["config"]
        clip = cls.from_architecture(cfg["architecture"], preprocess=cfg["preprocess"], model_name=cfg["model_name"])
        load_state_dict_strict(clip.model, state, source=path)
        clip.cast_from = read_cast_from(cfg.get("cast_from"), path)
        return clip

    def pretrained_config(self) -> dict[str, Any]:
        """What our `config.json` stores: the name, the full architecture and the preprocessing (and `cast_from`
        for a copy stored at lower precision)."""
        config = {"model_name": self.model_name, "architecture": self.architecture,
                  "preprocess": config_to_dict(self.preprocess_cfg)}
        return config | ({"cast_from": self.cast_from} if self.cast_from else {})

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write our format: `config.json` (see `pretrained_config`) + `model.safetensors`, atomically.

        `dtype` (e.g. torch.float16) stores the floating-point weights cast to it; the copy keeps the fingerprint
        of the weights it was cast from, so stages trained on this CLIP's embeddings still match it."""
        state = self.model.state_dict()
        if dtype is None:
            return save_pretrained_dir(path, kind=KIND, config=self.pretrained_config(), state_dict=state)
        stored = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        as_loaded = {k: stored[k].to(v.dtype) for k, v in state.items()}  # what loading into this model gives back
        config = self.pretrained_config() | {"cast_from": {"fingerprint": self.fingerprint(),
                                                            "weights": weights_fingerprint(as_loaded)}}
        return save_pretrained_dir(path, kind=KIND, config=config, state_dict=stored)

    def fingerprint(self) -> str:
        """The identity of this CLIP's weights (16 hex digits), recorded by everything trained on its embeddings.

        A hash of the weights; for a copy stored at lower precision and not changed since it was loaded, the hash
        of the weights it was cast from (`cast_from`)."""
        current = weights_fingerprint(self.model.state_dict())
        if self.cast_from is not None and self.cast_from["weights"] == current:
            return self.cast_from["fingerprint"]
        return current

    def freeze(self) -> Clip:
        """Eval mode and no gradients: CLIP as a fixed conditioner."""
        self.eval()
        self.requires_grad_(False)
        return self

    # ----- properties ---------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """d: the joint embedding size."""
        return int(self.architecture["embed_dim"])

    @property
    def text_width(self) -> int:
        """w: the width of the per-token text states."""
        return int(self.architecture["text_cfg"].get("width", 512))

    @property
    def context_length(self) -> int:
        """l: tokens per caption (longer captions are truncated)."""
        return int(self.tokenizer.context_length)

    @property
    def image_size(self) -> int:
        """The square input resolution of the image tower."""
        size = self.preprocess_cfg.size
        return int(size if isinstance(size, int) else size[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----- encoding -----------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str], truncate: bool = True,
                 rows: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (b, l) long and padding mask (b, l) bool for `captions`.

        An empty caption is an error. A caption longer than the context is cut to fit with a warning, or
        raises CaptionError when `truncate=False`; the message names it by its dataset row when `rows` (b,) gives
        the captions' rows (read only then: a device tensor costs no sync), else by its position.
        """
        captions = _check_captions(captions)
        too_long = [i for i, c in enumerate(captions) if self._token_count(c) > self.context_length]
        if too_long:
            first = f"row {int(rows[too_long[0]])}" if rows is not None else f"#{too_long[0]}"
            msg = (f"{len(too_long)} caption(s) longer than the {self.context_length}-token context "
                   f"(first: {first} {captions[too_long[0]][:60]!r}...)")
            if not truncate:
                raise CaptionError(msg)
            warnings.warn(msg + "; they are truncated", stacklevel=2)
        tokens = self.tokenizer(list(captions))
        return tokens, tokens != _pad_id(self.tokenizer)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], truncate: bool = True,
                    rows: Sequence[int] | torch.Tensor | None = None) -> TextEncoding:
        """Encode captions: pooled embedding (b, d), per-token states (b, l, w) and their mask (b, l). `rows`: the
        captions' dataset rows, which a warning about a caption too long names (see `tokenize`)."""
        tokens, mask = self.tokenize(captions, truncate=truncate, rows=rows)
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        out = self.model.forward_intermediates(text=tokens, text_indices=1, normalize=True,
                                               normalize_intermediates=True)
        text_states = out["text_intermediates"][-1]
        assert text_states.shape[:2] == tokens.shape, (text_states.shape, tokens.shape)
        return TextEncoding(out["text_features"].float(), text_states.float(), mask)

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (b, d) of PIL images or a float tensor (b, 3, h, w) in [0, 1]."""
        return self.encode_pixels(self.preprocess(images))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (b, d) of already preprocessed pixels (b, 3, s, s) (see `preprocess`)."""
        return F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)

    def preprocess(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """CLIP input pixels (b, 3, s, s): for PIL images `unclip.images.to_rgb` (as the data loader reads them:
        EXIF orientation, transparency onto white...) then open_clip's own transform; for tensors in [0, 1] a
        bicubic resize of the short side to s, a centre crop and the same mean/std normalisation."""
        if isinstance(images, torch.Tensor):
            return self._preprocess_tensor(images)
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images to encode")
        return torch.stack([self.image_transform(to_rgb(im)) for im in images])

    def _preprocess_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images as a (b, 3, h, w) tensor in [0, 1], got shape {tuple(x.shape)}")
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
            top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
            x = x[..., top:top + s, left:left + s]
        mean = torch.tensor(self.preprocess_cfg.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess_cfg.std, device=x.device).view(1, 3, 1, 1)
        return (x.float().clamp(0, 1) - mean) / std

    def _token_count(self, caption: str) -> int:
        encode = getattr(self.tokenizer, "encode", None)
        return len(encode(caption)) + 2 if callable(encode) else 0  # + start and end tokens


def load_clip(spec: str | Path, pretrained: str | None = None) -> Clip:
    """A Clip from what a user types: our directory, or an open_clip name + its weights (a tag or a local file).

    An open_clip architecture name without `pretrained` is refused (a ClipWeightsError): its weights would be random;
    `Clip.from_open_clip(name)` builds such a model on purpose."""
    path = Path(spec)
    if path.is_dir():
        if pretrained is not None:
            raise ValueError(f"{spec} is a checkpoint directory; 'pretrained' applies to open_clip names only")
        return Clip.from_pretrained(path)
    tags = architecture_tags(str(spec))
    if tags is not None and pretrained is None:
        choices = f"a pretrained tag ({_shown(tags)}) or " if tags else ""
        raise ClipWeightsError(f"{spec} is an open_clip architecture name without weights: give them as pretrained="
                               f"TAG|FILE ({choices}a local weights file; --pretrained on the command line, "
                               "clip_pretrained in a training config)")
    if tags is not None or str(spec).startswith(("hf-hub:", "local-dir:")):
        return Clip.from_open_clip(str(spec), pretrained=pretrained)
    if path.is_file():
        return Clip.from_pretrained(path)  # says it is a file and how to load it
    raise ClipNotFoundError(
        f"no CLIP at {str(spec)!r}: it is neither a directory written by train-clip / save_pretrained "
        "nor an open_clip model name (see open_clip.list_models()); train one first (train-clip "
        "configs/clip/shapes-tiny.yaml writes runs/clip-shapes-tiny/model) or point to another"
    )


def check_architecture(architecture: dict[str, Any], where: str = "architecture") -> None:
    """Raise ConfigError for the first key of an open_clip model config that open_clip does not take, naming its path
    under `where` and the closest key of open_clip's CLIP / CLIPVisionCfg / CLIPTextCfg."""
    custom_text = architecture.get("custom_text", False) or "hf_model_name" in (architecture.get("text_cfg") or {})
    model_cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    top = [name for name in inspect.signature(model_cls.__init__).parameters if name != "self"] + ["custom_text"]
    check_keys(architecture, top, where, f"open_clip's {model_cls.__name__}")
    for key, cfg_cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if isinstance(architecture.get(key), dict):
            fields = [f.name for f in dataclasses.fields(cfg_cls)]
            check_keys(architecture[key], fields, f"{where}.{key}", f"open_clip's {cfg_cls.__name__}")


def architecture_tags(name: str) -> list[str] | None:
    """The pretrained tags open_clip knows for the architecture `name` ([] for none); None if it is not one."""
    return list(open_clip.list_pretrained_tags_by_model(name)) if name in open_clip.list_models() else None


def _shown(tags: list[str]) -> str:
    return ", ".join(tags[:4]) + (f", ... ({len(tags)} in all)" if len(tags) > 4 else "")


def _pretrained_file(model_name: str, pretrained: str) -> Path | None:
    """The local file `pretrained` names, or None when it is one of open_clip's pretrained tags of `model_name` (or
    `model_name` is a hub or directory name, whose weights come with it). Anything else is a ClipWeightsError."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if ":" in model_name or open_clip.get_pretrained_cfg(model_name, pretrained):
        return None
    if path.is_dir():
        raise ClipWeightsError(f"pretrained {pretrained} is a directory: give an open_clip weights file (a directory "
                               "written by train-clip / save_pretrained is a CLIP itself: Clip.from_pretrained)")
    if len(path.parts) > 1 or path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        raise ClipWeightsError(f"pretrained weights file not found: {pretrained}")
    tags = architecture_tags(model_name) or []
    known = f"its tags: {_shown(tags)}" if tags else "it has no pretrained tags"
    raise ClipWeightsError(f"{pretrained!r} is neither a file nor a pretrained tag of {model_name} ({known})")


_PREPROCESS_FIELDS = {f.name for f in dataclasses.fields(PreprocessCfg)}


def _tag_weights(tag: dict[str, Any], what: str) -> Path:
    """The local file of an open_clip pretrained tag's weights (`tag`: its pretrained config), from the Hugging Face
    cache or downloaded into it: offline, only the cache is asked (`unclip.hub`). Like open_clip, a .safetensors
    twin of the tag's file comes first. A file that cannot be had is a ClipWeightsError naming `what`."""
    try:
        if not tag.get("hf_hub"):
            return Path(open_clip.download_pretrained(tag))  # the tag's own file, or a URL open_clip downloads
        repo_id, filename = os.path.split(tag["hf_hub"])  # "org/repo/file", or "org/repo/" for open_clip's name
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else filename.rpartition(".")[0] + ".safetensors"
        return hub_file(repo_id, [safe, filename] if filename.endswith((".bin", ".pth")) else [filename])
    except OSError as e:  # not cached offline, the Hub unreachable, a missing repository or file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ClipWeightsError(
            f"{what} could not be downloaded (offline?): {reason}. Download them where there is internet "
            "(the Hugging Face cache keeps them), or give a local open_clip weights file instead (pretrained=FILE)"
        ) from None


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """open_clip's symmetric InfoNCE loss over (b, d) normalised features; gathers across ranks when distributed."""
    loss = open_clip.ClipLoss(local_loss=world_size > 1, gather_with_grad=world_size > 1, rank=rank,
                              world_size=world_size)
    return loss(image_features, text_features, logit_scale)


def _make_tokenizer(model_name: str | None, architecture: dict[str, Any]) -> Any:
    text_cfg = architecture.get("text_cfg", {})
    if model_name and model_name in open_clip.list_models():
        return open_clip.get_tokenizer(model_name, context_length=text_cfg.get("context_length"))
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def _pad_id(tokenizer: Any) -> int:
    inner = getattr(tokenizer, "tokenizer", None)
    pad = getattr(inner, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if not captions:
        raise CaptionError("no captions to encode")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise CaptionError(f"caption #{i} is a {type(c).__name__}, not a string")
        if not c.strip():
            raise CaptionError(f"caption #{i} is empty")
        if not has_printable(c):  # e.g. only control characters
            raise CaptionError(f"caption #{i} is empty: it has no printable characters ({c!r})")
    return captions
