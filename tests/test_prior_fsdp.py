"""The prior's length-group forward (several calls of each transformer block per step) under FSDP2 with the blocks
sharded: two gloo processes give the gradients of one process running every row at full length, and export the
unsharded weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer_distributed import free_port

WORKER = Path(__file__).with_name("prior_fsdp_worker.py")


@pytest.mark.slow
def test_length_groups_under_fsdp_give_the_full_length_gradients(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), str(WORKER), str(tmp_path / "exported")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_grad_diff"] < 1e-5, result
    assert result["export_max_diff"] == 0.0, result
