"""`TrainConfig`: the knobs of the shared trainer, one frozen dataclass loaded strictly from YAML.

    cfg = load_config(TrainConfig, {"max_steps": 20_000, "lr": 3e-4, "ema_decay": 0.9999})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (updates actually applied; skipped non-finite steps do not count); the
    #   cosine LR decays over them: resuming with a larger value re-stretches it from the step reached (the LR jumps up)
    batch_size: int = 64  # global batch per optimizer step (split over processes and accumulation)
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each process
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, applied only to >=2-D parameters
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator term (DALL-E 2's prior: 1e-6)
    warmup_steps: int = 0  # linear warm-up: update s (0-based) of the warm-up uses lr * (s + 1) / warmup_steps
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # shape of the LR after warm-up
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float | None = 1.0  # max global L2 norm of the gradients; None: no clipping (norm still logged)
    ema_decay: float | None = None  # e.g. 0.9999; None disables EMA; effective decay min(d, (1+n)/(10+n))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = False  # model weights and 4-D batch tensors in channels_last (NHWC) memory format
    compile: bool = False  # torch.compile the model's forward in place (slow first steps; state-dict keys unchanged)
    gradient_checkpointing: bool = False  # recompute activations in the backward (modules that support it)
    fused_adamw: bool | None = None  # fused AdamW kernel; None: on CUDA only
    defer_sync: bool | None = None  # no effect (each optimizer step reads its loss and gradient norm once); kept so
    #   that configs setting it still load; the Trainer warns when it is set
    distributed: Literal["ddp", "fsdp"] = "ddp"  # how several processes share the model (one process: neither)
    seed: int = 0  # data order, training RNG (per process) and data-worker seeds derive from it
    num_workers: int = 0  # DataLoader worker processes per training process
    log_every: int = 10  # optimizer steps between log.jsonl / TensorBoard records
    sample_every: int = 0  # optimizer steps between sample grids; 0: never
    checkpoint_every: int = 500  # optimizer steps between training checkpoints; 0: only at the end
    keep_checkpoints: int = 3  # newest training checkpoints kept on disk
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before the run stops
    progress: bool = True  # tqdm bar (main process only)
    init_from: str | None = None  # a model directory of the task's stage (OUTPUT_DIR/model of a train-* run, or a
    #   stage sub-directory of a pipeline directory) whose weights a fresh run starts from, the optimizer, LR schedule
    #   and step starting anew (fine-tuning); a run with a checkpoint of its own resumes from that instead

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        need(
            self.batch_size % self.grad_accum_steps == 0,
            f"batch_size ({self.batch_size}) must be divisible by grad_accum_steps ({self.grad_accum_steps})",
        )
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")
        ema_ok = self.ema_decay is None or 0 <= self.ema_decay < 1
        need(ema_ok, f"ema_decay must lie in [0, 1) or be null, got {self.ema_decay}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.sample_every >= 0, f"sample_every must be >= 0, got {self.sample_every}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.init_from != "", "init_from must name a model directory, or be null")
        need(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
