"""Small image helpers shared by the data, training and sampling code.

img = open_image("photo.jpg")              # RGB, as every reader in unclip sees an image (`to_rgb`)
x = pil_to_tensor(img)                     # (3, h, w) float in [0, 1]
x_signed = to_signed_range(x)              # [-1, 1], what the diffusion models see
img = tensor_to_pil(to_unit_range(x0))     # back to a PIL image, clamped
grid = image_grid(samples, nrow=4, labels=captions)
to_square = SquareImage(64); x = to_square(img)   # (3, 64, 64): centre square crop, bicubic resize
small = resize_images(batch, 32)           # (b, 3, h, w) -> (b, 3, 32, 32): area for integer factors, else bicubic
batch = as_image_batch(["a.png", "b.jpg"])  # (2, 3, s, s): centre squares, as the models' training images are cropped

One conversion to RGB (`to_rgb`: EXIF orientation, transparency onto white, 16-bit grey...) serves the data loader
(`unclip.data.decode_image`), `open_image` (the CLI's reader), the CLIP's preprocessing of PIL images and the
manipulations' image inputs, so that an image file means the same pixels to training and to inference.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps

__all__ = ["as_image_batch", "open_image", "decode_image_file", "ImageTooLargeError", "to_rgb", "centre_square",
           "pil_to_tensor", "tensor_to_pil", "to_unit_range", "to_signed_range", "image_grid", "resize_images",
           "SquareImage"]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # 16/32-bit integer and float grey


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as an RGB PIL image, the way every reader in unclip sees it.

    EXIF orientation is applied; transparency (an alpha channel, or a palette, grey or RGB transparent colour) is
    composited onto white; 16/32-bit integer and float grey are scaled to 8 bits (`_grey_to_8bit`); CIELAB goes
    through a colour transform; other modes (CMYK, palette, YCbCr, HSV, 1-bit...) through PIL's conversion.
    Returns `image` itself when it is upright RGB without transparency.
    """
    image = _upright(image)
    if image.mode in _WIDE_GREY_MODES:
        image = _grey_to_8bit(image)
    elif image.mode == "LAB":
        image = _lab_to_rgb(image)
    if _has_transparency(image):
        return _onto_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says (the tag then removed); itself when it has no such tag."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grey image (h, w) as 8-bit "L". "I;16*" spans 0..65535; "I" (32-bit, which PIL
    also gives some 16-bit files) is read as 8-bit when its peak is <= 255, 16-bit when <= 65535, else 31-bit;
    "F" as 0..1 when its peak is <= 1, else 0..255. Values outside the range are clipped."""
    pixels = np.asarray(image, dtype=np.float64)
    peak = pixels.max(initial=0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < peak <= 65535):
        pixels = pixels * (255 / 65535)
    elif image.mode == "I" and peak > 65535:
        pixels = pixels * (255 / (2**31 - 1))
    elif image.mode == "F" and peak <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """A CIELAB image as sRGB (PIL's plain conversion would copy the L, a, b bytes into R, G, B)."""
    from PIL import ImageCms

    lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(image, lab_to_srgb)


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _onto_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of `image` (the crop `SquareImage` gives training images); itself when square."""
    w, h = image.size
    if w == h:
        return image
    c = min(w, h)
    left, top = (w - c) // 2, (h - c) // 2
    return image.crop((left, top, left + c, top + c))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, h, w) float32 tensor in [0, 1] (converted with `to_rgb` first)."""
    img = to_rgb(img)
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
        image = centre_square(to_rgb(image))
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
    pils = [tensor_to_pil(im) if isinstance(im, torch.Tensor) else to_rgb(im) for im in images]
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


class ImageTooLargeError(ValueError):
    """An image with more pixels than PIL's decompression-bomb limit; the message gives both numbers."""


def decode_image_file(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """An image file (a path or a binary file object) decoded in full and converted with `to_rgb`.

    Raises FileNotFoundError, ImageTooLargeError, or PIL's own errors for a file that is not a readable image
    (OSError, ValueError, SyntaxError, ...: a truncated file fails here, not later).
    """
    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(_too_large(e)) from None


def _too_large(error: Image.DecompressionBombError) -> str:
    """'N pixels, over the limit of M ...' from PIL's message (which words it its own way)."""
    numbers = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(error))
    if numbers is None:
        return str(error)
    pixels, limit = (int(n) for n in numbers.groups())
    return f"{pixels:,} pixels, over the limit of {limit:,} (twice PIL.Image.MAX_IMAGE_PIXELS)"


def open_image(image: ImageLike) -> Image.Image:
    """A PIL image or an image file as RGB via `to_rgb` (as the data loader reads it); ValueError naming the file if
    it is missing, unreadable or too large."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if not isinstance(image, (str, Path)):
        raise TypeError(f"images must be PIL images, image file paths or a (b, 3, h, w) tensor, got "
                        f"{type(image).__name__}")
    try:
        return decode_image_file(image)
    except FileNotFoundError:
        raise ValueError(f"image not found: {image}") from None
    except ImageTooLargeError as e:
        raise ValueError(f"image {image} is too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # unreadable or not an image
        raise ValueError(f"cannot read image {image}: {e}") from None


def as_image_batch(images: ImageLike | Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
    """PIL image(s), image file path(s) or a (b, 3, h, w) tensor in [0, 1] -> a float (b, 3, s, s) batch in [0, 1].

    Each image is cut to its centred square, as the decoder's and CLIP's training images are (`SquareImage`; the
    CLIP resizes the short side and crops the centre), never stretched: a wide image loses its sides. Files and
    PIL images are read with `open_image` (`to_rgb`); the squares are resized (`resize_images`) to the largest
    side s among them.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"an image tensor must be (b, 3, h, w) in [0, 1], got {tuple(images.shape)}")
        return _centre_square_tensor(images.float())
    if isinstance(images, (Image.Image, str, Path)) or not isinstance(images, Sequence):
        images = [images]  # one image (anything else is refused by open_image, naming its type)
    tensors = [pil_to_tensor(centre_square(open_image(im))) for im in images]
    side = max(t.shape[-1] for t in tensors)
    return torch.stack([resize_images(t[None], side)[0] for t in tensors])


def _centre_square_tensor(images: torch.Tensor) -> torch.Tensor:
    """(b, 3, h, w) -> (b, 3, c, c), c = min(h, w): the centred square, cropped as `centre_square` crops."""
    h, w = images.shape[-2:]
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    return images[..., top:top + c, left:left + c]
