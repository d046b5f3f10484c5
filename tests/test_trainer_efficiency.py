"""GPU-efficiency paths of the trainer, exercised on CPU: bf16 autocast, channels_last, gradient checkpointing,
torch.compile, fused AdamW, and what one optimizer step costs in host reads (one) and skips (non-finite updates)."""

from __future__ import annotations

import json
import math
import os
import re
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from train_toy import ToyTask

import unclip.train as train_package
from unclip.nn import UNet, UNetConfig
from unclip.train import TrainConfig, Trainer

TINY_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                       image_size=8, head_channels=16, groups=8, dropout=0.1, cond_dim=8, context_dim=8)


DEFAULTS = dict(max_steps=6, batch_size=4, lr=1e-3, checkpoint_every=0, log_every=3, progress=False)


def make_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**DEFAULTS, **overrides})


class _Images(Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x0": self.x[i]}


class _UNetTask:
    """A tiny eps-prediction task on a conditioned, attending UNet (dropout on), with tensor metrics."""

    def __init__(self, dropout: float = 0.1):
        torch.manual_seed(0)
        self.model = UNet(replace(TINY_UNET, dropout=dropout))
        with torch.no_grad():  # the zero-initialised output layers would make the first gradients trivial
            for p in self.model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)

    def train_dataset(self) -> Dataset:
        return _Images()

    def loss(self, model, batch):
        x0 = batch["x0"]
        b = x0.shape[0]
        t = torch.randint(0, 1000, (b,))
        noise = torch.randn(x0.shape)  # randn_like would follow a channels_last layout and draw other values
        context = torch.randn(b, 3, 8)
        out = model(x0 + noise, t, cond=torch.randn(b, 8), context=context, context_mask=torch.ones(b, 3).bool())
        loss = (out.float() - noise).square().mean()
        return loss, {"mse": loss.detach()}


class TensorMetricsToy(ToyTask):
    """ToyTask whose metrics stay tensors (ToyTask's own `loss.item()` is a host read inside the task)."""

    def loss(self, model, batch):
        self.calls += 1
        x = batch["x"] + self.noise * torch.randn_like(batch["x"]) if self.noise else batch["x"]
        loss = (model(x) - batch["y"]).square().mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}


def run(task, tmp_path, name: str, **cfg) -> tuple[Trainer, list[float]]:
    trainer = Trainer(task, make_cfg(**cfg), tmp_path / name)
    return trainer, trainer.train().losses


# ---------------------------------------------------------------- the UNet's own switches
def test_gradient_checkpointing_gives_identical_gradients():
    grads = []
    for enabled in (False, True):
        task = _UNetTask()
        task.model.set_gradient_checkpointing(enabled)
        torch.manual_seed(1)  # same noise, timesteps and dropout masks (checkpoint replays the RNG)
        loss, _ = task.loss(task.model, {"x0": _Images().x[:4]})
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in task.model.named_parameters()})
    assert set(grads[0]) == set(grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-6, msg=name)


def test_channels_last_gives_the_same_outputs():
    task = _UNetTask()
    model = task.model.eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    kwargs = dict(cond=torch.randn(2, 8), context=torch.randn(2, 3, 8))
    with torch.no_grad():
        reference = model(x, t, **kwargs)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, **kwargs)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- through the Trainer
