"""Worker for test_prior_fsdp.py (run by torchrun, 2 gloo processes): the prior under FSDP2 with every attention and
feed-forward block sharded on its own, so the length-group forward calls each sharded block once per group.

Prints one JSON line on rank 0: the largest difference between the FSDP gradients (gathered) and those of a
single-process, full-length (length_buckets 0) forward over both ranks' rows; and of the weights exported the way
the trainer does under FSDP (the full state dict gathered by every rank, written by rank 0 into the directory given
as the first argument, read back) from the unsharded model's.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from prior import DiffusionPriorNetwork, PriorConfig
from unclip.config import load_config
from unclip.train import end_process


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = load_config(PriorConfig, dict(embed_dim=32, text_width=32, text_length=16, width=64, depth=2, heads=2,
                                        dim_head=32, length_buckets=4))
    reference = DiffusionPriorNetwork(dataclasses.replace(cfg, length_buckets=0))
    model = DiffusionPriorNetwork(cfg)
    model.load_state_dict(reference.state_dict())
    b, g = 8, torch.Generator().manual_seed(1)  # b rows per rank; every rank draws all world * b rows alike
    n = world * b
    mask = torch.arange(16)[None] < torch.randint(2, 17, (n, 1), generator=g)
    mask[b:] = True  # the second rank's captions all fill the context: its rows still make as many calls
    batch = dict(text_embed=F.normalize(torch.randn(n, 32, generator=g), dim=-1),
                 text_states=torch.randn(n, 16, 32, generator=g), text_mask=mask,
                 cond_drop=torch.arange(n) % 5 == 0)
    x_t, t = torch.randn(n, 32, generator=g), torch.randint(0, 1000, (n,), generator=g)
    reference(x_t, t, **batch).square().mean().backward()
    for _, block, _ in model.transformer.layers:
        fully_shard(block)
    fully_shard(model)
    mine = slice(rank * b, (rank + 1) * b)
    model(x_t[mine], t[mine], **{k: v[mine] for k, v in batch.items()}).square().mean().backward()  # averaged
    worst = 0.0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            worst = max(worst, (p.grad.full_tensor() - p_ref.grad).abs().max().item())
    # the trainer's export under FSDP: accelerate's get_state_dict (these options) on every rank, rank 0 writes
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                cpu_offload=True))
    if rank == 0:
        model.save_pretrained(sys.argv[1], state_dict=full)
        exported = DiffusionPriorNetwork.from_pretrained(sys.argv[1]).state_dict()
        weights_diff = max((exported[k] - v).abs().max().item() for k, v in reference.state_dict().items())
        print(json.dumps({"max_grad_diff": worst, "export_max_diff": weights_diff}), flush=True)
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    end_process(0)  # interpreter shutdown races gloo's threads (see end_process): 1 run in 30 aborted without it


if __name__ == "__main__":
    main()
