"""Checkpoint I/O: a directory with `config.json` + `model.safetensors`, written atomically.

    save_pretrained_dir(out_dir, kind="clip", config={...}, state_dict=model.state_dict())
    meta, state = load_pretrained_dir(out_dir, kind="clip")
    load_state_dict_strict(model, state, source=out_dir)   # says exactly what differs on mismatch

Nothing here unpickles: weights are safetensors, metadata is JSON. A directory is written under a
temporary name beside its destination, flushed to disk, then renamed into place, so a crash (or SIGKILL)
in the middle of a write never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "FORMAT_VERSION",
    "TRAINING_CHECKPOINT_KIND",
    "CheckpointError",
    "atomic_directory",
    "check_replaceable",
    "default_permissions",
    "save_pretrained_dir",
    "load_pretrained_dir",
    "load_state_dict_strict",
    "write_json_atomic",
]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_CHECKPOINT_KIND = "training_checkpoint"  # the kind in a training checkpoint's config.json (unclip.train)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, of another kind, or whose weights do not fit the model."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def check_replaceable(final: Path, marker: str) -> None:
    """Raise CheckpointError unless `final` is absent, an empty directory, or a directory holding `marker` (a
    previous save of the same sort, which a new save may replace): never delete a directory of something else."""
    if not final.exists():
        return
    if not final.is_dir():
        raise CheckpointError(f"refusing to write to {final}: it is a file")
    entries = sorted(p.name for p in final.iterdir())
    if entries and marker not in entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise CheckpointError(f"refusing to replace {final}: it holds other things ({shown}) and no {marker}; "
                              "choose a new or empty directory")


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, replaces: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename.

    If the block raises (or the process dies), `final` keeps whatever it held before, and the temporary
    directory (named `.<name>.tmp-*`) is removed or, after a hard kill, left for `clean_stale_temporaries`.
    replaces: a file name that marks an existing `final` as replaceable (e.g. "config.json"); a non-empty `final`
    without it raises CheckpointError before anything is written. None: replace whatever is there.
    """
    final = Path(final)
    if replaces is not None:
        check_replaceable(final, replaces)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        default_permissions(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_permissions(path: str | Path) -> None:
    """Give the file `path`, or every file under the directory `path`, the permissions the umask gives a new file
    (safetensors writes 0600 files through its own temporary file, unreadable to the user's group)."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file():
            file.chmod(0o666 & ~mask)


def clean_stale_temporaries(parent: str | Path) -> list[Path]:
    """Remove temporary directories that a killed writer left in `parent`; returns what was removed."""
    parent = Path(parent)
    removed = []
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to `path` (creating its directory) via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no stray temporary file beside the target
        raise


def save_pretrained_dir(
    out_dir: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write `config.json` ({kind, format_version, config}) and `model.safetensors` to `out_dir`.

    An existing `out_dir` is replaced only if it is empty or holds a previous checkpoint (a config.json).

    `extra_files` maps further file names to JSON-serialisable data written beside them.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_directory(out_dir, replaces=CONFIG_NAME) as tmp:
        # One metadata key: safetensors writes the map in hash order, so several keys would make identical weights
        # give byte-different files (the kind lives in config.json).
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": dict(config)}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    return Path(out_dir)


def load_pretrained_dir(path: str | Path, *, kind: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a directory written by `save_pretrained_dir`: returns (config.json contents, state dict on CPU).

    A path that is something else (a file, a pipeline directory, a training run or one of its training checkpoints)
    is a CheckpointError that says what it is and, where there is one, which directory to give instead."""
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise CheckpointError(_not_a_directory(path))
    if not cfg_path.is_file():
        raise CheckpointError(_missing_config(path, kind))
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if isinstance(meta, dict) and meta.get("kind") == TRAINING_CHECKPOINT_KIND:
        raise CheckpointError(_training_checkpoint(path))
    if not weights_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {WEIGHTS_NAME} is missing")
    if not isinstance(meta, dict) or "config" not in meta or "kind" not in meta:
        raise CheckpointError(f"{cfg_path} lacks the 'kind' and 'config' entries of an unclip checkpoint")
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a '{meta['kind']}' checkpoint, not a '{kind}' one")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer unclip (format {meta['format_version']} > {FORMAT_VERSION}); upgrade unclip"
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{weights_path} could not be read (truncated or corrupt?): {e}") from None
    return meta, state


def _stage_dirs(path: Path, kind: str | None) -> list[Path]:
    """The sub-directories of `path` holding a checkpoint (of `kind`, when given), by name."""
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((sub / CONFIG_NAME).read_text())
            if isinstance(meta, dict) and "config" in meta and (kind is None or meta.get("kind") == kind):
                found.append(sub)
    return found


def _not_a_directory(path: Path) -> str:
    if not path.exists():
        return f"checkpoint directory not found: {path}"
    if path.name in (CONFIG_NAME, WEIGHTS_NAME):
        return f"{path} is a file of a checkpoint directory: give the directory, {path.parent}"
    return (f"{path} is a file, not a checkpoint directory: unclip saves a model as a directory "
            f"({CONFIG_NAME} + {WEIGHTS_NAME})")


def _missing_config(path: Path, kind: str | None) -> str:
    what = f"{kind} checkpoint" if kind else "checkpoint"
    stages = _stage_dirs(path, kind)
    if (path / "pipeline.json").is_file():
        where = (f"its {kind or 'stage'} is {stages[0]}" if len(stages) == 1
                 else f"give a stage directory ({', '.join(str(s) for s in stages) or 'none found'})")
        return f"{path} is a pipeline directory (pipeline.json), not a single {what}: {where}"
    if (path / "checkpoints").is_dir() or (path / "model").is_dir():
        if (path / "model" / CONFIG_NAME).is_file():
            return f"{path} is a training run directory, not a {what}: its trained model is {path / 'model'}"
        return (f"{path} is a training run directory without an exported model ({path / 'model'} is written when "
                "training finishes): finish or resume the training first")
    if stages:
        return f"{path} is not a {what} ({CONFIG_NAME} is missing); did you mean {stages[0]}?"
    return f"{path} is not a complete checkpoint: {CONFIG_NAME} is missing"


def _training_checkpoint(path: Path) -> str:
    run = path.parent.parent
    model = run / "model"
    done = "" if (model / CONFIG_NAME).is_file() else " (not there yet: it is written when training finishes)"
    return (f"{path} is a training checkpoint (for resuming training), not a model: load the run's exported model, "
            f"{model}{done}")


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | Path = "checkpoint"
) -> None:
    """Load `state_dict` into `module`, or raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"the weights in {source} do not fit this model (is it a checkpoint for another architecture?)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(dict(state_dict), strict=True)
