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
    images = folder_with_bad_images / "images"
    reasons = [f"row 1: {images / '000001.png'}: truncated PNG", f"row 3: {images / '000003.png'}: cannot identify "
               "image file", f"row 4: {images / '000004.png'}: file not found"]
    assert [r[: len(want)] for r, want in zip(batch["skip_reasons"], reasons, strict=True)] == reasons
    lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert [line[: len(want) + 9] for line, want in zip(lines, reasons, strict=True)] == [
        f"skipping {r}" for r in reasons]


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
    ds = datasets.Dataset.from_dict({"image": [{"bytes": pixels.getvalue(), "path": None}] * 5})
    ds = ds.add_column("caption", ["  a photo \n", "", "   ", None, "\x00\x01"])
    items = [ImageTextDataset(ds, pil_to_tensor)[i] for i in range(5)]
    assert items[0]["caption"] == "a photo" and items[0]["image"].shape == (3, 4, 4)
    assert all(it["image"] is None for it in items[1:])
    assert [it["skip_reason"] for it in items[1:]] == ["caption is empty", "caption is empty", "caption is missing",
                                                        "caption has no printable characters ('\\x00\\x01')"]
    with caplog.at_level(logging.WARNING):  # skipped here, so the CLIP never sees a caption it refuses
        batch = collate_image_text(items)
    assert batch["captions"] == ["a photo"] and batch["num_skipped"] == 4
    assert "skipping row 2: caption is empty" in caplog.text and "skipping row 3: caption is missing" in caplog.text


def test_a_caption_that_is_no_string_is_named(tmp_path):
    random_image(4, 4).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": 42}\n')  # a number, not "42"
    item = ImageTextDataset(load_image_text_dataset(tmp_path), pil_to_tensor)[0]
    assert item["image"] is None and item["skip_reason"] == "not a string caption: 42"


def test_skip_reasons_name_the_file_and_what_is_wrong(tmp_path, monkeypatch):
    png = encoded(random_image(8, 8))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    monkeypatch.chdir(tmp_path)
    cases = {
        str(tmp_path / "missing.png"): f"{tmp_path / 'missing.png'}: file not found",
        "sub/missing.png": f"sub/missing.png: file not found (a relative path is read from the current directory, "
                           f"{tmp_path})",
        str(tmp_path / "link.png"): f"{tmp_path / 'link.png'}: file not found (a link to a missing file)",
        str(tmp_path / "empty.png"): f"{tmp_path / 'empty.png'}: empty file (0 bytes)",
        str(tmp_path / "page.jpg"): f"{tmp_path / 'page.jpg'}: cannot identify image file: it holds HTML or XML text "
                                    "('<html><body>404 Not Found</body></html>'), not an image",
        str(tmp_path / "folder.png"): f"{tmp_path / 'folder.png'}: a directory, not an image file",
        "https://example.com/a.jpg": "https://example.com/a.jpg: a URL, not a local file (download the images first)",
    }
    images = [{"bytes": None, "path": path} for path in cases]
    images += [{"bytes": png[:-40], "path": None}, {"bytes": b"GIF89a\x00", "path": "x.gif"}]
    features = datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Value("string")})
    rows = datasets.Dataset.from_dict({"image": images, "caption": ["a cat"] * len(images)}, features=features)
    ds = ImageTextDataset(rows, pil_to_tensor)
    got = [ds[i]["skip_reason"] for i in range(len(ds))]
    assert got[: len(cases)] == list(cases.values())
    assert got[-2].startswith("truncated PNG (") and got[-1].startswith("x.gif: ")
    assert all(ds[i]["image"] is None for i in range(len(ds)))


def test_an_image_column_of_another_type_is_a_data_error(shapes):
    ds = shapes.add_column("id", list(range(len(shapes))))
    with pytest.raises(DataError, match=r"column 'id' holds int64 values, which cannot be read as images.*--image-col"):
        load_image_text_dataset(ds, image_column="id")


def test_csv_metadata_as_spreadsheets_write_it(tmp_path):
    """A UTF-8 byte-order mark (Excel) and a space after each comma are read as the plain header."""
    random_image(4, 4).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes("\ufefffile_name, caption\na.png, un chat gris\n".encode())
    loaded = load_image_text_dataset(tmp_path)
    assert loaded["caption"] == ["un chat gris"] and decode_image(loaded[0]["image"]).size == (4, 4)
    (tmp_path / "metadata.csv").write_bytes("file_name,caption\na.png,un chat \xe0 Paris\n".encode("latin-1"))
    with pytest.raises(DataError, match="metadata.csv is not UTF-8 text"):
        load_image_text_dataset(tmp_path)


def test_windows_file_names_and_relative_folders(tmp_path, monkeypatch):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    random_image(4, 4).save(tmp_path / "data" / "imgs" / "a.png")
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "imgs\\\\a.png", "caption": "a cat"}\n')
    monkeypatch.chdir(tmp_path)
    loaded = load_image_text_dataset("data/")
    assert loaded[0]["image"]["path"] == str(tmp_path / "data" / "imgs" / "a.png")  # absolute: cwd may change
    assert decode_image(loaded[0]["image"]).size == (4, 4)


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
    with pytest.raises(DataError, match=r"no column 'text'.*available columns: image, caption.*caption_column in the "
                                         r"data config \(--caption-column for unclip embed\)"):
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


def test_a_hub_name_fails_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    """A mistyped local path ("mydata") is not retried against an unreachable hub for half a minute."""
    from huggingface_hub import constants

    from unclip import hub

    def load_dataset(name, **kwargs):
        raise AssertionError("would retry the unreachable hub for ~30 s")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_resolves", lambda host: False)
    for variable in hub.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"'mydata' is not a local dataset \(there is no file or directory "
                                        rf"{tmp_path / 'mydata'}\).*the hub cannot be reached"):
        load_image_text_dataset("mydata")
    assert not datasets.config.HF_HUB_OFFLINE and not constants.HF_HUB_OFFLINE  # other libraries' settings untouched


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
