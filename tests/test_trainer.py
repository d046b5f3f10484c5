"""The shared trainer: schedule, optimizer, EMA, data order, non-finite handling, logs, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_toy import ToyTask

from unclip.config import ConfigError, load_config
from unclip.train import (
    EMA,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    build_lr_scheduler,
    build_optimizer,
    epoch_permutation,
    lr_factor,
    save_image_grid,
)
from unclip.train.data import GlobalOrder, ShardedBatchSampler
from unclip.train.state import (
    capture_rng_state,
    flatten_optimizer_state,
    list_checkpoints,
    restore_rng_state,
    unflatten_optimizer_state,
)


def make_cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=10, batch_size=8, lr=1e-2, checkpoint_every=0, log_every=5, progress=False)
    return TrainConfig(**{**base, **overrides})


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- config and schedule
def test_config_loads_strictly_from_yaml_like_dict():
    cfg = load_config(TrainConfig, {"max_steps": 5, "betas": [0.9, 0.95], "lr": "3e-4", "ema_decay": None})
    assert cfg.betas == (0.9, 0.95) and cfg.lr == 3e-4 and cfg.ema_decay is None
    with pytest.raises(ConfigError, match="max_step.*Did you mean 'max_steps'"):
        load_config(TrainConfig, {"max_step": 5})
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(TrainConfig, {"lr_schedule": "linear"})
    with pytest.raises(ConfigError, match="divisible by grad_accum_steps"):
        load_config(TrainConfig, {"batch_size": 6, "grad_accum_steps": 4})


def test_lr_warmup_then_cosine_values():
    f = lambda s: lr_factor(s, warmup_steps=4, max_steps=12, schedule="cosine", min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert f(12) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert lr_factor(7, warmup_steps=2, max_steps=12, schedule="constant") == 1.0

    # the scheduler applies factor(s) to update s
    param = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = make_cfg(lr=0.1, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)
    optimizer = torch.optim.AdamW([param], lr=cfg.lr)
    scheduler = build_lr_scheduler(optimizer, cfg)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * f(s) for s in range(12)])


def test_optimizer_skips_frozen_and_decays_only_matrices():
    task = ToyTask()
    optimizer = build_optimizer(task.model, make_cfg(weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6))
    groups = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    assert all(p.ndim >= 2 for p in groups[0.05]) and all(p.ndim < 2 for p in groups[0.0])
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(task.model.frozen.weight) not in in_optimizer
    assert len(in_optimizer) == sum(p.requires_grad for p in task.model.parameters())
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["eps"] == 1e-6


# ---------------------------------------------------------------- EMA
def test_ema_follows_formula_in_fp32_and_shares_frozen_params():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert ema.model[1].weight.dtype == torch.float32
    assert ema.model[0].weight is model[0].weight  # frozen: shared, not copied
    start = ema.model[1].weight.clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    decay = ema.current_decay()
    assert decay == pytest.approx(1 / 10)  # warm-up: min(0.9, (1 + 0) / (10 + 0))
    ema.update(model)
    expected = decay * start + (1 - decay) * model[1].weight.float()
    torch.testing.assert_close(ema.model[1].weight, expected)
    assert ema.num_updates == 1 and set(ema.state_dict()) == {"1.weight", "1.bias"}


# ---------------------------------------------------------------- data order
def test_data_order_is_a_pure_function_and_shards_cover_the_stream():
    assert torch.equal(epoch_permutation(10, 3, 1), epoch_permutation(10, 3, 1))
    assert not torch.equal(epoch_permutation(10, 3, 1), epoch_permutation(10, 3, 2))
    order = GlobalOrder(10, seed=3)
    stream = order.indices(0, 30)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    shards = [iter(ShardedBatchSampler(10, seed=3, micro_batch=2, world_size=2, rank=r, start=4)) for r in (0, 1)]
    got = []
    for _ in range(5):
        for shard in shards:
            got += next(shard)
    assert [p for _, p in got] == list(range(4, 24))
    assert [i for i, _ in got] == stream[4:24]


# ---------------------------------------------------------------- training
def test_loss_falls_and_outputs_are_written(tmp_path):
    task = ToyTask(dropout=0.0, noise=0.0)
    cfg = make_cfg(max_steps=60, batch_size=16, lr=3e-2, warmup_steps=5, ema_decay=0.9, sample_every=30)
    trainer = Trainer(task, cfg, tmp_path)
    result = trainer.train()
    assert result.step == 60 and len(result.losses) == 60
    assert sum(result.losses[-10:]) < 0.3 * sum(result.losses[:10])
    records = [r for r in read_log(tmp_path) if "event" not in r]
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    assert {"loss", "lr", "grad_norm", "samples_per_s", "skipped_samples", "nonfinite_steps"} <= set(records[0])
    assert records[-1]["metrics"]["mse"] > 0 and records[-1]["samples_seen"] == 60 * 16
    with Image.open(tmp_path / "samples" / "step-0000030.png") as image:
        assert image.size == (2 + 2 * 10, 2 + 2 * 10)  # 4 images of 8x8 in a 2x2 grid, 2 px padding
    # the export gets the EMA weights, which differ from the raw ones
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    torch.testing.assert_close(exported["net.0.weight"], trainer.ema_model.net[0].weight)
    assert not torch.equal(trainer.ema_model.net[0].weight, trainer.unwrapped_model.net[0].weight)
    assert not trainer.unwrapped_model.frozen.weight.requires_grad


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    result = Trainer(ToyTask(nan_calls=(3, 5)), make_cfg(max_steps=8), tmp_path).train()
    assert result.step == 8 and result.nonfinite_steps == 2 and len(result.losses) == 8
    assert all(math.isfinite(x) for x in result.losses)
    events = [r for r in read_log(tmp_path) if r.get("event") == "nonfinite"]
    assert [(r["step"], r["nonfinite_steps"], r["loss"]) for r in events] == [(3, 1, None), (4, 2, None)]


def test_consecutive_nonfinite_steps_stop_the_run_without_updates(tmp_path):
    constant = dict(lr_schedule="constant", max_nonfinite_steps=3)  # so the schedule ignores max_steps
    reference = Trainer(ToyTask(), make_cfg(max_steps=4, **constant), tmp_path / "ref")
    reference.train()
    trainer = Trainer(ToyTask(nan_from=5), make_cfg(max_steps=10, **constant), tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row.*step 5.*lower lr.*check the data"):
        trainer.train()
    assert trainer.step == 4 and trainer.nonfinite_steps == 3
    for name, value in reference.unwrapped_model.state_dict().items():
        assert torch.equal(trainer.unwrapped_model.state_dict()[name], value), name
    steps = {float(s["step"]) for s in trainer.optimizer.optimizer.state.values()}
    assert steps == {4.0}
    assert all(p.grad is None for p in trainer.unwrapped_model.parameters())


def test_skipped_samples_and_empty_batches(tmp_path):
    bad = (0, 1, 2, 3, 4, 5)  # with micro-batches of 2 out of 8 items, some micro-batches are empty
    task = ToyTask(n=8, bad=bad)
    trainer = Trainer(task, make_cfg(max_steps=12, batch_size=2), tmp_path)
    result = trainer.train()
    assert result.step == 12
    order = GlobalOrder(8, seed=0)
    expected = sum(order.index(p) in bad for p in range(trainer.samples_seen))
    assert result.skipped_samples == expected > 0
    assert trainer.empty_batches > 0 and trainer.samples_seen == 2 * (12 + trainer.empty_batches)
    assert read_log(tmp_path)[-1]["skipped_samples"] == expected


class ExplainedToyTask(ToyTask):
    """Its collate says why it drops each item, as `collate_image_text` does."""

    def collate_fn(self, items):
        return {**super().collate_fn(items), "skip_reasons": ["a bad item" for it in items if it is None]}


@pytest.mark.parametrize("task", [ToyTask(n=8, bad=tuple(range(8))), ExplainedToyTask(n=8, bad=tuple(range(8)))])
def test_a_dataset_without_one_usable_sample_is_a_data_error(task, tmp_path):
    from unclip.data import DataError

    reasons = "the collate_fn gave no reason" if type(task) is ToyTask else "a bad item; a bad item; a bad item\\)"
    with pytest.raises(DataError, match=rf"no usable sample in a whole epoch of the training data \(8 rows\): every "
                                        rf"one was skipped \({reasons}"):
        Trainer(task, make_cfg(max_steps=3, batch_size=2), tmp_path).train()
    with pytest.raises(DataError, match="the training dataset is empty"):
        Trainer(ToyTask(n=0), make_cfg(max_steps=3, batch_size=2), tmp_path / "empty").train()


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_rotation_keeps_the_newest(tmp_path):
    Trainer(ToyTask(), make_cfg(max_steps=10, checkpoint_every=2, keep_checkpoints=3), tmp_path).train()
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [6, 8, 10]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    config = json.loads((tmp_path / "checkpoints" / "step-00000010" / "config.json").read_text())
    assert config["train"]["max_steps"] == 10 and config["task"]["hidden"] == 16


def test_no_resume_starts_over(tmp_path):
    Trainer(ToyTask(), make_cfg(max_steps=4, checkpoint_every=2), tmp_path).train()
    with pytest.warns(UserWarning, match="resume=False: deleted 2 old checkpoints"):
        result = Trainer(ToyTask(), make_cfg(max_steps=3), tmp_path).train(resume=False)
    assert result.step == 3 and len(result.losses) == 3
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert [r["step"] for r in read_log(tmp_path)] == [3]  # the old run's log records were dropped


def test_no_resume_deletes_the_replaced_runs_stale_outputs(tmp_path):
    Trainer(ToyTask(), make_cfg(max_steps=2), tmp_path).train()
    for name in ("eval.json", "eval-1.json", "notes.txt"):
        (tmp_path / name).write_text("{}")
    assert Trainer(ToyTask(), make_cfg(max_steps=3), tmp_path).train(stale_outputs=["eval*.json"]).step == 3
    assert (tmp_path / "eval.json").is_file()  # resumed: the outputs are the run's own
    with pytest.warns(UserWarning, match="deleted the replaced run's eval-1.json, eval.json in"):
        Trainer(ToyTask(), make_cfg(max_steps=2), tmp_path).train(resume=False, stale_outputs=["eval*.json"])
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["log.jsonl", "notes.txt"]


def test_optimizer_and_rng_states_round_trip():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    tensors, meta = flatten_optimizer_state(state)
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"] == state["param_groups"]
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            assert torch.equal(back["state"][pid][name], value)

    rng = capture_rng_state()
    first = (torch.rand(3), torch.randn(2))
    restore_rng_state(json.loads(json.dumps({k: v for k, v in rng.items() if k in ("python", "numpy")})) | rng)
    assert torch.equal(torch.rand(3), first[0]) and torch.equal(torch.randn(2), first[1])


def test_fsdp_is_selectable(tmp_path):
    # Alone on CPU, accelerate ignores the FSDP plugin and trains plainly; real sharding needs several GPUs.
    result = Trainer(ToyTask(), make_cfg(max_steps=2, distributed="fsdp"), tmp_path).train()
    assert result.step == 2


def test_save_image_grid(tmp_path):
    path = save_image_grid(torch.ones(3, 3, 4, 6), tmp_path / "grid.png", nrow=3)
    with Image.open(path) as image:
        assert image.size == (2 + 3 * 8, 2 + 6) and image.getpixel((3, 3)) == (255, 255, 255)


def test_tensorboard_gets_scalars_and_images_when_available(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter, which is optional
        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, step))

        def add_image(self, tag, image, step):
            calls.append(("image", tag, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setattr("unclip.train.logging._open_tensorboard", lambda log_dir, purge_step: FakeWriter())
    Trainer(ToyTask(), make_cfg(max_steps=4, log_every=2, sample_every=4), tmp_path).train()
    assert ("scalar", "train/loss", 2) in calls and ("scalar", "train/metrics/mse", 4) in calls
    assert ("image", "samples", 4) in calls and calls[-1] == ("close",)


class OtherToyTask(ToyTask):
    """Another training script's task, as far as the trainer can tell."""


