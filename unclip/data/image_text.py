"""Image-text pairs from anywhere `datasets` can read, robust to images that cannot be decoded.

    ds = load_image_text_dataset("data/shapes/")          # image folder, saved dataset, parquet, hub name...
    torch_ds = ImageTextDataset(ds, image_transform)      # rows -> {"image": (3, h, w) | None, "caption", ...}
    loader = DataLoader(torch_ds, batch_size=64, collate_fn=collate_image_text)

Images are never decoded when a row is read from the HF dataset (the image column is cast to
`Image(decode=False)`), only in `ImageTextDataset.__getitem__`, where a truncated, corrupt or missing file
(or an empty, missing or non-string caption) marks the sample bad instead of raising, with the reason in words
(`skip_reasons.py`). `collate_image_text` drops bad samples, logs one warning line per sample naming its row,
file and reason, and reports how many it skipped and why.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.naming import camelcase_to_snakecase
from PIL import Image

from .. import hub
from ..images import ImageTooLargeError, decode_image_file, to_rgb
from .skip_reasons import caption_problem, unreadable_image_reason

__all__ = ["DataError", "load_image_text_dataset", "decode_image", "decode_image_or_reason", "ImageTextDataset",
           "collate_image_text"]

logger = logging.getLogger(__name__)

_TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
_LOCAL_SUFFIXES = {*_TABLE_SUFFIXES, ".jsonl", ".json", ".csv"}


class DataError(ValueError):
    """A dataset source that cannot be used: missing path, no rows, or a missing image or caption column."""


def load_image_text_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    split: str = "train",
) -> datasets.Dataset:
    """Load image-text pairs as a `datasets.Dataset` whose image column never decodes on access.

    `source` is a Dataset (or DatasetDict, of which `split` is taken); a directory holding an image folder
    (`metadata.jsonl` or `metadata.csv` with `file_name` and a caption column), a `save_to_disk` directory,
    or `.parquet` / `.arrow` files; a `.parquet` / `.arrow` file or a glob of them; or else a Hugging Face hub
    dataset name. Raises DataError for a missing path, an empty dataset or a missing column.
    """
    if isinstance(source, datasets.DatasetDict):
        source = _pick_split(source, split, "the DatasetDict")
    if isinstance(source, datasets.Dataset):
        ds, where = source, "the dataset"
    else:
        ds, where = _load_source(str(source), image_column=image_column, split=split), str(source)
    if len(ds) == 0:
        raise DataError(f"{where} has no rows")
    for key, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in ds.column_names:
            flag = "--" + key.replace("_", "-")
            raise DataError(
                f"{where} has no column '{column}'; available columns: {', '.join(ds.column_names)}. Name the "
                f"column that holds the {key.split('_')[0]}s with {key} in the data config ({flag} for unclip embed)"
            )
    return _undecoded(ds, image_column)


def _load_source(source: str, *, image_column: str, split: str) -> datasets.Dataset:
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_directory(path, image_column=image_column, split=split)
    if path.is_file():
        return _load_tables([path], where=source)
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        if not files:
            raise DataError(f"no files match {source}")
        return _load_tables(files, where=source)
    if _looks_local(source):
        raise DataError(f"dataset path not found: {source}")
    ds = _load_from_hub(source, split)
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"'{source}' split '{split}' loaded as {type(ds).__name__}, not a map-style Dataset")
    return ds


def _load_from_hub(source: str, split: str) -> Any:
    """`source` as a hub dataset name, e.g. "user/dataset". When the hub is offline (`unclip.hub`: HF_HUB_OFFLINE, or
    its host does not resolve) and `datasets` has not cached that name, it fails at once, so a mistyped local path is
    not retried against an unreachable hub for half a minute."""
    local = f"there is no file or directory {Path(source).expanduser().absolute()}"
    offline = hub.offline_reason()
    if offline is not None and not _in_datasets_cache(source):
        raise DataError(f"'{source}' is not a local dataset ({local}), and as a Hugging Face Hub dataset name it is "
                        f"not cached here and the hub cannot be reached ({offline})")
    if offline is not None and not datasets.config.HF_HUB_OFFLINE:
        logger.warning("the Hugging Face Hub cannot be reached (%s): `datasets` loads '%s' from its cache after its "
                       "retries; HF_HUB_OFFLINE=1 skips them", offline, source)
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub raises connection, not-found and config errors of many types
        raise DataError(f"'{source}' is neither a local dataset ({local}) nor a dataset the Hugging Face Hub "
                        f"could give: {e}") from e


def _in_datasets_cache(name: str) -> bool:
    """Whether `datasets` holds a prepared copy of the hub dataset `name` ("user/dataset"), which it loads offline:
    a directory `{namespace}___{snake_case_name}/{config}/{version}/{hash}` in its cache."""
    *namespace, dataset = name.split("/")
    cached_name = "___".join([*namespace, camelcase_to_snakecase(dataset)])
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / cached_name
    return any(path.is_dir() for path in root.glob("*/*/*"))


def _looks_local(source: str) -> bool:
    """Whether a string that names no existing file is clearly meant as a path rather than a hub name."""
    return (
        source.startswith((".", "~", "/", os.sep))
        or source.endswith(("/", os.sep))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in _LOCAL_SUFFIXES
    )


def _load_directory(path: Path, *, image_column: str, split: str) -> datasets.Dataset:
    for name in ("metadata.jsonl", "metadata.csv"):
        if (path / name).is_file():
            return _load_image_folder(path.absolute(), path.absolute() / name, image_column=image_column)
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        return _pick_split(ds, split, str(path)) if isinstance(ds, datasets.DatasetDict) else ds
    for suffix in _TABLE_SUFFIXES:
        files = sorted(path.rglob(f"*{suffix}"))
        if files:
            return _load_tables(files, where=str(path))
    raise DataError(
        f"{path} is not a dataset directory: it has no metadata.jsonl / metadata.csv (image folder), no "
        "dataset_info.json / state.json (save_to_disk) and no .parquet / .arrow files"
    )


def _load_image_folder(root: Path, metadata: Path, *, image_column: str) -> datasets.Dataset:
    """An image folder's metadata as a Dataset whose `image_column` holds absolute file paths."""
    try:  # utf-8-sig: also UTF-8 with a byte-order mark, as Excel writes CSV
        if metadata.suffix == ".jsonl":
            with metadata.open(encoding="utf-8-sig") as f:
                records = [json.loads(line) for line in f if line.strip()]
        else:
            with metadata.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, skipinitialspace=True)  # "file_name, caption": the header has no spaces
                if reader.fieldnames:
                    reader.fieldnames = [name.strip() for name in reader.fieldnames]
                records = list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{metadata} is not UTF-8 text ({e}); save it as UTF-8") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"{metadata} could not be parsed: {e}") from None
    if not records:
        raise DataError(f"{metadata} has no rows")
    for n, r in enumerate(records, start=1):
        if not isinstance(r, dict) or not r.get("file_name"):
            raise DataError(f"{metadata}: row {n} has no 'file_name' (the image folder convention): {r!r}")
    keys = list(dict.fromkeys(k for r in records for k in r))
    columns: dict[str, list[Any]] = {image_column: [_image_path(root, str(r["file_name"])) for r in records]}
    for key in keys:
        if key not in ("file_name", image_column):
            columns[key] = [r.get(key) for r in records]
    try:
        return datasets.Dataset.from_dict(columns)
    except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError: mixed types in a column
        raise DataError(f"{metadata} could not be read as a table (a column with mixed types?): {e}") from None


