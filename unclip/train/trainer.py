"""The one trainer behind every `train-*` script: a task supplies model, data and loss; this does the rest.

    trainer = Trainer(task, load_config(TrainConfig, "configs/train/prior.yaml"), "runs/prior")
    result = trainer.train()          # resumes from the newest complete checkpoint in runs/prior, if any

It runs alone or under `accelerate launch` (DDP, or FSDP2 with `distributed: fsdp`): AdamW (fused on CUDA),
warm-up + cosine/constant LR, gradient clipping and accumulation, fp32 EMA, bf16 autocast on CUDA,
non-finite loss skipping, atomic rotating checkpoints with exact resume, log.jsonl / TensorBoard / tqdm,
periodic sample grids and a final `task.export`. Data sharding is done here from one deterministic global
order (see `unclip.train.data`), not by accelerate's dataloader wrapper.

Each optimizer step reads its mean loss, gradient norm and tensor metrics on the host in one transfer, then
applies the update only when the loss and gradient norm are finite (with fp16, the loss scaler also skips an
overflow): the optimizer, the LR schedule, the EMA and the step count advance together, for applied updates only.
On a GPU the read waits for the backward to finish; the GPU then idles while the host queues the update, the EMA
and the next forward until it is ahead again: about a millisecond or a few per step for a model of hundreds of
parameter tensors, against forward and backward passes of 100s of ms.

GPU efficiency knobs (TrainConfig): channels_last, compile (in place, so state-dict keys do not change),
gradient_checkpointing (modules with a `set_gradient_checkpointing(enabled)` method, e.g. `unclip.nn.UNet`),
fused_adamw."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..checkpoint import clean_stale_temporaries
from ..data.image_text import DataError
from ..nn import eval_mode
from .config import TrainConfig
from .data import build_train_loader, is_empty_batch, split_skipped
from .device import build_accelerator, enable_gradient_checkpointing, to_channels_last, use_fused_adamw
from .ema import EMA
from .logging import MetricWindow, RunLogger
from .lr import build_lr_scheduler, build_optimizer
from .resume import Checkpointing
from .state import (
    list_checkpoints,
    preserved_rng,
    rotate_checkpoints,
)

__all__ = ["NonFiniteLossError", "TrainResult", "TrainTask", "Trainer"]


class NonFiniteLossError(RuntimeError):
    """Raised when `max_nonfinite_steps` optimizer steps in a row had a non-finite loss or gradient norm."""


@runtime_checkable
class TrainTask(Protocol):
    """What a stage's training script hands the Trainer.

    Required:
        model: the trainable nn.Module; sub-modules with requires_grad=False stay frozen and out of AdamW.
        train_dataset() -> map-style Dataset; items may use the global RNG (seeded per sample, see data.py).
        loss(model, batch) -> (scalar loss, {name: float} metrics). `model` may be DDP/FSDP-wrapped: call
            `model(...)` for the forward (so gradients synchronise) and `unwrap_model(model)` for attributes.
            Noise and dropout should come from the global torch RNG, which the checkpoints save and restore.
    Optional (looked up with getattr):
        collate_fn(items) -> batch dict; may hold "num_skipped": int (bad samples dropped, logged) and
            "skip_reasons": list of str (why each was dropped), and may be empty (first tensor dimension 0): it is
            then skipped and the next micro-batch drawn. A whole epoch of empty batches is a DataError that gives
            the first reasons.
        sample_images(model, step) -> (b, 3, h, w) in [0, 1]; called on the main process (on all under FSDP)
            with the EMA model (if any) in eval mode under torch.no_grad; it does not disturb the training RNG.
        export(model, out_dir: Path, state_dict): write the final model in the stage's format; state_dict holds the
            full weights to write (the EMA's if EMA is on; gathered under FSDP, where `model` itself is sharded),
            `model` is there for its config and attributes.
        config_dict() -> dict saved into every training checkpoint.
        identity() -> {name: str}: what the weights are bound to beyond the config, e.g. the fingerprint of the
            frozen CLIP whose embeddings the model learns from; saved into every training checkpoint, and resuming
            one saved with other values (a CLIP retrained at the same path, say) is refused.
        find_unused_parameters: bool, passed to DDP for models whose forward skips some parameters.
        pretrained_weights(state_dict) -> state_dict: the network's weights among those of a model directory that a
            fresh run starts from (`train.init_from`, of the kind `model.kind`), without what the directory stores
            beside them (the prior drops its calibrated eps moments).
    """

    model: nn.Module

    def train_dataset(self) -> Dataset: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class TrainResult:
    step: int  # optimizer steps applied in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step run by this call
    nonfinite_steps: int = 0  # skipped non-finite steps over the whole run
    skipped_samples: int = 0  # samples the collate dropped over the whole run
    output_dir: Path = Path(".")


class _Outcome(NamedTuple):
    """An applied optimizer step, read on the host."""

    loss: float  # mean over the step's micro-batches (and processes)
    grad_norm: float  # global L2 norm of the gradients before clipping
    lr: float  # the learning rate of the update
    metrics: dict[str, float]  # the task's metrics, mean over the micro-batches (this process)


def _read_on_host(loss: torch.Tensor, grad_norm: torch.Tensor | float,
                  metrics: dict[str, Any]) -> tuple[float, float, dict[str, float]]:
    """A step's 0-d loss, gradient norm and metrics as floats, the tensors read in one device-to-host transfer."""
    tensors = [loss, torch.as_tensor(grad_norm, device=loss.device)]
    tensors += [v for v in metrics.values() if isinstance(v, torch.Tensor)]
    values = iter(torch.stack([t.float().reshape(()).to(loss.device) for t in tensors]).tolist())
    loss_value, norm_value = next(values), next(values)
    return loss_value, norm_value, {k: next(values) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


class Trainer(Checkpointing):
    """Trains `task.model` as `cfg` says, writing logs, samples and checkpoints under `output_dir`."""

    def __init__(self, task: TrainTask, cfg: TrainConfig, output_dir: str | Path):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.task, self.cfg, self.output_dir = task, cfg, Path(output_dir)
        self.accelerator = acc = build_accelerator(cfg, task)
        self.world_size, self.rank = acc.num_processes, acc.process_index
        per_draw = cfg.batch_size // cfg.grad_accum_steps
        if per_draw % self.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} does not split evenly over {self.world_size} processes x "
                f"{cfg.grad_accum_steps} accumulation steps; use a multiple of {self.world_size * cfg.grad_accum_steps}"
            )
        self.micro_batch = per_draw // self.world_size  # samples per forward on each process
        # the per-batch agreement on skipped samples travels between hosts (gloo), never through the GPU
        self._host_group = (torch.distributed.new_group(backend="gloo")
                            if self.world_size > 1 and acc.device.type != "cpu" else None)
        if acc.is_fsdp2 and cfg.ema_decay is not None:
            raise NotImplementedError("EMA is not supported with distributed: fsdp yet; use ddp or ema_decay: null")
        if cfg.defer_sync is not None:
            warnings.warn("train.defer_sync has no effect (each optimizer step reads its loss and gradient norm "
                          "once); remove it from the config", FutureWarning, stacklevel=2)
        model = task.model.to(acc.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.compile:
            model.compile()  # in place: the module, its parameters and state-dict keys stay what they were
        optimizer = build_optimizer(model, cfg, fused=use_fused_adamw(cfg, acc.device.type))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer.optimizer, cfg)
        self.ema = EMA(self.unwrapped_model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step = 0  # optimizer updates applied
        self.samples_seen = 0  # positions of the global sample stream consumed (all processes together)
        self.nonfinite_steps = self.consecutive_nonfinite = self.skipped_samples = self.empty_batches = 0
        self._last_checkpoint_step: int | None = None
        self._logger = RunLogger(self.output_dir, enabled=False)

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def ema_model(self) -> nn.Module | None:
        """The EMA copy (fp32, eval mode), or None when EMA is off."""
        return self.ema.model if self.ema is not None else None

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    # ---------------------------------------------------------------- the run
    def train(self, resume: bool = True, *, stale_outputs: Sequence[str] = ()) -> TrainResult:
        """Train to `cfg.max_steps`, resuming from the newest complete checkpoint in output_dir when `resume`.

        With resume=False the run starts afresh: training checkpoints already in output_dir are deleted
        (with a warning) so that they can neither be resumed from nor outrank the new run's in the rotation, and
        so are the files matching `stale_outputs` (glob patterns in output_dir: what a script wrote about the
        model this run replaces, e.g. its evaluation). A fresh run starts from the weights of the model directory
        `cfg.init_from` when it names one (from the task model's initialisation otherwise), with a new optimizer, LR
        schedule and step count; a resumed run does not read it.
        """
        acc = self.accelerator
        self._check_output_dir(resume)
        if acc.is_main_process:
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.checkpoint_root)
            clean_stale_temporaries(self.output_dir)  # e.g. a `.model.tmp-*` export cut short
            if not resume and list_checkpoints(self.checkpoint_root):
                removed = rotate_checkpoints(self.checkpoint_root, keep=0)
                message = f"resume=False: deleted {len(removed)} old checkpoints in {self.checkpoint_root}"
                warnings.warn(message, stacklevel=2)
            stale = sorted({p for pattern in stale_outputs for p in self.output_dir.glob(pattern) if p.is_file()})
            if not resume and stale:
                for path in stale:
                    path.unlink()
                names = ", ".join(p.name for p in stale)
                warnings.warn(f"resume=False: deleted the replaced run's {names} in {self.output_dir}", stacklevel=2)
        acc.wait_for_everyone()
        latest = self._newest_readable_checkpoint() if resume else None
        if latest is not None:
            self._restore(latest)
            if self.cfg.init_from is not None:  # a preempted fine-tune goes on from where it was
                acc.print(f"train.init_from ({self.cfg.init_from}) is not used: the run resumes from its own "
                          f"checkpoint {latest.path}")
        else:
            self._seed_training_rng()
            if self.cfg.init_from is not None:
                self._init_from_pretrained(self.cfg.init_from)
        # a fresh run drops any log.jsonl left by a run killed before its first checkpoint
        resume_step = self.step if latest is not None else -1
        self._logger = RunLogger(self.output_dir, enabled=acc.is_main_process, resume_step=resume_step)
        if latest is not None:
            self._logger.log({"step": self.step, "event": "resume", "checkpoint": latest.path.name})
        elif self.cfg.init_from is not None:
            self._logger.log({"step": 0, "event": "init_from", "source": str(self.cfg.init_from)})
        losses: list[float] = []
        try:
            self._loop(losses)
            if self._last_checkpoint_step != self.step:
                self.save_checkpoint()
            self._export()
        finally:
            self._logger.close()
        acc.wait_for_everyone()
        return TrainResult(self.step, losses, self.nonfinite_steps, self.skipped_samples, self.output_dir)

    def _loop(self, losses: list[float]) -> None:
        cfg = self.cfg
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
            disable=not (cfg.progress and self.accelerator.is_main_process),
        )  # fmt: skip
        window = MetricWindow(self.samples_seen)
        stream = self._batches()
        try:
            while self.step < cfg.max_steps:
                outcome = self._train_step(stream)
                if outcome is None:
                    continue
                bar.update(1)
                losses.append(outcome.loss)
                window.add(outcome.loss, outcome.grad_norm, outcome.lr, outcome.metrics)
                rate = window.rate(self.samples_seen)
                bar.set_postfix(loss=f"{outcome.loss:.4f}", samples_s=f"{rate:.1f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._logger.log(window.record(self.step, self.samples_seen, self._totals()))
                    window = MetricWindow(self.samples_seen)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._sample()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            stream.close()

    def _train_step(self, stream: Iterator[Any]) -> _Outcome | None:
        """One optimizer step over `grad_accum_steps` micro-batches; None when its update was skipped (non-finite loss
        or gradient norm, or an fp16 overflow)."""
        acc, cfg = self.accelerator, self.cfg
        loss_sum = torch.zeros((), device=acc.device)
        metrics: dict[str, Any] = {}
        for i in range(cfg.grad_accum_steps):
            batch = next(stream)
            last = i == cfg.grad_accum_steps - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                with acc.autocast():
                    loss, batch_metrics = self.task.loss(self.model, batch)
                acc.backward(loss / cfg.grad_accum_steps)
            loss_sum += loss.detach().float()
            for k, v in batch_metrics.items():  # tensors stay on the device until the step's one read
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum_steps
        mean_loss = loss_sum / cfg.grad_accum_steps
        mean_loss = acc.reduce(mean_loss, "mean") if self.world_size > 1 else mean_loss
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        mean_loss, grad_norm, metrics = _read_on_host(mean_loss, grad_norm, metrics)
        try:
            applied = self._apply_update(mean_loss, grad_norm)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if not applied:
            return None
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.unwrapped_model)
        self.step += 1
        return _Outcome(mean_loss, grad_norm, lr, metrics)

    def _apply_update(self, loss: float, grad_norm: float) -> bool:
        """Step the optimizer unless the loss (or, without fp16 loss scaling, the gradient) is non-finite."""
        fp16 = self.accelerator.mixed_precision == "fp16"
        if math.isfinite(loss) and (fp16 or math.isfinite(grad_norm)):
            self.consecutive_nonfinite = 0
            self.optimizer.step()
            return not (fp16 and self.optimizer.step_was_skipped)  # fp16: the scaler skips on overflow
        if fp16:
            self.accelerator.scaler.update()  # clip_grad_norm_ unscaled the gradients; close that step
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        self._logger.log(
            {"step": self.step + 1, "event": "nonfinite", "loss": loss, "grad_norm": grad_norm, **self._totals()}
        )
        if self.consecutive_nonfinite >= self.cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss or gradient norm was non-finite (loss={loss}, grad_norm={grad_norm}) for "
                f"{self.consecutive_nonfinite} optimizer steps in a row, the last computing step {self.step + 1}; "
                f"the run stopped (last checkpoint: {self._last_checkpoint_step}). Try a lower lr (now {self.cfg.lr}), "
                "a longer warm-up or grad_clip, check the data for NaN/inf or corrupt samples, or use bf16 "
                "instead of fp16."
            )
        return False

    def _batches(self) -> Iterator[Any]:
        """This process's non-empty micro-batches on the device, counting skipped samples and stream position."""
        acc, cfg = self.accelerator, self.cfg
        dataset = self.task.train_dataset()
        loader = build_train_loader(
            dataset, getattr(self.task, "collate_fn", None), seed=cfg.seed, micro_batch=self.micro_batch,
            world_size=self.world_size, rank=self.rank, start=self.samples_seen, num_workers=cfg.num_workers,
            pin_memory=acc.device.type == "cuda",
        )  # fmt: skip
        chunk, empty_run, reasons = self.micro_batch * self.world_size, 0, []
        for batch in loader:
            self.samples_seen += chunk
            batch, skipped, why = split_skipped(batch)
            empty = is_empty_batch(batch)
            if self.world_size > 1:  # every process must agree to skip, or DDP would hang
                flags = torch.tensor([float(empty), float(skipped)])  # host values, summed over a host group
                torch.distributed.all_reduce(flags, group=self._host_group)
                empty, skipped = bool(flags[0] > 0), int(flags[1])
            self.skipped_samples += skipped
            if empty:
                self.empty_batches += 1
                empty_run += 1
                reasons += why[: max(0, 3 - len(reasons))]
                if empty_run * chunk > len(dataset) + chunk:
                    raise DataError(
                        f"no usable sample in a whole epoch of the training data ({len(dataset)} rows): every one was "
                        f"skipped ({'; '.join(reasons) or 'the collate_fn gave no reason'}); fix the data or point "
                        "data.source at another dataset"
                    )
                continue
            empty_run, reasons = 0, []
            batch = send_to_device(batch, acc.device, non_blocking=True)
            yield to_channels_last(batch) if cfg.channels_last else batch

    # ---------------------------------------------------------------- side outputs
    def _totals(self) -> dict[str, int]:
        return {
            "samples_seen": self.samples_seen,
            "skipped_samples": self.skipped_samples,
            "empty_batches": self.empty_batches,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def _sample(self) -> None:
        sample_images = getattr(self.task, "sample_images", None)
        # a sharded (FSDP) forward needs every process; otherwise only the main process samples
        if sample_images is None or not (self.accelerator.is_main_process or self.accelerator.is_fsdp2):
            return
        model = self.ema_model if self.ema_model is not None else self.unwrapped_model
        with eval_mode(model), torch.no_grad(), preserved_rng(), self.accelerator.autocast():
            images = sample_images(model, self.step)
        self._logger.save_samples(images, self.step)

    def _export(self) -> None:
        export, acc = getattr(self.task, "export", None), self.accelerator
        if export is not None:
            if self.ema_model is not None:
                model, state = self.ema_model, self.ema_model.state_dict()
            else:  # every process takes part: under FSDP this gathers the sharded weights
                model, state = self.unwrapped_model, acc.get_state_dict(self.model)
            if acc.is_main_process:
                export(model, self.output_dir / "model", state)
        acc.wait_for_everyone()
