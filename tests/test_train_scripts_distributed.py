"""Every `train-*` script runs under `accelerate launch` with two CPU processes (gloo, loopback only): the stage's
real task, data and model (tiny sizes through --set), DDP-wrapped, for a few steps to an exported model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer_distributed import ACCELERATE, free_port

from unclip.train.state import load_training_checkpoint

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=0",
         "train.sample_every=0", "train.warmup_steps=0", "train.progress=false", "train.num_workers=0"]
TINY_UNET = ["model.unet.model_channels=8", "model.unet.channel_mult=[1, 2]", "model.unet.num_res_blocks=1",
             "model.unet.groups=4"]


def scripts(clip_dir: Path) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (console script, config, overrides): the tiny CLIP of the conftest stands in for the SHAPES one."""
    clip = [f"clip={clip_dir}"]
    return {
        "clip": ("train-clip", "configs/clip/shapes-tiny.yaml", ["data.shapes_samples=16", "eval_samples=0"]),
        "prior": ("train-prior", "configs/prior/shapes-tiny.yaml", [
            *clip, "model.embed_dim=32", "model.text_width=48", "model.text_length=16", "model.width=32",
            "model.depth=1", "model.heads=2", "model.dim_head=16", "data.shapes_samples=16", "eval.enabled=false"]),
        "decoder": ("train-decoder", "configs/decoder/shapes-tiny.yaml", [
            *clip, "model.embed_dim=32", "model.text_width=48", "model.context_dim=16", "model.image_size=8",
            "model.unet.image_size=8", *TINY_UNET, "model.unet.attention_resolutions=[4]",
            "model.unet.head_channels=8", "data.shapes_samples=16", "eval.samples=0"]),
        "upsampler": ("train-upsampler", "configs/upsamplers/shapes-32-64.yaml", [
            *TINY_UNET, "data.shapes_samples=16", "eval.samples=0"]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_train_script_under_two_processes(stage, tmp_path, tiny_clip):
    clip_dir = tmp_path / "clip"
    tiny_clip.save_pretrained(clip_dir)
    script, config, overrides = scripts(clip_dir)[stage]
    out = tmp_path / "run"
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(BIN / script), config, "--output-dir", str(out),
        *(arg for item in [*TRAIN, *overrides] for arg in ("--set", item)),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = load_training_checkpoint(out / "checkpoints" / "step-00000002")
    assert checkpoint.trainer_state["world_size"] == 2 and len(checkpoint.rng_states) == 2
    assert checkpoint.trainer_state["samples_seen"] == 2 * 4
    assert json.loads((out / "model" / "config.json").read_text())["config"]
    assert "trained to step 2" in proc.stdout


@pytest.mark.slow
def test_fsdp_accelerate_config_launches(tmp_path):
    """configs/accelerate/fsdp-8gpu.yaml, shrunk to 2 CPU processes by flags, trains the toy with distributed: fsdp."""
    from test_trainer_distributed import TOY_SCRIPT

    cfg = dict(max_steps=4, batch_size=8, distributed="fsdp", checkpoint_every=2, log_every=1, progress=False)
    command = [
        str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp-8gpu.yaml"),
        "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(TOY_SCRIPT), str(tmp_path), "--config", json.dumps(cfg),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4
    assert load_training_checkpoint(tmp_path / "checkpoints" / "step-00000004").trainer_state["world_size"] == 2
