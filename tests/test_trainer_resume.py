"""Exact resume: a run stopped part-way (exception or SIGKILL) and resumed ends bit-identical to an unbroken one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_toy import SimulatedCrash, ToyTask

from unclip.train import TrainConfig, Trainer
from unclip.train.state import WRITE_DELAY_ENV, list_checkpoints

TOY_SCRIPT = Path(__file__).with_name("train_toy.py")




def make_cfg(**overrides) -> TrainConfig:
    base = dict(batch_size=8, lr=1e-2, warmup_steps=3, log_every=1, progress=False)
    return TrainConfig(**{**base, **overrides})


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for name, value in a.unwrapped_model.state_dict().items():
        assert torch.equal(b.unwrapped_model.state_dict()[name], value), f"model {name}"
    if a.ema is not None:
        for name, value in a.ema.state_dict().items():
            assert torch.equal(b.ema.state_dict()[name], value), f"ema {name}"
    state_a, state_b = a.optimizer.optimizer.state_dict()["state"], b.optimizer.optimizer.state_dict()["state"]
    for pid, entries in state_a.items():
        for name, value in entries.items():
            assert torch.equal(state_b[pid][name], value), f"optimizer {pid}/{name}"
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()
    assert (a.step, a.samples_seen) == (b.step, b.samples_seen)


def logged_steps(out: Path) -> list[int]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "event" not in r]


CASES = {
    "plain": (dict(), dict(), 0),
    "accum2_ema": (dict(grad_accum_steps=2, ema_decay=0.9), dict(), 0),
    "workers": (dict(num_workers=2), dict(jitter=0.1), 0),  # reference run loads data in-process
}


@pytest.mark.parametrize("case", list(CASES))
def test_stop_and_resume_is_bit_identical(tmp_path, case):
    cfg_kwargs, task_kwargs, reference_workers = CASES[case]
    total, split = 12, 6
    cfg = make_cfg(max_steps=total, checkpoint_every=split, **cfg_kwargs)
    reference = Trainer(ToyTask(**task_kwargs), cfg_with(cfg, num_workers=reference_workers), tmp_path / "full")
    reference.train()

    # crash one and a half optimizer steps after the checkpoint at `split`
    crash_call = (split + 1) * cfg.grad_accum_steps + max(1, cfg.grad_accum_steps // 2)
    with pytest.raises(SimulatedCrash):
        Trainer(ToyTask(**task_kwargs, crash_call=crash_call), cfg, tmp_path / "split").train()
    assert [s for s, _ in list_checkpoints(tmp_path / "split" / "checkpoints")] == [split]

    resumed = Trainer(ToyTask(**task_kwargs), cfg, tmp_path / "split")
    result = resumed.train()
    assert result.step == total and len(result.losses) == total - split
    assert_same_state(reference, resumed)
    assert logged_steps(tmp_path / "split") == list(range(1, total + 1))  # records of the crashed run dropped


def cfg_with(cfg: TrainConfig, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def crashed_run(tmp_path: Path, cfg: TrainConfig) -> tuple[Trainer, Path]:
    """An uninterrupted 9-step reference run, and the output directory of the same run crashed after step 7."""
    reference = Trainer(ToyTask(), cfg, tmp_path / "full")
    reference.train()
    out = tmp_path / "split"
    with pytest.raises(SimulatedCrash):
        Trainer(ToyTask(crash_call=8), cfg, out).train()
    return reference, out


def test_resume_ignores_incomplete_checkpoints(tmp_path):
    cfg = make_cfg(max_steps=9, checkpoint_every=3, ema_decay=0.9)
    reference, out = crashed_run(tmp_path, cfg)
    root = out / "checkpoints"
    # what a writer killed mid-write leaves: a temporary directory with some of the files
    stale = root / ".step-00000009.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00truncated")
    # and a directory under a final name that lacks files (e.g. copied by hand, half-way)
    partial = root / "step-00000008"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00truncated")

    resumed = Trainer(ToyTask(), cfg, out)
    with pytest.warns(UserWarning, match="skipping incomplete training checkpoint .*step-00000008"):
        resumed.train()
    assert not stale.exists()
    assert_same_state(reference, resumed)


def test_resume_passes_over_a_corrupt_checkpoint(tmp_path):
    """A complete-looking newest checkpoint whose weights were truncated (a full disk, say): the run resumes from
    the one before it, with a warning, and still ends where an uninterrupted run does."""
    cfg = make_cfg(max_steps=9, checkpoint_every=3, keep_checkpoints=3)
    reference, out = crashed_run(tmp_path, cfg)
    newest = list_checkpoints(out / "checkpoints")[-1][1]
    assert newest.name == "step-00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    resumed = Trainer(ToyTask(), cfg, out)
    with pytest.warns(UserWarning, match="cannot resume from .*step-00000006 .*trying the checkpoint before it"):
        result = resumed.train()
    assert result.step == 9 and len(result.losses) == 6  # from step 3
    assert_same_state(reference, resumed)


def test_resuming_to_more_steps_re_stretches_the_cosine_schedule(tmp_path):
    """The shipped recipe's way of extending a run (train 4000 steps, then resume to 8000): the schedule is a function
    of the current max_steps, so from the step reached it follows the cosine over the new total, with a warning that
    gives the jump; every resumed update, the first included, uses that schedule."""
    from unclip.train import lr_factor

    cfg = make_cfg(max_steps=6, lr=0.1, warmup_steps=2, min_lr_ratio=0.1, checkpoint_every=0)
    Trainer(ToyTask(), cfg, tmp_path).train()
    longer = cfg_with(cfg, max_steps=12)
    expected = [0.1 * lr_factor(s, warmup_steps=2, max_steps=12, schedule="cosine", min_lr_ratio=0.1)
                for s in range(6, 12)]
    with pytest.warns(UserWarning, match=r"at step 6 with train.max_steps 12 \(it was trained towards 6\): the cosine "
                                         rf"LR schedule is re-stretched over 12 steps, so the lr jumps from 0.01 to "
                                         rf"{expected[0]:.3g} \(no new warm-up\)"):
        Trainer(ToyTask(), longer, tmp_path).train()
    records = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert [r["step"] for r in records[6:]] == list(range(7, 13))
    assert [r["lr"] for r in records[6:]] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- SIGKILL, in a subprocess
def launch(out: Path, cfg: dict, task: dict, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, str(TOY_SCRIPT), str(out), "--config", json.dumps(cfg), "--task", json.dumps(task)]
    log = (out.parent / f"{out.name}-{time.monotonic_ns()}.log").open("w")
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training exited early with code {proc.returncode}"
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.01)


def last_logged_step(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_checkpoint_and_mid_step_then_resume(tmp_path):
    cfg = dict(max_steps=30, batch_size=8, lr=1e-2, warmup_steps=3, checkpoint_every=10, keep_checkpoints=2,
               log_every=1, ema_decay=0.9, progress=False)  # fmt: skip
    reference = Trainer(ToyTask(), TrainConfig(**cfg), tmp_path / "reference")
    reference.train()

    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    task = dict(sleep=0.05)  # slow steps: room to kill mid-run (sleeping does not change the numbers)
    # 1) killed while writing the checkpoint of step 20 (after its first file)
    proc = launch(out, cfg, task, env={WRITE_DELAY_ENV: "0.15"})
    writing = lambda: any(p.name.startswith(".step-00000020.tmp-") and any(p.iterdir()) for p in root.glob(".*"))
    wait_for(writing, proc)
    kill(proc)
    assert [s for s, _ in list_checkpoints(root)] == [10]
    assert list(root.glob(".step-00000020.tmp-*"))

    # 2) resumed from step 10, killed between steps 20 and 30
    proc = launch(out, cfg, task)
    wait_for(lambda: last_logged_step(out) >= 22, proc)
    kill(proc)
    assert [s for s, _ in list_checkpoints(root)] == [10, 20]

    # 3) resumed from step 20, runs to the end
    proc = launch(out, cfg, task)
    assert proc.wait(timeout=120) == 0
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert [s for s, _ in list_checkpoints(root)] == [20, 30]
    final = root / "step-00000030"
    for name, value in reference.unwrapped_model.state_dict().items():
        assert torch.equal(load_file(str(final / "model.safetensors"))[name], value), name
    for name, value in reference.ema.state_dict().items():
        assert torch.equal(load_file(str(final / "ema.safetensors"))[name], value), name
    assert logged_steps(out) == list(range(1, 31))


def test_resuming_with_another_lr_applies_it(tmp_path):
    """A changed peak lr, betas or weight decay takes effect from the resumed step (the restored optimizer and
    scheduler states used to keep the old ones silently); the schedule's shape is unchanged."""
    from unclip.train import lr_factor

    cfg = make_cfg(max_steps=6, lr=0.1, warmup_steps=2, checkpoint_every=3)
    Trainer(ToyTask(), cfg, tmp_path).train()
    (tmp_path / "checkpoints" / "step-00000006").rename(tmp_path / "elsewhere")  # resume from step 3
    halved = cfg_with(cfg, lr=0.05, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-6)
    with pytest.warns(UserWarning, match=r"changed optimizer settings, applied from step 3: lr 0.1 -> 0.05, "
                                         r"betas \[0.9, 0.999\] -> \[0.8, 0.9\], eps 1e-08 -> 1e-06, "
                                         r"weight_decay .* -> 0.5"):
        trainer = Trainer(ToyTask(), halved, tmp_path)
        trainer.train()
    groups = trainer.optimizer.optimizer.param_groups
    assert {g["betas"] for g in groups} == {(0.8, 0.9)} and {g["eps"] for g in groups} == {1e-6}
    assert [g["weight_decay"] for g in groups] == [0.5 if g["params"][0].ndim >= 2 else 0.0 for g in groups]
    assert any(g["weight_decay"] == 0.5 for g in groups)
    records = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    expected = [0.05 * lr_factor(s, warmup_steps=2, max_steps=6, schedule="cosine") for s in range(3, 6)]
    assert [r["lr"] for r in records if r["step"] > 3] == pytest.approx(expected, rel=1e-12)


