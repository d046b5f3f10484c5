"""Small image helpers shared by the data, training and sampling code.

x = pil_to_tensor(img)                     # (3, h, w) float in [0, 1]
x_signed = to_signed_range(x)              # [-1, 1], what the diffusion models see
img = tensor_to_pil(to_unit_range(x0))     # back to a PIL image, clamped
grid = image_grid(samples, nrow=4, labels=captions)
to_square = SquareImage(64); x = to_square(img)   # (3, 64, 64): centre square crop, bicubic resize
small = resize_images(batch, 32)           # (b, 3, h, w) -> (b, 3, 32, 32): area for integer factors, else bicubic
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

__all__ = ["as_image_batch", "open_image", "pil_to_tensor", "tensor_to_pil", "to_unit_range", "to_signed_range",
           "image_grid", "resize_images", "SquareImage"]


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, h, w) float32 tensor in [0, 1] (converted to RGB first if needed)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (h, w, 3)
    return rearrange(pixels, "h w c -> c h w").float() / 255.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """A (3, h, w) tensor in [0, 1] as an RGB PIL image; values outside [0, 1] are clamped."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, h, w) image tensor, got shape {tuple(x.shape)}")
    pixels = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(rearrange(pixels, "c h w -> h w c").numpy(), mode="RGB")


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] to [0, 1] (any shape); does not clamp."""
    return (x + 1) / 2


def to_signed_range(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1] (any shape); does not clamp."""
    return x * 2 - 1


class SquareImage:
    """PIL image -> (3, side, side) float tensor in [0, 1] (centre crop to a square, bicubic resize): a transform."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        if w != h:
            c = min(w, h)
            image = image.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
        if image.size != (self.side, self.side):
            image = image.resize((self.side, self.side), Image.Resampling.BICUBIC)
        return pil_to_tensor(image)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(b, 3, h, w) -> (b, 3, size, size): area averaging for integer downscales, antialiased bicubic otherwise."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h % size == 0 and w % size == 0:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def image_grid(
    images: torch.Tensor | Sequence[Image.Image | torch.Tensor],
    nrow: int,
    *,
    labels: Sequence[str] | None = None,
    pad: int = 2,
) -> Image.Image:
    """Tile images into a grid with `nrow` images per row, on white, each optionally labelled beneath.

    `images` is a (b, 3, h, w) tensor in [0, 1] or a list of PIL images / (3, h, w) tensors; cells take the
    size of the largest image. `labels` (one per image) are drawn in PIL's default font, word-wrapped to
    the cell width (at most 4 lines, the rest cut with "...").
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (b, 3, h, w) tensor, got shape {tuple(images.shape)}")
    pils = [tensor_to_pil(im) if isinstance(im, torch.Tensor) else im.convert("RGB") for im in images]
    if not pils:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(pils):
        raise ValueError(f"got {len(labels)} labels for {len(pils)} images")
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    cell_w, cell_h = max(im.width for im in pils), max(im.height for im in pils)
    font = ImageFont.load_default()
    wrapped = [_wrap(str(label), font, cell_w) for label in labels] if labels is not None else None
    line_h = _line_height(font)
    label_h = max(len(lines) for lines in wrapped) * line_h + 2 if wrapped else 0
    cols, rows = min(nrow, len(pils)), -(-len(pils) // nrow)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(pils):
        x = pad + (i % nrow) * (cell_w + pad)
        y = pad + (i // nrow) * (cell_h + label_h + pad)
        grid.paste(im, (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else ()):
            draw.text((x, y + cell_h + 1 + j * line_h), line, fill="black", font=font)
    return grid


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    return int(font.getbbox("Agy")[3]) + 1


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int = 4) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels; words wider than a line are cut."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(_fit(word, font, width))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + "...", font, width, suffix="...")
    return lines or [""]


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, suffix: str = "") -> str:
    """`text` shortened from the end (keeping `suffix`) until it fits in `width` pixels."""
    body = text[: -len(suffix)] if suffix else text
    while body and font.getlength(body + suffix) > width:
        body = body[:-1]
    return body + suffix


ImageLike = Image.Image | str | Path


def open_image(image: ImageLike) -> Image.Image:
    """A PIL image as is, or an image file read as RGB; ValueError naming the file if it is missing or unreadable."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise TypeError(f"images must be PIL images, image file paths or a (b, 3, h, w) tensor, got "
                        f"{type(image).__name__}")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image not found: {image}") from None
    except (OSError, ValueError) as e:  # unreadable or not an image
        raise ValueError(f"cannot read image {image}: {e}") from None


def as_image_batch(images: ImageLike | Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
    """PIL image(s), image file path(s) or a (b, 3, h, w) tensor in [0, 1] -> a float (b, 3, s, s) batch in [0, 1];
    images of different sizes are resized (`resize_images`) to the largest side s among them."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be (b, 3, h, w) in [0, 1], got {tuple(images.shape)}")
        return images.float()
    if isinstance(images, (Image.Image, str, Path)) or not isinstance(images, Sequence):
        images = [images]  # one image (anything else is refused by open_image, naming its type)
    tensors = [pil_to_tensor(open_image(im)) for im in images]
    side = max(max(t.shape[-2:]) for t in tensors)
    return torch.stack([resize_images(t[None], side)[0] for t in tensors])
