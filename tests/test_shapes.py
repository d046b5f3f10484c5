"""The SHAPES dataset: palette, held-out split, captions, determinism and pixel-level geometry."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from unclip.data.shapes import (
    ATTRIBUTES,
    CAPTION_TEMPLATES,
    COLORS,
    PALETTE,
    SHAPES,
    ShapeScene,
    all_triples,
    caption_for,
    is_heldout,
    make_shapes,
    render_scene,
    sample_scene,
    split_triples,
)

RED, BLUE = COLORS.index("red"), COLORS.index("blue")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int32)


def test_palette_and_shape_order():
    assert COLORS == ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    assert PALETTE["red"] == (220, 30, 30) and PALETTE["black"] == (20, 20, 20) and PALETTE["white"] == (240, 240, 240)
    assert [PALETTE[c] for c in COLORS][1:6] == [
        (30, 160, 60),
        (30, 70, 220),
        (240, 220, 40),
        (140, 50, 180),
        (245, 140, 20),
    ]
    assert SHAPES == ("circle", "square", "triangle", "cross")
    assert ATTRIBUTES == ("shape", "fg", "bg")


def test_heldout_split_has_25_triples_by_formula():
    triples = all_triples()
    assert len(triples) == 224 and len(set(triples)) == 224 and all(f != b for _, f, b in triples)
    heldout = split_triples("heldout")
    assert heldout == [(s, f, b) for s, f, b in triples if (s + 2 * f + 3 * b) % 9 == 0]
    assert len(heldout) == 25
    assert not is_heldout(0, 3, 3)  # fg == bg is never a valid triple
    train = split_triples("train")
    assert len(train) == 199 and not set(train) & set(heldout)
    assert sorted(train + heldout) == split_triples("all")
    with pytest.raises(ValueError, match="unknown SHAPES split"):
        split_triples("test")


def test_splits_hold_only_their_triples():
    train = make_shapes(400, split="train", seed=3, resolution=16)
    heldout = make_shapes(100, split="heldout", seed=3, resolution=16)
    train_triples = set(zip(train["shape"], train["fg"], train["bg"], strict=True))
    heldout_triples = set(zip(heldout["shape"], heldout["fg"], heldout["bg"], strict=True))
    assert not any(is_heldout(*t) for t in train_triples)
    assert all(is_heldout(*t) for t in heldout_triples) and len(heldout_triples) > 15


def test_captions():
    assert CAPTION_TEMPLATES[0] == "a {fg} {shape} on a {bg} background"
    assert caption_for(0, RED, BLUE) == "a red circle on a blue background"
    assert 5 <= len(CAPTION_TEMPLATES) <= 8
    for t in range(len(CAPTION_TEMPLATES)):
        caption = caption_for(SHAPES.index("triangle"), COLORS.index("yellow"), COLORS.index("purple"), t)
        assert "triangle" in caption and "yellow" in caption and "purple" in caption and "{" not in caption


def test_dataset_columns_and_caption_match_attributes():
    ds = make_shapes(20, seed=0, resolution=32)
    assert ds.column_names == ["image", "caption", "shape", "fg", "bg", "template"]
    assert ds.features["fg"].names == list(COLORS) and ds.features["shape"].names == list(SHAPES)
    for row in ds:
        assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
        assert row["caption"] == caption_for(row["shape"], row["fg"], row["bg"], row["template"])
        assert row["fg"] != row["bg"]
        # the image really shows those colours: its corner is the background, its most common other colour the fg
        px = pixels(row["image"]).reshape(-1, 3)
        assert tuple(px[0]) == PALETTE[COLORS[row["bg"]]]
        assert (px == PALETTE[COLORS[row["fg"]]]).all(axis=1).sum() > 20
    assert len(set(ds["template"])) > 1


def png_bytes(ds) -> list[bytes]:
    return [row["image"]["bytes"] for row in ds.cast_column("image", datasets.Image(decode=False))]


def test_deterministic_and_prefix_stable():
    a = make_shapes(12, seed=5)
    b = make_shapes(12, seed=5)
    longer = make_shapes(30, seed=5)
    other = make_shapes(12, seed=6)
    assert png_bytes(a) == png_bytes(b)
    assert png_bytes(longer)[:12] == png_bytes(a) and longer["caption"][:12] == a["caption"][:12]
    assert png_bytes(other) != png_bytes(a)
    # the held-out split uses its own stream, not the train stream filtered
    assert make_shapes(5, split="all", seed=5)["caption"] != a["caption"][:5]


def scene(shape: str, size: float = 40.0, cx: float = 32.0, cy: float = 32.0) -> ShapeScene:
    return ShapeScene(shape=SHAPES.index(shape), fg=RED, bg=BLUE, size=size, cx=cx, cy=cy)


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_centre_is_fg_and_corners_are_bg(shape):
    px = pixels(render_scene(scene(shape)))
    assert tuple(px[32, 32]) == PALETTE["red"]
    for y, x in [(0, 0), (0, 63), (63, 0), (63, 63)]:
        assert tuple(px[y, x]) == PALETTE["blue"]


def test_circle_corners_of_box_are_bg_and_square_fills_box():
    circle, square = pixels(render_scene(scene("circle"))), pixels(render_scene(scene("square")))
    # box spans [12, 52]: pixel 13 lies inside it; the box corner is outside the circle but inside the square
    assert tuple(circle[13, 13]) == PALETTE["blue"] and tuple(square[13, 13]) == PALETTE["red"]
    assert tuple(square[51, 51]) == PALETTE["red"] and tuple(square[52, 52]) == PALETTE["blue"]


def test_triangle_points_up():
    px = pixels(render_scene(scene("triangle")))  # box rows 12..52
    is_fg = (px == PALETTE["red"]).all(axis=-1)
    is_bg = (px == PALETTE["blue"]).all(axis=-1)
    assert is_bg[13, 12:52].mean() > 0.9 and not is_bg[13, 31:33].all()  # a sliver at the top centre only
    assert is_fg[51, 12:52].mean() > 0.9
    assert tuple(px[50, 13]) == PALETTE["red"] and tuple(px[14, 13]) == PALETTE["blue"]


def test_cross_is_a_plus_with_thirds():
    px = pixels(render_scene(scene("cross", size=42.0)))  # box [11, 53], arms [25, 39]
    for y, x in [(12, 12), (12, 51), (51, 12), (51, 51), (24, 24)]:
        assert tuple(px[y, x]) == PALETTE["blue"]
    for y, x in [(32, 12), (32, 51), (12, 32), (51, 32), (26, 26), (38, 38)]:
        assert tuple(px[y, x]) == PALETTE["red"]


def test_scenes_stay_inside_the_canvas():
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = sample_scene(rng, all_triples())
        assert 26 <= s.size <= 44
        assert 4 <= s.cx - s.size / 2 and s.cx + s.size / 2 <= 60 and 4 <= s.cy - s.size / 2 and s.cy + s.size / 2 <= 60
    for row in make_shapes(40, seed=1):
        px = pixels(row["image"])
        bg = np.array(PALETTE[COLORS[row["bg"]]])
        border = np.concatenate([px[:4].reshape(-1, 3), px[60:].reshape(-1, 3), px[:, :4].reshape(-1, 3)])
        assert (border == bg).all() and (px[:, 60:] == bg).all()


@pytest.mark.parametrize("resolution", [16, 32])
def test_low_resolution_is_the_downsampled_scene(resolution):
    large, small = make_shapes(8, seed=2, resolution=64), make_shapes(8, seed=2, resolution=resolution)
    for big_row, small_row in zip(large, small, strict=True):
        assert small_row["image"].size == (resolution, resolution)
        down = big_row["image"].resize((resolution, resolution), Image.Resampling.BOX)
        diff = np.abs(pixels(small_row["image"]) - pixels(down))
        assert diff.mean() < 0.5 and diff.max() <= 2  # equal up to 8-bit rounding


def test_other_resolutions_render():
    for resolution in (16, 128, 256):
        img = render_scene(scene("triangle"), resolution)
        assert img.size == (resolution, resolution)
        assert tuple(pixels(img)[resolution // 2, resolution // 2]) == PALETTE["red"]


def test_images_are_png_bytes():
    ds = make_shapes(2, seed=0)
    data = png_bytes(ds)[0]
    assert data.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(data)).mode == "RGB"
