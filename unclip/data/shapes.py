"""SHAPES: a synthetic text-to-image dataset of one coloured shape on a coloured background.

Every image is a solid background of one palette colour with one filled shape of another palette colour.
Geometry is defined in 64-px units and scaled, so a scene rendered at 16 px is the downsampled picture of the
same scene at 64 px (the cascade trains 16 -> 32 -> 64 on it). Anti-aliasing is box filtering of a supersampled
render (4x, finer below 64 px): each pixel's value is the fraction of its sub-pixel centres inside the shape.

    ds = make_shapes(10_000, split="train", seed=0, resolution=64)   # image, caption, shape, fg, bg, template
    ds[0]["caption"]   # e.g. "a red circle on a blue background"

The 25 (shape, fg, bg) triples with `(shape + 2 fg + 3 bg) % 9 == 0` never appear in the "train" split; they
form the "heldout" split, for testing compositional generalisation. Sample i of a given (split, seed) is the
same whatever `num_samples` is.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, Value
from einops import reduce
from PIL import Image as PILImage

__all__ = [
    "ATTRIBUTES",
    "CAPTION_TEMPLATES",
    "COLORS",
    "PALETTE",
    "SHAPES",
    "ShapeScene",
    "all_triples",
    "caption_for",
    "is_heldout",
    "make_shapes",
    "shapes_features",
    "render_scene",
    "sample_scene",
    "split_triples",
    "write_image_folder",
]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
ATTRIBUTES = ("shape", "fg", "bg")

# Every template names all three attributes; the first is the canonical caption used by evaluations.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {fg} {shape} on a {bg} background",
    "a {shape} in {fg} on a {bg} background",
    "{fg} {shape}, {bg} background",
    "a drawing of a {fg} {shape} against a {bg} backdrop",
    "a {bg} background with a {fg} {shape}",
    "a simple {fg} {shape} centred on {bg}",
)

SIZE_RANGE = (26.0, 44.0)  # side of the shape's bounding box, 64-px units
CANVAS = (4.0, 60.0)  # the bounding box lies inside this interval on both axes, 64-px units
SUPERSAMPLE = 4  # at least this many sub-pixels per pixel along each axis, and at least a 256-px grid (see _factor)
_SPLIT_IDS = {"train": 0, "heldout": 1, "all": 2}
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")

Split = Literal["train", "heldout", "all"]


def all_triples() -> list[tuple[int, int, int]]:
    """All 224 (shape, fg, bg) index triples with fg != bg, in lexicographic order."""
    n_colors = len(COLORS)
    return [(s, f, b) for s in range(len(SHAPES)) for f in range(n_colors) for b in range(n_colors) if f != b]


def is_heldout(shape: int, fg: int, bg: int) -> bool:
    """Whether the triple belongs to the held-out split: fg != bg and (shape + 2 fg + 3 bg) % 9 == 0."""
    return fg != bg and (shape + 2 * fg + 3 * bg) % 9 == 0


def split_triples(split: Split) -> list[tuple[int, int, int]]:
    """The triples a split draws from: "train" (199), "heldout" (25) or "all" (224)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown SHAPES split {split!r}; expected one of {', '.join(_SPLIT_IDS)}")
    triples = all_triples()
    if split == "all":
        return triples
    return [t for t in triples if is_heldout(*t) == (split == "heldout")]


def caption_for(shape: int, fg: int, bg: int, template: int = 0) -> str:
    """The caption of a triple (indices into SHAPES / COLORS) with CAPTION_TEMPLATES[template]."""
    return CAPTION_TEMPLATES[template].format(shape=SHAPES[shape], fg=COLORS[fg], bg=COLORS[bg])


@dataclass(frozen=True)
class ShapeScene:
    """One SHAPES picture: attribute indices plus geometry in 64-px units (box side and centre)."""

    shape: int  # index into SHAPES
    fg: int  # index into COLORS, the shape's colour
    bg: int  # index into COLORS, the background's colour
    size: float  # side of the shape's square bounding box
    cx: float  # centre, x (right)
    cy: float  # centre, y (down)


def sample_scene(rng: np.random.Generator, triples: list[tuple[int, int, int]]) -> ShapeScene:
    """Draw a triple uniformly from `triples`, a side uniform in SIZE_RANGE and a centre keeping the box in CANVAS."""
    shape, fg, bg = triples[int(rng.integers(len(triples)))]
    size = float(rng.uniform(*SIZE_RANGE))
    lo, hi = CANVAS[0] + size / 2, CANVAS[1] - size / 2
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    return ShapeScene(shape=shape, fg=fg, bg=bg, size=size, cx=cx, cy=cy)


