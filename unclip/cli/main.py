"""The `unclip` command: one entry point, a sub-command per job.

    unclip classify IMAGE... --labels "circle,square" --clip runs/clip-shapes-tiny/model
    unclip zero-shot runs/clip-shapes-tiny/model          # SHAPES held-out accuracy per attribute
    unclip embed --clip runs/clip-shapes-tiny/model --data shapes --out runs/embeddings
    unclip generate "a red circle on a blue background" -n 4 --out grid.png     # and vary, interpolate, text-diff
    unclip eval --images-per-caption 4                                         # SHAPES compositional accuracy
    unclip eval-cascade --upsamplers runs/upsampler-32-64/model runs/upsampler-64-128/model   # the cascade alone
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from .cascade import add_cascade_parser
from .common import CliError, add_device_argument, positive_int, print_table, read_image, resolve_device
from .pipeline_commands import add_pipeline_parsers
from .serve import add_serve_parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip",
        description="unCLIP (DALL-E 2) text-to-image: generate images from captions, vary, interpolate and edit "
                    "images, evaluate, classify zero-shot. Training lives in the train-clip, train-prior, "
                    "train-decoder and train-upsampler scripts; run `unclip COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_pipeline_parsers(sub)
    add_cascade_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("classify", help="zero-shot classify images against class names",
                       description="Zero-shot classification: each label is embedded with an ensemble of prompt "
                                   "templates ('a photo of a {}.', ...) and every image gets a probability per label.")
    p.add_argument("images", nargs="+", type=Path, help="image files (any format PIL reads)")
    p.add_argument("--labels", required=True, help='comma-separated class names, e.g. "cat,dog,bird"')
    _add_clip_arguments(p)
    p.add_argument("--template", action="append", default=None,
                   help="a prompt template with {} for the label (repeat for an ensemble; default: a built-in set)")
    add_device_argument(p)
    p.set_defaults(func=_classify)

    p = sub.add_parser("zero-shot", help="SHAPES zero-shot accuracy of a CLIP (shape, fg and bg colour)",
                       description="Classify freshly drawn SHAPES images' shape, foreground and background colour "
                                   "zero-shot and print the accuracy of each.")
    p.add_argument("clip", help="CLIP directory (written by train-clip) or open_clip model name")
    p.add_argument("--pretrained", default=None,
                   help="with a model name (required): an open_clip pretrained tag or a local weights file")
    p.add_argument("--split", choices=("heldout", "train", "all"), default="heldout",
                   help="which SHAPES triples to draw from (default: heldout, never seen in training)")
    p.add_argument("--samples", type=positive_int, default=500, help="images to draw (default 500)")
    p.add_argument("--seed", type=int, default=1234, help="SHAPES seed of the drawn images")
    add_device_argument(p)
    p.set_defaults(func=_zero_shot)

    p = sub.add_parser("embed", help="precompute CLIP embeddings of a dataset into resumable shards",
                       description="Write CLIP image embeddings, text embeddings and per-token text encodings of "
                                   "every row into safetensors shards (for training the prior at scale). Re-running "
                                   "the same command resumes after the last complete shard and tries the rows it "
                                   "skipped (unreadable images, empty captions) again.")
    _add_clip_arguments(p)
    p.add_argument("--data", required=True,
                   help='"shapes" (built-in training split), an image folder with metadata.jsonl/csv, '
                        "parquet/arrow files, a saved dataset, or a hub dataset name")
    p.add_argument("--out", required=True, type=Path, help="output directory for the shards")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--shapes-samples", type=positive_int, default=20000, help="rows to generate when --data shapes")
    p.add_argument("--shard-size", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    add_device_argument(p)
    p.set_defaults(func=_embed)
    return parser


def _add_clip_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", required=True,
                   help="CLIP directory written by train-clip, or an open_clip model name such as ViT-L-14")
    p.add_argument("--pretrained", default=None,
                   help="with a model name (required): an open_clip pretrained tag (downloads) or a local open_clip "
                        "weights file")


def _load_clip(spec: str, pretrained: str | None, device: torch.device):
    """The CLIP of --clip/--pretrained for inference (see `load_clip`: its errors say what to give instead)."""
    from ..clip import load_clip

    try:
        return load_clip(spec, pretrained=pretrained).to(device)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise CliError(str(e)) from None


def _classify(args: argparse.Namespace) -> None:
    from ..clip import DEFAULT_TEMPLATES, classify
    from ..clip.zero_shot import check_class_names, check_templates

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise CliError(f"--labels needs at least two comma-separated class names, got {args.labels!r}")
    try:  # before any image or model is read
        check_class_names(labels)
        templates = check_templates(args.template or DEFAULT_TEMPLATES)
    except ValueError as e:
        raise CliError(str(e)) from None
    images = [read_image(path) for path in args.images]
    clip = _load_clip(args.clip, args.pretrained, resolve_device(args.device))
    probs = classify(clip, images, labels, templates=templates)
    rows = [[str(p), labels[int(pr.argmax())], *(f"{float(v):.3f}" for v in pr)] for p, pr in zip(args.images, probs)]
    print_table(["image", "prediction", *labels], rows)


def _zero_shot(args: argparse.Namespace) -> None:
    from ..clip.shapes_judge import evaluate_shapes

    clip = _load_clip(args.clip, args.pretrained, resolve_device(args.device))
    acc = evaluate_shapes(clip, split=args.split, num_samples=args.samples, seed=args.seed)
    print(f"SHAPES {args.split} split, {args.samples} images, zero-shot accuracy:")
    print_table(["attribute", "accuracy"], [[k, f"{v:.1%}"] for k, v in acc.items()])


def _embed(args: argparse.Namespace) -> None:
    from ..data.embeddings import EmbeddingShards, embed_dataset
    from ..data.image_text import DataError, load_image_text_dataset
    from ..data.shapes import make_shapes

    clip = _load_clip(args.clip, args.pretrained, resolve_device(args.device))
    try:
        if args.data == "shapes":
            data, source = make_shapes(args.shapes_samples, split="train"), f"shapes:{args.shapes_samples}"
        else:
            data = load_image_text_dataset(args.data, image_column=args.image_column,
                                           caption_column=args.caption_column, split=args.split)
            source = str(args.data)
        out = embed_dataset(clip, data, args.out, source=source, shard_size=args.shard_size,
                            batch_size=args.batch_size, image_column=args.image_column,
                            caption_column=args.caption_column, num_workers=args.num_workers)
        kept = len(EmbeddingShards(out))
    except (DataError, ValueError) as e:
        raise CliError(str(e)) from None
    skipped = len(data) - kept
    dropped = (f"; {skipped} unusable rows skipped (the warnings above say why); running the same command again "
               "tries them again") if skipped else ""
    print(f"embeddings of {kept} of {len(data)} rows in {out}{dropped}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as e:
        print(f"unclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
