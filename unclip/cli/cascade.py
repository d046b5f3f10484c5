"""`unclip eval-cascade`: how often the upsampling cascade keeps what its base images show (SHAPES).

    unclip eval-cascade --upsamplers runs/upsampler-32-64/model runs/upsampler-64-128/model \\
        --clip runs/clip-shapes-tiny/model --samples 200 --out cascade.json

See `unclip.pipeline.cascade.cascade_agreement` for what is measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import CheckpointError, write_json_atomic
from ..diffusion import SAMPLERS
from .common import CliError, add_device_argument, check_writable, file_path, positive_int, print_table, resolve_device

__all__ = ["add_cascade_parser"]


def add_cascade_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `eval-cascade` sub-command on the `unclip` command's sub-parsers; returns its parser."""
    p = subparsers.add_parser(
        "eval-cascade", help="does the upsampler cascade keep the base images' shape and colours (SHAPES)",
        description="Render held-out SHAPES images, shrink them to the first upsampler's input side, run the cascade "
                    "and ask a SHAPES CLIP for each image's shape, foreground and background colour, on the base "
                    "image and on the cascade's output: how often the verdicts agree, and the judge's accuracy on "
                    "both.")
    p.add_argument("--upsamplers", nargs="+", required=True, type=Path,
                   help="upsampler directories, in cascade order (lowest resolution first)")
    p.add_argument("--clip", default="runs/clip-shapes-tiny/model", help="the SHAPES CLIP that judges")
    p.add_argument("--samples", type=positive_int, default=200, help="held-out SHAPES images (default 200)")
    p.add_argument("--steps", type=positive_int, nargs="+", default=None,
                   help="sampler steps per upsampler (default: each one's own)")
    p.add_argument("--aug-levels", type=float, nargs="+", default=None, help="corruption level per upsampler")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="every upsampler's sampler (default ddim)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=positive_int, default=50)
    add_device_argument(p)
    p.add_argument("--out", type=file_path, default=None, help="also write the report to this JSON file")
    p.set_defaults(func=_eval_cascade)
    return p


def _eval_cascade(args: argparse.Namespace) -> None:
    from upsamplers import Upsampler

    from ..clip import load_clip
    from ..pipeline.cascade import cascade_agreement

    device = resolve_device(args.device)
    if args.out is not None:
        check_writable(args.out)
    try:
        ups = [Upsampler.from_pretrained(path, device=device) for path in args.upsamplers]
        clip = load_clip(args.clip).to(device)
        report = cascade_agreement(ups, clip, samples=args.samples, seed=args.seed, steps=args.steps,
                                   aug_levels=args.aug_levels, sampler=args.sampler, batch_size=args.batch_size,
                                   progress=True)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    rows = [["output vs base verdict", *report["agreement"].values()]]
    if "base_accuracy" in report:
        rows += [["base vs truth", *report["base_accuracy"].values()],
                 ["output vs truth", *report["output_accuracy"].values()]]
    print(f"cascade {' -> '.join(map(str, report['sizes']))} on {report['samples']} held-out SHAPES images:")
    print_table(["", "shape", "fg", "bg", "all"], [[r[0], *(f"{v:.1%}" for v in r[1:])] for r in rows])
    if args.out is not None:
        result = {"upsamplers": [str(p) for p in args.upsamplers], "clip": args.clip, **report}
        try:
            write_json_atomic(args.out, result)
        except OSError as e:
            print(json.dumps(result, indent=2))  # the evaluation is not lost
            raise CliError(f"could not write {args.out}: {e} (the report is printed above)") from None
        print(f"wrote {args.out}")
