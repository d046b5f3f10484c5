"""Few-step sampling: SHAPES compositional accuracy against total sampling steps.

    python benchmarks/sampling_steps.py                          # the shipped pipeline, 4 images per caption
    python benchmarks/sampling_steps.py --pipeline runs/pipeline --images-per-caption 8

For each sampler (DDPM, DDIM, DPM-Solver++(2M), used in every stage) and each step budget (the paper's
64 / 250 / 27 / 15 steps for prior / decoder / upsampler 1 / upsampler 2, and fractions of it), generate the 25
held-out captions' images with the same seeds and judge them with the SHAPES CLIP. Writes
benchmarks/results/sampling_steps.json and the "Few-step sampling" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_result, write_section  # noqa: E402

from unclip.diffusion import SAMPLERS  # noqa: E402
from unclip.pipeline import load_pipeline  # noqa: E402
from unclip.pipeline.evaluation import evaluate_pipeline  # noqa: E402

PAPER = (64, 250, 27, 15)  # prior, decoder, upsampler 1, upsampler 2
BUDGETS = {"paper": 1.0, "1/5": 0.2, "1/10": 0.1}


def steps_at(fraction: float, n_upsamplers: int) -> dict[str, object]:
    """Per-stage steps at a fraction of the paper's (at least 2 each)."""
    s = [max(2, round(k * fraction)) for k in PAPER]
    steps: dict[str, object] = {"prior_steps": s[0], "decoder_steps": s[1]}
    if n_upsamplers:  # one value per upsampler (`unclip.settings.with_overrides`)
        steps["upsampler_steps"] = tuple(s[2:2 + n_upsamplers])
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=None, help="pipeline directory (default: the shipped SHAPES model)")
    p.add_argument("--images-per-caption", type=int, default=4)
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m_sde", "dpmpp_2m", "ddim", "ddpm"],
                   choices=tuple(SAMPLERS))
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline, device="cpu")
    rows = []
    for sampler in args.samplers:
        for budget in args.budgets:
            steps = steps_at(BUDGETS[budget], len(pipe.upsamplers))
            start = time.perf_counter()
            report = evaluate_pipeline(pipe, images_per_caption=args.images_per_caption, seed=0, real_samples=200,
                                       progress=False, sampler=sampler, **steps)
            seconds = time.perf_counter() - start
            total = steps["prior_steps"] + steps["decoder_steps"] + sum(steps.get("upsampler_steps", ()))
            row = {"sampler": sampler, "budget": budget, **steps, "total_steps": total, "seconds": seconds,
                   "accuracy": report["accuracy"], "clip_score": report["clip_score"], "fid": report["fid"]}
            rows.append(row)
            print(f"{sampler:9s} {budget:6s} steps {total:4d}  all {row['accuracy']['all']:.1%}  "
                  f"shape {row['accuracy']['shape']:.1%}  {seconds:.0f} s", flush=True)
    path = write_result("sampling_steps", {"images_per_caption": args.images_per_caption, "rows": rows})
    lines = [
        f"`{' '.join(['python', *sys.argv])}` on the shipped SHAPES pipeline ({args.images_per_caption} images for "
        f"each of the 25 held-out captions, the same seeds for every row; judged by the SHAPES CLIP; raw data in "
        f"`{path.relative_to(path.parents[2])}`). Steps are prior / decoder / upsampler 1 / upsampler 2; the "
        "paper's budget is 64 / 250 / 27 / 15.",
        "",
        "| sampler | budget | steps | total | compositional accuracy | shape | CLIP score | FID (CLIP features) | "
        "seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = " / ".join(map(str, [r["prior_steps"], r["decoder_steps"], *r.get("upsampler_steps", ())]))
        lines.append(f"| {r['sampler']} | {r['budget']} | {st} | {r['total_steps']} | {r['accuracy']['all']:.1%} | "
                     f"{r['accuracy']['shape']:.1%} | {r['clip_score']:.2f} | {r['fid']:.4f} | {r['seconds']:.0f} |")
    lines += ["", *against_paper(rows)]
    write_section("Few-step sampling", "\n".join(lines))


def against_paper(rows: list[dict]) -> list[str]:
    """One line per sampler measured at the paper's budget: its few-step rows' accuracy against that one
    (the target: within 2 points at <= 1/10 of the steps)."""
    acc = {(r["sampler"], r["budget"]): r["accuracy"]["all"] for r in rows}
    out = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        full = acc.get((sampler, "paper"))
        if full is None:
            continue
        few = [f"{b} {100 * (acc[(sampler, b)] - full):+.1f} points" for b in BUDGETS if b != "paper"
               and (sampler, b) in acc]
        if few:
            out.append(f"- {sampler}: paper budget {full:.1%}; " + ", ".join(few))
    if out:
        out.insert(0, "Against the same sampler at the paper's budget (target: within 2 points at 1/10):")
    return out


if __name__ == "__main__":
    main()
