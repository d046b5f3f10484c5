"""`train-prior` end to end with a tiny CLIP: from `unclip embed` shards and from SHAPES on the fly."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import refuse_resume_after_clip_retrain

from prior import DiffusionPriorNetwork, PriorTrainTask, TrainPriorConfig
from unclip.cli.train_prior import main
from unclip.config import ConfigError, load_config
from unclip.data import load_image_text_dataset, make_shapes
from unclip.data.embeddings import embed_dataset

MODEL = {"embed_dim": 32, "text_width": 48, "text_length": 16, "width": 64, "depth": 2, "heads": 2, "dim_head": 32,
         "schedule": {"kind": "cosine", "num_timesteps": 100}}
TRAIN = {"max_steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2, "log_every": 5, "checkpoint_every": 20,
         "ema_decay": 0.9, "progress": False}


@pytest.fixture(scope="module")
def clip_dir(tiny_clip, tmp_path_factory):
    return tiny_clip.save_pretrained(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def trained(tiny_clip, clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-prior")
    # what `unclip embed --data shapes --shapes-samples 64` writes as its source
    embeddings = embed_dataset(tiny_clip, make_shapes(64, seed=1), root / "emb", source="shapes:64", progress=False)
    config = {"clip": str(clip_dir), "model": MODEL, "data": {"source": str(embeddings)}, "train": TRAIN,
              "eval": {"images_per_triple": 1, "steps": 4, "guidance_scales": [1.0, 2.0]}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path), "--output-dir", str(root / "run")]) == 0
    return path, root / "run"


def test_loss_falls_and_the_prior_exports(trained):
    _, run = trained
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 8 and sum(losses[-2:]) < 0.5 * sum(losses[:2]), losses
    prior = DiffusionPriorNetwork.from_pretrained(run / "model")
    assert prior.config == load_config(TrainPriorConfig, trained[0]).model
    source = load_config(TrainPriorConfig, trained[0]).data.source
    assert prior.clip_fingerprint == json.loads((Path(source) / "manifest.json").read_text())["clip"]


def test_the_exported_prior_is_calibrated_for_analytic_sampling(trained, tiny_clip):
    """train-prior stores Analytic-DPM's moments (from the 64 embedded pairs: fewer than calibration_samples)."""
    from prior import sample_image_embeds

    prior = DiffusionPriorNetwork.from_pretrained(trained[1] / "model")
    moments = prior.eps_moments
    assert moments is not None and moments.shape == (100,) and bool(torch.isfinite(moments).all())
    assert bool((moments > 0).all())
    embeds = sample_image_embeds(prior, tiny_clip.encode_text(["a red circle on a blue background"]), steps=4,
                                 sampler="analytic_ddpm", generator=torch.Generator().manual_seed(0), progress=False)
    assert embeds.shape == (1, 32) and torch.isfinite(embeds).all()


def test_calibration_pairs_from_shapes_on_the_fly(tiny_clip, clip_dir):
    from prior.training import calibration_pairs

    cfg = load_config(TrainPriorConfig, {"clip": str(clip_dir), "model": MODEL,
                                         "data": {"source": "shapes", "shapes_samples": 8}})
    text, image_embed = calibration_pairs(cfg, 5, tiny_clip, batch_size=2)
    assert image_embed.shape == (5, 32) and text.text_states.shape == (5, 16, 48)
    rows = make_shapes(8, split="train", seed=0, resolution=64)
    drawn = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:5].tolist()
    torch.testing.assert_close(text.text_embed, tiny_clip.encode_text([rows[i]["caption"] for i in drawn]).text_embed)
    with pytest.raises(ValueError, match="calibration_samples must be >= 0"):
        load_config(TrainPriorConfig, {"clip": str(clip_dir), "model": MODEL, "calibration_samples": -1})
    with pytest.raises(ValueError, match="'analytic_ddpm' needs the Analytic-DPM moments"):
        load_config(TrainPriorConfig, {"clip": str(clip_dir), "model": MODEL, "calibration_samples": 0,
                                       "eval": {"sampler": "analytic_ddpm"}})


