"""GPU-efficiency paths of the trainer, exercised on CPU: bf16 autocast, channels_last, gradient checkpointing,
torch.compile, fused AdamW and the step that never reads the device (defer_sync)."""

from __future__ import annotations

import math
import os
import traceback
from dataclasses import replace

import pytest
import torch
from torch.utils.data import Dataset
from train_toy import ToyTask

from unclip.nn import UNet, UNetConfig
from unclip.train import TrainConfig, Trainer

TINY_UNET = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                       image_size=8, head_channels=16, groups=8, dropout=0.1, cond_dim=8, context_dim=8)


def make_cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, lr=1e-3, checkpoint_every=0, log_every=3, progress=False)
    return TrainConfig(**{**base, **overrides})


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


# ---------------------------------------------------------------- no host reads in the step
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
DATA_CODE = (os.path.join("unclip", "train", "data.py"), os.path.join("torch", "utils", "data"))


def test_deferred_step_does_not_read_the_device(tmp_path, monkeypatch):
    trainer = Trainer(TensorMetricsToy(), make_cfg(max_steps=10, log_every=5, defer_sync=True), tmp_path)
    assert trainer.defer_sync and trainer.optimizer.optimizer.defaults["fused"]
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
    step, settle = Trainer._train_step, Trainer._settle

    def counted(method):
        def run_counted(self, *args):
            counting[0] = True
            try:
                return method(self, *args)
            finally:
                counting[0] = False

        return run_counted

    monkeypatch.setattr(Trainer, "_train_step", counted(step))
    monkeypatch.setattr(Trainer, "_settle", counted(settle))
    result = trainer.train()
    assert result.step == 10 and len(result.losses) == 10
    assert counts == {"item": 0, "tolist": 2, "__float__": 0, "__int__": 0, "__bool__": 0}  # one read per log record


def test_deferred_matches_per_step_reads_and_skips_nonfinite_steps(tmp_path):
    cfg = dict(max_steps=8, log_every=4, fused_adamw=True, lr_schedule="constant")
    strict, strict_losses = run(TensorMetricsToy(nan_calls=(3, 5)), tmp_path, "strict", defer_sync=False, **cfg)
    deferred, losses = run(TensorMetricsToy(nan_calls=(3, 5)), tmp_path, "deferred", defer_sync=True, **cfg)
    assert not strict.defer_sync and deferred.defer_sync
    assert deferred.step == strict.step == 8 and deferred.nonfinite_steps == strict.nonfinite_steps == 2
    assert deferred.scheduler.last_epoch == 8 and len(losses) == 8
    torch.testing.assert_close(losses, strict_losses, rtol=0, atol=1e-6)
    for name, value in strict.unwrapped_model.state_dict().items():
        torch.testing.assert_close(deferred.unwrapped_model.state_dict()[name], value, rtol=0, atol=1e-6)
    steps = {float(s["step"]) for s in deferred.optimizer.optimizer.state.values()}
    assert steps == {8.0}  # the fused kernel did not count the skipped steps


def test_deferred_ema_skips_with_the_update(tmp_path):
    cfg = dict(max_steps=6, log_every=3, fused_adamw=True, lr_schedule="constant", ema_decay=0.05)
    strict, _ = run(TensorMetricsToy(nan_calls=(4,)), tmp_path, "strict", defer_sync=False, **cfg)
    deferred, _ = run(TensorMetricsToy(nan_calls=(4,)), tmp_path, "deferred", defer_sync=True, **cfg)
    assert deferred.ema.num_updates == strict.ema.num_updates == 6
    for name, value in strict.ema.state_dict().items():  # 0.05 < the warm-up decay (1+n)/(10+n): same decays
        torch.testing.assert_close(deferred.ema.state_dict()[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("device", "precision", "overrides", "expected"),
    [
        ("cuda", "bf16", {}, (True, True)),  # the defaults on a GPU: deferred reads, fused kernel
        ("cpu", "no", {}, (False, False)),
        ("cuda", "bf16", {"fused_adamw": False}, (False, False)),  # deferring needs the fused kernel's skip
        ("cuda", "fp16", {}, (False, True)),  # the loss scaler reads the gradients on the host
        ("cpu", "no", {"fused_adamw": True}, (False, True)),
        ("cpu", "no", {"defer_sync": True}, (True, True)),
    ],
)
def test_step_options_resolve_per_device(device, precision, overrides, expected):
    from unclip.train.device import step_options

    assert step_options(make_cfg(**overrides), device, precision) == expected


def test_step_options_refuse_defer_sync_with_fp16():
    from unclip.train.device import step_options

    with pytest.raises(ValueError, match="fp16"):
        step_options(make_cfg(defer_sync=True), "cuda", "fp16")
