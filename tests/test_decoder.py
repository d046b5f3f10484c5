"""The decoder stage: shapes, CLIP conditioning and its null paths, sampling, variations, training, checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from conftest import refuse_resume_after_clip_retrain
from safetensors.torch import load_file

from decoder import (
    Decoder,
    DecoderConfig,
    DecoderTrainTask,
    TrainDecoderConfig,
    decode,
    image_variations,
    reconstruction_accuracy,
)
from unclip.checkpoint import WEIGHTS_NAME, CheckpointError
from unclip.config import load_config, replace_config
from unclip.data import make_shapes
from unclip.diffusion import DiffusionConfig
from unclip.images import resize_images
from unclip.nn import UNetConfig
from unclip.settings import StageSampling
from unclip.train import TrainConfig, Trainer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "decoder").glob("*.yaml"))


def tiny_config(side: int = 8, variance: str = "fixed_small", **kw) -> DecoderConfig:
    unet = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(side // 2,),
                      image_size=side, head_channels=16, groups=8)
    return DecoderConfig(image_size=side, embed_dim=32, text_width=48, context_dim=16, unet=unet,
                         diffusion=DiffusionConfig(variance=variance), **kw)


def randomised(decoder: Decoder, seed: int = 0) -> Decoder:
    """Fill the zero-initialised output layers, so that every conditioning path reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return decoder.eval()


def inputs(b: int, side: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, side, side, generator=g)
    embed = torch.nn.functional.normalize(torch.randn(b, 32, generator=g), dim=-1)
    tokens = torch.randn(b, 6, 48, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 2] * b)
    return x, torch.randint(0, 1000, (b,), generator=g), embed, tokens, mask


def small_train_config(tmp_clip: str = "unused", **overrides) -> TrainDecoderConfig:
    cfg = TrainDecoderConfig(clip=tmp_clip, model=tiny_config(), train=TrainConfig(
        max_steps=60, batch_size=16, lr=2e-3, warmup_steps=5, checkpoint_every=0, progress=False, log_every=10))
    return replace_config(cfg, {"data.shapes_samples": 32, "eval.sample_grid": 3, "eval.steps": 4, **overrides})


@pytest.mark.parametrize(("side", "batch", "variance"), [(8, 1, "fixed_small"), (16, 3, "fixed_small"),
                                                         (8, 2, "learned_range")])
def test_output_shapes(side, batch, variance):
    decoder = Decoder(tiny_config(side, variance))
    x, t, embed, tokens, mask = inputs(batch, side)
    channels = 6 if variance == "learned_range" else 3
    assert decoder(x, t, image_embed=embed, text_states=tokens, text_mask=mask).shape == (batch, channels, side, side)
    assert decoder(x, t, image_embed=embed).shape == (batch, channels, side, side)


def test_conditioning_changes_the_output_and_nulls_replace_it():
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config()))
    x, t, embed, tokens, mask = inputs(4)
    other_embed, other_tokens = inputs(4, seed=1)[2:4]
    all_rows = torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        base = decoder(x, t, image_embed=embed, text_states=tokens, text_mask=mask)
        assert not torch.allclose(base, decoder(x, t, image_embed=other_embed, text_states=tokens, text_mask=mask))
        assert not torch.allclose(base, decoder(x, t, image_embed=embed, text_states=other_tokens, text_mask=mask))
        # padding tokens are never attended to
        padded = torch.where(mask[..., None], tokens, other_tokens)
        assert torch.allclose(base, decoder(x, t, image_embed=embed, text_states=padded, text_mask=mask), atol=1e-5)
        # a dropped image embedding is the learned null: the row no longer depends on the embedding
        dropped = decoder(x, t, image_embed=embed, text_states=tokens, text_mask=mask, image_drop=all_rows)
        assert not torch.allclose(dropped, base)
        assert torch.allclose(dropped, decoder(x, t, image_embed=other_embed, text_states=tokens, text_mask=mask,
                                               image_drop=all_rows), atol=1e-5)
        # dropped text is the same as no text at all
        no_text = decoder(x, t, image_embed=embed)
        assert not torch.allclose(no_text, base)
        assert torch.allclose(no_text, decoder(x, t, image_embed=embed, text_states=tokens, text_mask=mask,
                                               text_drop=all_rows), atol=1e-5)
        # cond_drop (the CFG unconditional branch) drops both; masks act per row
        uncond = decoder(x, t, image_embed=embed, text_states=tokens, text_mask=mask, cond_drop=all_rows)
        assert torch.allclose(uncond, decoder(x, t, image_embed=other_embed, image_drop=all_rows), atol=1e-5)
        rows = torch.tensor([True, False, True, False])
        mixed = decoder(x, t, image_embed=embed, text_states=tokens, text_mask=mask, cond_drop=rows)
        assert torch.allclose(mixed[rows], uncond[rows], atol=1e-5)
        assert torch.allclose(mixed[~rows], base[~rows], atol=1e-5)


