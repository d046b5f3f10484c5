"""Where the commands write: formats PIL cannot write RGB in and places that cannot be written are refused before
any work; images and reports are written atomically, so a failed write never truncates what was there; an
--out-dir never mixes a run's images with stale or foreign ones."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_pipeline
from PIL import Image

import unclip.cli.pipeline_commands as commands
from unclip.checkpoint import write_json_atomic
from unclip.cli.common import CliError, save_image
from unclip.cli.main import main

CAPTION = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipeline_dir(tiny_clip, tmp_path_factory):
    return build_tiny_pipeline(tiny_clip).save_pretrained(tmp_path_factory.mktemp("pipe") / "pipeline")


def generate(pipeline_dir, *args: str) -> int:
    return main(["generate", CAPTION, "--pipeline", str(pipeline_dir), "--decoder-steps", "2", "--prior-steps", "2",
                 "--device", "cpu", *args])


@pytest.mark.parametrize("name, message", [
    ("grid.xbm", "PIL cannot write RGB images as XBM"),  # a 1-bit format PIL writes
    ("grid.psd", "has no image file extension PIL can write"),  # a format PIL only reads
])
def test_an_output_format_pil_cannot_write_is_refused_by_the_parser(pipeline_dir, tmp_path, capsys, name, message):
    with pytest.raises(SystemExit) as e:
        generate(pipeline_dir, "--out", str(tmp_path / name))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_place_that_cannot_be_written_is_refused_before_any_work(pipeline_dir, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the output was checked")

    monkeypatch.setattr(commands, "load_pipeline", no_work, raising=False)
    monkeypatch.setattr(commands, "_pipeline", no_work)
    (tmp_path / "a-file").write_text("not a directory")
    assert generate(pipeline_dir, "--out", str(tmp_path / "a-file" / "grid.png")) == 2
    assert "a-file is a file, not a directory" in capsys.readouterr().err
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    for command in (["vary", str(image)], ["interpolate", str(image), str(image)],
                    ["text-diff", str(image), "--from", "a", "--to", "b"]):
        assert main([*command, "--out", str(tmp_path / "a-file" / "x.png")]) == 2, command
        assert "is a file, not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a report file that is a directory: refused by the parser
        main(["eval", "--out", str(tmp_path)])
    assert "is a directory; give a file name" in capsys.readouterr().err


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"the earlier grid")

    class FailingImage:
        def save(self, path):
            path.write_bytes(b"half an ima")
            raise OSError("disk full")

    with pytest.raises(CliError, match="could not write .*grid.png: disk full"):
        save_image(FailingImage(), target)
    assert target.read_bytes() == b"the earlier grid" and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    (tmp_path / "report.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_json_atomic(tmp_path / "report.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "report.json"]  # no .report.json.tmp-*


def test_out_dir_holds_exactly_the_images_of_the_last_run(pipeline_dir, tmp_path, capsys):
    out_dir = tmp_path / "images"
    assert generate(pipeline_dir, "-n", "3", "--out", str(tmp_path / "g.png"), "--out-dir", str(out_dir)) == 0
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["000-00.png", "000-01.png", "000-02.png"]
    assert generate(pipeline_dir, "-n", "1", "--out", str(tmp_path / "g.png"), "--out-dir", str(out_dir)) == 0
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["000-00.png"]  # the earlier run's others are gone
    assert json.loads((out_dir / "captions.json").read_text())["num_images"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"a photo")
    capsys.readouterr()
    assert generate(pipeline_dir, "--out", str(tmp_path / "g.png"), "--out-dir", str(mine)) == 2
    assert "holds other files; give a new or empty directory" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["holiday.png"]


def test_a_training_output_dir_that_cannot_be_written_is_refused_at_once(tmp_path, capsys):
    from unclip.cli.train_clip import main as train_clip

    (tmp_path / "a-file").write_text("not a directory")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "run"):
        assert train_clip(["configs/clip/shapes-tiny.yaml", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "train-clip: error: cannot write" in err and "is a file, not a directory" in err, err


def test_an_out_dir_write_that_fails_half_way_leaves_no_captions_json_describing_it(pipeline_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    out_dir = tmp_path / "images"
    assert generate(pipeline_dir, "-n", "2", "--out", str(tmp_path / "g.png"), "--out-dir", str(out_dir)) == 0
    calls = []

    def failing(image, path):
        calls.append(path)
        if path.parent == out_dir and len([c for c in calls if c.parent == out_dir]) == 2:
            raise CliError(f"could not write {path}: disk full")
        image.save(path)

    monkeypatch.setattr(commands, "save_image", failing)
    assert generate(pipeline_dir, "-n", "2", "--seed", "5", "--out", str(tmp_path / "g.png"),
                    "--out-dir", str(out_dir)) == 2
    assert "disk full" in capsys.readouterr().err
    assert not (out_dir / "captions.json").exists()  # the old one would describe a mix of old and new images
