"""Image helpers: PIL <-> tensor conversion, range maps and labelled grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.images import image_grid, pil_to_tensor, tensor_to_pil, to_signed_range, to_unit_range


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
