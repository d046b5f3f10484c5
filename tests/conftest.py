"""Shared fixtures: tiny, randomly initialised open_clip models that build in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _single_threaded_torch():
    """The suite's models are tiny: one thread is faster than two, and stays fast when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_arch() -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in TINY_ARCH.items()}


@pytest.fixture(scope="session")
def tiny_clip(tiny_arch):
    from unclip.clip import Clip

    torch.manual_seed(0)
    return Clip.from_architecture(tiny_arch, model_name="tiny-test")


def refuse_resume_after_clip_retrain(main, args: list[str], clip_dir: Path, tiny_clip, tiny_arch, capsys) -> str:
    """Overwrite the CLIP at clip_dir with new weights (as retraining it there would), then resume the finished run
    `main(args)` to more steps: it must be refused in one line naming both fingerprints. Returns the old one."""
    from unclip.clip import Clip

    torch.manual_seed(1)
    Clip.from_architecture(tiny_arch, model_name="tiny-test").save_pretrained(clip_dir)  # retrained
    assert main(args + ["--set", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    old, new = tiny_clip.fingerprint(), Clip.from_pretrained(clip_dir).fingerprint()
    assert f"trained with clip_fingerprint {old}, but this run has clip_fingerprint {new}" in err
    assert "--no-resume" in err and len(err.strip().splitlines()) == 1
    return old


def build_tiny_pipeline(clip, *, upsampler_sides: tuple[int, ...] = (), seed: int = 0):
    """A randomly initialised pipeline on the tiny CLIP: 8 px decoder, then one upsampler per entry of
    `upsampler_sides` (each doubling the side). Zero-initialised output layers are filled with small noise so
    that every stage's output depends on its inputs."""
    from decoder import Decoder, DecoderConfig
    from prior import DiffusionPriorNetwork, PriorConfig
    from unclip.config import load_config
    from unclip.nn import UNetConfig
    from unclip.pipeline.pipeline import UnclipPipeline
    from unclip.settings import Sampling, StageSampling

    torch.manual_seed(seed)
    prior = DiffusionPriorNetwork(load_config(PriorConfig, dict(
        embed_dim=32, text_width=48, text_length=16, width=64, depth=2, heads=2, dim_head=32,
        schedule={"kind": "cosine", "num_timesteps": 100})))
    unet = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                      image_size=8, head_channels=16, groups=8)
    decoder = Decoder(DecoderConfig(image_size=8, embed_dim=32, text_width=48, context_dim=16, unet=unet))
    upsamplers = []
    if upsampler_sides:
        side = 8
        for target in upsampler_sides:
            upsamplers.append(tiny_upsampler(side, target))
            side = target
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (prior, decoder, *upsamplers):
            for p in module.parameters():
                if p.abs().sum() == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    stages = {"prior": StageSampling("ddim", steps=4), "decoder": StageSampling("ddim", steps=4, guidance=3.0),
              **{f"upsampler-{i}": StageSampling("ddim", steps=3) for i in range(1, len(upsamplers) + 1)}}
    return UnclipPipeline(clip, [prior, decoder, *upsamplers], Sampling(best_of=2, stages=stages))


def tiny_upsampler(low: int, high: int):
    """A randomly initialised pure-convolutional upsampler low -> high px (two levels, 8 channels)."""
    from unclip.nn import UNetConfig
    from upsamplers import Upsampler, UpsamplerConfig

    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                      image_size=high, groups=4)
    return Upsampler(UpsamplerConfig(low_res_size=low, image_size=high, unet=unet, sample_steps=3))


@pytest.fixture()
def tiny_pipeline(tiny_clip):
    return build_tiny_pipeline(tiny_clip)


@pytest.fixture(scope="module")
def cascade(tiny_clip):
    """A tiny random pipeline 8 -> 16 -> 32 px (default sampler: ddim), shared by a test module."""
    return build_tiny_pipeline(tiny_clip, upsampler_sides=(16, 32))


@pytest.fixture(scope="module")
def cascade_dir(cascade, tmp_path_factory):
    """`cascade` saved as a pipeline directory."""
    return cascade.save_pretrained(tmp_path_factory.mktemp("pipe") / "pipeline")