def test_cfg_null_paths_are_used_at_the_stated_rates(tiny_clip):
    cfg = replace_config(small_train_config(), {"model.image_drop": 0.1, "model.text_drop": 0.5})
    task = DecoderTrainTask(cfg, clip=tiny_clip)
    seen = {"image_drop": [], "text_drop": []}

    def spy(module, args, kwargs):
        for key in seen:
            seen[key].append(kwargs[key].clone())

    task.model.register_forward_pre_hook(spy, with_kwargs=True)
    dataset = task.train_dataset()
    batch = task.collate_fn([dataset[i] for i in range(32)])
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(60):
            task.loss(task.model, batch)
    image_drop, text_drop = torch.cat(seen["image_drop"]).float(), torch.cat(seen["text_drop"]).float()
    assert len(image_drop) == 1920
    assert abs(image_drop.mean().item() - 0.1) < 0.025  # about 3.5 standard errors
    assert abs(text_drop.mean().item() - 0.5) < 0.04
    both = (image_drop * text_drop).mean().item()
    assert abs(both - 0.05) < 0.02, "the two drops are independent"


def test_decode_shapes_determinism_and_guidance():
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config()))
    _, _, embed, _, _ = inputs(3)

    def run(seed=0, **kw):
        return decode(decoder, embed, steps=4, generator=torch.Generator().manual_seed(seed), **kw)

    images = run(guidance_scale=1.0)
    assert images.shape == (3, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, run(guidance_scale=1.0))
    assert not torch.allclose(images, run(guidance_scale=3.0))
    assert not torch.allclose(run(sampler="ddim", eta=1.0), run(sampler="ddim", eta=1.0, seed=1))
    with pytest.raises(ValueError, match="eta"):  # ancestral DDPM has no eta to set
        run(eta=1.0)
    assert run(sampler="ddim").shape == run(sampler="dpmpp_2m_sde").shape == (3, 3, 8, 8)


def test_guided_decoding_on_cpu_runs_the_two_branches_as_separate_batches():
    """On the CPU the guided UNet calls are two batches of b (measured faster than one of 2b there)."""
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config()))
    _, _, embed, _, _ = inputs(3)
    batches = []
    handle = decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        decode(decoder, embed, steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert batches == [3, 3, 3, 3]


def test_the_stage_denoiser_guides_the_networks_eps_with_both_conditions_dropped():
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config()))
    x, t, embed, tokens, mask = inputs(3)
    cond = {"image_embed": embed, "text_states": tokens, "text_mask": mask}
    with torch.no_grad():
        own, null = decoder(x, t, **cond), decoder(x, t, **cond, cond_drop=torch.ones(3, dtype=torch.bool))
        unguided = decoder.denoiser(cond, StageSampling(guidance=1.0), threshold=None)(x, t)
        guided = decoder.denoiser(cond, StageSampling(guidance=3.0), threshold=None)(x, t)
        thresholded = decoder.denoiser(cond, StageSampling(guidance=3.0))(x, t)  # dynamic thresholding by default
    torch.testing.assert_close(unguided.eps, own)
    torch.testing.assert_close(guided.eps, null + 3.0 * (own - null))
    assert thresholded.x0.abs().max() <= 1 and not torch.allclose(thresholded.x0, guided.x0)


def test_inverted_latents_decode_back_to_the_image():
    """DDIM inversion is exact for a decoder whose eps is 0 (its output layer is zero-initialised): decoding the
    inverted x_T with deterministic DDIM over the same steps gives back the image at the decoder's side."""
    decoder = Decoder(tiny_config())
    _, _, embed, _, _ = inputs(2)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x_T = decoder.invert(pixels, embed, steps=5)
    assert x_T.shape == (2, 3, 8, 8) and torch.equal(x_T, decoder.invert(pixels, embed, steps=5))
    images = decode(decoder, embed, x_T=x_T, steps=5, sampler="ddim", guidance_scale=1.0, threshold=None)
    torch.testing.assert_close(images, resize_images(pixels, 8), atol=1e-5, rtol=0)


