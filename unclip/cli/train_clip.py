"""`train-clip`: contrastive CLIP training from a YAML config.

    train-clip configs/clip/shapes-tiny.yaml --output-dir runs/clip-shapes-tiny
    train-clip configs/clip/shapes-tiny.yaml --set train.max_steps=200 --set train.lr=1e-3
    accelerate launch --num_processes 2 -m unclip.cli.train_clip configs/clip/vit-b-32-laion.yaml ...

The trained model is written to OUTPUT_DIR/model in unclip's format (config.json + model.safetensors);
an interrupted run resumes from its last checkpoint when started again with the same output directory.
On SHAPES, the held-out zero-shot accuracy is printed at the end and saved to OUTPUT_DIR/zero_shot.json.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from ..config import ConfigError, load_config, replace_config
from .common import CliError, print_table

__all__ = ["main", "parse_overrides"]


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """`["train.lr=1e-3", "data.source=./folder"]` -> {"train.lr": 0.001, ...}; values read as YAML."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set expects KEY=VALUE (e.g. train.lr=1e-3), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train-clip", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", type=Path, help="YAML config, e.g. configs/clip/shapes-tiny.yaml")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where checkpoints, logs and the final model go (default: runs/clip-<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (CliError, ConfigError) as e:
        print(f"train-clip: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..checkpoint import write_json_atomic
    from ..clip import Clip
    from ..clip.shapes_judge import evaluate_shapes
    from ..clip.training import ClipTrainTask, TrainClipConfig
    from ..train import Trainer

    cfg = replace_config(load_config(TrainClipConfig, args.config), parse_overrides(args.overrides))
    out = args.output_dir or Path("runs") / f"clip-{args.config.stem}"
    task = ClipTrainTask(cfg)
    trainer = Trainer(task, cfg.train, out)
    result = trainer.train(resume=not args.no_resume)
    if not trainer.accelerator.is_main_process:
        return 0
    print(f"trained {result.step} steps; final loss {result.losses[-1]:.4f}; model in {out / 'model'}"
          if result.losses else f"nothing to train: already at step {result.step}; model in {out / 'model'}")
    if cfg.data.source == "shapes" and cfg.eval_samples > 0:
        clip = Clip.from_pretrained(out / "model")
        acc = evaluate_shapes(clip, split="heldout", num_samples=cfg.eval_samples)
        write_json_atomic(out / "zero_shot.json", {"split": "heldout", "samples": cfg.eval_samples, "accuracy": acc})
        print(f"SHAPES held-out zero-shot accuracy ({cfg.eval_samples} images):")
        print_table(["attribute", "accuracy"], [[k, f"{v:.1%}"] for k, v in acc.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