class ConfiguredToyTask(ToyTask):
    def __init__(self, model: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_config = model

    def config_dict(self):
        return {"model": self.model_config, "data": dict(self.settings)}


def test_another_scripts_run_is_neither_resumed_nor_deleted(tmp_path):
    from unclip.checkpoint import CheckpointError

    Trainer(ToyTask(), make_cfg(max_steps=2), tmp_path).train()
    before = list_checkpoints(tmp_path / "checkpoints")
    (tmp_path / "eval.json").write_text("{}")
    for resume in (True, False):
        with pytest.raises(CheckpointError, match="holds a training run of ToyTask .* not of OtherToyTask"):
            Trainer(OtherToyTask(), make_cfg(max_steps=4), tmp_path).train(resume=resume, stale_outputs=["*.json"])
    assert list_checkpoints(tmp_path / "checkpoints") == before and (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "eval.json").is_file()


def test_a_finished_model_without_checkpoints_is_not_silently_retrained(tmp_path):
    from unclip.checkpoint import CheckpointError

    Trainer(ToyTask(), make_cfg(max_steps=2, keep_checkpoints=1), tmp_path).train()
    for _, path in list_checkpoints(tmp_path / "checkpoints"):
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    model = (tmp_path / "model" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="holds a finished model but .* no training checkpoint"):
        Trainer(ToyTask(), make_cfg(max_steps=2), tmp_path).train()
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == model
    assert Trainer(ToyTask(), make_cfg(max_steps=2), tmp_path).train(resume=False).step == 2  # asked for: replaced


def test_resuming_with_another_model_config_is_refused(tmp_path):
    from unclip.checkpoint import CheckpointError

    Trainer(ConfiguredToyTask({"width": 16}), make_cfg(max_steps=2), tmp_path).train()
    with pytest.raises(CheckpointError, match="made with another model config"):
        Trainer(ConfiguredToyTask({"width": 32}), make_cfg(max_steps=4), tmp_path).train()
    with pytest.warns(UserWarning, match="changed config sections: data"):
        result = Trainer(ConfiguredToyTask({"width": 16}, noise=0.2), make_cfg(max_steps=4), tmp_path).train()
    assert result.step == 4


def test_a_model_key_added_since_the_checkpoint_does_not_block_resuming(tmp_path):
    """A run made before the library gained a model setting (say, the prior's length_buckets) resumes with this
    run's value and a warning naming the key; a changed old key still refuses."""
    from unclip.checkpoint import CheckpointError

    Trainer(ConfiguredToyTask({"width": 16, "block": {"depth": 2}}), make_cfg(max_steps=2), tmp_path).train()
    newer = {"width": 16, "block": {"depth": 2, "groups": 4}, "buckets": 4}
    with pytest.warns(UserWarning, match=r"predates the config key\(s\) model.block.groups, model.buckets; resuming"):
        assert Trainer(ConfiguredToyTask(newer), make_cfg(max_steps=3), tmp_path).train().step == 3
    with pytest.raises(CheckpointError, match="made with another model config"):
        Trainer(ConfiguredToyTask({**newer, "block": {"depth": 3, "groups": 4}}), make_cfg(max_steps=4),
                tmp_path).train()


class IdentifiedToyTask(ToyTask):
    """A task bound to inputs beyond its config (say, the fingerprint of the CLIP it learns embeddings of)."""

    def __init__(self, fingerprint: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fingerprint = fingerprint

    def identity(self):
        return {"clip_fingerprint": self.fingerprint}


def test_resuming_with_another_identity_is_refused(tmp_path):
    from unclip.checkpoint import CheckpointError

    Trainer(IdentifiedToyTask("aaaa"), make_cfg(max_steps=2), tmp_path).train()
    config = json.loads((tmp_path / "checkpoints" / "step-00000002" / "config.json").read_text())
    assert config["identity"] == {"clip_fingerprint": "aaaa"}
    with pytest.raises(CheckpointError, match="trained with clip_fingerprint aaaa, but this run has clip_fingerprint "
                                              "bbbb .*another output directory, or pass --no-resume"):
        Trainer(IdentifiedToyTask("bbbb"), make_cfg(max_steps=4), tmp_path).train()
    assert list_checkpoints(tmp_path / "checkpoints")[-1][0] == 2  # nothing trained, nothing deleted
    assert Trainer(IdentifiedToyTask("aaaa"), make_cfg(max_steps=4), tmp_path).train().step == 4
    with pytest.warns(UserWarning, match="resume=False: deleted"):
        assert Trainer(IdentifiedToyTask("bbbb"), make_cfg(max_steps=2), tmp_path).train(resume=False).step == 2


def test_a_checkpoint_saved_without_identity_still_resumes(tmp_path):
    Trainer(IdentifiedToyTask("old"), make_cfg(max_steps=2), tmp_path).train()
    path = tmp_path / "checkpoints" / "step-00000002" / "config.json"
    config = json.loads(path.read_text())
    del config["identity"]  # as older versions wrote checkpoints
    path.write_text(json.dumps(config))
    assert Trainer(IdentifiedToyTask("aaaa"), make_cfg(max_steps=4), tmp_path).train().step == 4
