"""Shared by benchmarks/prior_sampling.py and benchmarks/prior_train_step.py: our prior and the peer's at equal size,
the worker processes that time them, and the "## Prior" section of BENCHMARKS.md.

Each benchmark script is run with our venv; it launches itself twice as a worker, once with `.venv/bin/python`
(ours: `prior.DiffusionPriorNetwork`) and once with `.venv-peer/bin/python` (lucidrains' dalle2-pytorch:
`DiffusionPrior` around `DiffusionPriorNetwork`), with the same thread count; each worker prints one JSON line.
This module imports nothing but torch at the top, so both interpreters can import it.

The peer venv (nothing is installed at run time):

    python3 -m venv .venv-peer && .venv-peer/bin/pip install torch==2.14.1 torchvision==0.29.1 dalle2-pytorch==1.15.6
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
PEER_VENV = ("python3 -m venv .venv-peer && "
             ".venv-peer/bin/pip install torch==2.14.1 torchvision==0.29.1 dalle2-pytorch==1.15.6")

# The measured size: width 256, 6 layers, 77 text tokens, CLIP dim 256 (the peer needs text width = dim).
# The peer's attention has 8 query heads of 64 and one shared key/value head, and a SwiGLU feed-forward; ours is
# x-transformers' multi-head attention and GELU feed-forward. 8 heads of 60 make the parameter counts equal within
# ~2% (ours the larger).
DIM, DEPTH, TEXT_LEN, THREADS = 256, 6, 77, 2
OURS = dict(embed_dim=DIM, text_width=DIM, text_length=TEXT_LEN, width=DIM, depth=DEPTH, heads=8, dim_head=60,
            ff_mult=4, objective="x0", schedule={"kind": "cosine", "num_timesteps": 1000})
PEER_NET = dict(dim=DIM, depth=DEPTH, dim_head=64, heads=8, ff_mult=4, num_timesteps=1000, max_text_len=TEXT_LEN)
PEER_PRIOR = dict(image_embed_dim=DIM, timesteps=1000, cond_drop_prob=0.1, condition_on_text_encodings=True,
                  predict_x_start=True)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def text_inputs(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """b random captions' (text_embed (b, d) unit norm, text_states (b, l, d) zero at padding, text_mask (b, l)):
    between 8 and 77 real tokens each, the same on both sides."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, TEXT_LEN + 1, (b, 1), generator=g)
    mask = torch.arange(TEXT_LEN)[None, :] < lengths
    tokens = torch.randn(b, TEXT_LEN, DIM, generator=g) * mask[..., None]
    embed = torch.nn.functional.normalize(torch.randn(b, DIM, generator=g), dim=-1)
    return embed, tokens, mask


def build_ours(**overrides: Any):
    """Our prior at the benchmark size (OURS), with `overrides` of PriorConfig fields (e.g. length_buckets=0)."""
    from prior import DiffusionPriorNetwork, PriorConfig
    from unclip.config import load_config

    torch.manual_seed(0)
    return DiffusionPriorNetwork(load_config(PriorConfig, {**OURS, **overrides}))


def build_peer():
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    torch.manual_seed(0)
    return DiffusionPrior(DiffusionPriorNetwork(**PEER_NET), **PEER_PRIOR)


