"""CLIP weights from open_clip's files, and the errors of finding a CLIP's weights.

    state = read_open_clip_state_dict("epoch_32.pt")    # a plain state dict of tensors, nothing unpickled

Both errors are CheckpointErrors, which the command-line tools report as one line, and ValueErrors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..checkpoint import CheckpointError

__all__ = ["ClipNotFoundError", "ClipWeightsError", "read_cast_from", "read_open_clip_state_dict",
           "weights_fingerprint"]


class ClipNotFoundError(CheckpointError, ValueError):
    """`load_clip` found neither a checkpoint directory nor an open_clip model of that name (a ValueError, and a
    CheckpointError, which the command-line tools report as one line)."""


class ClipWeightsError(CheckpointError, ValueError):
    """A CLIP's weights are not given, not found, not readable, or not available offline."""


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash (16 hex digits) of a state dict: every name and the exact bytes of every tensor."""
    h = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_cast_from(record: Any, path: str | Path) -> dict[str, str] | None:
    """A checked `cast_from` record of a CLIP config.json (see Clip.fingerprint)."""
    if record is None:
        return None
    if not (isinstance(record, dict) and set(record) == {"fingerprint", "weights"}
            and all(isinstance(v, str) for v in record.values())):
        raise ClipWeightsError(f"{path}: config.json's cast_from must be {{'fingerprint': str, 'weights': str}}, "
                               f"got {record!r}")
    return dict(record)


def read_open_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from an open_clip checkpoint file without unpickling arbitrary objects.

    Accepts `.safetensors`, or a torch file holding a state dict or open_clip's training checkpoint
    (`{"state_dict": ..., "epoch": ...}`, with or without DDP's `module.` prefix), read with
    `torch.load(weights_only=True)`. A file that needs full unpickling (TorchScript archives, pickled
    objects) is refused with a CheckpointError; so is any other file, named with what it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipWeightsError(f"CLIP checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load and safetensors raise many types (KeyError, EOFError, ...) on other files
        raise ClipWeightsError(_unreadable(path, e)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipWeightsError(f"{path} is not a CLIP checkpoint: it holds {_describe_object(state)}, "
                               "not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _unreadable(path: Path, error: Exception) -> str:
    message = str(error)
    # torch's weights-only unpickler puts the reason after a long preamble
    reason = (message.partition("WeightsUnpickler error:")[2].strip() or message).split("\n")[0][:120]
    with path.open("rb") as f:
        pickled = f.read(1) == b"\x80"  # pickle's PROTO opcode: a pickle that is more than tensors and containers
    if "TorchScript" in message or pickled:
        what = "a TorchScript archive" if "TorchScript" in message else f"pickled Python objects ({reason})"
        return (f"{path} could not be read as plain weights: it holds {what}. unclip never unpickles arbitrary "
                "objects: convert it to a state dict or .safetensors first")
    return (f"{path} is not a readable CLIP checkpoint (a torch or .safetensors file of weights): it is "
            f"{_describe_file(path)} ({type(error).__name__}: {reason})")


def _describe_file(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return f"a {size}-byte zip archive that is not a torch checkpoint"
    try:
        text = head.decode()
    except UnicodeDecodeError:
        return f"a {size}-byte binary file starting with bytes {head[:8].hex(' ')}"
    return f"a {size}-byte text file starting {text[:40]!r}"


def _describe_object(obj: Any) -> str:
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        key, value = next((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        return f"a dict with {len(obj)} entries, not all tensors (e.g. {key!r}: {type(value).__name__})"
    return f"a {type(obj).__name__}"