def test_shapes_evaluation_is_written_for_each_guidance_scale(trained, capsys):
    path, run = trained
    result = json.loads((run / "eval.json").read_text())
    assert [r["guidance_scale"] for r in result["results"]] == [1.0, 2.0]
    for r in result["results"]:
        assert r["captions"] == 150 and r["best_of"] == 2
        for key in ("prior_cosine", "text_cosine"):
            assert -1.0 <= r[key] <= 1.0
        assert r["image_cosine_ceiling"] is None  # one image per triple in this config: no ceiling
        for key in ("prior_retrieval", "text_retrieval", "prior_beats_text"):
            assert 0.0 <= r[key] <= 1.0
    assert main([str(path), "--output-dir", str(run), "--set", "eval.guidance_scales=[3]"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: already at step 40" in out and "image-to-image ceiling: n/a" in out
    assert [r["guidance_scale"] for r in json.loads((run / "eval.json").read_text())["results"]] == [3.0]
    kept = list(run.glob("eval-*.json"))  # the earlier evaluation
    assert len(kept) == 1 and [r["guidance_scale"] for r in json.loads(kept[0].read_text())["results"]] == [1.0, 2.0]


def test_the_image_ceiling_needs_two_images_per_triple(trained, tiny_clip, capsys):
    from prior.evaluation import evaluate_prior_shapes

    prior = DiffusionPriorNetwork.from_pretrained(trained[1] / "model")
    one = evaluate_prior_shapes(prior, tiny_clip, best_of=1, steps=2, images_per_triple=1)
    assert one["image_cosine_ceiling"] is None  # no pair of distinct images: not a cosine of 0
    two = evaluate_prior_shapes(prior, tiny_clip, best_of=1, steps=2, images_per_triple=2)
    assert -1.0 <= two["image_cosine_ceiling"] <= 1.0


def test_on_the_fly_encoding_of_shapes(tiny_clip, clip_dir):
    cfg = load_config(TrainPriorConfig, {"clip": str(clip_dir), "model": MODEL,
                                         "data": {"source": "shapes", "shapes_samples": 8}})
    task = PriorTrainTask(cfg)
    batch = task.collate_fn([task.train_dataset()[i] for i in range(8)])
    fields = task.encode(batch)
    assert fields["image_embed"].shape == (8, 32) and fields["text_states"].shape == (8, 16, 48)
    torch.testing.assert_close(fields["text_embed"], tiny_clip.encode_text(batch["captions"]).text_embed)
    loss, metrics = task.loss(task.model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and set(metrics) == {"x0_cos", "cond_drop"}


def test_resuming_after_the_clip_was_retrained_is_refused(tiny_clip, tiny_arch, tmp_path, capsys):
    tiny_clip.save_pretrained(tmp_path / "clip")
    config = {"clip": str(tmp_path / "clip"), "model": MODEL, "data": {"source": "shapes", "shapes_samples": 16},
              "train": {**TRAIN, "max_steps": 2, "batch_size": 4}, "eval": {"enabled": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [str(path), "--output-dir", str(tmp_path / "run")]
    assert main(args) == 0
    old = refuse_resume_after_clip_retrain(main, args, tmp_path / "clip", tiny_clip, tiny_arch, capsys)
    assert DiffusionPriorNetwork.from_pretrained(tmp_path / "run" / "model").clip_fingerprint == old


def test_embeddings_made_by_another_clip_are_refused(tiny_clip, tiny_arch, tmp_path, capsys):
    from unclip.clip import Clip

    torch.manual_seed(1)
    other = Clip.from_architecture(tiny_arch, model_name="tiny-test").save_pretrained(tmp_path / "other-clip")
    embeddings = embed_dataset(tiny_clip, make_shapes(8, seed=1), tmp_path / "emb", source="shapes:8", progress=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"clip": str(other), "model": MODEL, "data": {"source": str(embeddings)},
                                    "train": {**TRAIN, "max_steps": 2, "batch_size": 4}}))
    assert main([str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (f"was embedded with another CLIP (fingerprint {tiny_clip.fingerprint()}) than clip: {other} "
            f"(fingerprint {Clip.from_pretrained(other).fingerprint()})") in err
    assert "unclip embed --clip" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the trainer touched anything
    cfg = load_config(TrainPriorConfig, yaml.safe_load(path.read_text()) | {"clip": "unused"})
    task = PriorTrainTask(cfg, clip=tiny_clip)  # the CLIP that made them
    assert task.model.clip_fingerprint == tiny_clip.fingerprint() and task.clip is tiny_clip
    # a CLIP whose weights cannot be had here (an architecture name without a tag; offline, a tag): the shards are
    # trusted with a warning, as training from shards needs no CLIP
    offline = load_config(TrainPriorConfig, yaml.safe_load(path.read_text()) | {"clip": "ViT-B-32"})
    with pytest.warns(UserWarning, match="cannot check that .* was embedded by clip: ViT-B-32"):
        task = PriorTrainTask(offline)
    assert task.model.clip_fingerprint == tiny_clip.fingerprint()


def test_a_prior_that_does_not_fit_its_clip_is_refused(clip_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.embed_dim = 64 but the CLIP .* has 32"):
        PriorTrainTask(load_config(TrainPriorConfig, {"clip": str(clip_dir), "model": {**MODEL, "embed_dim": 64}}))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"clip": str(clip_dir), "model": {**MODEL, "text_length": 77}}))
    assert main([str(path), "--output-dir", str(tmp_path / "run")]) == 2
    assert "model.text_length = 77" in capsys.readouterr().err


def test_malformed_yaml_and_missing_data_are_one_line_errors(clip_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [0.1\n")
    assert main([str(bad), "--output-dir", str(tmp_path / "a")]) == 2
    assert "bad.yaml is not valid YAML" in capsys.readouterr().err
    config = str(Path(__file__).resolve().parents[1] / "configs" / "prior" / "shapes-tiny.yaml")
    assert main([config, "--set", "train.betas=[0.9", "--output-dir", str(tmp_path / "b")]) == 2
    assert "the value is not valid YAML" in capsys.readouterr().err
    assert main([config, "--set", f"clip={tmp_path / 'no-clip'}", "--output-dir", str(tmp_path / "c")]) == 2
    assert "no CLIP at" in capsys.readouterr().err
    assert main([config, "--set", f"data.source={tmp_path / 'nowhere'}", "--set", "train.progress=false",
                 "--set", f"clip={clip_dir}", "--set", "model.embed_dim=32", "--set", "model.text_width=48",
                 "--set", "model.text_length=16", "--output-dir", str(tmp_path / "d")]) == 2
    assert "dataset path not found" in capsys.readouterr().err


def test_an_intermediate_checkpoint_exports_as_a_model(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    path, run = trained
    dest = tmp_path / "prior-20"
    assert main([str(path), "--output-dir", str(run), "--export-step", "20", "--export-to", str(dest)]) == 0
    assert f"exported step 20 of {run} to {dest}" in capsys.readouterr().out
    exported = DiffusionPriorNetwork.from_pretrained(dest)
    ema = load_file(str(run / "checkpoints" / "step-00000020" / "ema.safetensors"))
    for name, value in exported.state_dict().items():  # the step-20 EMA weights, not the final model's
        if name in ema:
            torch.testing.assert_close(value, ema[name], rtol=0, atol=0)
    final = DiffusionPriorNetwork.from_pretrained(run / "model").state_dict()
    assert any(not torch.equal(final[k], v) for k, v in exported.state_dict().items())
    assert exported.clip_fingerprint == DiffusionPriorNetwork.from_pretrained(run / "model").clip_fingerprint
    assert main([str(path), "--output-dir", str(run), "--export-step", "30"]) == 2
    assert "steps 20, 40" in capsys.readouterr().err
    for own in (run / "model", run / "checkpoints" / "step-00000040"):  # never over the run's own files
        assert main([str(path), "--output-dir", str(run), "--export-step", "20", "--export-to", str(own)]) == 2
        assert "would replace this run's own model or checkpoints" in capsys.readouterr().err
    after = DiffusionPriorNetwork.from_pretrained(run / "model").state_dict()
    assert all(torch.equal(after[k], v) for k, v in final.items())  # the finished model is untouched


@pytest.mark.parametrize(("script", "config", "owner"), [
    ("train_prior", "configs/decoder/shapes-tiny.yaml", "train-decoder"),
    ("train_decoder", "configs/prior/shapes-tiny.yaml", "train-prior"),
    ("train_clip", "configs/upsamplers/shapes-32-64.yaml", "train-upsampler"),
    ("train_upsampler", "configs/prior/shapes-tiny.yaml", "train-prior"),
    ("train_decoder", "configs/clip/shapes-tiny.yaml", "train-clip"),
])
def test_another_scripts_config_is_named(script, config, owner, tmp_path, capsys):
    """Not a list of unknown keys and a misleading 'did you mean': which script the config is for."""
    import importlib

    main_of = importlib.import_module(f"unclip.cli.{script}").main
    path = Path(__file__).resolve().parents[1] / config
    assert main_of([str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is a {owner} config" in err and f"run `{owner} {path}`" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_bad_set_or_a_missing_key_is_not_blamed_on_another_script(tmp_path, capsys):
    """Only keys this script does not know suggest another script's file; a --set typo or a missing key is named."""
    config = Path(__file__).resolve().parents[1] / "configs" / "prior" / "shapes-tiny.yaml"
    assert main([str(config), "--output-dir", str(tmp_path / "run"), "--set", "modle.embed_dim=32"]) == 2
    err = capsys.readouterr().err
    assert "'modle' is not a section" in err and "config, not a" not in err
    minimal = tmp_path / "min.yaml"
    minimal.write_text("clip: runs/c\ntrain: {max_steps: 5}\n")  # would load as a decoder config
    assert main([str(minimal), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "missing required config key 'model'" in err and "config, not a" not in err


def test_embeddings_without_one_row_are_a_one_line_error_naming_them(tiny_clip, clip_dir, tmp_path, capsys):
    from unclip.data import DataError

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "a red square"}\n')
    with pytest.raises(DataError, match="no row of"):
        embed_dataset(tiny_clip, load_image_text_dataset(folder), tmp_path / "emb", source=str(folder),
                      progress=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"clip": str(clip_dir), "model": MODEL, "data": {"source": str(tmp_path / "emb")},
                                    "train": {**TRAIN, "max_steps": 2, "batch_size": 4}}))
    assert main([str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{tmp_path / 'emb'} holds no embeddings: none of the 1 rows of {folder}" in err