def _factor(resolution: int) -> int:
    """Sub-pixels per pixel: 4x, or finer below 64 px so that the sub-pixel grid is the one a 64-px render uses,
    which makes a 16- or 32-px render exactly the box-downsampled 64-px one (up to 8-bit rounding)."""
    return max(SUPERSAMPLE, -(-SUPERSAMPLE * 64 // resolution))


def _coverage(scene: ShapeScene, resolution: int) -> np.ndarray:
    """(resolution, resolution) float fraction of each pixel's sub-pixel centres that lie inside the shape."""
    half, scale, k = scene.size / 2, resolution / 64.0, _factor(resolution)
    # Only pixels that meet the bounding box can be covered; evaluate the sub-pixel grid there alone.
    x0, x1 = max(int(np.floor((scene.cx - half) * scale)), 0), min(int(np.ceil((scene.cx + half) * scale)), resolution)
    y0, y1 = max(int(np.floor((scene.cy - half) * scale)), 0), min(int(np.ceil((scene.cy + half) * scale)), resolution)
    xs = (np.arange(x0 * k, x1 * k) + 0.5) / (k * scale)  # sub-pixel centres, 64-px units
    ys = (np.arange(y0 * k, y1 * k) + 0.5) / (k * scale)
    dx = np.abs(xs[None, :] - scene.cx)  # (1, w)
    dy = np.abs(ys[:, None] - scene.cy)  # (h, 1)
    name = SHAPES[scene.shape]
    if name == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif name == "square":
        inside = (dx <= half) & (dy <= half)
    elif name == "triangle":  # apex at top centre, base along the bottom of the box
        depth = ys[:, None] - (scene.cy - half)  # (h, 1) distance below the apex
        inside = (dx <= depth / 2) & (depth <= scene.size)
    elif name == "cross":  # plus sign, arms one third of the side thick
        arm = scene.size / 6
        inside = ((dx <= half) & (dy <= arm)) | ((dy <= half) & (dx <= arm))
    else:
        raise ValueError(f"unknown shape index {scene.shape}")
    coverage = np.zeros((resolution, resolution), dtype=np.float32)
    coverage[y0:y1, x0:x1] = reduce(inside.astype(np.float32), "(h a) (w b) -> h w", "mean", a=k, b=k)
    return coverage


def render_scene(scene: ShapeScene, resolution: int = 64) -> PILImage.Image:
    """Render `scene` as a (resolution, resolution) RGB image, anti-aliased by (at least 4x) supersampling."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    alpha = _coverage(scene, resolution)[..., None]  # (h, w, 1)
    fg = np.array(PALETTE[COLORS[scene.fg]], dtype=np.float32)
    bg = np.array(PALETTE[COLORS[scene.bg]], dtype=np.float32)
    pixels = np.rint(bg + alpha * (fg - bg)).astype(np.uint8)  # (h, w, 3)
    return PILImage.fromarray(pixels, mode="RGB")


def _png_bytes(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def shapes_features() -> Features:
    """The columns of a SHAPES dataset: image, caption, shape, fg, bg (ClassLabels) and template."""
    return Features(
        {
            "image": Image(),
            "caption": Value("string"),
            "shape": ClassLabel(names=list(SHAPES)),
            "fg": ClassLabel(names=list(COLORS)),
            "bg": ClassLabel(names=list(COLORS)),
            "template": Value("int64"),
        }
    )


def make_shapes(num_samples: int, *, split: Split = "train", seed: int = 0, resolution: int = 64) -> Dataset:
    """A SHAPES dataset of `num_samples` rows; row i depends only on (split, seed, i, resolution).

    Columns: image (PNG, resolution x resolution RGB), caption (str), shape / fg / bg (ClassLabel indices),
    template (int index into CAPTION_TEMPLATES).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be non-negative, got {num_samples}")
    triples = split_triples(split)
    columns: dict[str, list] = {name: [] for name in shapes_features()}
    for i in range(num_samples):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        scene = sample_scene(rng, triples)
        template = int(rng.integers(len(CAPTION_TEMPLATES)))
        columns["image"].append({"bytes": _png_bytes(render_scene(scene, resolution)), "path": None})
        columns["caption"].append(caption_for(scene.shape, scene.fg, scene.bg, template))
        columns["shape"].append(scene.shape)
        columns["fg"].append(scene.fg)
        columns["bg"].append(scene.bg)
        columns["template"].append(template)
    return Dataset.from_dict(columns, features=shapes_features())


def write_image_folder(
    dataset: Dataset, out_dir: str | Path, *, image_column: str = "image", caption_column: str = "caption"
) -> Path:
    """Write `dataset` as an image folder: `out_dir/images/000000.png ...` and `out_dir/metadata.jsonl`.

    Each metadata line holds `file_name` (relative to out_dir), `caption` (from `caption_column`) and every other
    scalar column.
    PNG inputs are copied byte for byte, anything else is re-encoded as PNG. The metadata is written last,
    under a temporary name then renamed, so a folder with a `metadata.jsonl` is always complete.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "metadata.jsonl").unlink(missing_ok=True)  # an earlier write's metadata must not describe new images
    dataset = dataset.cast_column(image_column, Image(decode=False))
    others = [c for c in dataset.column_names if c not in (image_column, caption_column)]
    width = max(6, len(str(len(dataset) - 1)))
    lines = []
    for i, row in enumerate(dataset):
        file_name = f"images/{i:0{width}d}.png"
        _write_png(row[image_column], out_dir / file_name)
        record = {"file_name": file_name, "caption": row[caption_column]}
        record.update({c: row[c] for c in others if isinstance(row[c], (str, int, float, bool, type(None)))})
        lines.append(json.dumps(record))
    tmp = out_dir / f".metadata.jsonl.tmp-{uuid.uuid4().hex[:8]}"
    with tmp.open("w") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / "metadata.jsonl")
    return out_dir


def _write_png(value: dict, path: Path) -> None:
    data = value.get("bytes")
    if data is None:
        data = Path(value["path"]).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        with PILImage.open(io.BytesIO(data)) as img:
            data = _png_bytes(img if img.mode in _PNG_MODES else img.convert("RGB"))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
