"""Prior sampling, side by side with the peer: our prior, cached and uncached, against
lucidrains' dalle2-pytorch at equal size (see prior_common.py), sampling one batch with DDIM at equal steps.

    .venv/bin/python benchmarks/prior_sampling.py                    # 64 captions x 1, 64 DDIM steps, 3 reps
    .venv/bin/python benchmarks/prior_sampling.py --captions 32 --best-of 2 --guidance 3 --reps 5

Needs the peer venv `.venv-peer` (the command is in prior_common.py and BENCHMARKS.md). Each side runs in its own
process with `--threads` threads; writes benchmarks/results/prior_sampling.json and BENCHMARKS.md's "## Prior".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prior_common import (  # noqa: E402
    DIM,
    OURS,
    PEER_NET,
    PEER_PRIOR,
    THREADS,
    build_ours,
    build_peer,
    cpu,
    num_params,
    run_worker,
    summarise,
    text_inputs,
    timed,
    worker_setup,
    write_prior_section,
)


@torch.no_grad()
def worker(side: str, a: dict) -> dict:
    """Time one side: a warm-up of `warmup_steps` steps, then `reps` full samplings; one JSON-able dict."""
    worker_setup(a["threads"])
    embed, tokens, mask = text_inputs(a["captions"])
    if side.startswith("ours"):
        from prior import sample_image_embeds
        from unclip.clip import TextEncoding

        prior = build_ours().eval()
        text = TextEncoding(embed, tokens, mask)

        def run(steps: int) -> None:
            sample_image_embeds(prior, text, best_of=a["best_of"], steps=steps, sampler="ddim",
                                guidance_scale=a["guidance"], progress=False, use_cache=side == "ours",
                                generator=torch.Generator().manual_seed(0))

        config, params = OURS, num_params(prior)
    else:
        from einops import repeat

        prior = build_peer().eval()
        n = a["best_of"]  # as the peer's own `DiffusionPrior.sample`: each caption repeated, its best kept
        text_cond = {"text_embed": repeat(embed, "b d -> (b n) d", n=n) * 1.0,
                     "text_encodings": repeat(tokens, "b l d -> (b n) l d", n=n)}

        def run(steps: int) -> None:
            torch.manual_seed(0)
            prior.p_sample_loop_ddim((a["captions"] * n, DIM), text_cond, timesteps=steps, eta=0.0,
                                     cond_scale=a["guidance"])

        config, params = {"net": PEER_NET, "prior": PEER_PRIOR}, num_params(prior)
    run(a["warmup_steps"])
    return {"times": timed(lambda: run(a["steps"]), a["reps"]), "params": params, "config": config,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=64)
    p.add_argument("--best-of", type=int, default=1, help="candidates per caption (rows = captions x best-of)")
    p.add_argument("--steps", type=int, default=64, help="DDIM steps (denoiser calls)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--sides", nargs="+", default=["ours", "ours-uncached", "peer"])
    p.add_argument("--no-report", action="store_true", help="print only; do not write the JSON or BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.args))))
        return
    a = {k: getattr(args, k) for k in ("captions", "best_of", "steps", "guidance", "reps", "warmup_steps")}
    results = {side: run_worker(__file__, side, a, args.threads) for side in args.sides}
    summary = summarise(results) if "peer" in results else {}
    print(json.dumps(summary, indent=2))
    if args.no_report:
        return
    from report import write_result

    data = {"args": a, "threads": args.threads, "cpu": cpu(), "summary": summary, "results": results}
    write_result("prior_sampling", data)
    write_prior_section()


if __name__ == "__main__":
    main()