def _image_path(root: Path, file_name: str) -> str:
    """root / file_name; a Windows-style name (images\\0001.png) is read with "/" where only that form exists."""
    path = root / file_name
    if "\\" in file_name and os.sep == "/" and not path.exists():
        posix = root / file_name.replace("\\", "/")
        if posix.exists():
            return str(posix)
    return str(path)


def _load_tables(files: Sequence[Path], *, where: str) -> datasets.Dataset:
    kinds = {_TABLE_SUFFIXES.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{where}: expected .parquet or .arrow files (one kind), got {', '.join(map(str, files[:5]))}")
    return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")


def _pick_split(ds: datasets.DatasetDict, split: str, where: str) -> datasets.Dataset:
    if split not in ds:
        raise DataError(f"{where} has no split '{split}'; available splits: {', '.join(ds)}")
    return ds[split]


def _undecoded(ds: datasets.Dataset, image_column: str) -> datasets.Dataset:
    """`ds` with its image column cast to `Image(decode=False)`: rows hold {"bytes", "path"} dicts."""
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image) and not feature.decode:
        return ds
    try:
        return ds.cast_column(image_column, datasets.Image(decode=False))
    except (TypeError, ValueError, NotImplementedError, pa.ArrowException) as e:  # int64 -> image: NotImplemented
        kind = feature.dtype if isinstance(feature, datasets.Value) else str(feature)
        raise DataError(f"column '{image_column}' holds {kind} values, which cannot be read as images (image files, "
                        "bytes or paths); name the column that holds the images with image_column in the data "
                        f"config (--image-column for unclip embed) ({type(e).__name__}: {e})") from None


def decode_image(value: Any) -> Image.Image | None:
    """An RGB PIL image from a PIL image, a {"bytes", "path"} dict, raw bytes, a path or a (h, w[, c]) uint8 array.

    Converted with `unclip.images.to_rgb` (as the CLI and the CLIP read images): EXIF rotation applied, transparent
    images composited onto white, 16-bit ones rescaled. Returns None when the image cannot be read (missing,
    truncated, corrupt, not an image or too large); `decode_image_or_reason` says why.
    """
    return decode_image_or_reason(value)[0]


