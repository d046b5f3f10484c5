"""Time upsampler training steps as the Trainer runs them (data loading, conditioning, forward, backward, AdamW).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/upsampler_train_steps.py configs/upsamplers/shapes-64-128.yaml \
        configs/upsamplers/shapes-32-64.yaml --workers 0 1 --steps 20

For each worker count: one warm-up step, then `steps` timed steps, from the start of the second loss call to the
start of call steps + 2 (so worker start-up, the first batch, the final checkpoint and export are left out). Reports
wall seconds and the main process's CPU seconds (`time.process_time`; worker processes not included), one JSON
line per config and worker count, and (unless --no-write) benchmarks/results/upsampler_train_steps.json and the
"## Upsampler training steps" section of BENCHMARKS.md. The SHAPES set is cut to `--samples` images (rendering
them is not timed). The conditioning (corruption, upsampling, crops) is made in the DataLoader's collate, so with
workers it leaves the main process; the main-process CPU seconds show what the training step itself costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import command, machine, write_result, write_section  # noqa: E402  (benchmarks/ is sys.path[0])

from unclip.config import load_config, replace_config  # noqa: E402
from unclip.train import Trainer  # noqa: E402
from upsamplers import TrainUpsamplerConfig, UpsamplerTrainTask  # noqa: E402


def time_steps(config: Path, workers: int, steps: int, samples: int) -> dict:
    cfg = replace_config(load_config(TrainUpsamplerConfig, config), {
        "data.shapes_samples": samples, "train.max_steps": steps + 2, "train.num_workers": workers,
        "train.checkpoint_every": 0, "train.sample_every": 0, "train.progress": False, "eval.samples": 0})
    task = UpsamplerTrainTask(cfg)
    dataset = task.train_dataset()
    task.train_dataset = lambda: dataset  # rendered once, outside the timing
    stamps: list[tuple[float, float]] = []
    loss = task.loss

    def timed_loss(model, batch):
        stamps.append((time.perf_counter(), time.process_time()))
        return loss(model, batch)

    task.loss = timed_loss
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        Trainer(task, cfg.train, out).train(resume=False)
    (w0, c0), (w1, c1) = stamps[1], stamps[steps + 1]
    return {"config": str(config), "augmentation": cfg.model.augmentation, "batch_size": cfg.train.batch_size,
            "num_workers": workers, "steps": steps, "wall_s": round(w1 - w0, 3), "main_cpu_s": round(c1 - c0, 3),
            "threads": torch.get_num_threads()}


def render(rows: list[dict]) -> str:
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    lines = [f"Command: `{env}{command()}`. Machine: {machine()}. Each row: {rows[0]['steps']} training steps as the "
             "`Trainer` runs them (data loading, conditioning, forward, backward, AdamW) after one warm-up step; "
             "main-process CPU = its CPU seconds (DataLoader workers not counted). With a worker, the corruption "
             "and crops leave the main process (`UpsamplerTrainTask.collate_fn`); before they moved there "
             "(a helper's interleaved runs of the old code, same command) the 64->128 BSR row with 1 worker took "
             "8.86 s of main-process CPU against 8.52 s after, and 32->64 blur 6.45 s against 6.08 s.", "",
             "| config | augmentation | batch | workers | wall s | main-process CPU s | s per step |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| `{r['config']}` | {r['augmentation']} | {r['batch_size']} | {r['num_workers']} | {r['wall_s']:.2f} | "
              f"{r['main_cpu_s']:.2f} | {r['wall_s'] / r['steps']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", type=Path, nargs="+")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the JSON and BENCHMARKS.md alone")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        for workers in args.workers:
            rows.append(time_steps(config, workers, args.steps, args.samples))
            print(json.dumps(rows[-1]), flush=True)
    if not args.no_write:
        write_result("upsampler_train_steps", {"rows": rows})
        write_section("Upsampler training steps", render(rows))


if __name__ == "__main__":
    main()
