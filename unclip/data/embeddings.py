"""Precomputed CLIP embeddings on disk, for training the prior at scale (`unclip embed`).

Layout of an embeddings directory:

    manifest.json               what was embedded: source, rows, shard size, CLIP fingerprint, dims
    shard-000000.safetensors    rows [0, S): image_embed (n, d), text_embed (n, d), text_tokens (n, l, w),
    shard-000001.safetensors    text_mask (n, l) bool, index (n,) source row; captions in the metadata.
                                text_tokens holds the per-token text states (a row's `text_states`)
    ...

Each shard is written to a temporary file and renamed into place, so an interrupted run leaves only
complete shards; running the same command again checks them, skips the sound ones and carries on. A shard
that cannot be read back (truncated or overwritten by a copy gone wrong) is renamed aside (`*.corrupt-<8 hex>`, kept
for inspection) and embedded again. Rows whose image or caption cannot be used are left out of their shard (its
`index` says which source rows it holds), each named in a warning and counted; running the command again tries
them again (after the images are fixed, say) and adds those that now work to their shard. A dataset of which no
row can be used is an error that names it and the first reasons.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import default_permissions, write_json_atomic
from .image_text import DataError, ImageTextDataset, collate_image_text

__all__ = ["embed_dataset", "EmbeddingShards", "clip_fingerprint", "check_shards_clip", "read_manifest"]

MANIFEST = "manifest.json"
TENSORS = ("image_embed", "text_embed", "text_tokens", "text_mask", "index")  # the tensors of a shard file
FIELDS = {"text_tokens": "text_states"}  # a shard tensor's name as a field of a row where the two differ


def clip_fingerprint(clip: Any) -> str:
    """The identity of a CLIP's weights (`Clip.fingerprint`): embeddings from different CLIPs must never be mixed."""
    return clip.fingerprint()


def check_shards_clip(source: str | Path, shards_fingerprint: str | None, clip: str, fingerprint: str) -> None:
    """DataError unless the shards at `source` (whose manifest says `shards_fingerprint`) were embedded by the CLIP
    `clip` of weights fingerprint `fingerprint`: a stage would learn one embedding space and be used with another."""
    if shards_fingerprint != fingerprint:
        raise DataError(f"{source} was embedded with another CLIP (fingerprint {shards_fingerprint}) than clip: {clip} "
                        f"(fingerprint {fingerprint}); re-embed the data with `unclip embed --clip {clip}`, or set "
                        "clip: to the CLIP that made the embeddings")


def _shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:06d}.safetensors"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest.json of an embeddings directory, without opening the shards (FileNotFoundError if there is none,
    DataError if it cannot be read)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an embeddings directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read as an embeddings manifest: {e}") from e
    missing = [k for k in ("rows", "shard_size") if not isinstance(manifest.get(k) if isinstance(manifest, dict)
                                                                    else None, int)]
    if missing:
        raise DataError(f"{path} is not an embeddings manifest: no integer {', '.join(missing)}")
    return manifest


