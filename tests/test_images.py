"""Image helpers: reading images as RGB (one way for the data loader, the CLI, the CLIP and the manipulations),
PIL <-> tensor conversion, centre squares, range maps and labelled grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import unclip
from unclip.cli.main import main
from unclip.data import ImageTextDataset, decode_image, make_shapes
from unclip.data.image_text import decode_image_or_reason
from unclip.images import (
    SquareImage,
    as_image_batch,
    image_grid,
    open_image,
    pil_to_tensor,
    tensor_to_pil,
    to_rgb,
    to_signed_range,
    to_unit_range,
)

SHIPPED_CLIP = Path(unclip.__file__).parent / "pretrained" / "shapes-tiny" / "clip"
ORIENTATION = 0x0112


def random_image(h: int = 5, w: int = 7, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def test_pil_tensor_round_trip_is_exact():
    img = random_image()
    x = pil_to_tensor(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert x[:, 2, 3].tolist() == pytest.approx([v / 255 for v in img.getpixel((3, 2))])
    assert np.array_equal(np.asarray(tensor_to_pil(x)), np.asarray(img))


def test_pil_to_tensor_converts_grey_to_rgb():
    x = pil_to_tensor(Image.new("L", (4, 3), 51))
    assert x.shape == (3, 3, 4) and torch.allclose(x, torch.full_like(x, 0.2))


def test_tensor_to_pil_clamps_and_checks_shape():
    x = torch.tensor([-0.5, 0.5, 1.5]).view(3, 1, 1).expand(3, 2, 2)
    assert tensor_to_pil(x).getpixel((0, 0)) == (0, 128, 255)
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        tensor_to_pil(torch.zeros(1, 3, 4, 4))


def test_range_maps_are_inverse():
    x = torch.linspace(-1, 1, 11)
    assert torch.allclose(to_unit_range(x), (x + 1) / 2)
    assert torch.allclose(to_signed_range(to_unit_range(x)), x, atol=1e-6)
    assert to_unit_range(torch.tensor(-1.0)) == 0 and to_signed_range(torch.tensor(1.0)) == 1


def test_image_grid_layout_from_tensor():
    images = torch.stack([torch.full((3, 8, 10), i / 4) for i in range(5)])  # (5, 3, 8, 10)
    grid = image_grid(images, nrow=3, pad=2)
    assert grid.size == (3 * 12 + 2, 2 * 10 + 2)
    px = np.asarray(grid)
    assert tuple(px[2, 2]) == (0, 0, 0)  # first cell
    assert tuple(px[2 + 10, 2 + 12]) == tuple([round(4 / 4 * 255)] * 3)  # cell 4: second row, second column
    assert tuple(px[0, 0]) == (255, 255, 255)  # padding
    assert (px[12:, 2 * 12 + 2 :] == 255).all()  # the missing sixth cell stays blank


def test_image_grid_with_labels_from_pil_list():
    images = [random_image(16, 16, seed=i) for i in range(4)]
    plain = image_grid(images, nrow=2)
    labelled = image_grid(images, nrow=2, labels=["a red circle on a blue background", "x", "y", "z"])
    assert labelled.width == plain.width and labelled.height > plain.height
    px = np.asarray(labelled)
    assert np.array_equal(px[2:18, 2:18], np.asarray(images[0]))
    label_strip = px[19 : labelled.height // 2, 2:18]
    assert (label_strip < 128).any()  # some dark text was drawn under the first cell
    with pytest.raises(ValueError, match="labels"):
        image_grid(images, nrow=2, labels=["only one"])


# ----- one way to read an image ---------------------------------------------------------------------------------
def upright_scene(w: int = 48, h: int = 32) -> Image.Image:
    """A non-square RGB picture whose orientation shows: a red box top left on blue."""
    image = Image.new("RGB", (w, h), (30, 70, 220))
    ImageDraw.Draw(image).rectangle((2, 2, w // 3, h // 3), fill=(220, 30, 30))
    return image


def exif_rotated_jpeg(upright: Image.Image, path: Path) -> Path:
    """`upright` stored turned 90 degrees anticlockwise, with EXIF orientation 6 (turn clockwise to display)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)
    return path


