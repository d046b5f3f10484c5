"""Peak training memory per parameter of each full-scale config, estimated without a GPU (labelled as such).

    .venv/bin/python benchmarks/memory_per_param.py          # writes benchmarks/results/memory.json + "## Memory"

Method (an estimate; `benchmarks/gpu_efficiency.py` measures the decoder's on a GPU):
- states, per parameter: fp32 weights 4 B + fp32 gradients 4 B + AdamW's two fp32 moments 8 B + the trainer's fp32
  EMA copy 4 B when the config turns EMA on; DDP adds its gradient buckets (4 B). Under FSDP over N GPUs the
  weights, gradients and moments are sharded (/N; the trainer refuses EMA with FSDP).
- activations: the bytes autograd saves for the backward in one training forward at the config's per-GPU
  micro-batch, counted with `torch.autograd.graph.saved_tensors_hooks` on the meta device (shapes only: nothing is
  allocated), in fp32, parameters and repeated views of one tensor counted once. bf16 autocast saves most of them
  in bf16 (about half); gradient checkpointing (UNets) keeps only block inputs and is counted separately.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
GPUS = 8  # every full-scale config's launch comment: 8 GPUs


def saved_activation_bytes(model: nn.Module, loss_fn) -> int:
    """Bytes autograd saves for the backward while `loss_fn()` runs (meta tensors; parameters excluded)."""
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params and id(base) not in seen:
            seen.add(id(base))
            total[0] += base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return total[0]


def _unet_stage(kind: str, path: Path, micro_batch: int, checkpointing: bool) -> tuple[nn.Module, Any, dict]:
    from unclip.config import load_config

    if kind == "decoder":
        from gpu_efficiency import decoder_inputs, decoder_loss

        from decoder import Decoder, TrainDecoderConfig

        cfg = load_config(TrainDecoderConfig, path)
        model = Decoder(cfg.model)
        x = decoder_inputs(cfg.model, micro_batch, "meta")
        loss = lambda: decoder_loss(model, x)  # noqa: E731
    else:
        from upsamplers import TrainUpsamplerConfig, Upsampler

        cfg = load_config(TrainUpsamplerConfig, path)
        model = Upsampler(cfg.model)
        side = cfg.data.crop_size or cfg.model.image_size  # trained on random crops
        x_t = torch.randn(micro_batch, 3, side, side)
        loss = lambda: model(x_t, torch.randint(0, 1000, (micro_batch,)), low_res_up=torch.randn_like(x_t),  # noqa
                             aug_level=torch.rand(micro_batch)).square().mean()
    model.unet.set_gradient_checkpointing(checkpointing)
    return model, loss, {"ema": cfg.train.ema_decay is not None}


def estimate(kind: str, config: str, micro_batch: int) -> dict[str, Any]:
    path = ROOT / "configs" / config
    row: dict[str, Any] = {"config": config, "micro_batch": micro_batch}
    with torch.device("meta"):
        model, loss, info = _unet_stage(kind, path, micro_batch, checkpointing=False)
        row["activation_bytes"] = saved_activation_bytes(model, loss)
        model, loss, _ = _unet_stage(kind, path, micro_batch, checkpointing=True)
        row["activation_bytes_checkpointed"] = saved_activation_bytes(model, loss)
    n = sum(p.numel() for p in model.parameters())
    states = 4 + 4 + 8 + (4 if info["ema"] else 0)
    row.update(params=n, ema=info["ema"], state_bytes_per_param=states,
               ddp_bytes_per_param=states + 4 + row["activation_bytes"] / n,
               ddp_checkpointed_bytes_per_param=states + 4 + row["activation_bytes_checkpointed"] / n,
               fsdp_bytes_per_param=16 / GPUS + row["activation_bytes"] / n)
    return row


def states_only(kind: str, config: str) -> dict[str, Any]:
    """The CLIP and prior configs: parameter count and per-parameter states; their activations are not counted
    (their forwards read data on the way, which the meta device cannot give)."""
    from accelerate import init_empty_weights

    from unclip.config import load_config

    path = ROOT / "configs" / config
    if kind == "prior":
        from prior import DiffusionPriorNetwork, TrainPriorConfig

        cfg = load_config(TrainPriorConfig, path)
        with init_empty_weights():  # parameters on the meta device, buffers real
            n = sum(p.numel() for p in DiffusionPriorNetwork(cfg.model).parameters())
    else:
        from unclip.clip import Clip
        from unclip.clip.training import TrainClipConfig

        cfg = load_config(TrainClipConfig, path)
        n = sum(p.numel() for p in Clip.from_config(cfg.model).parameters())  # built on the CPU (~1.7 GB, seconds)
    ema = cfg.train.ema_decay is not None
    states = 4 + 4 + 8 + (4 if ema else 0)
    return {"config": config, "micro_batch": cfg.train.batch_size // GPUS // cfg.train.grad_accum_steps,
            "params": n, "ema": ema, "state_bytes_per_param": states, "activation_bytes": None,
            "ddp_bytes_per_param": states + 4, "ddp_checkpointed_bytes_per_param": None,
            "fsdp_bytes_per_param": 16 / GPUS}


STAGES = [  # (kind, config, per-GPU micro-batch from the config's comment)
    ("decoder", "decoder/full-64.yaml", 64),
    ("upsampler", "upsamplers/full-64-256.yaml", 64),
    ("upsampler", "upsamplers/full-256-1024.yaml", 16),
]


def render(data: dict[str, Any]) -> str:
    rows = ["| config | params | micro-batch / GPU | saved activations (fp32) | DDP, bytes per param | DDP + "
            "gradient checkpointing | FSDP over 8 GPUs |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["activation_bytes"] is None:
            rows.append(f"| `{r['config']}` | {r['params'] / 1e9:.2f}B | {r['micro_batch']} | not counted | "
                        f"{r['ddp_bytes_per_param']:.0f} + activations | n/a | {r['fsdp_bytes_per_param']:.0f} + "
                        "activations |")
            continue
        gib = r["activation_bytes"] / 2**30
        rows.append(f"| `{r['config']}` | {r['params'] / 1e9:.2f}B | {r['micro_batch']} | {gib:.1f} GiB | "
                    f"{r['ddp_bytes_per_param']:.1f} ({r['ddp_bytes_per_param'] * r['params'] / 2**30:.0f} GiB) | "
                    f"{r['ddp_checkpointed_bytes_per_param']:.1f} | {r['fsdp_bytes_per_param']:.1f} |")
    return "\n".join([
        "**Estimates, not measurements** (no GPU on this machine): peak training memory per parameter of each "
        "full-scale config, per GPU, with the method of `benchmarks/memory_per_param.py`: fp32 weights, gradients "
        "and AdamW moments (16 B), the fp32 EMA (4 B) where the config has one, DDP's gradient buckets (4 B), plus "
        "the activations autograd saves for the backward at the per-GPU micro-batch, counted on the meta device in "
        "fp32 (bf16 autocast saves most of them in half the bytes, so these are upper bounds). FSDP shards the 16 B "
        "of states over 8 GPUs (and runs without EMA). For the CLIP and prior configs only the states are counted: "
        "their forwards read tensor data on the way, which the meta device cannot give, so their activations are "
        "not estimated here.",
        "",
        f"Command: `{data['command']}`.",
        "",
        *rows,
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from report import command, write_result, write_section

    rows = [estimate(*stage) for stage in STAGES]
    rows += [states_only("clip", "clip/vit-l-14.yaml"), states_only("prior", "prior/vit-l-14.yaml")]
    for r in rows:
        print(r)
    data = {"command": command(), "method": __doc__, "rows": rows}
    if not args.no_write:
        write_result("memory", data)
        write_section("Memory", render(data))


if __name__ == "__main__":
    main()
