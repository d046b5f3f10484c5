import json
from pathlib import Path

import pytest
import torch

from unclip.checkpoint import (
    CheckpointError,
    atomic_directory,
    clean_stale_temporaries,
    load_pretrained_dir,
    load_state_dict_strict,
    save_pretrained_dir,
)


def test_round_trip_and_kind_check(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    save_pretrained_dir(tmp_path / "m", kind="toy", config={"width": 4}, state_dict=state)
    meta, loaded = load_pretrained_dir(tmp_path / "m", kind="toy")
    assert meta["config"] == {"width": 4} and meta["format_version"] == 1
    assert torch.equal(loaded["w"], state["w"])
    with pytest.raises(CheckpointError, match="holds a 'toy' checkpoint, not a 'clip' one"):
        load_pretrained_dir(tmp_path / "m", kind="clip")


def test_identical_weights_give_identical_files(tmp_path):
    """Re-saving unchanged weights (e.g. `unclip assemble` run again) must not produce a byte-different file."""
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4), "a": torch.ones(2, dtype=torch.int64)}
    blobs = set()
    for i in range(8):
        save_pretrained_dir(tmp_path / f"m{i}", kind="toy", config={"width": 4}, state_dict=state)
        blobs.add((tmp_path / f"m{i}" / "model.safetensors").read_bytes())
    assert len(blobs) == 1


def test_a_directory_of_other_things_is_never_replaced(tmp_path):
    state = {"w": torch.ones(2)}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match=r"refusing to replace .*run: it holds other things \(checkpoints, notes"):
        save_pretrained_dir(tmp_path / "run", kind="toy", config={}, state_dict=state)
    assert (tmp_path / "run" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    for target in ("empty", "new", "new"):  # empty, absent, then a previous checkpoint: all written
        save_pretrained_dir(tmp_path / target, kind="toy", config={"v": target}, state_dict=state)
        assert load_pretrained_dir(tmp_path / target)[0]["config"] == {"v": target}


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    save_pretrained_dir(tmp_path / "m", kind="toy", config={"v": 1}, state_dict={"w": torch.ones(2)})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "m") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("boom")
    meta, _ = load_pretrained_dir(tmp_path / "m")
    assert meta["config"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_stale_temporaries_are_ignored_and_cleaned(tmp_path):
    (tmp_path / ".m.tmp-deadbeef").mkdir()
    assert len(clean_stale_temporaries(tmp_path)) == 1 and not any(tmp_path.iterdir())


def test_incomplete_or_corrupt_directories_are_named(tmp_path):
    save_pretrained_dir(tmp_path / "m", kind="toy", config={}, state_dict={"w": torch.ones(2)})
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained_dir(tmp_path / "m")
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_pretrained_dir(tmp_path / "m")
    save_pretrained_dir(tmp_path / "m", kind="toy", config={}, state_dict={"w": torch.ones(2)})
    (tmp_path / "m" / "config.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(CheckpointError, match="lacks the 'kind' and 'config'"):
        load_pretrained_dir(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained_dir(tmp_path / "m")


def test_strict_loading_lists_every_difference():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = torch.zeros(5, 4)
    state["extra"] = torch.zeros(1)
    del state["1.bias"]
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, state, source="ckpt")
    msg = str(e.value)
    assert "missing (1): 1.bias" in msg and "unexpected (1): extra" in msg and "0.weight: checkpoint (5, 4)" in msg


def test_other_directories_and_files_say_what_they_are_and_what_to_give(tmp_path):
    """A file, a pipeline directory, a training run and a training checkpoint each get a message naming what was
    given and which directory to give instead (not just 'config.json is missing')."""
    from unclip.train.state import capture_rng_state, save_training_checkpoint

    model = save_pretrained_dir(tmp_path / "run" / "model", kind="toy", config={}, state_dict={"w": torch.ones(2)})
    step = save_training_checkpoint(tmp_path / "run" / "checkpoints", step=30, model_state={"w": torch.ones(2)},
                                    optimizer_state={"state": {}, "param_groups": []}, scheduler_state={},
                                    rng_states=[capture_rng_state()], trainer_state={}, config={"train": {}})
    with pytest.raises(CheckpointError, match=r"is a training checkpoint \(for resuming training\)") as e:
        load_pretrained_dir(step, kind="toy")
    assert str(model) in str(e.value) and "not there yet" not in str(e.value)
    with pytest.raises(CheckpointError, match="training run directory") as e:
        load_pretrained_dir(tmp_path / "run", kind="toy")
    assert f"its trained model is {model}" in str(e.value)
    with pytest.raises(CheckpointError, match="is a file of a checkpoint directory") as e:
        load_pretrained_dir(model / "model.safetensors")
    assert str(e.value).endswith(f"give the directory, {model}")
    (tmp_path / "epoch_32.pt").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="epoch_32.pt is a file, not a checkpoint directory"):
        load_pretrained_dir(tmp_path / "epoch_32.pt")

    import unclip

    shipped = Path(unclip.__file__).parent / "pretrained" / "shapes-tiny"
    with pytest.raises(CheckpointError, match="is a pipeline directory") as e:
        load_pretrained_dir(shipped, kind="clip")
    assert str(e.value).endswith(f"its clip is {shipped / 'clip'}")
    with pytest.raises(CheckpointError, match="upsampler-1.*upsampler-2"):
        load_pretrained_dir(shipped, kind="upsampler")


def test_written_files_get_the_umask_s_permissions(tmp_path):
    """safetensors writes its files 0600; a model directory must be as readable as any file the user writes."""
    import os

    from unclip.checkpoint import save_pretrained_dir

    mask = os.umask(0o022)
    try:
        out = save_pretrained_dir(tmp_path / "m", kind="toy", config={}, state_dict={"w": torch.ones(2)})
    finally:
        os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o644)}


def test_embedding_shards_get_the_umask_s_permissions(tmp_path, tiny_clip):
    import os

    from unclip.data import make_shapes
    from unclip.data.embeddings import embed_dataset

    mask = os.umask(0o022)
    try:
        out = embed_dataset(tiny_clip, make_shapes(4, seed=1), tmp_path / "emb", source="shapes:4", progress=False)
    finally:
        os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in Path(out).iterdir()} == {oct(0o644)}