def test_decode_with_text_and_learned_variance(tiny_clip):
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config(variance="learned_range")))
    text = tiny_clip.encode_text(["a red circle on a blue background", "a green square"])
    embed = tiny_clip.encode_image(torch.rand(2, 3, 32, 32))
    for sampler in ("ddim", "ddpm"):
        images = decode(decoder, embed, text, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_image_variations(tiny_clip):
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config()))
    pil = make_shapes(2, split="heldout", seed=0, resolution=32)["image"]
    out = image_variations(decoder, tiny_clip, pil, n=3, eta=1.0, steps=4, seed=0)
    assert out.shape == (2, 3, 3, 8, 8)
    assert not torch.allclose(out[:, 0], out[:, 1]), "eta > 0 gives different variations"
    assert torch.equal(out, image_variations(decoder, tiny_clip, pil, n=3, eta=1.0, steps=4, seed=0))
    inverted = image_variations(decoder, tiny_clip, torch.rand(1, 3, 32, 32), n=2, eta=0.0, steps=4, invert=True)
    assert inverted.shape == (1, 2, 3, 8, 8)
    assert torch.allclose(inverted[:, 0], inverted[:, 1]), "eta = 0 from the inverted latent is deterministic"


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config(variance="learned_range"), clip_source="x", clip_fingerprint="f"))
    decoder.save_pretrained(tmp_path / "decoder")
    meta = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert meta["kind"] == "decoder" and meta["config"]["model"]["diffusion"]["variance"] == "learned_range"
    loaded = Decoder.from_pretrained(tmp_path / "decoder")
    assert loaded.config == decoder.config
    assert (loaded.clip_source, loaded.clip_fingerprint) == ("x", "f")
    x, t, embed, tokens, mask = inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, image_embed=embed, text_states=tokens, text_mask=mask),
                           decoder(x, t, image_embed=embed, text_states=tokens, text_mask=mask))
    (tmp_path / "decoder" / "config.json").write_text(json.dumps({**meta, "kind": "prior"}))
    with pytest.raises(CheckpointError, match="not a 'decoder'"):
        Decoder.from_pretrained(tmp_path / "decoder")


