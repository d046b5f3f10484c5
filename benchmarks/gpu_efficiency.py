"""GPU efficiency of the full-scale 64x64 decoder: model FLOPs utilisation (MFU) of its bf16 training step, and
images/s of full-pipeline sampling at full scale.

    .venv/bin/python benchmarks/gpu_efficiency.py                   # CUDA: measures; CPU: counts FLOPs and says so
    .venv/bin/python benchmarks/gpu_efficiency.py --micro-batch 32 --gradient-checkpointing --compile

FLOPs per step are counted, not assumed: `torch.utils.flop_counter.FlopCounterMode` over the forward, the MSE
loss and the backward of `decoder.Decoder` built from configs/decoder/full-64.yaml at the per-GPU micro-batch
(2048 = 8 GPUs x 4 accumulation x 64), on the meta device (no memory, no GPU needed). AdamW's elementwise work
and the recomputation of gradient checkpointing are not counted (MFU counts model FLOPs only).

    MFU = FLOPs per step x steps per second / peak dense bf16 FLOP/s of the GPU

On CUDA the step is the trainer's: fp32 weights under bf16 autocast, channels_last, fused AdamW, SDPA attention,
no host sync inside the timed loop (one `torch.cuda.synchronize` at each end); peak memory per parameter is
printed too. Full-pipeline sampling builds every stage from its full-scale config (randomly initialised: the
speed does not depend on the weights) and times `UnclipPipeline.generate_tensors` in bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
DECODER_CONFIG = ROOT / "configs" / "decoder" / "full-64.yaml"
TEXT_LEN = 77  # ViT-L/14's context
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}  # dense (no sparsity), vendor data sheets


def decoder_inputs(cfg, b: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    s, d = cfg.image_size, cfg.embed_dim
    out = {"x_t": torch.randn(b, 3, s, s, device=device), "t": torch.randint(0, 1000, (b,), device=device),
           "noise": torch.randn(b, 3, s, s, device=device), "image_embed": torch.randn(b, d, device=device),
           "image_drop": torch.rand(b, device=device) < cfg.image_drop,
           "text_drop": torch.rand(b, device=device) < cfg.text_drop}
    if cfg.text_width is not None:
        out["text_states"] = torch.randn(b, TEXT_LEN, cfg.text_width, device=device)
        out["text_mask"] = torch.ones(b, TEXT_LEN, dtype=torch.bool, device=device)
    return out


def decoder_loss(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    args = {k: v for k, v in x.items() if k not in ("x_t", "t", "noise")}
    return (model(x["x_t"], x["t"], **args).float()[:, :3] - x["noise"]).square().mean()


def load_decoder_config(path: Path = DECODER_CONFIG):
    from decoder import TrainDecoderConfig
    from unclip.config import load_config

    return load_config(TrainDecoderConfig, path).model


def count_flops(micro_batch: int, path: Path = DECODER_CONFIG) -> dict[str, Any]:
    """Forward, backward and total FLOPs of one decoder training micro-step, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from decoder import Decoder

    cfg = load_decoder_config(path)
    with torch.device("meta"):
        model = Decoder(cfg)
        x = decoder_inputs(cfg, micro_batch, "meta")
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as forward_counter:
        loss = decoder_loss(model, x)
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    fwd, bwd = forward_counter.get_total_flops(), backward_counter.get_total_flops()
    return {"config": str(path.relative_to(ROOT)), "micro_batch": micro_batch, "params": params, "forward": fwd,
            "backward": bwd, "total": fwd + bwd, "per_sample": (fwd + bwd) / micro_batch}


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def measure_training(args: argparse.Namespace, flops: dict[str, Any]) -> dict[str, Any]:
    from decoder import Decoder

    device = torch.device("cuda")
    cfg = load_decoder_config()
    torch.manual_seed(0)
    model = Decoder(cfg).to(device).to(memory_format=torch.channels_last)
    if args.gradient_checkpointing:
        model.unet.set_gradient_checkpointing(True)
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = decoder_inputs(cfg, args.micro_batch, device)
    x["x_t"] = x["x_t"].contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = decoder_loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / args.steps)
    seconds = statistics.median(times)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, args.peak_tflops)
    params = sum(p.numel() for p in model.parameters())
    return {"gpu": name, "seconds_per_step": seconds, "steps_per_s": 1 / seconds,
            "achieved_tflops": flops["total"] / seconds / 1e12, "peak_tflops": peak / 1e12 if peak else None,
            "mfu": flops["total"] / seconds / peak if peak else None,
            "peak_memory_bytes_per_param": torch.cuda.max_memory_allocated() / params,
            "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile}


def build_full_pipeline(device: torch.device):
    """Every stage from its full-scale config, randomly initialised, in bf16 (the CLIP in fp32)."""
    from decoder import Decoder
    from prior import DiffusionPriorNetwork, TrainPriorConfig
    from unclip.clip import Clip
    from unclip.clip.training import TrainClipConfig
    from unclip.config import load_config
    from unclip.pipeline.pipeline import UnclipPipeline
    from upsamplers import TrainUpsamplerConfig, Upsampler

    configs = ROOT / "configs"
    clip = Clip.from_config(load_config(TrainClipConfig, configs / "clip" / "vit-l-14.yaml").model)
    prior = DiffusionPriorNetwork(load_config(TrainPriorConfig, configs / "prior" / "vit-l-14.yaml").model)
    decoder = Decoder(load_decoder_config())
    ups = [Upsampler(load_config(TrainUpsamplerConfig, configs / "upsamplers" / f"full-{n}.yaml").model)
           for n in ("64-256", "256-1024")]
    return UnclipPipeline(clip, [prior, decoder, *ups]).to(device, torch.bfloat16)


def measure_sampling(args: argparse.Namespace) -> dict[str, Any]:
    pipeline = build_full_pipeline(torch.device("cuda"))
    captions = [f"a photo of object number {i}" for i in range(args.images)]
    pipeline.generate_tensors(captions[:1], seed=0)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipeline.generate_tensors(captions, seed=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images": args.images, "image_size": images.shape[-1], "seconds": seconds,
            "images_per_s": args.images / seconds, "defaults": sampling_summary(pipeline.sampling)}


def sampling_summary(sampling) -> str:
    """The pipeline's sampling settings in one line: best-of, then each stage's sampler, steps and guidance."""
    stages = [f"{name} {spec.sampler} {spec.steps} steps, guidance {spec.guidance:g}"
              for name, spec in sampling.stages.items()]
    return f"best of {sampling.best_of}; " + "; ".join(stages)


def render(data: dict[str, Any]) -> str:
    f = data["flops"]
    lines = [
        "Model FLOPs utilisation of the full-scale 64x64 decoder's bf16 training step and images/s of full-pipeline "
        "sampling (`benchmarks/gpu_efficiency.py`; the method is in its docstring).",
        "",
        f"Command: `{data['command']}`. Machine: {data['machine']}.",
        "",
        f"- Decoder `{f['config']}`: {f['params']:,} parameters. FLOPs of one training step at micro-batch "
        f"{f['micro_batch']} (counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device): forward "
        f"{f['forward'] / 1e12:.1f} TFLOP, backward {f['backward'] / 1e12:.1f} TFLOP, total "
        f"**{f['total'] / 1e12:.1f} TFLOP** ({f['per_sample'] / 1e12:.2f} TFLOP per image).",
        "- MFU = FLOPs per step x steps per second / peak dense bf16 FLOP/s of the GPU (e.g. H100/H200 SXM: 989 "
        "TFLOP/s), so MFU 40% on an H100 means "
        f"{0.4 * 989e12 / f['total']:.2f} steps/s = {0.4 * 989e12 / f['per_sample']:.0f} images/s per GPU.",
    ]
    if data.get("training"):
        t = data["training"]
        mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "n/a (unknown peak; pass --peak-tflops)"
        lines.append(f"- Measured on {t['gpu']}: {t['seconds_per_step']:.3f} s per step, {t['achieved_tflops']:.0f} "
                     f"TFLOP/s, **MFU {mfu}**; peak memory {t['peak_memory_bytes_per_param']:.1f} bytes per "
                     f"parameter (gradient checkpointing {t['gradient_checkpointing']}, compile {t['compile']}).")
    else:
        lines.append("- **Not measured: no CUDA device on this machine.** MFU and sampling images/s are measured by "
                     "the same command on a GPU.")
    if data.get("sampling"):
        s = data["sampling"]
        lines.append(f"- Full pipeline (prior, decoder, 64->256->1024 upsamplers; {s['defaults']}): {s['images']} "
                     f"images of {s['image_size']}px in {s['seconds']:.1f} s = **{s['images_per_s']:.2f} images/s**.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batch", type=int, default=64, help="per-GPU batch of one step (full-64.yaml: 64)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="captions sampled by the full pipeline")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s, if not in the table")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from report import command, machine, write_result, write_section

    flops = count_flops(args.micro_batch)
    print(json.dumps(flops, indent=2))
    data: dict[str, Any] = {"args": vars(args), "command": command(), "machine": machine(), "flops": flops}
    if torch.cuda.is_available():
        data["training"] = measure_training(args, flops)
        print(json.dumps(data["training"], indent=2))
        if not args.no_sampling:
            data["sampling"] = measure_sampling(args)
            print(json.dumps(data["sampling"], indent=2))
    else:
        print("no CUDA device: FLOPs per step counted above; MFU and sampling images/s need a GPU "
              "(run the same command there)", file=sys.stderr)
    if not args.no_write:
        write_result("gpu_efficiency", data)
        write_section("GPU efficiency", render(data))


if __name__ == "__main__":
    main()
