"""Resuming a training run: what the `Trainer` writes into and reads back from its output directory.

    output_dir/checkpoints/step-N/   save_checkpoint() / _restore(): weights, EMA, optimizer, scheduler, RNG, counters
    output_dir/model/                exported at the end (Trainer._export), or from step N: export_checkpoint(N, dir)

A fresh run (no checkpoint to resume) with `train.init_from` starts from the weights of that model directory
(`_init_from_pretrained`); a run that has a checkpoint resumes from it and does not read `init_from`.

Before a run starts, `_check_output_dir` refuses a directory it would wrongly resume from or destroy (another
script's run, a finished model without checkpoints, checkpoints of another model / CLIP config or identity). On
resume the optimizer takes this run's lr, betas, eps and weight decay, and the LR schedule this run's max_steps.
`Checkpointing` is the part of `Trainer` that does this; it uses the trainer's attributes (cfg, task, accelerator,
model, optimizer, scheduler, ema, step counters, output_dir).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object

from ..checkpoint import CheckpointError, load_pretrained_dir, load_state_dict_strict
from ..config import config_to_dict
from .data import mix_seed
from .ema import EMA
from .lr import scheduled_lrs
from .state import (
    TrainingCheckpoint,
    capture_rng_state,
    checkpoint_name,
    list_checkpoints,
    load_training_checkpoint,
    missing_files,
    read_checkpoint_config,
    restore_rng_state,
    rotate_checkpoints,
    save_training_checkpoint,
    seed_everything,
)

__all__ = ["Checkpointing"]


def _added_keys(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the keys of nested dict `current` that `saved` lacks (both dicts, else none)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return []
    return [name for k, v in current.items() for name in (
        [f"{prefix}{k}"] if k not in saved else _added_keys(saved[k], v, f"{prefix}{k}."))]


def _without(current: Any, saved: Any) -> Any:
    """`current` without the keys (at any depth of nested dicts) that `saved` lacks."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return current
    return {k: _without(v, saved[k]) for k, v in current.items() if k in saved}


