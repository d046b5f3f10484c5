"""`train-upsampler`: train a super-resolution stage of the cascade (low-res image -> image) from a YAML config.

    train-upsampler configs/upsamplers/shapes-32-64.yaml --output-dir runs/upsampler-32-64
    train-upsampler configs/upsamplers/shapes-64-128.yaml --set train.max_steps=100
    accelerate launch --multi_gpu --num_processes 8 -m unclip.cli.train_upsampler configs/upsamplers/full-64-256.yaml

The trained model is written to OUTPUT_DIR/model; an interrupted run resumes from its last checkpoint when started
again with the same output directory. On SHAPES the final evaluation is printed and saved to OUTPUT_DIR/eval.json:
the PSNR of the upsampler's output and of bicubic upsampling against the held-out originals at every
`eval.aug_levels` (upsamplers/evaluation.py). Started again on a finished run, it only evaluates (with other
`--set eval.*` values, say); the earlier eval.json is kept as eval-<time>.json.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from upsamplers.config import TrainUpsamplerConfig
from upsamplers.training import UpsamplerTrainTask

from .common import print_table
from .training import training_main, write_eval

__all__ = ["evaluate", "main"]


def evaluate(cfg: TrainUpsamplerConfig, out: Path) -> None:
    """The held-out SHAPES PSNR of the model in OUTPUT_DIR/model against bicubic, printed and written to eval.json."""
    from upsamplers import Upsampler, psnr_vs_bicubic

    e = cfg.eval
    if cfg.data.source != "shapes" or e.samples <= 0:
        return
    upsampler = Upsampler.from_pretrained(out / "model", device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"evaluating on {e.samples} held-out SHAPES images at aug level {', '.join(map(str, e.aug_levels))} "
          "(a progress bar per batch; eval.samples: 0 skips this)", flush=True)
    report = psnr_vs_bicubic(upsampler, samples=e.samples, seed=e.seed, aug_levels=e.aug_levels, steps=e.steps,
                             sampler=e.sampler, batch_size=e.batch_size, progress=cfg.train.progress)
    write_eval(out, {"split": "heldout", **report})
    print(f"SHAPES held-out super-resolution ({report['samples']} images, {report['low_res_size']} -> "
          f"{report['image_size']} px, {report['sampler']} {report['steps']} steps): mean PSNR against the originals")
    rows = [["bicubic", f"{report['bicubic']:.2f} dB", ""]]
    rows += [[f"upsampler, aug level {level}", f"{db:.2f} dB", f"{report['wins'][level]:.1%}"]
             for level, db in report["model"].items()]
    print_table(["", "PSNR", "images beating bicubic"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    return training_main("train-upsampler", __doc__, TrainUpsamplerConfig, UpsamplerTrainTask, argv, after=evaluate)


if __name__ == "__main__":
    sys.exit(main())
