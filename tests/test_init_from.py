"""Fine-tuning from a model directory (`train.init_from`, `--init-from DIR`): a fresh run starts from the stored
weights with a new optimizer and step count, a run with a checkpoint of its own resumes from that instead, and a
directory of another kind or architecture is a one-line error before training starts."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_pipeline
from safetensors.torch import load_file

from decoder import DecoderConfig, DecoderTrainTask, TrainDecoderConfig
from prior import DiffusionPriorNetwork, PriorTrainTask, TrainPriorConfig
from unclip.cli.train_decoder import main as train_decoder
from unclip.config import load_config, replace_config
from unclip.nn import UNetConfig
from unclip.train import TrainConfig, Trainer, unwrap_model
from upsamplers import TrainUpsamplerConfig, Upsampler, UpsamplerTrainTask

UNET = {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
        "image_size": 8, "head_channels": 16, "groups": 8}  # the tiny pipeline's decoder (conftest)


def decoder_config(**overrides) -> TrainDecoderConfig:
    """A tiny 8 px decoder on 32 SHAPES images, logging every step."""
    model = DecoderConfig(image_size=8, embed_dim=32, text_width=48, context_dim=16, unet=UNetConfig(**UNET))
    cfg = TrainDecoderConfig(clip="unused", model=model, train=TrainConfig(
        max_steps=10, batch_size=16, lr=2e-3, warmup_steps=2, checkpoint_every=0, progress=False, log_every=1))
    return replace_config(cfg, {"data.shapes_samples": 32, "data.cache_embeddings": True, **overrides})


def spy_on_first_step(task, trainer: Trainer) -> dict:
    """Filled when the run computes its first loss: the step, the weights of the model and of its EMA, and how many
    parameters have optimizer state."""
    seen, loss = {}, task.loss

    def first(model, batch):
        if not seen:
            ema = trainer.ema_model
            seen.update(step=trainer.step, optimizer_state=len(trainer.optimizer.optimizer.state),
                        weights={k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()},
                        ema=None if ema is None else {k: v.detach().clone() for k, v in ema.state_dict().items()})
        return loss(model, batch)

    task.loss = first
    return seen


def assert_weights_equal(weights: dict, stored: dict) -> None:
    assert set(weights) == set(stored)
    for name, value in stored.items():
        assert torch.equal(weights[name].float(), value.float()), name


@pytest.fixture(scope="module")
def pretrained_decoder(tiny_clip, tmp_path_factory) -> Path:
    """A tiny decoder trained 10 steps on SHAPES and exported: OUTPUT_DIR/model."""
    torch.manual_seed(0)
    cfg = decoder_config()
    out = tmp_path_factory.mktemp("pretrain") / "run"
    Trainer(DecoderTrainTask(cfg, clip=tiny_clip), cfg.train, out).train()
    return out / "model"


@pytest.fixture(scope="module")
def pipeline_dir(tiny_clip, tmp_path_factory) -> Path:
    """A tiny pipeline directory (prior, 8 px decoder, 8 -> 16 px upsampler) whose prior holds eps moments."""
    pipeline = build_tiny_pipeline(tiny_clip, upsampler_sides=(16,))
    pipeline.prior.eps_moments = torch.linspace(0.1, 1.0, 100, dtype=torch.float64)
    return pipeline.save_pretrained(tmp_path_factory.mktemp("pipeline") / "pipe")


def test_a_fine_tune_starts_from_the_exported_weights_with_a_fresh_optimizer_and_its_loss_falls(
        tiny_clip, pretrained_decoder, tmp_path):
    torch.manual_seed(0)
    cfg = decoder_config(**{"train.init_from": str(pretrained_decoder), "train.max_steps": 30,
                            "train.ema_decay": 0.9, "train.seed": 1})
    task = DecoderTrainTask(cfg, clip=tiny_clip)
    trainer = Trainer(task, cfg.train, tmp_path / "fine")
    start = spy_on_first_step(task, trainer)
    result = trainer.train()
    stored = load_file(pretrained_decoder / "model.safetensors")
    assert start["step"] == 0 and start["optimizer_state"] == 0
    assert_weights_equal(start["weights"], stored)
    assert_weights_equal(start["ema"], stored)  # the EMA starts from the loaded weights too
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert result.step == 30 and last < 0.8 * first, f"the fine-tune's loss did not fall: {first:.3f} -> {last:.3f}"
    events = [json.loads(line) for line in (tmp_path / "fine" / "log.jsonl").read_text().splitlines()]
    assert {"step": 0, "event": "init_from", "source": str(pretrained_decoder)} in events


class Preempted(Exception):
    """The run was stopped (as a preempted job is)."""


def test_an_interrupted_fine_tune_resumes_from_its_own_checkpoint(tiny_clip, pretrained_decoder, tmp_path, capsys):
    source = shutil.copytree(pretrained_decoder, tmp_path / "source")
    cfg = decoder_config(**{"train.init_from": str(source), "train.max_steps": 8, "train.checkpoint_every": 4})
    task = DecoderTrainTask(cfg, clip=tiny_clip)
    calls, loss = [], task.loss

    def preempted(model, batch):
        calls.append(1)
        if len(calls) == 6:
            raise Preempted  # after the checkpoint of step 4
        return loss(model, batch)

    task.loss = preempted
    with pytest.raises(Preempted):
        Trainer(task, cfg.train, tmp_path / "fine").train()
    saved = load_file(tmp_path / "fine" / "checkpoints" / "step-00000004" / "model.safetensors")
    shutil.rmtree(source)  # the resumed run must not read it
    task = DecoderTrainTask(cfg, clip=tiny_clip)
    trainer = Trainer(task, cfg.train, tmp_path / "fine")
    start = spy_on_first_step(task, trainer)
    assert trainer.train().step == 8
    assert start["step"] == 4 and start["optimizer_state"] > 0
    assert_weights_equal(start["weights"], saved)
    assert f"train.init_from ({source}) is not used: the run resumes from its own checkpoint" in capsys.readouterr().out


def cli_args(tmp_path: Path, *extra: str) -> list[str]:
    """train-decoder arguments for the tiny decoder on SHAPES (2 steps, no evaluation), CLIP in tmp_path/clip."""
    config = tmp_path / "tiny.yaml"
    model = {"image_size": 8, "embed_dim": 32, "text_width": 48, "context_dim": 16, "unet": UNET}
    config.write_text(yaml.safe_dump({"clip": str(tmp_path / "clip"), "model": model}))
    return [str(config), "--output-dir", str(tmp_path / "run"), "--set", "data.shapes_samples=8",
            "--set", "train.batch_size=4", "--set", "train.max_steps=2", "--set", "train.progress=false",
            "--set", "eval.samples=0", *extra]


def test_train_decoder_starts_from_a_pipelines_decoder(tiny_clip, pipeline_dir, tmp_path, capsys):
    tiny_clip.save_pretrained(tmp_path / "clip")
    assert train_decoder(cli_args(tmp_path, "--init-from", str(pipeline_dir / "decoder"))) == 0
    out = capsys.readouterr().out
    assert f"initialised the model from {pipeline_dir / 'decoder'}" in out and "trained to step 2" in out
    assert train_decoder(cli_args(tmp_path, "--no-resume", "--set", f"train.init_from={pipeline_dir}")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"its decoder is {pipeline_dir / 'decoder'}" in err


def test_a_model_that_does_not_fit_is_a_one_line_error_naming_the_tensors(tiny_clip, pipeline_dir, tmp_path, capsys):
    tiny_clip.save_pretrained(tmp_path / "clip")
    wider = cli_args(tmp_path, "--init-from", str(pipeline_dir / "decoder"), "--set", "model.unet.model_channels=32")
    assert train_decoder(wider) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train-decoder: error: train.init_from: ")
    assert "shape mismatch" in err and re.search(r"unet\.\S+: checkpoint \(16,.*\) vs model \(32,", err), err
    assert "model.unet.model_channels (16 vs 32)" in err
    assert train_decoder(cli_args(tmp_path, "--init-from", str(pipeline_dir / "prior"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a 'prior' checkpoint, not a 'decoder' one" in err
    assert train_decoder(cli_args(tmp_path, "--init-from", str(tmp_path / "nowhere"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"not found: {tmp_path / 'nowhere'}" in err
    assert not (tmp_path / "run" / "model").exists()


def test_the_prior_fine_tunes_without_the_stored_eps_moments(tiny_clip, pipeline_dir, tmp_path):
    model = json.loads((pipeline_dir / "prior" / "config.json").read_text())["config"]["model"]
    cfg = load_config(TrainPriorConfig, {"clip": "unused", "model": model, "data": {"source": "shapes",
                                         "shapes_samples": 8}, "train": {"batch_size": 4, "max_steps": 2,
                                         "progress": False, "init_from": str(pipeline_dir / "prior")}})
    task = PriorTrainTask(cfg, clip=tiny_clip)
    trainer = Trainer(task, cfg.train, tmp_path / "run")
    start = spy_on_first_step(task, trainer)
    trainer.train()
    stored = load_file(pipeline_dir / "prior" / "model.safetensors")
    assert "eps_moments" in stored
    assert_weights_equal(start["weights"], {k: v for k, v in stored.items() if k != "eps_moments"})
    assert DiffusionPriorNetwork.from_pretrained(tmp_path / "run" / "model").eps_moments is None


def test_an_upsampler_fine_tunes_from_a_pipelines_upsampler(pipeline_dir, tmp_path):
    model = json.loads((pipeline_dir / "upsampler-1" / "config.json").read_text())["config"]["model"]
    cfg = load_config(TrainUpsamplerConfig, {"model": model, "data": {"shapes_samples": 8, "shapes_resolution": 16},
                                             "train": {"batch_size": 4, "max_steps": 2, "progress": False,
                                                       "init_from": str(pipeline_dir / "upsampler-1")}})
    task = UpsamplerTrainTask(cfg)
    trainer = Trainer(task, cfg.train, tmp_path / "run")
    start = spy_on_first_step(task, trainer)
    trainer.train()
    assert_weights_equal(start["weights"], load_file(pipeline_dir / "upsampler-1" / "model.safetensors"))
    assert Upsampler.from_pretrained(tmp_path / "run" / "model").config.image_size == 16