def odd_image(kind: str, tmp_path: Path) -> tuple[Path, np.ndarray, int]:
    """An image file of an odd kind, the (h, w, 3) RGB pixels it shows, and how far (mean absolute difference) a
    reader may be off them: 0 for PNGs, a few levels for JPEG."""
    mask = np.zeros((16, 24), dtype=bool)
    mask[4:12, 6:18] = True  # an opaque box; the rest is transparent
    shown = np.where(mask[..., None], np.array([200, 40, 40], np.uint8), np.uint8(255))  # the box on white
    if kind == "exif-orientation-6":
        upright = upright_scene()
        return exif_rotated_jpeg(upright, tmp_path / "rotated.jpg"), np.asarray(upright), 6
    if kind == "rgba-transparent-background":
        rgba = np.zeros((16, 24, 4), np.uint8)  # hidden colour black, fully transparent
        rgba[mask] = (200, 40, 40, 255)
        Image.fromarray(rgba).save(tmp_path / "rgba.png")
        return tmp_path / "rgba.png", shown, 0
    if kind == "grey-16-bit":
        grey = np.tile(np.arange(0, 240, 10, dtype=np.uint16), (16, 1))  # (16, 24) in 0..230
        Image.fromarray(grey * 257).save(tmp_path / "grey16.png")  # mode I;16
        return tmp_path / "grey16.png", np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1), 0
    if kind == "palette-with-transparency":
        palette = Image.new("P", (24, 16))  # index 0 transparent, 1 the box
        palette.putdata(mask.astype(np.uint8).ravel().tolist())
        palette.putpalette([0, 0, 0, 200, 40, 40])
        palette.save(tmp_path / "palette.png", transparency=0)
        return tmp_path / "palette.png", shown, 0
    raise AssertionError(kind)