def timed(fn: Callable[[], Any], reps: int) -> list[float]:
    """Wall-clock seconds of `reps` calls of fn."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ----- processes ---------------------------------------------------------------------------------------------
def run_worker(script: str, side: str, args: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run `script --worker SIDE --args JSON` with that side's interpreter and `threads` threads; its JSON line."""
    python = OURS_PYTHON if side.startswith("ours") else PEER_PYTHON
    if not python.exists():
        raise SystemExit(f"{python} is missing; create the peer venv with:\n  {PEER_VENV}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    cmd = [str(python), script, "--worker", side, "--args", json.dumps({**args, "threads": threads})]
    print(f"[{side}] running ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"[{side}] worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[{side}] median {statistics.median(result['times']):.4f} s, params {result['params']:,}", file=sys.stderr)
    return result


def worker_setup(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_grad_enabled(True)


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Medians per side and the ratios against the peer at the same precision (a side "x-bf16" against
    "peer-bf16", any other against "peer"): time ours / peer and its inverse, the speed-up."""
    medians = {side: statistics.median(r["times"]) for side, r in results.items()}
    ratios = {}
    for side, median in medians.items():
        peer = "peer-bf16" if side.endswith("-bf16") else "peer"
        if not side.startswith("peer") and peer in medians:
            ratios[side] = {"vs": peer, "time_ratio_vs_peer": median / medians[peer],
                            "speedup_vs_peer": medians[peer] / median}
    return {"medians_s": medians, "ratios": ratios}


# ----- BENCHMARKS.md -----------------------------------------------------------------------------------------
def write_prior_section() -> None:
    """Render BENCHMARKS.md's "## Prior" section from benchmarks/results/prior_*.json (whichever exist)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import RESULTS, write_section

    parts = [
        "Our diffusion prior against lucidrains' dalle2-pytorch (`DiffusionPrior` + `DiffusionPriorNetwork`, version "
        "1.15.6), the closest open implementation, at equal size: width 256, 6 layers, 77 text tokens (8 to 77 real, "
        "the rest padding), CLIP dim 256. Both run on the same machine in one script run, each in a fresh process "
        "with the same thread count; times are medians of the repetitions after a warm-up. The peer runs in its own "
        f"venv: `{PEER_VENV}`.",
    ]
    for name, render in (("prior_sampling", _render_sampling), ("prior_train_step", _render_train)):
        path = RESULTS / f"{name}.json"
        if path.exists():
            parts.append(render(json.loads(path.read_text())))
    parts.append(NOTES)
    write_section("Prior", "\n\n".join(parts))


NOTES = """### Where the time goes

- Sampling, cached (`prior/cache.py`): one pass of the Decoder over the b caption prefixes [77 text tokens | text
  embed] (plus the null prefix when guiding) stores every layer's keys and values; each of the 64 steps then runs
  only the 3 suffix positions [timestep | x_t | query] of every row against them (3 of 81 positions; the last
  layer only the query). What remains per step is the suffix's linear layers and reading the cached keys and
  values (memory-bound), so the sampling cost is about one full forward plus 64 small ones.
- Sampling, uncached and the peer: the full 81-position sequence at every step: the same work, a similar time.
- Training step: nothing can be cached in training, but padding need not be computed. The peer runs all 81
  positions of every row (its padded text slots hold learned null tokens, attended to); ours masks padded
  tokens out of attention, so a row's output does not depend on them, and the forward runs the batch in
  caption-length groups (`PriorConfig.length_buckets`, default 4: rows sorted by length, cut into 4 equal parts,
  each part cut to its longest caption). Outputs and gradients are those of the full-length forward (tested);
  with captions of 8 to 77 tokens (10% dropped to the 77 null tokens) the groups run ~54 of the 77 token slots
  per row on average (the real tokens: ~42). `ours-full-length` is
  the same network with `length_buckets: 0`: at full length the matrix-multiply work of the two sides is equal
  (profiled: ~85% of our step is matmuls) and ours is only modestly faster. bf16 autocast (the trainer's
  `mixed_precision: bf16`) is ~3x faster than float32 on this CPU (avx512_bf16) for both sides. Switching
  x-transformers to SDPA (`attn_flash=True`) made our step slower on this CPU
  (SDPA's CPU path with a padding mask), so it stays off."""


def _note(data: dict[str, Any]) -> str:
    """A run's note on its conditions (e.g. a busy machine), followed by a space; empty when there is none."""
    note = (data.get("note") or "").strip()
    return f"{note} " if note else ""


def _config_lines(data: dict[str, Any]) -> str:
    r = data["results"]
    return (f"Parameters: ours {r['ours']['params']:,} (`PriorConfig` {json.dumps(r['ours']['config'])}), "
            f"peer {r['peer']['params']:,} (`DiffusionPriorNetwork` {json.dumps(r['peer']['config']['net'])}, "
            f"`DiffusionPrior` {json.dumps(r['peer']['config']['prior'])}). "
            f"Machine: {data.get('cpu', data['machine'])}; "
            f"{data['threads']} torch threads each side; torch {r['ours']['torch']} (ours) / "
            f"{r['peer']['torch']} (peer).")


def cpu() -> str:
    """'N CPU cores (model name)' of this machine."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return f"{os.cpu_count()} CPU cores ({model})"


def _render_sampling(data: dict[str, Any]) -> str:
    a, s = data["args"], data["summary"]
    rows = ["| side | median s per batch | s per step | time ours / peer | peer / ours |", "|---|---|---|---|---|"]
    for side, median in s["medians_s"].items():
        ratio = s["ratios"].get(side, {"time_ratio_vs_peer": 1.0, "speedup_vs_peer": 1.0})
        rows.append(f"| {side} | {median:.3f} | {median / a['steps']:.4f} | {ratio['time_ratio_vs_peer']:.3f} | "
                    f"{ratio['speedup_vs_peer']:.1f}x |")
    return "\n".join([
        f"### Sampling: {a['captions']} captions x {a['best_of']} candidates, DDIM {a['steps']} steps, "
        f"guidance {a['guidance']}",
        "",
        f"Command: `{data['command']}`. {_note(data)}Repetitions: {a['reps']} after a "
        f"{a['warmup_steps']}-step warm-up. "
        "ours = the caption prefix computed once per call (default); ours-uncached = the full sequence at every "
        "step (`use_cache=False`; the forward's caption-length groups still skip the padding); peer = "
        "`DiffusionPrior.p_sample_loop_ddim(eta=0)` on the same rows.",
        "",
        *rows,
        "",
        _config_lines(data),
    ])


def _render_train(data: dict[str, Any]) -> str:
    a, s = data["args"], data["summary"]
    rows = ["| side | median s per step | time ours / peer | peer / ours | against |", "|---|---|---|---|---|"]
    for side, median in s["medians_s"].items():
        ratio = s["ratios"].get(side, {"time_ratio_vs_peer": 1.0, "speedup_vs_peer": 1.0, "vs": side})
        rows.append(f"| {side} | {median:.4f} | {ratio['time_ratio_vs_peer']:.3f} | {ratio['speedup_vs_peer']:.2f}x | "
                    f"{ratio['vs']} |")
    return "\n".join([
        f"### Training step: batch {a['batch']}, forward + backward + AdamW",
        "",
        f"Command: `{data['command']}`. {_note(data)}{a['reps']} timed steps after {a['warmup']} warm-up "
        "steps. ours = "
        "`prior.prior_loss` (10% caption dropout) then backward and `torch.optim.AdamW.step`; peer = "
        "`DiffusionPrior.forward` (its loss, 10% text and image dropout) then the same. -bf16: the forward under "
        "`torch.autocast('cpu', dtype=torch.bfloat16)` (our trainer's `mixed_precision: bf16`; weights, gradients "
        "and AdamW in float32), compared with the peer under the same autocast.",
        "",
        *rows,
        "",
        _config_lines(data),
    ])