def test_each_option_trains_through_the_trainer(tmp_path):
    # no dropout: its masks are drawn in memory order, so channels_last would draw other ones
    UNetTask = lambda: _UNetTask(dropout=0.0)  # noqa: E731, N806
    _, reference = run(UNetTask(), tmp_path, "default")
    assert len(reference) == 6 and all(math.isfinite(v) for v in reference)
    trainer, checkpointed = run(UNetTask(), tmp_path, "ckpt", gradient_checkpointing=True)
    assert trainer.unwrapped_model.gradient_checkpointing
    torch.testing.assert_close(checkpointed, reference, rtol=0, atol=1e-5)  # same gradients, same run
    trainer, nhwc = run(UNetTask(), tmp_path, "nhwc", channels_last=True)
    assert trainer.unwrapped_model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, reference, rtol=1e-4, atol=1e-4)
    trainer, fused = run(UNetTask(), tmp_path, "fused", fused_adamw=True)
    assert trainer.optimizer.optimizer.defaults["fused"]
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_trains(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        trainer, bf16 = run(_UNetTask(dropout=0.0), tmp_path, "bf16", mixed_precision="bf16")
        assert trainer.accelerator.mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    _, reference = run(_UNetTask(dropout=0.0), tmp_path, "fp32")
    assert all(math.isfinite(v) for v in bf16)
    torch.testing.assert_close(bf16, reference, rtol=0.05, atol=0.0)


def test_gradient_checkpointing_needs_a_supporting_module(tmp_path):
    with pytest.raises(ValueError, match="no module that supports it"):
        Trainer(ToyTask(), make_cfg(gradient_checkpointing=True), tmp_path)


@pytest.mark.slow
def test_compile_trains_a_tiny_model(tmp_path):
    # inductor compiles the toy MLP's forward and backward in ~10-30 s on 2 cores; the UNet would take minutes
    task = TensorMetricsToy(dropout=0.0, noise=0.0)
    trainer, compiled = run(task, tmp_path, "compiled", compile=True, max_steps=3)
    _, eager = run(TensorMetricsToy(dropout=0.0, noise=0.0), tmp_path, "eager", max_steps=3)
    assert trainer.unwrapped_model._compiled_call_impl is not None
    assert "net.0.weight" in trainer.unwrapped_model.state_dict()  # compiled in place: the keys did not change
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- one host read per step
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
DATA_CODE = (os.path.join("unclip", "train", "data.py"), os.path.join("torch", "utils", "data"))


def test_each_step_reads_the_device_once(tmp_path, monkeypatch):
    # fused AdamW (the default on CUDA) keeps its step counts on the device; the for-loop kernel reads them
    trainer = Trainer(TensorMetricsToy(), make_cfg(max_steps=10, log_every=5, fused_adamw=True), tmp_path)
    counts = {name: 0 for name in HOST_READS}
    counting = [False]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _name=name, _original=original, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if counting[0] and not any(part in caller for part in DATA_CODE):  # index lists: host-side tensors
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    step = Trainer._train_step

    def counted_step(self, *args):
        counting[0] = True
        try:
            return step(self, *args)
        finally:
            counting[0] = False

    monkeypatch.setattr(Trainer, "_train_step", counted_step)
    result = trainer.train()
    assert result.step == 10 and len(result.losses) == 10
    assert counts == {"item": 0, "tolist": 10, "__float__": 0, "__int__": 0, "__bool__": 0}  # loss, norm, metrics


def test_a_skipped_step_advances_nothing(tmp_path):
    """Non-finite losses at calls 3 and 5 of a 10-call run: 8 updates, each with the LR and EMA decay of its
    number among the updates, and the weights the 8 finite batches alone give."""
    from unclip.train import lr_factor
    from unclip.train.data import GlobalOrder

    cfg = dict(max_steps=8, log_every=1, warmup_steps=3, ema_decay=0.5, fused_adamw=True)
    deterministic = dict(dropout=0.0, noise=0.0)  # no RNG in the loss: a skipped forward draws nothing
    skipped, _ = run(TensorMetricsToy(nan_calls=(3, 5), **deterministic), tmp_path, "nan", **cfg)
    # the same stream without batches 3 and 5: their samples are dropped, so those batches are empty and passed over
    order, size = GlobalOrder(64, seed=0), make_cfg().batch_size
    dropped = order.indices(2 * size, 3 * size) + order.indices(4 * size, 5 * size)
    finite, _ = run(TensorMetricsToy(bad=tuple(dropped), **deterministic), tmp_path, "finite", **cfg)
    assert finite.empty_batches == 2 and finite.nonfinite_steps == 0
    assert skipped.step == finite.step == 8 and skipped.nonfinite_steps == 2

    lrs = {name: [r["lr"] for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
                  if "lr" in r] for name in ("nan", "finite")}
    expected = [1e-3 * lr_factor(s, warmup_steps=3, max_steps=8, schedule="cosine") for s in range(8)]
    assert lrs["nan"] == lrs["finite"] == pytest.approx(expected, rel=1e-12)
    assert skipped.ema.num_updates == finite.ema.num_updates == 8
    assert {float(s["step"]) for s in skipped.optimizer.optimizer.state.values()} == {8.0}
    for name, value in finite.unwrapped_model.state_dict().items():
        assert torch.equal(skipped.unwrapped_model.state_dict()[name], value), name
    for name, value in finite.ema.state_dict().items():
        assert torch.equal(skipped.ema.state_dict()[name], value), f"ema {name}"


def test_the_trainer_writes_no_optimizer_scheduler_or_ema_counters():
    """The step path advances the optimizer, LR schedule and EMA through their own step / update methods."""
    train_dir = Path(train_package.__file__).parent
    written = re.compile(r"\.(found_inf|last_epoch|num_updates)\s*[-+]?=(?!=)")
    assert not written.findall((train_dir / "trainer.py").read_text())
    for path in train_dir.glob("*.py"):  # nothing in the package sets another library's skip flag or step count
        assert not re.search(r"\.(found_inf|last_epoch)\s*[-+]?=(?!=)", path.read_text()), path.name


def test_defer_sync_still_loads_and_changes_nothing(tmp_path):
    from unclip.config import load_config

    old = load_config(TrainConfig, {**DEFAULTS, "defer_sync": True})  # a config that still sets it
    with pytest.warns(FutureWarning, match="train.defer_sync has no effect"):
        trainer = Trainer(TensorMetricsToy(), old, tmp_path / "a")
    _, reference = run(TensorMetricsToy(), tmp_path, "b")
    assert trainer.train().losses == reference


@pytest.mark.parametrize(
    ("device", "overrides", "expected"),
    [
        ("cuda", {}, True),  # the default on a GPU
        ("cpu", {}, False),
        ("cuda", {"fused_adamw": False}, False),
        ("cpu", {"fused_adamw": True}, True),
    ],
)
def test_fused_adamw_resolves_per_device(device, overrides, expected):
    from unclip.train.device import use_fused_adamw

    assert use_fused_adamw(make_cfg(**overrides), device) is expected