def _shard_index(path: Path, rows: range, *, captions: bool = True) -> torch.Tensor:
    """The source rows (n,) long the shard at `path` holds, which must lie within `rows`; DataError if it cannot be
    read.
    captions=False only checks that the captions are there (parsing them all is the costly part of a large set;
    `EmbeddingShards` checks each shard's when it first opens it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            index = f.get_tensor("index")
            names, text = set(f.keys()), (f.metadata() or {}).get("captions")
            parsed = json.loads(text) if captions and text is not None else None
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise DataError(f"embedding shard {path} cannot be read ({type(e).__name__}: {e}); "
                        "delete it and run `unclip embed` again to remake it") from e
    n = index.shape[0]
    problem = None
    if text is None or (captions and not _captions_fit(parsed, n)):
        problem = "its captions do not match its rows"
    elif n and not set(TENSORS) <= names:
        problem = f"it lacks {sorted(set(TENSORS) - names)}"
    elif n and not (rows.start <= int(index.min()) and int(index.max()) < rows.stop):
        problem = f"it holds source rows outside {rows.start}..{rows.stop - 1}"
    if problem:
        raise DataError(f"embedding shard {path} is damaged: {problem}")
    return index


def _captions_fit(captions: Any, rows: int) -> bool:
    return isinstance(captions, list) and len(captions) == rows


def _sound_shard_index(out_dir: Path, k: int, rows: range) -> torch.Tensor | None:
    """The source rows shard k holds if it is present and sound, else None. A damaged one is renamed to *.corrupt
    (kept, with a warning)."""
    path = _shard_path(out_dir, k)
    if not path.exists():
        return None
    try:
        return _shard_index(path, rows)
    except DataError as e:
        aside = path.with_name(f"{path.name}.corrupt-{uuid.uuid4().hex[:8]}")
        os.replace(path, aside)
        # the frames up: _rows_to_embed, embed_dataset, torch.no_grad's wrapper, its caller
        warnings.warn(f"{e}; moved it to {aside.name} and embedding it again", stacklevel=5)
        return None


def _rows_to_embed(out_dir: Path, rows: int, shard_size: int) -> list[tuple[int, list[int], bool]]:
    """(shard k, source rows it lacks, whether the shard exists) for every shard with rows to embed: all of a
    missing or damaged shard's, and the rows a sound one left out (skipped by an earlier run)."""
    todo = []
    for k in range(-(-rows // shard_size)):
        wanted = _shard_range(k, shard_size, rows)
        index = _sound_shard_index(out_dir, k, wanted)
        if index is None:
            todo.append((k, list(wanted), False))
        elif len(index) < len(wanted):
            have = set(index.tolist())
            todo.append((k, [i for i in wanted if i not in have], True))
    return todo


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = out_dir / MANIFEST
    if path.exists():
        old = read_manifest(out_dir)
        differs = [k for k in manifest if old.get(k) != manifest[k]]
        if differs:
            raise ValueError(
                f"{out_dir} already holds embeddings made with a different {', '.join(differs)}; "
                "choose another output directory (nothing was overwritten)"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, manifest)


@torch.no_grad()
def embed_dataset(
    clip: Any,
    dataset: Any,
    out_dir: str | Path,
    *,
    source: str,
    shard_size: int = 4096,
    batch_size: int = 256,
    image_column: str = "image",
    caption_column: str = "caption",
    num_workers: int = 0,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> Path:
    """Embed every (image, caption) row of an HF dataset with `clip` into shards under `out_dir`.

    Resumable: complete shards already present are kept, and only the rows they left out (unusable images or
    captions, each warned about) are tried again. Returns `out_dir`; DataError when no row of the dataset is usable.
    """
    out_dir = Path(out_dir)
    rows = len(dataset)
    if rows == 0:
        raise DataError(f"dataset {source!r} has no rows to embed")
    manifest = {
        "source": source,
        "rows": rows,
        "shard_size": shard_size,
        "clip": clip_fingerprint(clip),
        "embed_dim": clip.embed_dim,
        "text_width": clip.text_width,
        "context_length": clip.context_length,
        "dtype": str(dtype).removeprefix("torch."),
    }
    _check_manifest(out_dir, manifest)
    todo = _rows_to_embed(out_dir, rows, shard_size)
    wrapped = ImageTextDataset(dataset, clip.image_transform, image_column=image_column, caption_column=caption_column)
    skipped, reasons = 0, []
    bar = tqdm(total=rows, initial=rows - sum(len(wanted) for _, wanted, _ in todo), desc="embed", unit="img",
               disable=not progress)
    for k, wanted, exists in todo:
        part = torch.utils.data.Subset(wrapped, wanted)
        loader = DataLoader(part, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_image_text)
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
        captions: list[str] = []
        for batch in loader:
            skipped += batch["num_skipped"]
            reasons += batch["skip_reasons"][: max(0, 3 - len(reasons))]
            bar.update(len(batch["captions"]) + batch["num_skipped"])
            if not batch["captions"]:
                continue
            enc = clip.encode_text(batch["captions"], rows=batch["index"])
            chunks["image_embed"].append(clip.encode_pixels(batch["images"]).to("cpu", dtype))  # already preprocessed
            chunks["text_embed"].append(enc.text_embed.to("cpu", dtype))
            chunks["text_tokens"].append(enc.text_states.to("cpu", dtype))
            chunks["text_mask"].append(enc.text_mask.cpu())
            chunks["index"].append(batch["index"].long())
            captions += batch["captions"]
        path = _shard_path(out_dir, k)
        if exists and captions:  # rows an earlier run skipped that can be used now: the shard gains them
            chunks, captions = _with_shard_rows(path, chunks, captions)
        if captions or not exists:
            _write_shard(path, chunks, captions)
    bar.close()
    if skipped == rows:  # every row was tried in this run (a shard keeps the rows that worked before)
        raise DataError(f"no row of {source} could be embedded: all {rows} were skipped (first: {'; '.join(reasons)}"
                        "); fix them and run the same command again")
    if skipped:
        warnings.warn(f"embed: {skipped} row(s) of {source} skipped because their image or caption was unusable (the "
                      "warnings above name each); running the same command again tries them again", stacklevel=3)
    return out_dir


def _shard_range(k: int, shard_size: int, rows: int) -> range:
    return range(k * shard_size, min((k + 1) * shard_size, rows))


def _with_shard_rows(path: Path, chunks: dict[str, list[torch.Tensor]],
                     captions: list[str]) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
    """New rows (`chunks`, `captions`) joined with those already in the shard at `path`, in source row order."""
    with safe_open(str(path), framework="pt") as f:
        old = {name: f.get_tensor(name) for name in f.keys()}
        captions = json.loads(f.metadata()["captions"]) + captions
    tensors = {name: torch.cat(([old[name]] if name in old else []) + chunks[name]) for name in TENSORS}
    order = torch.argsort(tensors["index"])
    return {name: [t[order]] for name, t in tensors.items()}, [captions[i] for i in order.tolist()]


def _write_shard(path: Path, chunks: dict[str, list[torch.Tensor]], captions: list[str]) -> None:
    tensors = {name: torch.cat(parts) for name, parts in chunks.items() if parts}
    if not tensors:  # every row of the shard was unusable: an empty shard still marks it done
        tensors = {"index": torch.zeros(0, dtype=torch.long)}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)})
    default_permissions(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EmbeddingShards(Dataset):
    """Read an embeddings directory row by row (memory-mapped; only the rows asked for are read).

    Item: {"image_embed": (d,), "text_embed": (d,), "text_states": (l, w), "text_mask": (l,) bool,
    "index": source row, "caption": str}, floats in the stored dtype.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.shards = sorted(self.directory.glob("shard-*.safetensors"))
        rows, shard_size = self.manifest["rows"], self.manifest["shard_size"]
        expected = -(-rows // shard_size)
        if len(self.shards) != expected:
            warnings.warn(
                f"{self.directory}: {len(self.shards)} of {expected} shards present (embedding unfinished?)",
                stacklevel=2,
            )
        self.offsets = [0]
        for shard in self.shards:  # every shard is read back once: a damaged one fails here, naming it
            k = shard.name.removeprefix("shard-").removesuffix(".safetensors")
            if not k.isdigit():
                raise DataError(f"{shard} is not a shard this library wrote (expected shard-NNNNNN.safetensors)")
            k = int(k)
            n = len(_shard_index(shard, _shard_range(k, shard_size, rows), captions=False))  # captions: on opening
            self.offsets.append(self.offsets[-1] + n)
        if self.offsets[-1] == 0:
            raise DataError(f"{self.directory} holds no embeddings: none of the {rows} rows of "
                            f"{self.manifest.get('source')} were usable when it was embedded (or its shards are "
                            "missing); fix the data and run the same `unclip embed` command again")

    def __len__(self) -> int:
        return self.offsets[-1]

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of open shards per dataset object
    def _open(self, k: int) -> tuple[Any, list[str]]:
        handle = safe_open(str(self.shards[k]), framework="pt")
        captions = json.loads(handle.metadata()["captions"])
        if not _captions_fit(captions, self.offsets[k + 1] - self.offsets[k]):
            raise DataError(f"embedding shard {self.shards[k]} is damaged: its captions do not match its rows")
        return handle, captions

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.offsets, i) - 1
        row = i - self.offsets[k]
        handle, captions = self._open(k)
        item: dict[str, Any] = {FIELDS.get(name, name): handle.get_slice(name)[row : row + 1][0] for name in TENSORS}
        item["caption"] = captions[row]
        return item
