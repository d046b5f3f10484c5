"""`train-prior`: train the diffusion prior (CLIP text embedding -> CLIP image embedding) from a YAML config.

    train-prior configs/prior/shapes-tiny.yaml --output-dir runs/prior-shapes-tiny
    train-prior configs/prior/shapes-tiny.yaml --set clip=runs/clip-shapes-tiny/model --set train.max_steps=500
    train-prior configs/prior/shapes-tiny.yaml --set data.source=runs/embeddings    # from `unclip embed` shards
    accelerate launch --multi_gpu --num_processes 8 -m unclip.cli.train_prior configs/prior/vit-l-14.yaml

The trained prior is written to OUTPUT_DIR/model (config.json + model.safetensors), with the Analytic-DPM
moments estimated from `calibration_samples` training pairs (prior/analytic.py); an interrupted run resumes
from its last checkpoint when started again with the same output directory. On SHAPES (data.source "shapes",
or embeddings made from it) the held-out evaluation of prior/evaluation.py runs at the end for every
`eval.guidance_scales`, is printed and is saved to OUTPUT_DIR/eval.json; a finished run only re-evaluates (the
earlier eval.json is kept as eval-<time>.json).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from prior.config import TrainPriorConfig
from prior.training import PriorTrainTask

from .common import print_table
from .training import training_main, write_eval

__all__ = ["main"]


def _ceiling(value: float | None) -> str:
    return f"cosine {value:.3f}" if value is not None else "n/a (needs eval.images_per_triple >= 2)"


def _trained_on_shapes(cfg: TrainPriorConfig) -> bool:
    source = Path(cfg.data.source)
    if (source / "manifest.json").is_file():
        made_from = str(json.loads((source / "manifest.json").read_text()).get("source"))
        return made_from == "shapes" or made_from.startswith("shapes:")  # `unclip embed --data shapes`: shapes:N
    return cfg.data.source == "shapes"


def _evaluate(cfg: TrainPriorConfig, out: Path) -> None:
    from prior import DiffusionPriorNetwork, evaluate_prior_shapes, triple_image_embeds
    from unclip.clip import load_clip

    e = cfg.eval
    if not e.enabled or not _trained_on_shapes(cfg):
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = load_clip(cfg.clip, cfg.clip_pretrained).to(device)
    prior = DiffusionPriorNetwork.from_pretrained(out / "model", device=device)
    image_embeds = triple_image_embeds(clip, e.images_per_triple, seed=e.seed)
    results = [
        evaluate_prior_shapes(prior, clip, guidance_scale=s, best_of=e.best_of, steps=e.steps, sampler=e.sampler,
                              images_per_triple=e.images_per_triple, seed=e.seed, image_embeds=image_embeds,
                              progress=cfg.train.progress)
        for s in e.guidance_scales
    ]
    write_eval(out, {"split": "heldout", "clip": cfg.clip, "results": results})
    r0 = results[0]
    print(f"SHAPES held-out captions ({r0['captions']}), {e.sampler} {e.steps} steps, best of {e.best_of}; "
          f"text-embedding baseline: cosine {r0['text_cosine']:.3f}, retrieval {r0['text_retrieval']:.1%}; "
          f"image-to-image ceiling: {_ceiling(r0['image_cosine_ceiling'])}")
    print_table(["guidance", "cosine", "captions where cosine > text's", "retrieval"],
                [[f"{r['guidance_scale']:g}", f"{r['prior_cosine']:.3f}", f"{r['prior_beats_text']:.1%}",
                  f"{r['prior_retrieval']:.1%}"] for r in results])


def _calibrate(cfg: TrainPriorConfig, out: Path) -> None:
    """Store Analytic-DPM's moments with the exported prior, from `calibration_samples` training pairs."""
    from prior import DiffusionPriorNetwork
    from prior.analytic import calibrate_prior
    from prior.training import calibration_pairs

    if cfg.calibration_samples == 0:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prior = DiffusionPriorNetwork.from_pretrained(out / "model", device=device)
    text, image_embed = calibration_pairs(cfg, cfg.calibration_samples)
    calibrate_prior(prior, text, image_embed, generator=torch.Generator().manual_seed(0),
                    progress=cfg.train.progress)
    prior.save_pretrained(out / "model")
    print(f"Analytic-DPM moments from {image_embed.shape[0]} training pairs stored with {out / 'model'}")


def _after(cfg: TrainPriorConfig, out: Path) -> None:
    _calibrate(cfg, out)
    _evaluate(cfg, out)


def main(argv: Sequence[str] | None = None) -> int:
    return training_main("train-prior", __doc__, TrainPriorConfig, PriorTrainTask, argv, after=_after)


if __name__ == "__main__":
    sys.exit(main())