ODD_KINDS = ["exif-orientation-6", "rgba-transparent-background", "grey-16-bit", "palette-with-transparency"]


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_the_cli_reader_the_data_loader_and_the_clip_see_the_same_rgb_pixels(kind, tmp_path, tiny_clip):
    path, shown, tolerance = odd_image(kind, tmp_path)
    cli = np.asarray(open_image(path))  # `unclip classify / vary ...` and the Python API's file paths
    assert cli.shape == shown.shape, kind
    assert np.abs(cli.astype(int) - shown).mean() <= tolerance, kind
    with Image.open(path) as opened:  # a PIL image handed to the API
        assert np.array_equal(np.asarray(open_image(opened)), cli), kind
    for value in (path, str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": None}):
        assert np.array_equal(np.asarray(decode_image(value)), cli), kind  # the training data loader
    with Image.open(path) as opened:  # the CLIP's own preprocessing of a PIL image
        clip_pixels = tiny_clip.preprocess([opened])
    assert torch.equal(clip_pixels, tiny_clip.image_transform(Image.fromarray(cli))[None]), kind
    assert torch.equal(as_image_batch(path), SquareImage(min(cli.shape[:2]))(Image.fromarray(cli))[None]), kind


def test_to_rgb_scales_wide_modes_and_leaves_plain_rgb_alone():
    grey = np.array([[0, 100, 200]], dtype=np.int32)  # Image.fromarray: mode "I"

    def shown(array: np.ndarray) -> list[int]:
        image = Image.fromarray(array)
        assert image.mode in ("I", "F")
        return np.asarray(to_rgb(image))[0, :, 0].tolist()

    assert shown(grey) == shown(grey * 257) == shown(grey * 8421504) == [0, 100, 200]  # 8-, 16- and 31-bit ranges
    assert shown((grey / 255).astype(np.float32)) == shown(grey.astype(np.float32)) == [0, 100, 200]  # 0..1, 0..255
    assert to_rgb(Image.new("LAB", (1, 1), (128, 128, 128))).getpixel((0, 0)) == (119, 119, 119)  # mid grey, not blue
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    rgb_with_key = Image.new("RGB", (1, 1), (1, 2, 3))
    rgb_with_key.info["transparency"] = (1, 2, 3)  # a PNG tRNS colour
    assert to_rgb(rgb_with_key).getpixel((0, 0)) == (255, 255, 255)
    plain = upright_scene()
    assert to_rgb(plain) is plain


def test_an_exif_rotated_image_is_turned_once(tmp_path):
    """The tag is dropped when the image is turned, so a reader handed an already read image does not turn it again."""
    path = exif_rotated_jpeg(upright_scene(), tmp_path / "rotated.jpg")
    once = open_image(path)
    assert once.size == (48, 32) and once.getexif().get(ORIENTATION, 1) == 1
    assert np.array_equal(np.asarray(open_image(once)), np.asarray(once))
    assert np.array_equal(np.asarray(decode_image(once)), np.asarray(once))


def test_an_upright_triangle_and_the_same_triangle_stored_rotated_classify_alike(tmp_path, capsys):
    """With the shipped SHAPES CLIP, as `unclip classify` prints it (the rotated file once read as a circle)."""
    shapes = make_shapes(32, split="train", seed=0)
    triangle = next(row["image"] for row in shapes if row["shape"] == 2)
    triangle.save(tmp_path / "upright.png")
    exif_rotated_jpeg(triangle, tmp_path / "rotated.jpg")
    labels = "circle,square,triangle,cross"
    files = [str(tmp_path / "upright.png"), str(tmp_path / "rotated.jpg")]
    assert main(["classify", *files, "--labels", labels, "--clip", str(SHIPPED_CLIP), "--device", "cpu"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[1] for row in rows] == ["triangle", "triangle"]
    assert np.allclose([float(p) for p in rows[0][2:]], [float(p) for p in rows[1][2:]], atol=0.02)


# ----- images too large to read ---------------------------------------------------------------------------------
@pytest.fixture()
def small_pixel_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered so that a 20x20 image is over it (400 > 2 x 150 pixels)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)


def test_a_too_large_image_is_a_one_line_error_naming_the_file_and_the_limit(tmp_path, small_pixel_limit, capsys):
    path = tmp_path / "huge.png"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(ValueError, match=r"^image .*huge.png is too large: 400 pixels, over the limit of 300 "):
        open_image(path)
    assert main(["classify", str(path), "--labels", "a,b", "--clip", str(SHIPPED_CLIP)]) == 2
    err = capsys.readouterr().err
    assert "huge.png is too large: 400 pixels, over the limit of 300" in err and len(err.strip().splitlines()) == 1


def test_the_data_loader_skips_a_too_large_image_saying_so(tmp_path, small_pixel_limit):
    import datasets

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, format="PNG")
    image, reason = decode_image_or_reason(buffer.getvalue())
    assert image is None and reason.startswith("image is too large: 400 pixels, over the limit of 300")
    assert decode_image(buffer.getvalue()) is None
    rows = datasets.Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}], "caption": ["big"]})
    item = ImageTextDataset(rows, SquareImage(8))[0]
    assert item["image"] is None and item["skip_reason"].startswith("image is too large: 400 pixels")


# ----- centre squares, as training crops them -------------------------------------------------------------------
def test_as_image_batch_cuts_the_centre_square_as_training_does():
    wide = upright_scene(48, 32)
    want = SquareImage(32)(wide)  # what the decoder's training data loader makes of it: (3, 32, 32)
    assert torch.equal(as_image_batch(wide), want[None])
    assert torch.equal(as_image_batch(pil_to_tensor(wide)[None]), want[None])  # a (b, 3, h, w) tensor too
    tall = upright_scene(20, 30)
    batch = as_image_batch([wide, tall])  # squares of 32 and 20 px, the smaller resized to 32
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[0], want)
