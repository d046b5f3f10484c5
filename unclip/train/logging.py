"""Run logs: `log.jsonl` always, TensorBoard when `torch.utils.tensorboard` imports, PNG sample grids.

Only the main process logs; on the others every method is a no-op. After a resume from step N, records
of steps after N (written by the interrupted run) are dropped from log.jsonl, so the file reads as one run
(a fresh run passes resume_step=-1 and starts the file over).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunLogger", "MetricWindow", "save_image_grid"]


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (b, 3, h, w) in [0, 1] as one PNG grid, `nrow` per row (default: about square)."""
    from PIL import Image
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (b, 3, h, w), got {tuple(images.shape)}")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    return value


def _open_tensorboard(log_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional; any import problem just disables it
        return None
    try:
        return SummaryWriter(str(log_dir), purge_step=purge_step)
    except Exception:
        return None


def _truncate_after(path: Path, step: int) -> None:
    """Drop records with a "step" beyond `step` (written by an interrupted run) from a JSONL file."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLogger:
    """Writes metric records of one run under `output_dir` (main process only: pass `enabled`)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / "log.jsonl"
        if resume_step is not None:
            _truncate_after(log_path, resume_step)
        self._file = log_path.open("a")
        purge = resume_step if resume_step is not None and resume_step > 0 else None
        self._tb = _open_tensorboard(self.output_dir / "tensorboard", purge_step=purge)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold "step") to log.jsonl; numbers also go to TensorBoard as train/<key>."""
        if not self.enabled:
            return
        self._file.write(json.dumps(_json_ready(record)) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            flat = {k: v for k, v in record.items() if k != "step"}
            flat.update({f"metrics/{k}": v for k, v in flat.pop("metrics", {}).items()})
            for key, value in flat.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def save_samples(self, images: torch.Tensor, step: int) -> Path | None:
        """Write `samples/step-XXXXXXX.png` (and the grid to TensorBoard)."""
        if not self.enabled:
            return None
        path = save_image_grid(images, self.output_dir / "samples" / f"step-{step:07d}.png")
        if self._tb is not None:
            from torchvision.utils import make_grid

            self._tb.add_image("samples", make_grid(images.detach().float().cpu().clamp(0, 1)), step)
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class MetricWindow:
    """Running sums of the optimizer steps between two log records."""

    def __init__(self, samples_seen: int):
        self.start_time, self.start_samples = time.perf_counter(), samples_seen
        self.steps, self.loss, self.grad_norm, self.lr = 0, 0.0, 0.0, 0.0
        self.metrics: dict[str, float] = {}

    def add(self, loss: float, grad_norm: float, lr: float, metrics: dict[str, float]) -> None:
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.lr = lr
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    def rate(self, samples_seen: int) -> float:
        """Samples per second (all processes) since the window opened."""
        return (samples_seen - self.start_samples) / max(time.perf_counter() - self.start_time, 1e-9)

    def record(self, step: int, samples_seen: int, totals: dict[str, int]) -> dict[str, Any]:
        """The log record: means over the window, the lr of the last step, run totals."""
        n = max(self.steps, 1)
        return {
            "step": step,
            "loss": self.loss / n,
            "lr": self.lr,
            "grad_norm": self.grad_norm / n,
            "samples_per_s": self.rate(samples_seen),
            **totals,
            "metrics": {k: v / n for k, v in self.metrics.items()},
        }
