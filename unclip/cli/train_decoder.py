"""`train-decoder`: train the base decoder of the image cascade (CLIP image embedding -> image) from a YAML config.

    train-decoder configs/decoder/shapes-tiny.yaml --output-dir runs/decoder-shapes-tiny
    train-decoder configs/decoder/shapes-tiny.yaml --set clip=runs/clip-shapes-tiny/model --set train.max_steps=500
    train-decoder configs/decoder/shapes-tiny.yaml --set data.embeddings=runs/embeddings   # `unclip embed` shards
    accelerate launch --multi_gpu --num_processes 8 -m unclip.cli.train_decoder configs/decoder/full-64.yaml

The config's top-level `stage` key says what it trains: "base" (the default). A config of a super-resolution stage
("upsampler", configs/upsamplers/*.yaml) is `train-upsampler`'s; given one, train-decoder says so and trains it
as train-upsampler would (`STAGES`: each stage's config class, training task and final evaluation). The trained
model is written to OUTPUT_DIR/model; an interrupted run resumes from its last checkpoint when started again with
the same output directory. On SHAPES the final evaluation is printed and saved to OUTPUT_DIR/eval.json: the
held-out reconstruction accuracy (decoder/evaluation.py) at every `eval.guidance_scales`. Started again on a
finished run, it only evaluates (with other `--set eval.*` values, say); the earlier eval.json is kept as
eval-<time>.json.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from decoder.config import TrainDecoderConfig
from decoder.training import DecoderTrainTask
from upsamplers.config import TrainUpsamplerConfig
from upsamplers.training import UpsamplerTrainTask

from .common import CliError, print_table
from .train_upsampler import evaluate as evaluate_upsampler
from .training import build_training_parser, parse_overrides, training_main, write_eval

__all__ = ["STAGES", "TrainableStage", "main"]


@dataclass(frozen=True)
class TrainableStage:
    """One trainable stage of the cascade: its config dataclass, TrainTask factory and after-training hook."""

    config_cls: type
    make_task: Callable[[Any], Any]
    after: Callable[[Any, Path], None] | None = None


def _evaluate_base(cfg: TrainDecoderConfig, out: Path) -> None:
    from decoder import Decoder, reconstruction_accuracy
    from unclip.clip import load_clip

    e = cfg.eval
    if cfg.data.source != "shapes" or e.samples <= 0:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = load_clip(cfg.clip, cfg.clip_pretrained).to(device)
    decoder = Decoder.from_pretrained(out / "model", device=device)
    print(f"evaluating on {e.samples} held-out SHAPES images at guidance {', '.join(map(str, e.guidance_scales))} "
          "(a progress bar per batch; eval.samples: 0 skips this)", flush=True)
    acc = reconstruction_accuracy(decoder, clip, samples=e.samples, guidance_scales=e.guidance_scales, steps=e.steps,
                                  sampler=e.sampler, eta=e.eta, seed=e.seed, batch_size=e.batch_size,
                                  resolution=cfg.data.shapes_resolution, progress=cfg.train.progress)
    write_eval(out, {"split": "heldout", "clip": cfg.clip, "sampler": e.sampler, "steps": e.steps, "eta": e.eta,
                     **acc})
    print(f"SHAPES held-out reconstruction ({acc['samples']} images decoded at {acc['image_size']}px from their CLIP "
          f"image embeddings, {e.sampler} {e.steps} steps), judged by the CLIP's zero-shot classification:")
    rows = [["source images", *acc["source"].values()],
            [f"true images at {acc['image_size']}px", *acc["ceiling"].values()]]
    rows += [[f"decoded, guidance {s}", *a.values()] for s, a in acc["guidance"].items()]
    rows += [[f"true images at {acc['image_size']}px vs judged source", *acc["ceiling_agreement"].values()]]
    rows += [[f"decoded vs judged source, guidance {s}", *a.values()] for s, a in acc["agreement"].items()]
    print_table(["", "shape", "fg", "bg", "all"], [[r[0], *(f"{v:.1%}" for v in r[1:])] for r in rows])


STAGES: dict[str, TrainableStage] = {
    "base": TrainableStage(TrainDecoderConfig, DecoderTrainTask, _evaluate_base),
    "upsampler": TrainableStage(TrainUpsamplerConfig, UpsamplerTrainTask, evaluate_upsampler),
}
OWN_COMMAND = {"upsampler": "train-upsampler"}  # the stages that have a command of their own


def _stage_name(argv: Sequence[str] | None) -> str:
    """The `stage` the config file (or a --set stage=...) names; "base" when it names none."""
    args, _ = build_training_parser("train-decoder", __doc__).parse_known_args(argv)  # also answers --help
    overrides = parse_overrides(args.overrides)
    if "stage" in overrides:
        return str(overrides["stage"])
    if args.config.is_file():
        data = yaml.safe_load(args.config.read_text()) or {}
        if isinstance(data, dict) and "stage" in data:
            return str(data["stage"])
    return "base"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        name = _stage_name(argv)
    except CliError as e:
        print(f"train-decoder: error: {e}", file=sys.stderr)
        return 2
    if name not in STAGES:
        print(f"train-decoder: error: unknown stage {name!r}; valid stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if name in OWN_COMMAND and os.environ.get("RANK", "0") == "0":  # once, not once per process of a launch
        print(f"train-decoder: note: {OWN_COMMAND[name]} is the command for {name} configs; this run trains the "
              f"{name} all the same", file=sys.stderr)
    stage = STAGES[name]
    return training_main("train-decoder", __doc__, stage.config_cls, stage.make_task, argv, after=stage.after)


if __name__ == "__main__":
    sys.exit(main())
