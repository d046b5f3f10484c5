"""Where a training run executes: the Accelerator (device, precision, DDP / FSDP2) and the model and batch
layouts that the TrainConfig's efficiency options ask for.

    acc = build_accelerator(cfg, task)     # cfg.mixed_precision "auto": bf16 on CUDA, fp32 on CPU
    batch = to_channels_last(batch)        # 4-D float tensors (b, c, h, w) stored NHWC, values unchanged
    end_process(0)                         # the last line of a script launched as several processes
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin
from accelerate.utils import parse_flag_from_env
from torch import nn

from .config import TrainConfig

__all__ = ["build_accelerator", "enable_gradient_checkpointing", "end_process", "to_channels_last", "unwrap_model",
           "use_fused_adamw"]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Switch on activation recomputation in every sub-module that supports it (`set_gradient_checkpointing`)."""
    supporting = [m for m in model.modules() if callable(getattr(m, "set_gradient_checkpointing", None))]
    if not supporting:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no module that supports it "
                         "(one with a set_gradient_checkpointing(enabled) method, like unclip.nn.UNet)")
    for module in supporting:
        module.set_gradient_checkpointing(True)


def to_channels_last(batch: Any) -> Any:
    """4-D floating tensors of a batch (dicts, lists and tuples walked) in channels_last memory format."""
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 and batch.is_floating_point() \
            else batch
    if isinstance(batch, dict):
        return {k: to_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_channels_last(v) for v in batch)
    return batch


def unwrap_model(model: nn.Module) -> nn.Module:
    """The task's own module inside a DDP / FSDP / compile wrapper."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def build_accelerator(cfg: TrainConfig, task: Any) -> Accelerator:
    """The Accelerator of a run: CPU or GPU, mixed precision, DDP or FSDP2, checked against the launch."""
    # CPU when there is no GPU or `accelerate launch --cpu` asked for it; passing cpu=True is what makes
    # accelerate start gloo when several CPU processes were launched (torchrun / accelerate launch).
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    precision = ("no" if cpu else "bf16") if cfg.mixed_precision == "auto" else cfg.mixed_precision
    fsdp = None
    if cfg.distributed == "fsdp":
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
            auto_wrap_policy="size_based_wrap", min_num_params=1_000_000,
        )  # fmt: skip
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(getattr(task, "find_unused_parameters", False)))
    acc = Accelerator(cpu=cpu, mixed_precision=precision, fsdp_plugin=fsdp, kwargs_handlers=[ddp])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {acc.num_processes}; "
            "was accelerate's state created before the Trainer with other settings?"
        )
    return acc


def use_fused_adamw(cfg: TrainConfig, device_type: str) -> bool:
    """Whether a run on `device_type` uses the fused AdamW kernel: `cfg.fused_adamw`, or when unset, on CUDA only."""
    return cfg.fused_adamw if cfg.fused_adamw is not None else device_type == "cuda"


def end_process(code: int = 0) -> NoReturn:
    """Exit a process of a multi-process (gloo) run at once, skipping the interpreter's shutdown.

    A script launched as several processes should end this way once its files are written. gloo's worker threads
    may still be destroying a finished collective (the last barrier) when Python finalizes; the destructor's
    tensor decref then needs the GIL, the thread is killed inside a noexcept destructor, and the rank dies of
    SIGABRT ("terminate called without an active exception"), so the launcher reports a complete run as failed.
    A core dump shows ~AsyncBarrierWork in ProcessGroupGloo::runLoop; destroy_process_group does not stop those
    threads while a DDP model still holds the group. Standard streams and logging are flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
