"""`train-clip` end to end on SHAPES with a tiny model: the loss falls, the model exports and evaluates."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from unclip.cli.train_clip import main
from unclip.clip import Clip
from unclip.clip.shapes_judge import evaluate_shapes


@pytest.fixture(scope="module")
def trained(tiny_arch, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-clip")
    config = {
        "model": {"model_name": "tiny-test", "architecture": tiny_arch},
        "data": {"source": "shapes", "shapes_samples": 2048},
        "train": {"max_steps": 60, "batch_size": 64, "lr": 2e-3, "warmup_steps": 5, "weight_decay": 0.1,
                  "log_every": 5, "checkpoint_every": 30, "progress": False},
        "eval_samples": 200,
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path), "--output-dir", str(root / "run")]) == 0
    return path, root / "run"


def test_loss_falls(trained):
    _, run = trained
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_exported_model_learned_the_background_colour(trained):
    _, run = trained
    result = json.loads((run / "zero_shot.json").read_text())
    assert set(result["accuracy"]) == {"shape", "fg", "bg", "all"} and result["split"] == "heldout"
    clip = Clip.from_pretrained(run / "model")
    acc = evaluate_shapes(clip, num_samples=200)
    assert acc == result["accuracy"]  # the export is the model that was evaluated
    assert acc["bg"] > 0.5  # chance is 1/8: 60 steps learn the colour that covers most pixels


def test_rerun_is_idempotent_and_overrides_are_checked(trained, capsys):
    path, run = trained
    before = load_file(run / "model" / "model.safetensors")
    assert main([str(path), "--output-dir", str(run), "--set", "eval_samples=0"]) == 0
    assert "nothing to train: already at step 60" in capsys.readouterr().out
    after = load_file(run / "model" / "model.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert main([str(path), "--output-dir", str(run), "--set", "train.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_trains_on_an_image_folder_with_a_corrupt_file(tiny_arch, tmp_path, capsys):
    from unclip.data import make_shapes, write_image_folder

    folder = write_image_folder(make_shapes(32, seed=5), tmp_path / "data")
    victim = sorted((folder / "images").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:30])  # truncated: not decodable
    config = {
        "model": {"architecture": tiny_arch},
        "data": {"source": str(folder)},
        "train": {"max_steps": 3, "batch_size": 16, "log_every": 1, "progress": False},
    }
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path), "--output-dir", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["skipped_samples"] == 1
    assert Clip.from_pretrained(tmp_path / "run" / "model").embed_dim == tiny_arch["embed_dim"]


def test_a_folder_without_one_usable_row_is_a_one_line_error(tiny_arch, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"")  # as a download gone wrong leaves them
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": "a red square"})
                                                   + "\n" for i in range(4)))
    config = {"model": {"architecture": tiny_arch}, "data": {"source": str(folder)},
              "train": {"max_steps": 3, "batch_size": 2, "progress": False}}
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("train-clip: error: no usable sample in a whole epoch of the training data (4 rows)")
    assert f"{folder / '0.png'}: empty file (0 bytes)" in err
