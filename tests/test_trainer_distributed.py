"""Two CPU processes (gloo, loopback only) under `accelerate launch` train like one with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_toy import ToyTask

from unclip.train import TrainConfig, Trainer
from unclip.train.state import load_training_checkpoint

TOY_SCRIPT = Path(__file__).with_name("train_toy.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    cfg = dict(max_steps=8, batch_size=8, grad_accum_steps=2, lr=1e-2, warmup_steps=2, checkpoint_every=4,
               ema_decay=0.9, log_every=2, progress=False)  # fmt: skip
    task = dict(dropout=0.0, noise=0.0)  # per-process noise would differ from a single process's draws
    out = tmp_path / "ddp"
    command = [
        # --multi_gpu selects accelerate's torchrun launcher; ACCELERATE_USE_CPU keeps both processes on CPU/gloo
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(TOY_SCRIPT), str(out), "--config", json.dumps(cfg), "--task", json.dumps(task), "--dump-params",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, rank1 = (load_file(str(out / f"params-rank{r}.safetensors")) for r in (0, 1))
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), f"{name} differs between the ranks"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(ToyTask(**task), TrainConfig(**cfg), tmp_path / "single")
        single.train()
    finally:
        torch.set_num_threads(threads)
    for name, value in single.unwrapped_model.state_dict().items():
        torch.testing.assert_close(rank0[name], value, atol=1e-5, rtol=0, msg=f"{name}: 2 processes vs 1")

    checkpoint = load_training_checkpoint(out / "checkpoints" / "step-00000008")
    assert checkpoint.trainer_state["world_size"] == 2 and len(checkpoint.rng_states) == 2
    assert checkpoint.trainer_state["samples_seen"] == 8 * 8
    for name, value in single.ema.state_dict().items():
        torch.testing.assert_close(checkpoint.ema_state[name], value, atol=1e-5, rtol=0)
    exported = load_file(str(out / "model" / "model.safetensors"))
    torch.testing.assert_close(exported["net.0.weight"], checkpoint.ema_state["net.0.weight"])
