"""`train-clip`: contrastive CLIP training from a YAML config.

    train-clip configs/clip/shapes-tiny.yaml --output-dir runs/clip-shapes-tiny
    train-clip configs/clip/shapes-tiny.yaml --set train.max_steps=200 --set train.lr=1e-3
    accelerate launch --multi_gpu --num_processes 8 -m unclip.cli.train_clip configs/clip/vit-l-14.yaml

The trained model is written to OUTPUT_DIR/model in unclip's format (config.json + model.safetensors);
an interrupted run resumes from its last checkpoint when started again with the same output directory.
On SHAPES, the held-out zero-shot accuracy is printed at the end and saved to OUTPUT_DIR/zero_shot.json.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import write_json_atomic
from ..clip.training import ClipTrainTask, TrainClipConfig
from .common import print_table
from .training import training_main

__all__ = ["main"]


def _evaluate(cfg: TrainClipConfig, out: Path) -> None:
    from ..clip import Clip
    from ..clip.shapes_judge import evaluate_shapes

    if cfg.data.source != "shapes" or cfg.eval_samples <= 0:
        return
    acc = evaluate_shapes(Clip.from_pretrained(out / "model"), split="heldout", num_samples=cfg.eval_samples)
    write_json_atomic(out / "zero_shot.json", {"split": "heldout", "samples": cfg.eval_samples, "accuracy": acc})
    print(f"SHAPES held-out zero-shot accuracy ({cfg.eval_samples} images):")
    print_table(["attribute", "accuracy"], [[k, f"{v:.1%}"] for k, v in acc.items()])


def main(argv: Sequence[str] | None = None) -> int:
    return training_main("train-clip", __doc__, TrainClipConfig, ClipTrainTask, argv, after=_evaluate)


if __name__ == "__main__":
    sys.exit(main())