def decode_image_or_reason(value: Any) -> tuple[Image.Image | None, str | None]:
    """(the RGB image, None) as `decode_image` reads `value`, or (None, why) when it cannot be read: "image is too
    large: N pixels, over the limit of M ..." or "image could not be decoded"."""
    try:
        if isinstance(value, Image.Image):
            return to_rgb(value), None
        if isinstance(value, np.ndarray):
            return to_rgb(Image.fromarray(value)), None
        if isinstance(value, dict):
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = io.BytesIO(bytes(value))
        elif not isinstance(value, (str, os.PathLike)):
            return None, "image could not be decoded"
        return decode_image_file(value), None
    except ImageTooLargeError as e:
        return None, f"image is too large: {e}"
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error ... on bad files
        logger.debug("could not decode image: %s", e)
        return None, "image could not be decoded"


class ImageTextDataset(torch.utils.data.Dataset):
    """A torch Dataset of image-text pairs over an HF dataset; bad samples are marked, not raised.

    `image_transform` maps an RGB PIL image to a (3, h, w) tensor of a fixed size. Item i is
    `{"image": (3, h, w) tensor or None, "caption": str, "index": i, "skip_reason": None or str, **extra}`,
    with `image` None and `skip_reason` saying why (the file and the cause, e.g. "/data/a.png: file not found", or
    "caption is empty") when the image cannot be decoded or the caption cannot be used.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_transform: Callable[[Image.Image], torch.Tensor],
        *,
        image_column: str = "image",
        caption_column: str = "caption",
        extra_columns: Sequence[str] = (),
    ) -> None:
        for key, column in [("image_column", image_column), ("caption_column", caption_column)] + [
            ("extra_columns", c) for c in extra_columns
        ]:
            if column not in dataset.column_names:
                raise DataError(
                    f"the dataset has no column '{column}' ({key}); available: {', '.join(dataset.column_names)}"
                )
        clashes = set(extra_columns) & {"image", "caption", "index", "skip_reason", "skip_reasons", "num_skipped"}
        if clashes:
            raise DataError(f"extra_columns may not be named {', '.join(sorted(clashes))}")
        self.dataset = _undecoded(dataset, image_column)
        self.image_transform = image_transform
        self.image_column, self.caption_column = image_column, caption_column
        self.extra_columns = tuple(extra_columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.dataset[int(i)]
        caption, reason = caption_problem(row[self.caption_column])
        image = None
        if reason is None:
            pil, reason = decode_image_or_reason(row[self.image_column])
            if pil is None and not reason.startswith("image is too large"):
                reason = unreadable_image_reason(row[self.image_column])  # the file and the cause
            elif pil is not None:
                image = self.image_transform(pil)
        extra = {c: row[c] for c in self.extra_columns}
        return {"image": image, "caption": caption, "index": int(i), "skip_reason": reason, **extra}


def collate_image_text(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch `ImageTextDataset` items, dropping bad ones with one warning line each (row, file and reason).

    Returns `{"images": (b, 3, h, w) float, "captions": list of b str, "index": (b,) long, "num_skipped": int,
    "skip_reasons": list of "row i: why" str, one per dropped item, **extra}`, each extra column stacked into a
    (b, ...) tensor when numeric, else a list. When every item is bad the batch is empty: b = 0 and images is
    (0, 3, 0, 0); the trainer skips such batches.
    """
    good = [it for it in items if it["image"] is not None]
    reasons = [f"row {it['index']}: {it.get('skip_reason') or 'image is missing'}" for it in items
               if it["image"] is None]
    for reason in reasons:
        logger.warning("skipping %s", reason)
    skipped = len(items) - len(good)
    extra_keys = [k for k in (items[0] if items else {}) if k not in ("image", "caption", "index", "skip_reason")]
    if not good:
        extras = {k: _stack([it[k] for it in items])[:0] for k in extra_keys}
        empty = {"images": torch.empty(0, 3, 0, 0), "captions": [], "index": torch.empty(0, dtype=torch.long)}
        return {**empty, "num_skipped": skipped, "skip_reasons": reasons, **extras}
    shapes = {tuple(it["image"].shape) for it in good}
    if len(shapes) != 1:
        raise ValueError(f"images in a batch differ in shape {sorted(shapes)}; make image_transform resize to one size")
    return {
        "images": torch.stack([it["image"] for it in good]).float(),
        "captions": [it["caption"] for it in good],
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "num_skipped": skipped,
        "skip_reasons": reasons,
        **{k: _stack([it[k] for it in good]) for k in extra_keys},
    }


def _stack(values: list[Any]) -> torch.Tensor | list[Any]:
    """Numbers or equal-shaped tensors / arrays as one tensor; anything else stays a list."""
    if values and all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack(values)
    if values and all(isinstance(v, np.ndarray) for v in values):
        return torch.from_numpy(np.stack(values))
    if values and all(isinstance(v, (bool, int, float)) for v in values):
        return torch.tensor(values)
    return list(values)
