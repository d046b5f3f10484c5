"""The image-text loader: every source kind round-trips, bad images and captions are skipped, errors are clear."""

from __future__ import annotations

import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from unclip.data.image_text import (
    DataError,
    ImageTextDataset,
    collate_image_text,
    decode_image,
    load_image_text_dataset,
)
from unclip.data.shapes import make_shapes, write_image_folder
from unclip.images import pil_to_tensor


@pytest.fixture(autouse=True)
def local_hf_cache(tmp_path, monkeypatch):
    """Keep the arrow files `datasets` builds from parquet out of the user's cache, and never touch the hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(6, seed=0, resolution=16)


def assert_same_pairs(loaded: datasets.Dataset, original: datasets.Dataset) -> None:
    assert isinstance(loaded.features["image"], datasets.Image) and not loaded.features["image"].decode
    assert list(loaded["caption"]) == list(original["caption"])
    for got, want in zip(loaded, original, strict=True):
        assert np.array_equal(np.asarray(decode_image(got["image"])), np.asarray(want["image"]))


def test_image_folder_round_trip(shapes, tmp_path):
    out = write_image_folder(shapes, tmp_path / "folder")
    assert (out / "images" / "000000.png").is_file() and not list(out.glob(".*"))
    first = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert first["file_name"] == "images/000000.png" and first["caption"] == shapes[0]["caption"]
    assert first["fg"] == shapes[0]["fg"] and first["template"] == shapes[0]["template"]
    loaded = load_image_text_dataset(out)
    assert_same_pairs(loaded, shapes)
    assert list(loaded["shape"]) == list(shapes["shape"])
    assert loaded[0]["image"]["path"] == str(out / "images" / "000000.png")


def test_image_folder_with_csv_metadata(tmp_path):
    random_image(4, 4).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a cat, sitting"\n')
    loaded = load_image_text_dataset(tmp_path, caption_column="text")
    assert loaded["text"][0] == "a cat, sitting" and decode_image(loaded[0]["image"]).size == (4, 4)


def test_parquet_round_trip(shapes, tmp_path):
    (tmp_path / "pq").mkdir()
    shapes.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    for source in (tmp_path / "pq" / "part-0.parquet", tmp_path / "pq", str(tmp_path / "pq" / "*.parquet")):
        assert_same_pairs(load_image_text_dataset(source), shapes)


def test_save_to_disk_round_trip(shapes, tmp_path):
    shapes.save_to_disk(str(tmp_path / "saved"))
    assert_same_pairs(load_image_text_dataset(tmp_path / "saved"), shapes)
    datasets.DatasetDict({"train": shapes.select(range(2)), "val": shapes}).save_to_disk(str(tmp_path / "dict"))
    assert_same_pairs(load_image_text_dataset(tmp_path / "dict", split="val"), shapes)
    with pytest.raises(DataError, match="no split 'test'; available splits: train, val"):
        load_image_text_dataset(tmp_path / "dict", split="test")


def test_in_memory_dataset_passes_through_undecoded(shapes):
    loaded = load_image_text_dataset(shapes)
    assert len(loaded) == len(shapes) and set(loaded[0]["image"]) == {"bytes", "path"}


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture
def folder_with_bad_images(shapes, tmp_path):
    out = write_image_folder(shapes, tmp_path / "folder")
    png = (out / "images" / "000001.png").read_bytes()
    (out / "images" / "000001.png").write_bytes(png[: len(png) // 2])  # truncated PNG
    (out / "images" / "000003.png").write_bytes(np.random.default_rng(0).bytes(300))  # not an image
    (out / "images" / "000004.png").unlink()  # missing file
    return out


def test_collate_skips_bad_images_with_a_warning(folder_with_bad_images, caplog):
    ds = ImageTextDataset(load_image_text_dataset(folder_with_bad_images), pil_to_tensor, extra_columns=("fg",))
    items = [ds[i] for i in range(len(ds))]  # reading never raises
    assert [it["image"] is None for it in items] == [False, True, False, True, True, False]
    with caplog.at_level(logging.WARNING, logger="unclip.data.image_text"):
        batch = collate_image_text(items)
    assert batch["num_skipped"] == 3
    assert batch["images"].shape == (3, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 2, 5] and batch["index"].dtype == torch.long
    assert batch["captions"] == [items[i]["caption"] for i in (0, 2, 5)]
    assert batch["fg"].tolist() == [items[i]["fg"] for i in (0, 2, 5)]
    assert "skipping sample 1: image could not be decoded" in caplog.text
    assert "skipping sample 3: image could not be decoded" in caplog.text
    assert len([r for r in caplog.records if "skipping sample" in r.getMessage()]) == 3


def test_all_bad_batch_is_empty(folder_with_bad_images):
    ds = ImageTextDataset(load_image_text_dataset(folder_with_bad_images), pil_to_tensor, extra_columns=("fg",))
    batch = collate_image_text([ds[1], ds[3]])
    assert batch["images"].shape[0] == 0 and batch["captions"] == [] and batch["index"].shape == (0,)
    assert batch["num_skipped"] == 2 and len(batch["fg"]) == 0


def test_data_loader_batches(shapes):
    ds = ImageTextDataset(load_image_text_dataset(shapes), pil_to_tensor)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_image_text)
    sizes = [batch["images"].shape for batch in loader]
    assert sizes == [(4, 3, 16, 16), (2, 3, 16, 16)]


def test_empty_captions_are_bad_samples(caplog):
    pixels = io.BytesIO()
    random_image(4, 4).save(pixels, format="PNG")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": pixels.getvalue(), "path": None}] * 4})
    ds = ds.add_column("caption", ["  a photo \n", "", "   ", None])
    items = [ImageTextDataset(ds, pil_to_tensor)[i] for i in range(4)]
    assert items[0]["caption"] == "a photo" and items[0]["image"].shape == (3, 4, 4)
    assert all(it["image"] is None and it["skip_reason"] == "caption is empty" for it in items[1:])
    with caplog.at_level(logging.WARNING):
        batch = collate_image_text(items)
    assert batch["captions"] == ["a photo"] and batch["num_skipped"] == 3
    assert "skipping sample 2: caption is empty" in caplog.text


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_converts_modes_to_rgb(tmp_path):
    grey = Image.new("L", (3, 2), 100)
    rgba = Image.new("RGBA", (3, 2), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    deep = Image.fromarray(np.full((2, 3), 65535, dtype=np.uint16))
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))
    cases = {
        "L": (encoded(grey), (100, 100, 100)),
        "RGBA": (encoded(rgba), (255, 255, 255)),
        "P": (encoded(palette), (10, 20, 30)),
        "P+transparency": (encoded(transparent_palette), (255, 255, 255)),
        "LA": (encoded(Image.new("LA", (3, 2), (0, 0))), (255, 255, 255)),
        "I;16": (encoded(deep), (255, 255, 255)),
        "CMYK": (encoded(cmyk, "JPEG"), None),
    }
    for name, (data, want) in cases.items():
        img = decode_image(data)
        assert img is not None and img.mode == "RGB" and img.size == (3, 2), name
        if want is not None:
            assert img.getpixel((2, 1)) == want, name
    assert decode_image(encoded(rgba)).getpixel((0, 0)) == (0, 0, 255)
    assert decode_image(cmyk).getpixel((0, 0))[0] > 200  # CMYK (0, 255, 255, 0) is red
    # every accepted input kind
    path = tmp_path / "g.png"
    grey.save(path)
    for value in (grey, path, str(path), {"bytes": None, "path": str(path)}, {"bytes": encoded(grey), "path": None}):
        assert decode_image(value).getpixel((0, 0)) == (100, 100, 100)


def test_decode_image_returns_none_for_unreadable_input(tmp_path):
    png = encoded(random_image(32, 32))
    assert decode_image(png[:-40]) is None  # truncated: caught by img.load()
    assert decode_image(b"not an image") is None
    assert decode_image(tmp_path / "missing.png") is None
    assert decode_image(None) is None


def test_missing_columns_name_what_is_there(shapes):
    with pytest.raises(DataError, match=r"no column 'text'.*available columns: image, caption.*caption_column"):
        load_image_text_dataset(shapes, caption_column="text")
    with pytest.raises(DataError, match=r"no column 'jpg'.*image_column"):
        load_image_text_dataset(shapes, image_column="jpg")
    with pytest.raises(DataError, match="available"):
        ImageTextDataset(shapes, pil_to_tensor, extra_columns=("size",))


def test_empty_dataset_is_an_error(shapes, tmp_path):
    with pytest.raises(DataError, match="has no rows"):
        load_image_text_dataset(shapes.select([]))
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_image_text_dataset(tmp_path)


def test_bad_paths_are_clear_errors_without_hub_lookup(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path must not be looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for source in ("./nope/", tmp_path / "nope", "data/train/shapes.parquet", "~/nope"):
        with pytest.raises(DataError, match="not found"):
            load_image_text_dataset(source)
    with pytest.raises(DataError, match="no files match"):
        load_image_text_dataset(str(tmp_path / "*.parquet"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="is not a dataset directory"):
        load_image_text_dataset(tmp_path)


def test_image_folder_metadata_without_file_name(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(DataError, match="row 1 has no 'file_name'"):
        load_image_text_dataset(tmp_path)


def test_write_image_folder_reencodes_non_png(tmp_path):
    jpeg = encoded(random_image(8, 8), "JPEG")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": jpeg, "path": None}], "caption": ["noise"], "score": [0.5]})
    loaded = load_image_text_dataset(write_image_folder(ds, tmp_path / "out"))
    assert loaded[0]["score"] == 0.5 and (tmp_path / "out" / "images" / "000000.png").read_bytes().startswith(
        b"\x89PNG"
    )
    assert np.array_equal(np.asarray(decode_image(loaded[0]["image"])), np.asarray(decode_image(jpeg)))
