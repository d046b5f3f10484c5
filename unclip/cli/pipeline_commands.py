"""The pipeline's sub-commands of `unclip`: generate, vary, interpolate, text-diff, eval and assemble.

    unclip generate "a red circle on a blue background" "a green cross on a white background" -n 4 --out grid.png
    unclip generate "a red circle" --decoder-guidance 4 --set "upsampler.steps=[3, 2]" --out-dir images
    unclip vary photo.png -n 4 --out variations.png
    unclip interpolate a.png b.png -n 6 --out interpolation.png
    unclip text-diff photo.png --from "a red circle" --to "a red square" -n 5 --out edit.png
    unclip eval --images-per-caption 4 --out eval.json
    unclip assemble --clip runs/clip/model --prior runs/prior/model --decoder runs/decoder/model --out runs/pipeline

Each loads the shipped SHAPES model unless `--pipeline DIR` names another pipeline directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, write_json_atomic
from ..config import config_to_dict
from ..settings import Sampling
from .common import (
    CliError,
    add_device_argument,
    check_writable,
    file_path,
    image_path,
    int_at_least,
    positive_int,
    print_table,
    read_image,
    resolve_device,
    save_image,
)
from .sampling import add_sampling_arguments, sampling_overrides

__all__ = ["add_pipeline_parsers"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_pipeline_parsers(sub: argparse._SubParsersAction) -> None:
    """Register generate, vary, interpolate, text-diff, eval and assemble on the `unclip` sub-parsers."""
    p = sub.add_parser("generate", help="text -> images (CLIP -> prior -> decoder -> upsamplers)",
                       description="Generate images for one or more captions and write a labelled grid (one row per "
                                   "caption). Steps, guidance and sampler default to the pipeline's own settings.")
    p.add_argument("captions", nargs="+", help="captions, each in quotes")
    p.add_argument("-n", "--num-images", type=int, default=4, help="images per caption (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    p.add_argument("--out", type=image_path, default=Path("generated.png"),
                   help="grid PNG to write (default generated.png)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="also write every image as its own PNG, with captions.json, into this directory: a new or "
                        "empty one, or an earlier --out-dir (its images are replaced)")
    _add_pipeline_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("vary", help="variations of an image (DALL-E 2 section 3.1)",
                       description="Encode an image as its CLIP image embedding and DDIM-inverted decoder latent, then "
                                   "decode it n times with DDIM noise eta (0: about the image itself; 1: free).")
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("-n", type=int, default=4, help="variations (default 4)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise of the decoder (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=image_path, default=Path("variations.png"))
    _add_pipeline_arguments(p)
    p.set_defaults(func=_vary)

    p = sub.add_parser("interpolate", help="interpolate between two images (DALL-E 2 section 3.2)",
                       description="Spherical interpolation of two images' CLIP image embeddings and DDIM-inverted "
                                   "decoder latents, decoded with DDIM eta 0; both ends included.")
    p.add_argument("image_a", type=Path)
    p.add_argument("image_b", type=Path)
    p.add_argument("-n", type=int, default=5, help="images including both ends (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the upsamplers' noise (default 0)")
    p.add_argument("--out", type=image_path, default=Path("interpolation.png"))
    _add_pipeline_arguments(p)
    p.set_defaults(func=_interpolate)

    p = sub.add_parser("text-diff", help="edit an image along a change of caption (DALL-E 2 section 3.3)",
                       description="Rotate the image's CLIP embedding towards the normalised difference of two "
                                   "captions' text embeddings (slerp up to --max-angle) and decode each step.")
    p.add_argument("image", type=Path)
    p.add_argument("--from", dest="from_text", required=True, help="a caption describing the image now")
    p.add_argument("--to", dest="to_text", required=True, help="a caption describing the wanted change")
    p.add_argument("-n", type=int, default=5, help="images, the first the (approximate) reconstruction (default 5)")
    p.add_argument("--max-angle", type=float, default=0.5, help="largest slerp fraction (paper: 0.25-0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the upsamplers' noise (default 0)")
    p.add_argument("--out", type=image_path, default=Path("text-diff.png"))
    _add_pipeline_arguments(p)
    p.set_defaults(func=_text_diff)

    p = sub.add_parser("eval", help="SHAPES compositional accuracy, CLIP score, FID and KID of a pipeline",
                       description="Generate images for the 25 held-out SHAPES captions and report the fraction whose "
                                   "shape, foreground and background colour the judge finds right, the CLIP score, "
                                   "and FID / KID against real held-out images. The judge (also the CLIP of the "
                                   "score and of the FID / KID features) is the pipeline's own CLIP, for the shipped "
                                   "pipeline the SHAPES CLIP it was trained with; --judge fixes another, to compare "
                                   "pipelines under one judge.")
    p.add_argument("--images-per-caption", type=positive_int, default=4,
                   help="images per held-out caption (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-samples", type=int_at_least(2), default=500,
                   help="real held-out images for FID / KID, at least 2 (default 500)")
    p.add_argument("--features", choices=("clip", "inception"), default="clip",
                   help="FID / KID features: the judge's CLIP (default) or Inception-v3 via torch-fidelity")
    p.add_argument("--judge", default=None, metavar="CLIP_DIR",
                   help="the CLIP that judges (a directory written by train-clip; default: the pipeline's own)")
    p.add_argument("--batch-size", type=positive_int, default=25)
    p.add_argument("--out", type=file_path, default=None, help="write the full report as JSON here")
    _add_pipeline_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("assemble", help="assemble a pipeline directory from trained stages",
                       description="Gather the stages written by train-clip, train-prior, train-decoder and "
                                   "train-upsampler (each OUTPUT_DIR/model) into one pipeline directory, checking "
                                   "that they fit together (the prior and the decoder must have been trained on this "
                                   "CLIP's embeddings).")
    p.add_argument("--clip", required=True, type=Path)
    p.add_argument("--prior", type=Path, default=None,
                   help="the prior (without one, the pipeline decodes given image embeddings only: vary, "
                        "interpolate, text-diff)")
    p.add_argument("--decoder", required=True, type=Path)
    p.add_argument("--upsamplers", nargs="*", type=Path, default=[], help="upsampler directories, lowest first")
    p.add_argument("--out", required=True, type=Path, help="the pipeline directory to write")
    p.add_argument("--store-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the stored weights (float16 halves the size; loading casts back)")
    p.add_argument("--defaults", type=Path, default=None,
                   help="a YAML file of the pipeline's sampling settings (configs/pipeline/*.yaml: best_of, and per "
                        "stage sampler, steps, guidance, eta); a stage it does not name samples with its own defaults")
    p.set_defaults(func=_assemble)


def _add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", default=None, help="a pipeline directory (default: the shipped SHAPES model)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the diffusion stages (default float32; bfloat16 or float16 on CUDA)")
    add_device_argument(p)


def _pipeline(args: argparse.Namespace):
    from ..pipeline.default import load_pipeline

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if dtype == torch.float16 and device.type == "cpu":
        raise CliError("--dtype float16 needs a CUDA device; on the CPU use float32 or bfloat16")
    if args.pipeline is not None and not Path(args.pipeline).exists():
        raise CliError(f"pipeline directory not found: {args.pipeline}")
    try:
        return load_pipeline(args.pipeline, device=device, dtype=dtype)
    except (CheckpointError, ValueError) as e:
        raise CliError(str(e)) from None


def _write_grid(images, path: Path, nrow: int, labels=None) -> None:
    from ..images import image_grid

    check_writable(path)
    save_image(image_grid(images, nrow, labels=labels), path)
    print(f"wrote {path}")


CAPTIONS_FILE = "captions.json"


def _image_name(index: int, num_images: int) -> str:
    return f"{index // num_images:03d}-{index % num_images:02d}.png"


def _check_out_dir(out_dir: Path) -> list[Path]:
    """--out-dir must be new, empty, or an earlier --out-dir of `generate` (its captions.json); returns the images
    that earlier run wrote, which this run replaces (so that no stale image sits beside the new captions.json)."""
    check_writable(out_dir, directory=True)
    record = out_dir / CAPTIONS_FILE
    if not record.is_file():
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise CliError(f"--out-dir {out_dir} holds other files; give a new or empty directory (nothing was "
                           "written)")
        return []
    try:
        earlier = json.loads(record.read_text())
        count = len(earlier["captions"]) * int(earlier["num_images"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CliError(f"--out-dir {out_dir}: {record} is not a captions.json that generate wrote; give a new or "
                       "empty directory") from None
    return [out_dir / _image_name(i, int(earlier["num_images"])) for i in range(count)]


def _generate(args: argparse.Namespace) -> None:
    from ..clip import CaptionError

    if args.num_images < 1:
        raise CliError(f"--num-images must be >= 1, got {args.num_images}")
    overrides = sampling_overrides(args)
    check_writable(args.out)  # before any work: a place the images cannot be written is found now
    earlier = _check_out_dir(args.out_dir) if args.out_dir is not None else []
    pipe = _pipeline(args)
    try:
        sampling = pipe.resolve_sampling(overrides)  # what the images are sampled with, checked before any work
        images = pipe.generate(args.captions, args.num_images, seed=args.seed, progress=True, sampling=sampling)
    except (CaptionError, ValueError) as e:
        raise CliError(str(e)) from None
    labels = [c for c in args.captions for _ in range(args.num_images)]
    _write_grid(images, args.out, args.num_images, labels)
    if args.out_dir is not None:
        _write_out_dir(args, images, earlier, sampling)


def _write_out_dir(args: argparse.Namespace, images, earlier: list[Path], sampling: Sampling) -> None:
    """The images and captions.json (the captions, the seed and every setting they were sampled with); the old
    captions.json goes first, so a write that fails half-way never leaves one describing a mix of old and new
    images."""
    names = [args.out_dir / _image_name(i, args.num_images) for i in range(len(images))]
    try:
        (args.out_dir / CAPTIONS_FILE).unlink(missing_ok=True)
        for stale in set(earlier) - set(names):
            stale.unlink(missing_ok=True)
        for im, name in zip(images, names, strict=True):
            save_image(im, name)
        write_json_atomic(args.out_dir / CAPTIONS_FILE, {"captions": args.captions, "seed": args.seed,
                                                         "num_images": args.num_images,
                                                         "sampling": config_to_dict(sampling)})
    except OSError as e:
        raise CliError(f"could not write --out-dir {args.out_dir}: {e}") from None
    print(f"wrote {len(images)} images to {args.out_dir}")


def _vary(args: argparse.Namespace) -> None:
    from ..pipeline.manipulations import vary

    check_writable(args.out)
    image = read_image(args.image)
    try:
        images = vary(_pipeline(args), image, args.n, eta=args.eta, seed=args.seed, progress=True)
    except ValueError as e:
        raise CliError(str(e)) from None
    _write_grid(images, args.out, args.n)


def _interpolate(args: argparse.Namespace) -> None:
    from ..pipeline.manipulations import interpolate

    check_writable(args.out)
    a, b = read_image(args.image_a), read_image(args.image_b)
    try:
        images = interpolate(_pipeline(args), a, b, args.n, seed=args.seed, progress=True)
    except ValueError as e:
        raise CliError(str(e)) from None
    _write_grid(images, args.out, args.n)


def _text_diff(args: argparse.Namespace) -> None:
    from ..clip import CaptionError
    from ..pipeline.manipulations import text_diff

    for option, caption in (("--from", args.from_text), ("--to", args.to_text)):
        if not caption.strip():
            raise CliError(f"{option} is empty; give a caption")
    check_writable(args.out)
    image = read_image(args.image)
    try:
        images = text_diff(_pipeline(args), image, args.from_text, args.to_text, args.n, max_angle=args.max_angle,
                           seed=args.seed, progress=True)
    except (CaptionError, ValueError) as e:
        raise CliError(str(e)) from None
    _write_grid(images, args.out, args.n)


def _eval(args: argparse.Namespace) -> None:
    from ..pipeline.evaluation import evaluate_pipeline, inception_features

    overrides = sampling_overrides(args)
    if args.out is not None:
        check_writable(args.out)
    pipe = _pipeline(args)
    judge = None
    if args.judge is not None:
        from ..clip import load_clip

        try:
            judge = load_clip(args.judge).to(pipe.device)
        except (CheckpointError, ValueError, FileNotFoundError) as e:
            raise CliError(f"--judge: {e}") from None
    features = None
    if args.features == "inception":
        try:
            features = inception_features(pipe.device)
        except (ImportError, RuntimeError) as e:
            raise CliError(str(e)) from None
    try:
        report = evaluate_pipeline(pipe, images_per_caption=args.images_per_caption, seed=args.seed,
                                   batch_size=args.batch_size, real_samples=args.real_samples, features=features,
                                   judge=judge, sampling=overrides)
    except ValueError as e:
        raise CliError(str(e)) from None
    report["features"] = args.features
    report["pipeline"] = args.pipeline or "default"
    if args.judge is not None:
        report["judge"]["source"] = str(args.judge)
    acc = report["accuracy"]
    who = "the pipeline's own CLIP" if args.judge is None else f"the CLIP {args.judge}"
    print(f"SHAPES held-out captions: 25 x {args.images_per_caption} images at {report['image_size']}px")
    print(f"judged by {who} (fingerprint {report['judge']['fingerprint']})")
    print_table(["measure", "value"], [
        ["compositional accuracy (shape, fg and bg right)", f"{acc['all']:.1%}"],
        ["shape / fg / bg accuracy", f"{acc['shape']:.1%} / {acc['fg']:.1%} / {acc['bg']:.1%}"],
        ["CLIP score", f"{report['clip_score']:.2f}"],
        [f"FID ({args.features} features, {args.real_samples} real images)", f"{report['fid']:.4f}"],
        [f"KID ({args.features} features)", f"{report['kid']['mean']:.5f} +- {report['kid']['std']:.5f}"],
    ])
    if args.out is not None:
        try:
            write_json_atomic(args.out, json.loads(json.dumps(report, default=list)))
        except OSError as e:
            print(json.dumps(report, default=list, indent=2))  # the evaluation is not lost
            raise CliError(f"could not write {args.out}: {e} (the report is printed above)") from None
        print(f"wrote {args.out}")


def _assemble(args: argparse.Namespace) -> None:
    from ..checkpoint import check_replaceable
    from ..config import ConfigError
    from ..pipeline.pipeline import PIPELINE_FILE, UnclipPipeline
    from ..settings import read_sampling_file

    overrides = {}
    if args.defaults is not None:
        try:
            overrides = read_sampling_file(args.defaults)
        except (ConfigError, OSError) as e:
            raise CliError(f"--defaults: {e}") from None  # the message names the file
    stages = [*([args.prior] if args.prior is not None else []), args.decoder, *args.upsamplers]
    try:
        check_replaceable(args.out, PIPELINE_FILE)  # before any loading: never replace a directory of other things
        pipe = UnclipPipeline.from_stages(args.clip, stages)
        try:
            pipe.sampling = pipe.resolve_sampling(overrides)  # over each stage's own defaults
        except ValueError as e:
            raise ValueError(f"--defaults {args.defaults}: {e}") from None
        pipe.save_pretrained(args.out, dtype=DTYPES[args.store_dtype] if args.store_dtype != "float32" else None)
    except (CheckpointError, ValueError) as e:
        raise CliError(str(e)) from None
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    prior = "" if pipe.prior is not None else "no prior, "
    print(f"wrote the pipeline ({prior}{len(pipe.upsamplers)} upsampler(s), {pipe.image_size}px output, "
          f"{size / 2**20:.1f} MiB) to {args.out}")