def test_checkpoint_dtypes(tmp_path):
    """from_pretrained casts to the asked dtype; save_pretrained(dtype=) stores in it, and it loads back as float32."""
    torch.manual_seed(0)
    decoder = randomised(Decoder(tiny_config()))
    decoder.save_pretrained(tmp_path / "fp32")
    bf16 = Decoder.from_pretrained(tmp_path / "fp32", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and not bf16.training
    images = decode(bf16, inputs(2)[2], steps=2, generator=torch.Generator().manual_seed(0))
    assert images.dtype == torch.float32 and images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    decoder.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    stored = load_file(tmp_path / "fp16" / WEIGHTS_NAME)
    assert stored.keys() == decoder.state_dict().keys()
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert next(decoder.parameters()).dtype == torch.float32, "saving does not cast the module"
    loaded = Decoder.from_pretrained(tmp_path / "fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, decoder.state_dict()[name].half().float()), name


@pytest.mark.parametrize(("objective", "variance"), [("eps", "fixed_small"), ("v", "learned_range")])
def test_tiny_decoder_loss_falls_and_exports(tiny_clip, tmp_path, objective, variance):
    torch.manual_seed(0)
    cfg = small_train_config(**{"train.sample_every": 60, "data.cache_embeddings": True,
                                "model.diffusion.objective": objective, "model.diffusion.variance": variance})
    task = DecoderTrainTask(cfg, clip=tiny_clip)
    result = Trainer(task, cfg.train, tmp_path / "run").train()
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert result.nonfinite_steps == 0
    assert (tmp_path / "run" / "samples" / "step-0000060.png").is_file()
    decoder = Decoder.from_pretrained(tmp_path / "run" / "model")
    assert decoder.clip_fingerprint == task.clip_fingerprint
    images = decode(decoder, tiny_clip.encode_image(torch.rand(2, 3, 32, 32)), steps=3)
    assert images.shape == (2, 3, 8, 8)


def test_reconstruction_accuracy_report(tiny_clip):
    torch.manual_seed(0)
    decoder = Decoder(tiny_config())
    acc = reconstruction_accuracy(decoder, tiny_clip, samples=6, guidance_scales=(1.0, 2.0), steps=2, batch_size=4,
                                  resolution=32)
    assert acc["samples"] == 6 and acc["image_size"] == 8 and set(acc["guidance"]) == {"1.0", "2.0"}
    assert set(acc["agreement"]) == {"1.0", "2.0"}
    for scores in (acc["source"], acc["ceiling"], *acc["guidance"].values(), *acc["agreement"].values()):
        assert set(scores) == {"shape", "fg", "bg", "all"} and all(0 <= v <= 1 for v in scores.values())


def test_clip_mismatch_is_refused(tiny_clip):
    cfg = replace_config(small_train_config(), {"model.embed_dim": 64})
    with pytest.raises(ValueError, match="embed_dim"):
        DecoderTrainTask(cfg, clip=tiny_clip)


def test_decoder_config_checks():
    with pytest.raises(ValueError, match="cond_dim"):
        DecoderConfig(image_size=64, unet=UNetConfig(cond_dim=3))
    with pytest.raises(ValueError, match="image_size"):
        DecoderConfig(image_size=32)
    with pytest.raises(ValueError, match="image_drop"):
        DecoderConfig(image_drop=1.5)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_decoder_config_loads(path):
    cfg = load_config(TrainDecoderConfig, path)
    assert cfg.stage == "base" and cfg.model.image_size == cfg.model.unet.image_size
    if cfg.model.image_size <= 32:  # the CPU configs also build
        assert sum(p.numel() for p in Decoder(cfg.model).parameters()) > 0


def tiny_cli_args(tmp_path: Path) -> list[str]:
    """train-decoder arguments for a tiny 8 px decoder on SHAPES with the CLIP in tmp_path/clip (2 steps)."""
    config = tmp_path / "tiny.yaml"
    config.write_text("stage: base\n")
    return [str(config), "--output-dir", str(tmp_path / "run"), "--set", f"clip={tmp_path / 'clip'}",
            "--set", "model.embed_dim=32", "--set", "model.text_width=48", "--set", "model.context_dim=16",
            "--set", "model.image_size=8", "--set", "model.unet.image_size=8",
            "--set", "model.unet.model_channels=16", "--set", "model.unet.channel_mult=[1, 2]",
            "--set", "model.unet.attention_resolutions=[4]", "--set", "model.unet.head_channels=16",
            "--set", "model.unet.num_res_blocks=1", "--set", "data.shapes_samples=8", "--set", "train.batch_size=4",
            "--set", "train.max_steps=2", "--set", "train.progress=false", "--set", "eval.samples=4",
            "--set", "eval.steps=2", "--set", "eval.batch_size=4", "--set", "data.shapes_resolution=32"]


def test_train_decoder_cli(tiny_clip, tmp_path, capsys):
    from unclip.cli.train_decoder import main

    tiny_clip.save_pretrained(tmp_path / "clip")
    args = tiny_cli_args(tmp_path)
    config = Path(args[0])
    assert main(args) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(report["guidance"]) == {"1.0", "3.0"}
    assert "decoded, guidance 3.0" in capsys.readouterr().out
    config.write_text("stage: nonsense\n")
    assert main([str(config)]) == 2
    assert "unknown stage 'nonsense'" in capsys.readouterr().err


def test_resuming_after_the_clip_was_retrained_is_refused(tiny_clip, tiny_arch, tmp_path, capsys):
    from unclip.cli.train_decoder import main

    tiny_clip.save_pretrained(tmp_path / "clip")
    args = tiny_cli_args(tmp_path) + ["--set", "eval.samples=0"]
    assert main(args) == 0
    old = refuse_resume_after_clip_retrain(main, args, tmp_path / "clip", tiny_clip, tiny_arch, capsys)
    assert Decoder.from_pretrained(tmp_path / "run" / "model").clip_fingerprint == old  # not re-exported


def test_no_resume_leaves_no_stale_evaluation(tiny_clip, tmp_path, capsys):
    from unclip.cli.train_decoder import main

    tiny_clip.save_pretrained(tmp_path / "clip")
    args = tiny_cli_args(tmp_path)
    assert main(args) == 0 and (tmp_path / "run" / "eval.json").is_file()
    (tmp_path / "run" / "eval-20260101-120000.json").write_text("{}")  # an earlier one write_eval kept
    (tmp_path / "run" / "eval-ddim.json").write_text("{}")  # the user's own file
    with pytest.warns(UserWarning, match="deleted the replaced run's eval-20260101-120000.json, eval.json"):
        assert main(args + ["--no-resume", "--set", "eval.samples=0"]) == 0
    assert not (tmp_path / "run" / "eval.json").exists()  # it described the model this run replaced
    assert (tmp_path / "run" / "eval-ddim.json").exists()  # not ours to delete


def test_re_evaluating_a_finished_run_keeps_the_earlier_evaluation(tiny_clip, tmp_path, capsys):
    from unclip.cli.train_decoder import main

    tiny_clip.save_pretrained(tmp_path / "clip")
    args, run = tiny_cli_args(tmp_path), tmp_path / "run"
    assert main(args + ["--set", "eval.sampler=ddpm"]) == 0
    assert main(args + ["--set", "eval.sampler=ddim", "--set", "eval.eta=0.5"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    kept = list(run.glob("eval-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["sampler"] == "ddpm"
    report = json.loads((run / "eval.json").read_text())
    assert (report["sampler"], report["steps"], report["eta"]) == ("ddim", 2, 0.5)
    assert main(args + ["--set", "eval.steps=3"]) == 0
    assert len(list(run.glob("eval-*.json"))) == 2
    with pytest.warns(UserWarning, match="deleted the replaced run's eval-"):
        assert main(args + ["--no-resume", "--set", "eval.samples=0"]) == 0
    assert not list(run.glob("eval*.json"))


def test_training_from_embedding_shards(tiny_clip, tmp_path):
    from unclip.data.embeddings import embed_dataset

    cfg = small_train_config(**{"data.shapes_resolution": 32})
    embed_dataset(tiny_clip, make_shapes(32, split="train", seed=0, resolution=32), tmp_path / "emb", source="shapes",
                  shard_size=20, batch_size=16, dtype=torch.float32, progress=False)
    task = DecoderTrainTask(replace_config(cfg, {"data.embeddings": str(tmp_path / "emb")}), clip=tiny_clip)
    dataset = task.train_dataset()
    batch = task.collate_fn([dataset[i] for i in (0, 25, 31)])
    on_the_fly = DecoderTrainTask(cfg, clip=tiny_clip)
    on_the_fly.train_dataset()
    expected = on_the_fly.conditioning(batch)
    got = task.conditioning(batch)
    assert torch.allclose(got["image_embed"], expected["image_embed"], atol=1e-4)
    assert torch.allclose(got["text_states"], expected["text_states"], atol=1e-4)
    loss, _ = task.loss(task.model, batch)
    assert torch.isfinite(loss)


def test_embeddings_made_by_another_clip_are_a_one_line_error(tiny_clip, tiny_arch, tmp_path, capsys):
    from unclip.cli.train_decoder import main
    from unclip.clip import Clip
    from unclip.data.embeddings import embed_dataset

    tiny_clip.save_pretrained(tmp_path / "clip")
    torch.manual_seed(1)
    other = Clip.from_architecture(tiny_arch, model_name="tiny-test")
    embed_dataset(other, make_shapes(8, split="train", seed=0, resolution=32), tmp_path / "emb", source="shapes",
                  progress=False)
    assert main(tiny_cli_args(tmp_path) + ["--set", f"data.embeddings={tmp_path / 'emb'}"]) == 2
    err = capsys.readouterr().err
    assert (f"was embedded with another CLIP (fingerprint {other.fingerprint()}) than clip: {tmp_path / 'clip'} "
            f"(fingerprint {tiny_clip.fingerprint()})") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_embedding_cache_returns_each_samples_own_conditioning(tiny_clip):
    cfg = small_train_config(**{"data.cache_embeddings": True})
    cached, fresh = DecoderTrainTask(cfg, clip=tiny_clip), DecoderTrainTask(cfg, clip=tiny_clip)
    dataset = cached.train_dataset()
    fresh.train_dataset()
    for rows in ([0, 5, 9], [9, 3, 0, 7]):  # the second batch mixes cached and new samples, in another order
        batch = cached.collate_fn([dataset[i] for i in rows])
        got, expected = cached.conditioning(batch), fresh.conditioning(batch)
        for key in ("image_embed", "text_states", "text_mask"):
            assert torch.allclose(got[key].float(), expected[key].float(), atol=1e-5), key
    assert int(cached._cache.store["filled"].sum()) == 5
