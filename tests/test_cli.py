"""The `unclip` command line: tables on success, one clear line and exit status 2 on bad input."""

import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from unclip.cli.main import main
from unclip.data import make_shapes

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def clip_dir(tiny_clip, tmp_path_factory):
    return tiny_clip.save_pretrained(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture()
def pngs(tmp_path):
    paths = []
    for i, image in enumerate(make_shapes(2)["image"]):
        paths.append(tmp_path / f"img{i}.png")
        image.save(paths[-1])
    return paths


def test_classify_prints_a_table(clip_dir, pngs, capsys):
    assert main(["classify", *map(str, pngs), "--labels", "circle, square,cross", "--clip", str(clip_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "prediction", "circle", "square", "cross"]
    assert len(lines) == 2 + len(pngs)
    for line, path in zip(lines[2:], pngs):
        cells = line.split()
        assert cells[0] == str(path) and cells[1] in ("circle", "square", "cross")
        assert sum(float(c) for c in cells[2:]) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "circle"], "at least two"),
        (["--labels", "a,b", "--device", "cuda:7"], "cuda"),
        (["--labels", "a,b", "--device", "tpu"], "unknown device"),
    ],
)
def test_classify_argument_errors(clip_dir, pngs, capsys, extra, message):
    if "cuda:7" in extra and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert main(["classify", str(pngs[0]), "--clip", str(clip_dir), *extra]) == 2
    assert message in capsys.readouterr().err


