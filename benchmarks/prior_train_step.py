"""One prior training step, side by side with the peer: forward, backward and AdamW at equal size
(see prior_common.py), batch 64, each side in its own process with the same thread count.

    .venv/bin/python benchmarks/prior_train_step.py                  # batch 64, 5 warm-up + 20 timed steps, fp32
                                                                     # and bf16 autocast (each against the peer's)
    .venv/bin/python benchmarks/prior_train_step.py --batch 128 --reps 30

Needs the peer venv `.venv-peer`; writes benchmarks/results/prior_train_step.json and BENCHMARKS.md's "## Prior".
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
)


def worker(side: str, a: dict) -> dict:
    """Time one side's training step: `warmup` steps, then `reps` timed steps; one JSON-able dict."""
    worker_setup(a["threads"])
    embed, tokens, mask = text_inputs(a["batch"])
    image_embed = torch.nn.functional.normalize(embed + 0.5 * torch.randn(a["batch"], DIM), dim=-1)
    if side.startswith("ours"):
        from prior import prior_loss

        full_length = "-full-length" in side  # every row at all 77 token slots (length_buckets: 0)
        model = build_ours(**({"length_buckets": 0} if full_length else {})).train()

        def loss_fn() -> torch.Tensor:
            return prior_loss(model, image_embed, embed, tokens, mask)[0]

        config = {**OURS, "length_buckets": 0 if full_length else 4}
    else:
        model = build_peer().train()

        def loss_fn() -> torch.Tensor:  # the peer scales image_embed in place: give it a fresh copy
            return model(text_embed=embed, image_embed=image_embed.clone(), text_encodings=tokens)

        config = {"net": PEER_NET, "prior": PEER_PRIOR}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    bf16 = side.endswith("-bf16")  # autocast the forward to bfloat16 (the trainer's mixed_precision: bf16)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    for _ in range(a["warmup"]):
        step()
    return {"times": timed(step, a["reps"]), "params": num_params(model), "config": config,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--sides", nargs="+", default=["ours", "ours-full-length", "peer", "ours-bf16", "peer-bf16"],
                   help="-bf16: the forward under torch.autocast(bfloat16), weights and optimizer in float32; "
                        "-full-length: ours with length_buckets 0 (no caption-length groups)")
    p.add_argument("--no-report", action="store_true", help="print only; do not write the JSON or BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.args))))
        return
    a = {"batch": args.batch, "reps": args.reps, "warmup": args.warmup}
    results = {side: run_worker(__file__, side, a, args.threads) for side in args.sides}
    summary = summarise(results)
    print(json.dumps(summary, indent=2))
    if args.no_report:
        return
    from prior_common import write_prior_section
    from report import write_result

    data = {"args": a, "threads": args.threads, "cpu": cpu(), "summary": summary, "results": results}
    write_result("prior_train_step", data)
    write_prior_section()


if __name__ == "__main__":
    main()
