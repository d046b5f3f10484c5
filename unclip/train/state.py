"""Training checkpoints: everything needed for an exact resume, in safetensors + JSON (nothing pickled).

    output_dir/checkpoints/step-00000500/
        model.safetensors        raw (non-EMA) weights of the trained module
        ema.safetensors          EMA weights (trainable params + buffers), only when EMA is on
        optimizer.safetensors    optimizer state tensors, keyed "state/<param id>/<name>"
        optimizer.json           the rest of the optimizer state dict: param_groups, non-tensor state values
        scheduler.json           LR scheduler state dict
        rng.safetensors          torch CPU (and CUDA) RNG states, keyed "rank<r>/<kind>"
        rng.json                 python `random` and numpy RNG states, one entry per process
        config.json              {"kind": "training_checkpoint", "format_version", "train": ..., "task": ...,
                                  "task_type": ..., "identity": ...}
        trainer_state.json       step, samples seen, counters, world size (written last)

A checkpoint is written in a temporary directory beside its final name and renamed into place
(`atomic_directory`), so a directory named step-* is always complete; a killed writer leaves only a
`.step-*.tmp-*` directory, which `clean_stale_temporaries` removes at the next start.

Test hook: the environment variable UNCLIP_TEST_CHECKPOINT_WRITE_DELAY (seconds, default 0) makes the writer
sleep after each file it writes into the temporary directory, so a test can kill the process mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import FORMAT_VERSION, TRAINING_CHECKPOINT_KIND, CheckpointError, atomic_directory

__all__ = [
    "CHECKPOINT_KIND",
    "TrainingCheckpoint",
    "checkpoint_name",
    "list_checkpoints",
    "find_latest_checkpoint",
    "rotate_checkpoints",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "read_checkpoint_config",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
    "capture_rng_state",
    "restore_rng_state",
    "preserved_rng",
    "seed_everything",
]

CHECKPOINT_KIND = TRAINING_CHECKPOINT_KIND
WRITE_DELAY_ENV = "UNCLIP_TEST_CHECKPOINT_WRITE_DELAY"
_NAME = re.compile(r"^step-(\d{8,})$")
_REQUIRED = (
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng.safetensors",
    "rng.json",
    "config.json",
    "trainer_state.json",
)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-*` directory in `root`, oldest first (temporaries are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def missing_files(path: str | Path) -> list[str]:
    """The required checkpoint files absent from `path` (empty for a complete checkpoint)."""
    return [name for name in _REQUIRED if not (Path(path) / name).is_file()]


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint in `root`, or None; incomplete ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        missing = missing_files(path)
        if not missing:
            return path
        warnings.warn(f"skipping incomplete training checkpoint {path} (missing {', '.join(missing)})", stacklevel=2)
    return None


def rotate_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints in `root` (keep=0: all); returns the deleted paths."""
    found = list_checkpoints(root)
    doomed = [path for _, path in (found[:-keep] if keep > 0 else found)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _saveable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied weights) are cloned for safetensors."""
    out, seen = {}, set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.device.type)
        out[key] = tensor.clone() if ptr in seen and tensor.numel() > 0 else tensor
        seen.add(ptr)
    return out


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON-ready metadata."""
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        state_meta[str(pid)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                key = f"state/{pid}/{name}"
                tensors[key] = value
                state_meta[str(pid)][name] = {"__tensor__": key}
            else:
                state_meta[str(pid)][name] = value
    int_keys = all(isinstance(pid, int) for pid in state_dict["state"])
    meta = {"param_groups": state_dict["param_groups"], "state": state_meta, "int_param_ids": int_keys}
    return _saveable(tensors), meta


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from `flatten_optimizer_state`'s output (as read back from disk)."""
    state = {}
    for pid, entries in meta["state"].items():
        key = int(pid) if meta.get("int_param_ids", True) else pid
        state[key] = {
            name: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
            for name, v in entries.items()
        }
    groups = [dict(g) for g in meta["param_groups"]]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU (+ current CUDA device), python `random`, numpy."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo `capture_rng_state` (also accepts its form as read back from disk)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    keys = np.asarray(npy["keys"], dtype=np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. sampling) without changing this process's RNG states."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python `random` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _write_delay() -> None:
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    _write_delay()


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file(_saveable(tensors), str(path), metadata={"format": "pt"})
    _write_delay()


def save_training_checkpoint(
    root: str | Path,
    *,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    rng_states: list[Mapping[str, Any]],
    trainer_state: Mapping[str, Any],
    config: Mapping[str, Any],
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write `root/step-XXXXXXXX/` (see the module docstring); `rng_states` has one entry per rank."""
    final = Path(root) / checkpoint_name(step)
    with atomic_directory(final) as tmp:
        _write_tensors(tmp / "model.safetensors", model_state)
        if ema_state is not None:
            _write_tensors(tmp / "ema.safetensors", ema_state)
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state)
        _write_tensors(tmp / "optimizer.safetensors", opt_tensors)
        _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / "scheduler.json", dict(scheduler_state))
        rng_tensors = {f"rank{r}/torch": s["torch"] for r, s in enumerate(rng_states)}
        rng_tensors.update({f"rank{r}/cuda": s["cuda"] for r, s in enumerate(rng_states) if s["cuda"] is not None})
        _write_tensors(tmp / "rng.safetensors", rng_tensors)
        _write_json(tmp / "rng.json", [{"python": s["python"], "numpy": s["numpy"]} for s in rng_states])
        meta = {"kind": CHECKPOINT_KIND, "format_version": FORMAT_VERSION, **dict(config)}
        _write_json(tmp / "config.json", meta)
        _write_json(tmp / "trainer_state.json", {"step": step, **dict(trainer_state)})
    return final


@dataclass
class TrainingCheckpoint:
    """A training checkpoint read back from disk (all tensors on CPU)."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_states: list[dict[str, Any]]
    trainer_state: dict[str, Any]
    config: dict[str, Any]


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's config.json without loading the rest ({} when it is missing or unreadable: loading
    the checkpoint then says what is wrong)."""
    try:
        data = _read_json(Path(path) / "config.json")
    except (OSError, CheckpointError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {e}") from None


def load_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Read a checkpoint written by `save_training_checkpoint`; raises CheckpointError if it is not complete."""
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{path} is not a complete training checkpoint: {', '.join(missing)} missing")
    config = _read_json(path / "config.json")
    if config.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} holds a '{config.get('kind')}' checkpoint, not a training checkpoint")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer unclip (format {config['format_version']}); upgrade")
    rng_tensors = _read_tensors(path / "rng.safetensors")
    rng_states = [
        {**entry, "torch": rng_tensors[f"rank{r}/torch"], "cuda": rng_tensors.get(f"rank{r}/cuda")}
        for r, entry in enumerate(_read_json(path / "rng.json"))
    ]
    trainer_state = _read_json(path / "trainer_state.json")
    ema_path = path / "ema.safetensors"
    return TrainingCheckpoint(
        path=path,
        step=int(trainer_state["step"]),
        model_state=_read_tensors(path / "model.safetensors"),
        ema_state=_read_tensors(ema_path) if ema_path.is_file() else None,
        optimizer_state=unflatten_optimizer_state(
            _read_tensors(path / "optimizer.safetensors"), _read_json(path / "optimizer.json")
        ),
        scheduler_state=_read_json(path / "scheduler.json"),
        rng_states=rng_states,
        trainer_state=trainer_state,
        config=config,
    )
