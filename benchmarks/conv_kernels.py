"""How close the decoder UNet's convolutions run to the CPU's limit: forward, grad-input and grad-weight times.

    .venv/bin/python benchmarks/conv_kernels.py --threads 2          # writes JSON + BENCHMARKS.md "Convolution kernels"

The 3x3 convolutions of the 32x32 benchmark decoder (`benchmarks/decoder_unet.py`, batch 64) make ~60% of its
training step. For each shape it times (median of `--reps` after warm-up, channels_last activations as the UNet runs
them on the CPU): the forward (`F.conv2d`), the two halves of the backward separately (`aten.convolution_backward`
with only the input gradient, then only the weight and bias gradients), and the forward with channels_last weights
too. Achieved GFLOP/s = 2 * MACs / time, compared with the cores' float32 FMA peak. If the forward runs near
that peak and the backward halves near the forward's time, the convolutions leave no implementation overhead to
remove, only work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# (c_in, c_out, side, calls per training step) of the 32x32 decoder's 3x3 convolutions (most of its conv time)
SHAPES = [(64, 64, 32, 7), (128, 64, 32, 2), (192, 64, 32, 1), (128, 128, 32, 2), (128, 128, 16, 6),
          (256, 256, 16, 2), (256, 256, 8, 10)]
BATCH = 64


def median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_shape(c_in: int, c_out: int, side: int, warmup: int, reps: int) -> dict[str, float]:
    cl = torch.channels_last
    x = torch.randn(BATCH, c_in, side, side).contiguous(memory_format=cl)
    w = torch.randn(c_out, c_in, 3, 3)
    g = torch.randn(BATCH, c_out, side, side).contiguous(memory_format=cl)

    def backward(mask: list[bool]):
        return torch.ops.aten.convolution_backward(g, x, w, [c_out], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    w_cl = w.contiguous(memory_format=cl)
    gflop = 2 * BATCH * c_in * c_out * 9 * side * side / 1e9  # of the forward; each backward half is the same
    result = {
        "forward_ms": median_ms(lambda: F.conv2d(x, w, padding=1), warmup, reps),
        "grad_input_ms": median_ms(lambda: backward([True, False, False]), warmup, reps),
        "grad_weight_ms": median_ms(lambda: backward([False, True, True]), warmup, reps),
        "forward_cl_weight_ms": median_ms(lambda: F.conv2d(x, w_cl, padding=1), warmup, reps),
    }
    return {"gflop": gflop, **result, "forward_gflops": gflop / result["forward_ms"] * 1e3}


def summary(data: dict) -> str:
    """The forward's rate per thread against the core's float32 FMA peak, and the backward halves against it."""
    rates = [r["forward_gflops"] / data["threads"] for r in data["shapes"]]
    halves = [r[k] / r["forward_ms"] for r in data["shapes"] for k in ("grad_input_ms", "grad_weight_ms")]
    return (f"The forwards run at {min(rates):.0f}-{max(rates):.0f} GFLOP/s per thread: an AVX-512 core with two "
            "16-wide float32 FMA units (as these, Zen 5) peaks at 64 FLOP per cycle, 256-320 GFLOP/s at 4-5 GHz, "
            f"and each half of the backward takes {min(halves):.2f}-{max(halves):.2f}x the forward's time.")


def render(data: dict) -> str:
    lines = [f"Command: `{data['command']}`. Machine: {data['machine']}. Batch {BATCH}, 3x3 convolutions, padding 1, "
             "channels_last activations, float32; medians of the repetitions after warm-up. calls = per training "
             "step of the 32x32 benchmark decoder. Backward halves: `aten.convolution_backward` with one output "
             "mask at a time. The last column: the forward with the weights in channels_last too (the trainer's "
             "`channels_last: true`). " + summary(data), "",
             "| c_in -> c_out @ side | calls | GFLOP | forward ms | GFLOP/s | grad input ms (x fwd) | "
             "grad weight ms (x fwd) | forward, channels_last weights ms |", "|---|---|---|---|---|---|---|---|"]
    for r in data["shapes"]:
        f = r["forward_ms"]
        lines.append(f"| {r['c_in']} -> {r['c_out']} @ {r['side']} | {r['calls']} | {r['gflop']:.2f} | {f:.1f} | "
                     f"{r['forward_gflops']:.0f} | {r['grad_input_ms']:.1f} ({r['grad_input_ms'] / f:.2f}) | "
                     f"{r['grad_weight_ms']:.1f} ({r['grad_weight_ms'] / f:.2f}) | {r['forward_cl_weight_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-write", action="store_true", help="print only; leave the JSON and BENCHMARKS.md alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import command, machine, write_result, write_section

    shapes = []
    for c_in, c_out, side, calls in SHAPES:
        shapes.append({"c_in": c_in, "c_out": c_out, "side": side, "calls": calls,
                       **time_shape(c_in, c_out, side, args.warmup, args.reps)})
        print(shapes[-1], flush=True)
    data = {"command": command(), "machine": machine(), "threads": args.threads, "shapes": shapes}
    if not args.no_write:
        write_result("conv_kernels", data)
        write_section("Convolution kernels", render(data))


if __name__ == "__main__":
    main()
