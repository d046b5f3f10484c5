"""The upsamplers: fully convolutional sampling, seeded degradations, crops, training, checkpoints, configs, CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_decoder import randomised  # fills zero-initialised output layers (any module)

from unclip.checkpoint import WEIGHTS_NAME, CheckpointError
from unclip.config import ConfigError, load_config, replace_config
from unclip.diffusion import DiffusionConfig
from unclip.nn import UNetConfig
from unclip.settings import StageSampling
from unclip.stage import SamplingRun, run_sampler
from unclip.train import TrainConfig, Trainer
from upsamplers import (
    TrainUpsamplerConfig,
    Upsampler,
    UpsamplerConfig,
    UpsamplerTrainTask,
    bsr_degrade,
    corrupt,
    gaussian_blur,
    psnr,
    psnr_vs_bicubic,
    random_crops,
    upsample,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "upsamplers").glob("*.yaml"))


def tiny_config(low: int = 8, high: int = 16, augmentation: str = "blur", **kw) -> UpsamplerConfig:
    unet = kw.pop("unet", None) or UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                              attention_resolutions=(), image_size=high, groups=4)
    kw.setdefault("sample_steps", 3)
    return UpsamplerConfig(low_res_size=low, image_size=high, augmentation=augmentation, aug_embed_dim=8, unet=unet,
                           **kw)


def small_train_config(**overrides) -> TrainUpsamplerConfig:
    cfg = TrainUpsamplerConfig(model=tiny_config(), train=TrainConfig(
        max_steps=50, batch_size=16, lr=3e-3, warmup_steps=5, checkpoint_every=0, progress=False, log_every=10))
    return replace_config(cfg, {"data.shapes_samples": 64, "data.shapes_resolution": 16, "eval.sample_grid": 2,
                                "eval.steps": 2, **overrides})


def images(b: int, side: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (b, 3, side, side) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, max(2, side // 4), max(2, side // 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=side, mode="bilinear", align_corners=False)


# ----- fully convolutional -------------------------------------------------------------------------------------
def test_runs_fully_convolutionally_at_sizes_other_than_the_training_crop():
    torch.manual_seed(0)
    cfg = small_train_config(**{"data.crop_size": 8})
    assert cfg.crop_size == 8
    up = randomised(Upsampler(cfg.model))
    for side in (24, 32):
        x = torch.randn(2, 3, side, side)
        cond = up.conditioning(images(2, side // 2), torch.tensor([0.0, 0.5]))
        assert cond.shape == (2, 3, side, side)
        assert up(x, torch.tensor([10, 900]), low_res_up=cond, aug_level=torch.tensor([0.0, 0.5])).shape == x.shape
    out = upsample(up, images(3, 12), generator=torch.Generator().manual_seed(0))  # 12 -> 24: not the crop, not 16
    assert out.shape == (3, 3, 24, 24) and 0 <= out.min() and out.max() <= 1
    rect = upsample(up, images(1, 8)[..., :6, :], steps=2)  # non-square: 6x8 -> 12x16
    assert rect.shape == (1, 3, 12, 16)
    deeper = UNetConfig(model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(),
                        image_size=16, groups=4)
    three_levels = Upsampler(tiny_config(unet=deeper))
    assert upsample(three_levels, images(1, 6), steps=1).shape == (1, 3, 12, 12)
    with pytest.raises(ValueError, match="multiple of 4"):
        upsample(three_levels, images(1, 5))  # 5 -> 10: the UNet halves twice


def test_no_attention_anywhere():
    up = Upsampler(small_train_config().model)
    assert not [m for m in up.modules() if "Attention" in type(m).__name__]
    with pytest.raises(ValueError, match="attention"):
        UpsamplerConfig(low_res_size=8, image_size=16, unet=UNetConfig(image_size=16, attention_resolutions=(8,)))


# ----- degradations --------------------------------------------------------------------------------------------
def test_gaussian_blur_identity_at_zero_and_per_row_sigma():
    x = images(3, 16)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(blurred[0], x[0])
    assert torch.allclose(blurred[1], gaussian_blur(x[1:2], 1.0)[0], atol=1e-6), "each row has its own sigma"
    assert not torch.allclose(blurred[1], x[1])
    # more blur, less high-frequency energy; the mean colour is kept (reflect padding, normalised kernel)
    tv = [float((b[:, 1:] - b[:, :-1]).abs().mean()) for b in blurred]
    assert tv[0] > tv[1] > tv[2]
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02)
    corrupted = corrupt(x, torch.tensor([0.0, 0.5, 1.0]), "blur", blur_sigma=2.0)
    assert torch.equal(corrupted, torch.cat([x[:1], gaussian_blur(x[1:], torch.tensor([1.0, 2.0]))]))


def test_bsr_degrade_is_seeded_and_deterministic():
    x = images(4, 32)

    def run(seed, level=0.7):
        return bsr_degrade(x, level, torch.Generator().manual_seed(seed))

    a = run(0)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, run(0)), "same seed, same output"
    assert not torch.allclose(a, run(1)), "another seed, another output"
    assert float((a - x).abs().mean()) > 0.01, "level 0.7 degrades"
    assert torch.equal(run(3, level=0.0), x), "level 0 is the identity"
    levels = torch.tensor([0.0, 0.2, 0.5, 1.0])
    mixed = bsr_degrade(x, levels, torch.Generator().manual_seed(5))
    assert torch.equal(mixed[0], x[0])
    err = [float((mixed[i] - x[i]).abs().mean()) for i in range(4)]
    assert err[3] > err[1], "a higher level degrades more"
    assert torch.equal(corrupt(x, levels, "bsr", generator=torch.Generator().manual_seed(5)), mixed)
    with pytest.raises(ValueError, match="augmentation"):
        corrupt(x, 0.5, "noise")


def test_the_bsr_blur_kernel_is_an_oriented_gaussian():
    """Isotropic, it is the separable Gaussian blur; anisotropic, it blurs along its angle: a horizontal line stays
    sharp under a kernel long along x, and spreads when the kernel turns by 90 degrees."""
    from upsamplers.degradations import anisotropic_blur

    x = images(2, 32)
    for sigma in (0.7, 1.5):
        torch.testing.assert_close(anisotropic_blur(x[0], sigma, sigma, 0.3), gaussian_blur(x[:1], sigma)[0],
                                   atol=1e-5, rtol=0)
    assert torch.equal(anisotropic_blur(x[0], 0.0, 0.0, 1.0), x[0])
    line = torch.zeros(1, 16, 16)
    line[0, 8, 2:14] = 1.0  # a horizontal line
    along, across = anisotropic_blur(line, 2.0, 0.01, 0.0), anisotropic_blur(line, 2.0, 0.01, math.pi / 2)
    assert float(along[0, 7].abs().max()) < 1e-6 and float(along[0, 8, 8]) > 0.9  # blurred along itself only
    assert float(across[0, 7, 8]) > 0.1 and float(across[0, 8, 8]) < 0.5  # spread across rows


def test_random_crops_cut_the_same_aligned_window():
    torch.manual_seed(0)
    a = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    b = a * 10
    ca, cb = random_crops([a, b], 8, align=4)
    assert ca.shape == (2, 1, 8, 8) and torch.equal(cb, ca * 10)
    for i in range(2):
        top, left = divmod(int(ca[i, 0, 0, 0]) - i * 256, 16)
        assert top % 4 == 0 and left % 4 == 0


# ----- sampling ------------------------------------------------------------------------------------------------
def test_upsample_determinism_and_conditioning():
    torch.manual_seed(0)
    up = randomised(Upsampler(tiny_config(augmentation="bsr")))
    low = images(2, 8)

    def run(seed=0, **kw):
        return upsample(up, low, generator=torch.Generator().manual_seed(seed), **kw)

    out = run()
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out, run()), "same seed, same images"
    assert not torch.allclose(run(aug_level=0.8), run(aug_level=0.8, seed=1)), "BSR and noise follow the seed"
    assert not torch.allclose(out, upsample(up, images(2, 8, seed=1), generator=torch.Generator().manual_seed(0)))
    assert run(sampler="ddpm").shape == run(sampler="dpmpp_2m").shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="aug_level"):
        run(aug_level=1.5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    up = randomised(Upsampler(tiny_config(diffusion=DiffusionConfig(objective="v", variance="learned_range"))))
    up.save_pretrained(tmp_path / "up")
    meta = json.loads((tmp_path / "up" / "config.json").read_text())
    assert meta["kind"] == "upsampler" and meta["config"]["model"]["diffusion"]["variance"] == "learned_range"
    loaded = Upsampler.from_pretrained(tmp_path / "up")
    assert loaded.config == up.config
    x, t, level = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0.1, 0.9])
    cond = up.conditioning(images(2, 8), level)
    with torch.no_grad():
        out = up(x, t, low_res_up=cond, aug_level=level)
        assert out.shape == (2, 6, 16, 16)
        assert torch.equal(loaded(x, t, low_res_up=cond, aug_level=level), out)
    assert upsample(loaded, images(1, 8), steps=2, sampler="ddpm").shape == (1, 3, 16, 16)
    (tmp_path / "up" / "config.json").write_text(json.dumps({**meta, "kind": "decoder"}))
    with pytest.raises(CheckpointError, match="not a 'upsampler'|not an? 'upsampler'"):
        Upsampler.from_pretrained(tmp_path / "up")


def test_checkpoint_dtypes(tmp_path):
    """from_pretrained casts to the asked dtype; save_pretrained(dtype=) stores in it, and it loads back as float32."""
    torch.manual_seed(0)
    up = randomised(Upsampler(tiny_config()))
    up.save_pretrained(tmp_path / "fp32")
    bf16 = Upsampler.from_pretrained(tmp_path / "fp32", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and not bf16.training
    out = upsample(bf16, images(1, 8), steps=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    up.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    stored = load_file(tmp_path / "fp16" / WEIGHTS_NAME)
    assert stored.keys() == up.state_dict().keys()
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert next(up.parameters()).dtype == torch.float32, "saving does not cast the module"
    loaded = Upsampler.from_pretrained(tmp_path / "fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, up.state_dict()[name].half().float()), name


def test_the_stage_denoiser_clamps_x0_and_takes_no_guidance():
    torch.manual_seed(0)
    up = randomised(Upsampler(tiny_config()))
    level = torch.tensor([0.0, 0.5])
    cond = {"low_res_up": up.conditioning(images(2, 8), level), "aug_level": level}
    x_t, t = torch.randn(2, 3, 16, 16) * 3, torch.tensor([999, 999])
    with torch.no_grad():
        clamped = up.denoiser(cond, StageSampling())(x_t, t)
        free = up.denoiser(cond, StageSampling(), threshold=None)(x_t, t)
    assert clamped.x0.abs().max() <= 1 < free.x0.abs().max()
    torch.testing.assert_close(clamped.x0, free.x0.clamp(-1, 1))
    with pytest.raises(ValueError, match="an upsampler is not guided"):
        up.check_sampling(StageSampling(guidance=2.0))  # what the pipeline and run_sampler ask before sampling
    with pytest.raises(ValueError, match="an upsampler is not guided"):
        run_sampler(up, "upsampler", StageSampling(guidance=2.0), x_t, cond, SamplingRun())


def test_a_generator_per_image_makes_each_image_independent_of_its_batch():
    torch.manual_seed(0)
    up = randomised(Upsampler(tiny_config(augmentation="bsr")))
    low = images(3, 8)

    def generators(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = upsample(up, low, aug_level=0.5, generator=generators(5, 6, 7))
    for i, seed in enumerate((5, 6, 7)):
        alone = upsample(up, low[i:i + 1], aug_level=0.5, generator=generators(seed))
        torch.testing.assert_close(alone, batch[i:i + 1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 images do not split into equal groups for 2 generators"):
        upsample(up, low, aug_level=0.5, generator=generators(5, 6))
    pairs = upsample(up, torch.cat([low[:2], low[:2]]), aug_level=0.5, generator=generators(5, 6))  # 2 rows each
    torch.testing.assert_close(pairs[:2], upsample(up, low[:2], aug_level=0.5, generator=generators(5)), atol=1e-5,
                               rtol=0)


# ----- training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("augmentation", ["blur", "bsr"])
def test_tiny_upsampler_loss_falls_and_exports(tmp_path, augmentation):
    torch.manual_seed(0)
    workers = 1 if augmentation == "bsr" else 0  # the conditioning made in a DataLoader worker process
    cfg = small_train_config(**{"model.augmentation": augmentation, "train.sample_every": 50,
                                "train.num_workers": workers})
    task = UpsamplerTrainTask(cfg)
    result = Trainer(task, cfg.train, tmp_path / "run").train()
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert result.nonfinite_steps == 0
    assert (tmp_path / "run" / "samples" / "step-0000050.png").is_file()
    up = Upsampler.from_pretrained(tmp_path / "run" / "model")
    assert up.config == cfg.model
    assert upsample(up, images(2, 16), steps=2).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("augmentation", ["blur", "bsr"])
def test_collate_makes_the_models_conditioning_and_crops(augmentation):
    """The collate gives what Upsampler.conditioning + aligned crops give, from a generator seeded by the items'
    aug_seeds; only small crops travel to the step."""
    from unclip.train.data import mix_seed

    cfg = small_train_config(**{"model.augmentation": augmentation, "model.max_aug_level": 0.4})
    task, scale, crop = UpsamplerTrainTask(cfg), cfg.model.scale, cfg.crop_size
    torch.manual_seed(0)
    dataset = task.train_dataset()
    items = [dataset[i] for i in range(6)]
    rng = torch.get_rng_state()
    batch = task.collate_fn(items)
    assert torch.equal(torch.get_rng_state(), rng), "the collate draws from its own generator only"
    assert set(batch) == {"x0", "low_res_up", "aug_level", "index", "num_skipped", "skip_reasons"}, "no full images"
    assert batch["x0"].shape == batch["low_res_up"].shape == (6, 3, crop, crop) == (6, 3, 4, 4)
    assert batch["x0"].dtype == batch["low_res_up"].dtype == batch["aug_level"].dtype == torch.float32
    assert batch["aug_level"].shape == (6,) and ((batch["aug_level"] >= 0) & (batch["aug_level"] < 0.4)).all()
    assert batch["x0"].min() >= -1 and batch["x0"].max() <= 1 and batch["num_skipped"] == 0

    g = torch.Generator().manual_seed(mix_seed(*(item["aug_seed"] for item in items)))
    images = torch.stack([item["image"] for item in items])  # (6, 3, 16, 16) in [0, 1]
    level = torch.rand(6, generator=g) * 0.4
    cond = Upsampler(cfg.model).conditioning(torch.nn.functional.avg_pool2d(images, scale), level, g)
    x0, cond = random_crops([images * 2 - 1, cond], crop, align=scale, generator=g)
    assert torch.equal(batch["aug_level"], level)
    assert torch.equal(batch["low_res_up"], cond) and torch.equal(batch["x0"], x0)
    empty = task.collate_fn([{**items[0], "image": None, "skip_reason": "a.png: file not found"}])
    assert empty["x0"].shape == (0, 3, crop, crop) and empty["aug_level"].shape == (0,) and empty["num_skipped"] == 1
    assert empty["skip_reasons"] == ["row 0: a.png: file not found"]  # for the trainer's error on a bad dataset


def test_augmentation_follows_the_stream_position_with_or_without_workers():
    """A fixed seed gives the same batches with 0 or 1 workers, and a loader restarted part-way (a resume) gives
    the batches of the unbroken stream from there on."""
    from unclip.train.data import build_train_loader

    task = UpsamplerTrainTask(small_train_config(**{"model.augmentation": "bsr"}))
    dataset = task.train_dataset()

    def batches(workers: int, start: int = 0, n: int = 3) -> list[dict]:
        loader = build_train_loader(dataset, task.collate_fn, seed=7, micro_batch=4, world_size=1, rank=0,
                                    start=start, num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    reference, workers, resumed = batches(0), batches(1), batches(1, start=4, n=2)
    for a, b in zip(reference, workers):
        assert all(torch.equal(a[k], b[k]) for k in ("x0", "low_res_up", "aug_level", "index"))
    for a, b in zip(reference[1:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in ("x0", "low_res_up", "aug_level", "index"))
    assert not torch.equal(reference[0]["aug_level"], reference[1]["aug_level"])


def test_training_step_takes_the_collated_crops_and_degrades_nothing(monkeypatch):
    import upsamplers.model

    cfg = small_train_config(**{"model.augmentation": "bsr"})
    task = UpsamplerTrainTask(cfg)
    seen = {}

    def spy(module, args, kwargs):
        seen.update(x_t=args[0], low_res_up=kwargs["low_res_up"], aug_level=kwargs["aug_level"])

    task.model.register_forward_pre_hook(spy, with_kwargs=True)
    dataset = task.train_dataset()
    batch = task.collate_fn([dataset[i] for i in range(8)])

    def no_degradation(*args, **kwargs):
        raise AssertionError("the training step must not degrade images: the collate does")

    monkeypatch.setattr(upsamplers.model, "corrupt", no_degradation)
    torch.manual_seed(0)
    loss, metrics = task.loss(task.model, batch)
    assert torch.isfinite(loss) and "mse" in metrics
    assert torch.equal(metrics["aug_level"], batch["aug_level"].mean())
    assert seen["x_t"].shape == (8, 3, 4, 4)  # crop_size 16 // 4
    assert torch.equal(seen["low_res_up"], batch["low_res_up"]) and torch.equal(seen["aug_level"], batch["aug_level"])


def test_resume_with_workers_is_bit_identical(tmp_path):
    """A run crashed after its checkpoint and resumed with a data worker ends where an unbroken in-process run does."""
    cfg = small_train_config(**{"model.augmentation": "bsr", "train.max_steps": 4, "train.checkpoint_every": 2,
                                "train.batch_size": 4, "train.sample_every": 0})

    def run(out: Path, workers: int, crash_at: int | None = None) -> Trainer:
        torch.manual_seed(0)  # the same initial weights
        task = UpsamplerTrainTask(cfg)
        if crash_at is not None:
            loss, calls = task.loss, []

            def crashing(model, batch):
                calls.append(1)
                if len(calls) == crash_at:
                    raise RuntimeError("simulated crash")
                return loss(model, batch)

            task.loss = crashing
        trainer = Trainer(task, replace_config(cfg, {"train.num_workers": workers}).train, out)
        trainer.train()
        return trainer

    reference = run(tmp_path / "full", workers=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "split", workers=1, crash_at=4)
    resumed = run(tmp_path / "split", workers=1)
    assert resumed.step == 4 and resumed.samples_seen == reference.samples_seen
    for name, value in reference.unwrapped_model.state_dict().items():
        assert torch.equal(resumed.unwrapped_model.state_dict()[name], value), name


# ----- evaluation, configs, CLI --------------------------------------------------------------------------------
def test_psnr_and_the_bicubic_comparison():
    x = torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(psnr(x + 0.1, x), torch.tensor([20.0, 20.0]), atol=1e-4)
    torch.manual_seed(0)
    up = Upsampler(small_train_config().model)
    report = psnr_vs_bicubic(up, samples=3, aug_levels=(0.0, 0.5), steps=2, batch_size=2)
    assert report["samples"] == 3 and (report["low_res_size"], report["image_size"]) == (8, 16)
    assert set(report["model"]) == set(report["wins"]) == {"0.0", "0.5"}
    assert report["bicubic"] > 15 and all(0 <= w <= 1 for w in report["wins"].values())


def test_config_checks():
    assert TrainUpsamplerConfig().crop_size == 64, "the defaults are a valid config (64 -> 256, crops of 64)"
    with pytest.raises(ConfigError, match="bogus"):
        load_config(TrainUpsamplerConfig, {"model": {"bogus": 1}})
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(low=8, high=20)
    with pytest.raises(ValueError, match="cond_dim"):
        UpsamplerConfig(low_res_size=8, image_size=16, unet=UNetConfig(image_size=16, attention_resolutions=(),
                                                                      cond_dim=4))
    with pytest.raises(ValueError, match="crop_size"):
        small_train_config(**{"data.crop_size": 7})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_upsampler_config_loads(path):
    cfg = load_config(TrainUpsamplerConfig, path)
    assert cfg.stage == "upsampler" and cfg.crop_size == cfg.model.image_size // 4
    assert not cfg.model.unet.attention_resolutions
    if cfg.model.image_size <= 128:  # the CPU configs also build
        assert sum(p.numel() for p in Upsampler(cfg.model).parameters()) > 0


@pytest.mark.parametrize("script", ["train_upsampler", "train_decoder"])
def test_train_upsampler_cli(script, tmp_path, capsys):
    """train-upsampler trains an upsampler config; train-decoder, given one, names that command and trains it too."""
    import importlib

    main = importlib.import_module(f"unclip.cli.{script}").main
    config = tmp_path / "tiny.yaml"
    config.write_text("stage: upsampler\n")
    args = [str(config), "--output-dir", str(tmp_path / "run"),
            "--set", "model.low_res_size=8", "--set", "model.image_size=16", "--set", "model.unet.image_size=16",
            "--set", "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1, 2]",
            "--set", "model.unet.num_res_blocks=1", "--set", "model.unet.attention_resolutions=[]",
            "--set", "model.unet.groups=4", "--set", "model.sample_steps=2", "--set", "data.shapes_samples=8",
            "--set", "data.shapes_resolution=16", "--set", "train.batch_size=4", "--set", "train.max_steps=2",
            "--set", "train.progress=false", "--set", "eval.samples=3", "--set", "eval.batch_size=2"]
    assert main(args) == 0
    assert Upsampler.from_pretrained(tmp_path / "run" / "model").config.image_size == 16
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {"bicubic", "model", "wins"} <= set(report) and set(report["model"]) == {"0.0"}
    captured = capsys.readouterr()
    assert "bicubic" in captured.out and "upsampler, aug level 0.0" in captured.out
    assert ("train-upsampler is the command for upsampler configs" in captured.err) == (script == "train_decoder")