def test_resuming_with_another_schedule_floor_warns_with_the_lr_change(tmp_path):
    from unclip.train import lr_factor

    cfg = make_cfg(max_steps=6, lr=0.1, warmup_steps=2, min_lr_ratio=0.0, checkpoint_every=3)
    Trainer(ToyTask(), cfg, tmp_path).train()
    (tmp_path / "checkpoints" / "step-00000006").rename(tmp_path / "elsewhere")  # resume from step 3
    floored = cfg_with(cfg, min_lr_ratio=0.5)
    was = 0.1 * lr_factor(3, warmup_steps=2, max_steps=6, schedule="cosine", min_lr_ratio=0.0)  # the old schedule
    now = 0.1 * lr_factor(3, warmup_steps=2, max_steps=6, schedule="cosine", min_lr_ratio=0.5)
    with pytest.warns(UserWarning, match=rf"with a changed LR schedule \(min_lr_ratio 0.0 -> 0.5\): the lr changes "
                                         rf"from {was:.3g} to {now:.3g}"):
        Trainer(ToyTask(), floored, tmp_path).train()


def test_a_checkpoint_from_before_train_eps_warns_when_eps_changes(tmp_path):
    """Such a run trained with AdamW's default eps (1e-8); resuming with another one says so rather than switching
    silently (the added key is otherwise accepted as new)."""
    cfg = make_cfg(max_steps=4, checkpoint_every=2)
    Trainer(ToyTask(), cfg, tmp_path).train()
    (tmp_path / "checkpoints" / "step-00000004").rename(tmp_path / "elsewhere")  # resume from step 2
    meta_path = tmp_path / "checkpoints" / "step-00000002" / "config.json"
    meta = json.loads(meta_path.read_text())
    del meta["train"]["eps"]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"changed optimizer settings, applied from step 2: eps 1e-08 -> 1e-06"):
        Trainer(ToyTask(), cfg_with(cfg, eps=1e-6), tmp_path).train()


def test_a_run_that_set_defer_sync_still_resumes(tmp_path):
    """defer_sync has no effect: a run started with a config that sets it (its checkpoints record it) resumes with a
    config that drops the key, and ends where an unbroken run without it does."""
    cfg = make_cfg(max_steps=6, checkpoint_every=3, ema_decay=0.9)
    reference = Trainer(ToyTask(), cfg, tmp_path / "full")
    reference.train()
    out = tmp_path / "split"
    with pytest.warns(FutureWarning, match="defer_sync"), pytest.raises(SimulatedCrash):
        Trainer(ToyTask(crash_call=5), cfg_with(cfg, defer_sync=True), out).train()
    saved = json.loads((out / "checkpoints" / "step-00000003" / "config.json").read_text())
    assert saved["train"]["defer_sync"] is True
    resumed = Trainer(ToyTask(), cfg, out)
    result = resumed.train()
    assert result.step == 6 and len(result.losses) == 3
    assert_same_state(reference, resumed)
