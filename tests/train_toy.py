"""A tiny regression task for the trainer tests, importable and runnable as a script.

    python tests/train_toy.py OUT_DIR --config '{"max_steps": 20}' --task '{"dropout": 0.1}' [--dump-params]
    accelerate launch --num_processes 2 --cpu tests/train_toy.py OUT_DIR ...

The model (a frozen input projection + MLP with dropout) regresses a fixed random linear map; the loss adds
Gaussian input noise from the global RNG, and items jitter their input with the global RNG, so exact
resume needs the RNG states restored. `crash_call` raises SimulatedCrash at that loss call, to stop an
in-process run part-way; `sleep` slows each loss call down for the kill tests. `--dump-params` writes
params-rank<r>.safetensors for each process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from unclip.checkpoint import save_pretrained_dir
from unclip.config import load_config
from unclip.train import TrainConfig, Trainer, end_process, unwrap_model


class SimulatedCrash(RuntimeError):
    """Raised by ToyTask.loss at call `crash_call`, to stop a run part-way in-process."""


class ToyModel(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.frozen = nn.Linear(dim, dim).requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, d) -> (b,)
        return self.net(self.frozen(x)).squeeze(-1)


class ToyDataset(Dataset):
    """Items {"x": (d,), "y": ()}; items listed in `bad` come back as None (dropped by the collate)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, jitter: float, bad: frozenset[int]):
        self.x, self.y, self.jitter, self.bad = x, y, jitter, bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i in self.bad:
            return None
        x = self.x[i] + self.jitter * torch.randn(self.x.shape[1]) if self.jitter else self.x[i]
        return {"x": x, "y": self.y[i]}


class ToyTask:
    def __init__(
        self,
        n: int = 64,
        dim: int = 8,
        hidden: int = 16,
        dropout: float = 0.1,
        noise: float = 0.1,
        jitter: float = 0.0,
        seed: int = 0,
        bad: tuple[int, ...] = (),
        nan_calls: tuple[int, ...] = (),
        nan_from: int | None = None,
        sleep: float = 0.0,
        crash_call: int | None = None,
    ):
        self.settings = dict(n=n, dim=dim, hidden=hidden, dropout=dropout, noise=noise, jitter=jitter, seed=seed)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, generator=g) / dim**0.5  # (n,), unit variance
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = ToyModel(dim, hidden, dropout)
        self.noise, self.jitter, self.bad, self.sleep = noise, jitter, frozenset(bad), sleep
        self.nan_calls, self.nan_from, self.crash_call, self.calls = set(nan_calls), nan_from, crash_call, 0

    def train_dataset(self) -> Dataset:
        return ToyDataset(self.x, self.y, self.jitter, self.bad)

    def collate_fn(self, items):
        good = [it for it in items if it is not None]
        if not good:
            return {"x": torch.empty(0, self.x.shape[1]), "y": torch.empty(0), "num_skipped": len(items)}
        return {
            "x": torch.stack([it["x"] for it in good]),
            "y": torch.stack([it["y"] for it in good]),
            "num_skipped": len(items) - len(good),
        }

    def loss(self, model, batch):
        assert batch["x"].shape[0] > 0, "the trainer passed an empty batch"
        self.calls += 1
        if self.calls == self.crash_call:
            raise SimulatedCrash(f"simulated crash at loss call {self.calls}")
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"] + self.noise * torch.randn_like(batch["x"]) if self.noise else batch["x"]
        loss = (model(x) - batch["y"]).square().mean()
        if self.calls in self.nan_calls or (self.nan_from is not None and self.calls >= self.nan_from):
            loss = loss * float("nan")
        frozen = not unwrap_model(model).frozen.weight.requires_grad
        return loss, {"mse": loss.item(), "frozen_is_frozen": float(frozen)}

    def sample_images(self, model, step):
        assert not model.training and not torch.is_grad_enabled()
        return torch.rand(4, 3, 8, 8)  # uses the RNG, which the trainer must isolate from training

    def export(self, model, out_dir, state_dict):
        save_pretrained_dir(out_dir, kind="toy", config=self.settings, state_dict=state_dict)

    def config_dict(self):
        return dict(self.settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    parser.add_argument("--task", default="{}", help="ToyTask arguments as JSON")
    parser.add_argument("--dump-params", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, {"progress": False, **json.loads(args.config)})
    trainer = Trainer(ToyTask(**json.loads(args.task)), cfg, args.output_dir)
    result = trainer.train()
    if args.dump_params:
        params = {k: v.detach().contiguous() for k, v in trainer.unwrapped_model.state_dict().items()}
        save_file(params, str(args.output_dir / f"params-rank{trainer.rank}.safetensors"))
    if trainer.accelerator.is_main_process:
        print(json.dumps({"step": result.step, "losses": result.losses}), file=sys.stdout)
    if trainer.accelerator.num_processes > 1:
        end_process(0)


if __name__ == "__main__":
    main()