def _differences(stored: Any, current: Any, prefix: str) -> list[str]:
    """`name (stored vs current)` for each dotted key of two nested dicts whose values differ (keys in both)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return [d for k in current if k in stored for d in _differences(stored[k], current[k], f"{prefix}.{k}")]
    return [] if stored == current else [f"{prefix} ({stored} vs {current})"]


class Checkpointing:
    """Run-directory checks, training checkpoints (save, restore, export) and the training RNG seed of `Trainer`."""

    def _check_output_dir(self, resume: bool) -> None:
        """Refuse an output_dir whose contents this run would wrongly resume from or destroy: the checkpoints of
        another training script (even with resume=False), a finished model without the checkpoints to resume it
        (resume=True would silently train a new one over it), or checkpoints made with another model or CLIP."""
        task_type = type(self.task).__name__
        checkpoints = list_checkpoints(self.checkpoint_root)
        if checkpoints:
            newest = checkpoints[-1][1]
            config = read_checkpoint_config(newest)
            other = config.get("task_type")
            if other is not None and other != task_type:
                raise CheckpointError(f"{self.output_dir} holds a training run of {other} ({newest.name}), not of "
                                      f"{task_type}; choose another output directory (nothing was deleted)")
            if resume:
                self._check_resumed_config(config.get("task") or {}, newest)
                self._check_resumed_identity(config.get("identity") or {}, newest)
        elif resume and (self.output_dir / "model" / "config.json").is_file():
            raise CheckpointError(f"{self.output_dir / 'model'} holds a finished model but {self.checkpoint_root} "
                                  "has no training checkpoint to resume from; choose another output directory, or "
                                  "pass --no-resume (resume=False) to train from scratch and replace it")

    def _check_resumed_config(self, saved: dict[str, Any], path: Path) -> None:
        """The model and CLIP sections of the task config must be those the checkpoint was made with; other
        changes (more steps, another log interval, ...) are what resuming is for, and are listed."""
        task_config = getattr(self.task, "config_dict", None)
        current = task_config() if task_config else {}
        added = [f"{k}.{name}" for k in ("model", "clip") for name in _added_keys(saved.get(k), current.get(k))]
        if added:  # settings the library gained after the checkpoint was made: this run's values apply
            warnings.warn(f"{path} predates the config key(s) {', '.join(added)}; resuming with this run's values",
                          stacklevel=3)
        changed = sorted(k for k in set(saved) & set(current) if _without(current[k], saved[k]) != saved[k])
        fixed = [k for k in changed if k in ("model", "clip")]
        if fixed:
            raise CheckpointError(f"{path} was made with another {' and '.join(fixed)} config than this run's; resume "
                                  "it with the config it was made with, or choose another output directory")
        if [k for k in changed if k != "train"]:
            warnings.warn(f"resuming {path} with changed config sections: {', '.join(changed)}", stacklevel=3)

    def _identity(self) -> dict[str, str]:
        identity = getattr(self.task, "identity", None)
        return dict(identity()) if identity else {}

    def _check_resumed_identity(self, saved: dict[str, Any], path: Path) -> None:
        """The task's identity (`TrainTask.identity`) must be the one the checkpoint was saved with; a checkpoint
        saved without it (older runs) has nothing to compare."""
        current = self._identity()
        changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
        if changed:
            was = ", ".join(f"{k} {saved[k]}" for k in changed)
            now = ", ".join(f"{k} {current[k]}" for k in changed)
            raise CheckpointError(f"{path} was trained with {was}, but this run has {now} (e.g. its CLIP was retrained "
                                  "at the same path), so resuming would continue on other inputs; choose another "
                                  "output directory, or pass --no-resume (resume=False) to train from scratch")

    def export_checkpoint(self, step: int, out_dir: str | Path) -> Path:
        """Export this run's training checkpoint of `step` to `out_dir` as the task exports a finished model (the
        EMA weights when the checkpoint has them), without training: to evaluate or assemble an intermediate model.
        The checkpoint must have been made with this run's model and CLIP config and identity (as for resuming)."""
        if self.world_size > 1:
            raise RuntimeError("export a checkpoint from a single process (not under accelerate launch)")
        export = getattr(self.task, "export", None)
        if export is None:
            raise TypeError(f"{type(self.task).__name__} has no export")
        path = self.checkpoint_root / checkpoint_name(step)
        if not path.is_dir():
            steps = [s for s, _ in list_checkpoints(self.checkpoint_root)]
            raise CheckpointError(f"{path} does not exist; {self.checkpoint_root} holds checkpoints at steps "
                                  f"{', '.join(map(str, steps)) or '(none)'}")
        out = Path(out_dir).resolve()
        own = (self.output_dir / "model").resolve(), self.checkpoint_root.resolve()
        if out in own or own[1] in out.parents:
            raise CheckpointError(f"exporting to {out_dir} would replace this run's own model or checkpoints; "
                                  "choose another directory")
        ckpt = load_training_checkpoint(path)
        other = ckpt.config.get("task_type")
        if other is not None and other != type(self.task).__name__:
            raise CheckpointError(f"{path} is a checkpoint of {other}, not of {type(self.task).__name__}")
        self._check_resumed_config(ckpt.config.get("task") or {}, path)
        self._check_resumed_identity(ckpt.config.get("identity") or {}, path)  # e.g. trained on this very CLIP
        model = self.unwrapped_model
        load_state_dict_strict(model, ckpt.model_state, source=path)
        if ckpt.ema_state is not None:
            ema = EMA(model, self.cfg.ema_decay if self.cfg.ema_decay is not None else 0.0)
            ema.load_state_dict(ckpt.ema_state, source=str(path))
            model = ema.model
        export(model, Path(out_dir), model.state_dict())
        return Path(out_dir)

    def _init_from_pretrained(self, source: str | Path) -> None:
        """Load the weights of the model directory `source` (`train.init_from`) into this fresh run's model, and start
        the EMA (if any) from them. It must hold the task model's `kind`, with weights that fit the model this config
        builds (else a one-line CheckpointError that lists the differing tensors); the optimizer, the LR schedule and
        the step are untouched (fresh). A task may drop what the directory stores beside the network's weights
        (`TrainTask.pretrained_weights`)."""
        path, model = Path(source), self.unwrapped_model
        kind = getattr(model, "kind", None)
        if kind is None:
            raise CheckpointError(f"train.init_from: {type(self.task).__name__} does not start from a model directory")
        try:
            meta, state = load_pretrained_dir(path, kind=kind)
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from: {e}") from None
        weights = getattr(self.task, "pretrained_weights", None)
        state = weights(state) if weights is not None else state
        task_config = getattr(self.task, "config_dict", None)
        changed = _differences(meta["config"].get("model"), (task_config() if task_config else {}).get("model"),
                               "model")
        try:
            if self.accelerator.is_fsdp2:  # every process loads its shards of the full weights
                from torch.distributed.checkpoint import state_dict as dcp

                dcp.set_model_state_dict(self.model, state, options=dcp.StateDictOptions(full_state_dict=True))
            else:
                load_state_dict_strict(model, state, source=path)
        except (RuntimeError, KeyError) as e:  # a CheckpointError (a RuntimeError) lists the tensors that differ
            differs = f"; its model config differs from this run's in {', '.join(changed)}" if changed else ""
            lines = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise CheckpointError(f"train.init_from: {lines}{differs}") from None
        if changed:
            warnings.warn(f"train.init_from: the model config of {path} differs from this run's in "
                          f"{', '.join(changed)}; its weights fit, and training goes on with this run's", stacklevel=3)
        if self.ema is not None:
            self.ema = EMA(model, self.cfg.ema_decay)
        self.accelerator.print(f"initialised the model from {path} (train.init_from); optimizer and step start anew")

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a training checkpoint of the current step (all processes must call; the main one writes)."""
        acc = self.accelerator
        model_state = acc.get_state_dict(self.model)
        optimizer_state = self._optimizer_state()
        rng_states = gather_object([capture_rng_state()])
        path = None
        if acc.is_main_process:
            trainer_state = {
                **self._totals(),
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "ema_updates": self.ema.num_updates if self.ema is not None else 0,
                "world_size": self.world_size,
                "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            }
            task_config = getattr(self.task, "config_dict", None)
            path = save_training_checkpoint(
                self.checkpoint_root,
                step=self.step,
                model_state=model_state,
                optimizer_state=optimizer_state,
                scheduler_state=self.scheduler.state_dict(),
                rng_states=rng_states,
                trainer_state=trainer_state,
                config={"train": config_to_dict(self.cfg), "task": task_config() if task_config else None,
                        "task_type": type(self.task).__name__, "identity": self._identity()},
                ema_state=self.ema.state_dict() if self.ema is not None else None,
            )
            rotate_checkpoints(self.checkpoint_root, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        self._last_checkpoint_step = self.step
        return path

    def _optimizer_state(self) -> dict[str, Any]:
        if self.accelerator.is_fsdp2:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=options)
        return self.optimizer.optimizer.state_dict()

    def _newest_readable_checkpoint(self) -> TrainingCheckpoint | None:
        """The newest training checkpoint that reads back whole; a corrupt newer one (a truncated file, say) is
        passed over with a warning, and is replaced when the run saves that step again."""
        for _, path in reversed(list_checkpoints(self.checkpoint_root)):
            missing = missing_files(path)
            if missing:
                warnings.warn(f"skipping incomplete training checkpoint {path} (missing {', '.join(missing)})",
                              stacklevel=3)
                continue
            try:
                return load_training_checkpoint(path)
            except CheckpointError as e:
                warnings.warn(f"cannot resume from {path} ({e}); trying the checkpoint before it", stacklevel=3)
        return None

    def _restore(self, ckpt: TrainingCheckpoint) -> None:
        acc, path = self.accelerator, ckpt.path
        if acc.is_fsdp2:
            from torch.distributed.checkpoint import state_dict as dcp

            options = dcp.StateDictOptions(full_state_dict=True)
            dcp.set_model_state_dict(self.model, ckpt.model_state, options=options)
            dcp.set_optimizer_state_dict(self.model, self.optimizer.optimizer, ckpt.optimizer_state, options=options)
        else:
            load_state_dict_strict(self.unwrapped_model, ckpt.model_state, source=path)
            self.optimizer.optimizer.load_state_dict(ckpt.optimizer_state)
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        state = ckpt.trainer_state
        if self.ema is not None and ckpt.ema_state is not None:
            self.ema.load_state_dict(ckpt.ema_state, source=str(path))
            self.ema.num_updates = int(state.get("ema_updates", ckpt.step))
        elif self.ema is not None:
            warnings.warn(f"{path} has no EMA weights; the EMA restarts from the restored weights", stacklevel=2)
            self.ema = EMA(self.unwrapped_model, self.cfg.ema_decay)
        if acc.scaler is not None and state.get("grad_scaler"):
            acc.scaler.load_state_dict(state["grad_scaler"])
        self.step = self._last_checkpoint_step = ckpt.step
        self._resync_lr(ckpt)
        self.samples_seen = int(state["samples_seen"])
        self.skipped_samples, self.nonfinite_steps = int(state["skipped_samples"]), int(state["nonfinite_steps"])
        self.empty_batches = int(state.get("empty_batches", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        if len(ckpt.rng_states) == self.world_size:
            restore_rng_state(ckpt.rng_states[self.rank])
        else:
            warnings.warn(
                f"{path} holds RNG states of {len(ckpt.rng_states)} processes, this run has {self.world_size}; "
                "reseeding (the run continues, but not bit-identically)",
                stacklevel=2,
            )
            self._seed_training_rng(ckpt.step)
        acc.print(f"resumed from {path} at step {self.step} ({self.samples_seen} samples seen)")

    def _apply_optimizer_config(self, ckpt: TrainingCheckpoint) -> None:
        """Set the restored param groups' peak lr, betas, eps and weight decay to this run's config (warning when
        they differ from the checkpoint's); the moments and step counts are kept."""
        cfg = self.cfg
        saved = {"eps": 1e-8, **(ckpt.config.get("train") or {})}  # before train.eps: AdamW's default
        changed = [f"{k} {saved[k]} -> {v}" for k, v in (("lr", cfg.lr), ("betas", list(cfg.betas)), ("eps", cfg.eps),
                                                          ("weight_decay", cfg.weight_decay))
                   if k in saved and saved[k] != v]
        for group in self.optimizer.optimizer.param_groups:
            group["initial_lr"], group["betas"], group["eps"] = cfg.lr, tuple(cfg.betas), cfg.eps
            group["weight_decay"] = cfg.weight_decay if group["params"][0].ndim >= 2 else 0.0  # as build_optimizer
        self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.optimizer.param_groups)
        if changed:
            warnings.warn(f"resuming {ckpt.path} with changed optimizer settings, applied from step {ckpt.step}: "
                          f"{', '.join(changed)}", stacklevel=4)

    def _resync_lr(self, ckpt: TrainingCheckpoint) -> None:
        """Give the next update the LR of this run's schedule: the restored optimizer holds the one the checkpoint's
        schedule gave it. They differ when max_steps changed: the cosine is then re-stretched over the new total from
        the step reached (no new warm-up), and the LR jumps; a warning says so, with the values (as it does for a
        changed warm-up, floor or schedule kind). A changed peak lr,
        betas, eps or weight decay is applied too (the restored optimizer and scheduler would keep the old ones)."""
        groups = self.optimizer.optimizer.param_groups
        self._apply_optimizer_config(ckpt)
        was, lrs = groups[0]["lr"], scheduled_lrs(self.scheduler)
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        saved = ckpt.config.get("train") or {}
        trained_for = saved.get("max_steps", self.cfg.max_steps)
        if trained_for != self.cfg.max_steps and self.cfg.lr_schedule == "cosine" and self.step < self.cfg.max_steps:
            warnings.warn(f"resuming {ckpt.path} at step {self.step} with train.max_steps {self.cfg.max_steps} (it was "
                          f"trained towards {trained_for}): the cosine LR schedule is re-stretched over "
                          f"{self.cfg.max_steps} steps, so the lr jumps from {was:.3g} to {lrs[0]:.3g} (no new "
                          "warm-up); see README, Configs and checkpoints", stacklevel=3)
            return
        shape = [f"{k} {saved[k]} -> {getattr(self.cfg, k)}" for k in ("warmup_steps", "min_lr_ratio", "lr_schedule")
                 if k in saved and saved[k] != getattr(self.cfg, k)]
        if shape:  # the schedule's other settings: the LR follows this config's schedule from the step reached
            warnings.warn(f"resuming {ckpt.path} at step {self.step} with a changed LR schedule ({', '.join(shape)}): "
                          f"the lr changes from {was:.3g} to {lrs[0]:.3g}", stacklevel=3)

    def _seed_training_rng(self, *extra: int) -> None:
        """Seed the global RNGs of this process from (seed, rank): each process draws different noise."""
        seed_everything(mix_seed(self.cfg.seed, self.rank, *extra))