def test_classify_bad_files(clip_dir, pngs, tmp_path, capsys):
    assert main(["classify", str(tmp_path / "missing.png"), "--labels", "a,b", "--clip", str(clip_dir)]) == 2
    assert "image not found" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(pngs[0].read_bytes()[:40])
    assert main(["classify", str(broken), "--labels", "a,b", "--clip", str(clip_dir)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["classify", str(pngs[0]), "--labels", "a,b", "--clip", str(tmp_path / "no-model")]) == 2
    assert "no CLIP at" in capsys.readouterr().err


def test_zero_shot_command(clip_dir, capsys):
    assert main(["zero-shot", str(clip_dir), "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "heldout split, 8 images" in out
    for attribute in ("shape", "fg", "bg", "all"):
        assert any(line.split()[:1] == [attribute] and line.endswith("%") for line in out.splitlines())


def test_embed_command(clip_dir, tmp_path, capsys):
    args = ["embed", "--clip", str(clip_dir), "--data", "shapes", "--shapes-samples", "6", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    assert "embeddings of 6 of 6 rows" in capsys.readouterr().out
    args[4] = str(tmp_path / "missing-folder") + "/"
    assert main(args) == 2
    assert "error" in capsys.readouterr().err


def test_embed_counts_the_rows_it_kept(clip_dir, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / name)
    (folder / "c.png").write_bytes(b"not an image")
    (folder / "metadata.jsonl").write_text("".join(
        f'{{"file_name": "{n}", "caption": "a red square"}}\n' for n in ("a.png", "b.png", "c.png")))
    with pytest.warns(UserWarning):
        assert main(["embed", "--clip", str(clip_dir), "--data", str(folder), "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "embeddings of 2 of 3 rows" in out
    assert ("1 unusable rows skipped (the warnings above say why); running the same command again tries them "
            "again") in out
    (folder / "c.png").write_bytes((folder / "a.png").read_bytes())  # fixed: the rerun embeds it
    assert main(["embed", "--clip", str(clip_dir), "--data", str(folder), "--out", str(tmp_path / "e")]) == 0
    assert "embeddings of 3 of 3 rows" in capsys.readouterr().out


def test_embed_of_a_dataset_with_no_usable_row_fails(clip_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"")
    (folder / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "caption": "a red square"}}\n'
                                                   for i in range(3)))
    assert main(["embed", "--clip", str(clip_dir), "--data", str(folder), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err  # the progress bar, then one line
    assert "Traceback" not in err and err.splitlines()[-1].startswith("unclip embed: error: no row of ")
    assert f"no row of {folder} could be embedded: all 3 were skipped" in err
    assert f"row 0: {folder / '0.png'}: empty file (0 bytes)" in err
    urls = tmp_path / "urls.parquet"
    datasets.Dataset.from_dict({"url": ["https://example.com/a.jpg"], "caption": ["a cat"], "id": [1]}).to_parquet(
        str(urls))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # the arrow files it builds
    assert main(["embed", "--clip", str(clip_dir), "--data", str(urls), "--image-column", "id", "--out",
                 str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err  # the progress bars of `datasets`, then one line
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("unclip embed: error: column 'id' holds int64 values, which cannot be read "
                                           "as images")


def test_console_scripts_are_installed_and_teach():
    for script in ("unclip", "train-clip", "train-upsampler"):
        out = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, check=True).stdout
        assert "usage:" in out
    out = subprocess.run([str(BIN / "unclip"), "classify", "--help"], capture_output=True, text=True).stdout
    assert "--labels" in out and "prompt" in out


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_clip_arguments_that_give_no_usable_weights_are_one_line(clip_dir, pngs, tiny_arch, tmp_path, capsys,
                                                                 monkeypatch):
    """An architecture name without --pretrained (random weights), an open_clip file as --clip, and --pretrained
    files or tags that cannot be had: exit status 2 and one line saying what to give instead."""
    import open_clip

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "unclip-test-tiny", tiny_arch)

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub (MaxRetryError)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    classify = ["classify", str(pngs[0]), "--labels", "a,b", "--clip"]
    err = _one_line_error([*classify, "unclip-test-tiny"], capsys)
    assert "unclip-test-tiny is an open_clip architecture name without weights" in err and "--pretrained on the" in err
    assert "(a pretrained tag (openai, " in _one_line_error(["zero-shot", "ViT-B-32"], capsys)
    embed = ["embed", "--clip", "ViT-B-32", "--data", "shapes", "--out", str(tmp_path / "e")]
    assert "is an open_clip architecture name without weights" in _one_line_error(embed, capsys)
    weights = tmp_path / "epoch_32.pt"
    weights.write_text("not weights")
    assert f"--clip NAME --pretrained {weights}" in _one_line_error([*classify, str(weights)], capsys)
    assert "is not a readable CLIP checkpoint" in _one_line_error([*classify, "unclip-test-tiny", "--pretrained",
                                                                   str(weights)], capsys)
    missing = ["zero-shot", "unclip-test-tiny", "--pretrained", str(tmp_path / "missing.pt")]
    assert "pretrained weights file not found" in _one_line_error(missing, capsys)
    err = _one_line_error(["zero-shot", "ViT-B-32", "--pretrained", "openai"], capsys)
    assert "'openai' of ViT-B-32 could not be downloaded" in err and "local open_clip weights file" in err


def test_directories_that_hold_a_clip_elsewhere_are_pointed_to(clip_dir, tmp_path, capsys):
    """A pipeline directory, a training run and a training checkpoint: the error names the CLIP directory to give."""
    import shutil

    import unclip
    from unclip.train.state import capture_rng_state, save_training_checkpoint

    shipped = Path(unclip.__file__).parent / "pretrained" / "shapes-tiny"
    assert f"its clip is {shipped / 'clip'}" in _one_line_error(["zero-shot", str(shipped)], capsys)
    run = tmp_path / "runs" / "clip"
    step = save_training_checkpoint(run / "checkpoints", step=30, model_state={"w": torch.ones(1)},
                                    optimizer_state={"state": {}, "param_groups": []}, scheduler_state={},
                                    rng_states=[capture_rng_state()], trainer_state={}, config={"train": {}})
    assert "not there yet" in _one_line_error(["zero-shot", str(step)], capsys)
    shutil.copytree(clip_dir, run / "model")
    assert f"its trained model is {run / 'model'}" in _one_line_error(["zero-shot", str(run)], capsys)
    err = _one_line_error(["zero-shot", str(step)], capsys)
    assert "is a training checkpoint (for resuming training), not a model" in err and str(run / "model") in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "circle,circle"], "duplicate class names: 'circle'"),
        (["--labels", "a,b", "--template", "no placeholder"], "'no placeholder' must contain exactly one {}"),
        (["--labels", "a,b", "--template", "a {}.", "--template", "a {} {} thing"], "found: {}, {}"),
    ],
)
def test_classify_refuses_templates_and_labels_that_cannot_classify(clip_dir, pngs, capsys, extra, message):
    assert message in _one_line_error(["classify", str(pngs[0]), "--clip", str(clip_dir), *extra], capsys)


def test_the_cli_starts_without_importing_the_stages():
    """`unclip --help` and the parser stay quick: the stages (x-transformers, the prior's model) load only when a
    command runs; the sampler flags offer every registered sampler, the prior's analytic_ddpm among them."""
    code = ("import sys, unclip.cli.main; parser = unclip.cli.main.build_parser(); "
            "parser.parse_args(['generate', 'x', '--prior-sampler', 'analytic_ddpm']); "
            "print(sorted(m for m in ('prior', 'decoder', 'upsamplers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


UPSAMPLER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "upsamplers" / "shapes-32-64.yaml"
TINY_UPSAMPLER = ["model.unet.model_channels=8", "model.unet.channel_mult=[1, 2]", "model.unet.num_res_blocks=1",
                  "model.unet.groups=4", "data.shapes_samples=8", "train.max_steps=1", "train.batch_size=4",
                  "train.log_every=1", "train.checkpoint_every=0", "train.sample_every=0", "train.warmup_steps=0",
                  "train.progress=false", "train.num_workers=0", "eval.samples=0"]


def test_train_upsampler_is_the_command_for_upsampler_configs(tmp_path, capsys):
    from unclip.cli.train_decoder import main as train_decoder
    from unclip.cli.train_upsampler import main as train_upsampler
    from upsamplers import Upsampler

    out = subprocess.run([str(BIN / "train-upsampler"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: train-upsampler" in out and "configs/upsamplers" in out
    overrides = [arg for item in TINY_UPSAMPLER for arg in ("--set", item)]
    assert train_upsampler([str(UPSAMPLER_CONFIG), "--output-dir", str(tmp_path / "up"), *overrides]) == 0
    assert "trained to step 1" in capsys.readouterr().out
    assert Upsampler.from_pretrained(tmp_path / "up" / "model").config.image_size == 64
    assert train_decoder([str(UPSAMPLER_CONFIG), "--output-dir", str(tmp_path / "dec"), *overrides]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "train-upsampler" in line]
    assert notes == ["train-decoder: note: train-upsampler is the command for upsampler configs; this run trains "
                     "the upsampler all the same"], captured.err
    assert "trained to step 1" in captured.out and (tmp_path / "dec" / "model" / "config.json").is_file()


def test_train_upsampler_names_the_script_of_another_config(tmp_path, capsys):
    from unclip.cli.train_upsampler import main as train_upsampler

    config = Path(__file__).resolve().parents[1] / "configs" / "decoder" / "shapes-tiny.yaml"
    assert train_upsampler([str(config), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a train-decoder config" in err and f"run `train-decoder {config}`" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_one_device_resolution_for_the_library_and_the_cli(monkeypatch):
    from unclip.cli import common
    from unclip.devices import resolve_device
    from unclip.pipeline import default

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == common.resolve_device("auto") == torch.device("cpu")
    assert default.resolve_device is resolve_device
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(common.CliError, match="unknown device 'tpu'"):
        common.resolve_device("tpu")
