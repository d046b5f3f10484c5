"""The stage protocol and the pipeline as a loop over stages: a new sampler and a new kind of stage plug in without a
change to the pipeline; an image does not depend on the other captions of its batch; the callback sees every step
of every stage; format-1 pipeline directories still load; a pipeline may lack a prior; importing the library
imports no stage, and any stage imports first without a cycle."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import unclip
from unclip.checkpoint import load_pretrained_dir, load_state_dict_strict, save_pretrained_dir
from unclip.diffusion import (
    SAMPLERS,
    alphas_cumprod_at,
    make_denoiser,
    make_schedule,
    randn,
    register_sampler,
    timestep_subset,
)
from unclip.images import to_signed_range, to_unit_range
from unclip.pipeline.default import DEFAULT_PIPELINE
from unclip.pipeline.pipeline import UnclipPipeline
from unclip.settings import Sampling, StageSampling
from unclip.stage import CascadeState, SamplingRun, Stage, register_stage, run_sampler, stage_class, unregister_stage

CAPTION = "a red circle on a blue background"
OTHER = "a green cross on a white background"
ROOT = Path(__file__).resolve().parents[1]


# ----- a toy sampler and a toy stage, written against the registry and the protocol alone ------------------------
def sample_toy_euler(denoiser, x_T, schedule, steps, *, spacing="trailing", generator=None, cond=None, callback=None,
                     progress=True, label=None, calls=None):
    """Euler on the probability-flow ODE in x0 form: x_next = sqrt(abar_next) (x0 + r (x / sqrt(abar) - x0)),
    r = sigma_next / sigma in the variables x / alpha. The last step (abar = 1) lands on the predicted x0."""
    ts = timestep_subset(schedule.num_timesteps, steps, spacing).tolist()
    alpha_bars = [alphas_cumprod_at(schedule, t) for t in ts] + [1.0]
    x = x_T
    for i, t in enumerate(ts):
        d = denoiser(x, torch.full((x.shape[0],), t, device=x.device), **(cond or {}))
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        ratio = math.sqrt((1 - a_next) / a_next) / math.sqrt((1 - a) / a)
        x = math.sqrt(a_next) * (d.x0 + ratio * (x / math.sqrt(a) - d.x0))
        if callback is not None:
            callback(i, t, x, d)
    return x


@dataclass(frozen=True)
class ToyConfig:
    low_res_size: int  # side of the images it reads
    image_size: int  # side of the images it makes (twice low_res_size)


class ToyNearest(nn.Module):
    """An upsampler by 2 whose network predicts x0 = gain * (the nearest-upsampled input): sampled by any
    deterministic sampler, its images are exactly the input's pixels doubled (with gain 1)."""

    role: ClassVar[str] = "upsampler"
    kind: ClassVar[str] = "toy-nearest"
    clip_fingerprint: ClassVar[None] = None

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.gain = nn.Parameter(torch.ones(()))
        self.schedule = make_schedule("cosine", 100)

    def forward(self, x_t: Tensor, t: Tensor, *, low_res_up: Tensor) -> Tensor:
        return self.gain * low_res_up  # x0 (b, 3, H, W)

    def default_sampling(self) -> StageSampling:
        return StageSampling(sampler="ddim", steps=3)

    def check_sampling(self, spec: StageSampling) -> None:
        if spec.guidance != 1.0:
            raise ValueError("the toy stage takes no guidance")

    def sampler_options(self) -> dict[str, Any]:
        return {}

    def denoiser(self, cond, spec):
        return make_denoiser(lambda x_t, t: self(x_t, t, **cond), self.schedule, "x0")

    def sample(self, state: CascadeState, spec: StageSampling, run: SamplingRun, *, name: str,
               x_T: Tensor | None = None) -> CascadeState:
        low_res_up = to_signed_range(F.interpolate(state.images, scale_factor=2, mode="nearest"))
        if x_T is None:
            x_T = randn(low_res_up.shape, generator=run.generator, device=low_res_up.device)
        x0 = run_sampler(self, name, spec, x_T, {"low_res_up": low_res_up}, run)
        return state.but(images=to_unit_range(x0).clamp(0, 1))

    def save_pretrained(self, path, dtype=None) -> Path:
        config = {"low_res_size": self.config.low_res_size, "image_size": self.config.image_size}
        return save_pretrained_dir(path, kind=self.kind, config=config, state_dict=self.state_dict())

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> ToyNearest:
        meta, state = load_pretrained_dir(path, kind=cls.kind)
        stage = cls(ToyConfig(**meta["config"]))
        load_state_dict_strict(stage, state, source=path)
        return stage.to(device=device, dtype=dtype).eval()


@pytest.fixture
def toys():
    """The toy sampler (as "toy", counting its runs by stage name) and stage, registered for one test only."""
    runs: list[str] = []

    def toy(denoiser, x_T, schedule, steps, *, spacing="trailing", generator=None, cond=None, callback=None,
            progress=True, label=None):
        runs.append(label)
        return sample_toy_euler(denoiser, x_T, schedule, steps, spacing=spacing, cond=cond, callback=callback)

    register_sampler("toy", toy)
    register_stage(ToyNearest)
    yield runs
    del SAMPLERS["toy"]
    unregister_stage(ToyNearest.kind)


def test_a_toy_sampler_and_a_toy_stage_run_in_generate_and_round_trip(toys, tiny_pipeline, tmp_path):
    toy = ToyNearest(ToyConfig(low_res_size=8, image_size=16))
    assert isinstance(toy, Stage) and stage_class("toy-nearest") is ToyNearest
    pipe = UnclipPipeline(tiny_pipeline.clip, [tiny_pipeline.prior, tiny_pipeline.decoder, toy], tiny_pipeline.sampling)
    assert pipe.names == ["prior", "decoder", "upsampler-1"]
    assert pipe.sampling.of("upsampler-1") == toy.default_sampling()  # a stage the sampling does not name
    steps: list[tuple[str, int]] = []
    out = pipe.generate_tensors([CAPTION, OTHER], 2, seed=0, sampling={"upsampler-1.sampler": "toy"},
                                callback=lambda stage, i, t, x_t, denoised: steps.append((stage, i)))
    assert out.shape == (4, 3, 16, 16) and toys == ["upsampler-1"]
    assert [i for stage, i in steps if stage == "upsampler-1"] == [0, 1, 2]
    base = tiny_pipeline.generate_tensors([CAPTION, OTHER], 2, seed=0)  # the same prior and decoder draws
    assert base.shape == (4, 3, 8, 8)
    torch.testing.assert_close(out, F.interpolate(base, scale_factor=2, mode="nearest"), rtol=0, atol=1e-5)

    with torch.no_grad():
        toy.gain.fill_(0.5)  # a weight that must survive the round trip
    pipe.sampling = pipe.resolve_sampling(upsampler_sampler="toy", upsampler_steps=2)
    saved = pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((saved / "upsampler-1" / "config.json").read_text())["kind"] == "toy-nearest"
    loaded = UnclipPipeline.from_pretrained(saved)
    assert type(loaded.upsamplers[0]) is ToyNearest and float(loaded.upsamplers[0].gain.detach()) == 0.5
    assert loaded.sampling == pipe.sampling and loaded.sampling.of("upsampler-1") == StageSampling("toy", 2)
    toys.clear()
    again = loaded.generate_tensors([CAPTION], 1, seed=1)
    assert toys == ["upsampler-1"] and torch.equal(again, pipe.generate_tensors([CAPTION], 1, seed=1))
    halved = F.interpolate(tiny_pipeline.generate_tensors([CAPTION], 1, seed=1), scale_factor=2, mode="nearest")
    torch.testing.assert_close(again, halved / 2 + 0.25, rtol=0, atol=1e-5)  # x0 = 0.5 (2 p - 1), back in [0, 1]


# ----- one generator per image -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return unclip.load_pipeline(device="cpu")


FAST = {"prior_steps": 2, "decoder_steps": 3, "upsampler_steps": [1, 1]}


def test_an_image_is_unchanged_when_another_caption_joins_the_batch(shipped):
    alone = shipped.generate_tensors([CAPTION], 2, seed=0, **FAST)
    joined = shipped.generate_tensors([CAPTION, OTHER], 2, seed=0, **FAST)
    assert alone.shape == (2, 3, 128, 128) and joined.shape == (4, 3, 128, 128)
    torch.testing.assert_close(joined[:2], alone, rtol=0, atol=1e-4)
    # With one generator shared by the batch, the second caption's draws shift the first's: the test can fail.
    shared = [shipped.generate_tensors(captions, 2, generator=torch.Generator().manual_seed(0), **FAST)
              for captions in ([CAPTION], [CAPTION, OTHER])]
    assert (shared[1][0] - shared[0][0]).abs().max() > 0.1


# ----- the callback ----------------------------------------------------------------------------------------------
def test_the_callback_sees_every_step_of_every_stage_in_cascade_order(cascade):
    samplers = {"prior": "ddpm", "decoder": "dpmpp_2m", "upsampler-1": "ddim", "upsampler-2": "dpmpp_2m_sde"}
    steps = {"prior": 2, "decoder": 5, "upsampler-1": 3, "upsampler-2": 1}
    overrides = {f"{name}.{field}": value[name] for name in cascade.names
                 for field, value in (("sampler", samplers), ("steps", steps))}
    seen: list[tuple[str, int, tuple[int, ...]]] = []
    out = cascade.generate_tensors([CAPTION, OTHER], 1, seed=0, sampling=overrides,
                                   callback=lambda stage, i, t, x_t, d: seen.append((stage, i, tuple(x_t.shape))))
    assert out.shape == (2, 3, 32, 32)
    assert [(stage, i) for stage, i, _ in seen] == [(name, i) for name in cascade.names for i in range(steps[name])]
    shapes = {stage: shape for stage, _, shape in seen}
    assert shapes == {"prior": (4, 32), "decoder": (2, 3, 8, 8), "upsampler-1": (2, 3, 16, 16),
                      "upsampler-2": (2, 3, 32, 32)}  # the prior's rows: best_of 2 per image


# ----- format-1 directories --------------------------------------------------------------------------------------
def test_a_format_1_pipeline_directory_loads_with_the_sampling_its_file_says(shipped, tmp_path):
    """The shipped pipeline as it was stored in format 1 (its pipeline.json then, kept in tests/data)."""
    old = tmp_path / "format-1"
    shutil.copytree(DEFAULT_PIPELINE, old)
    shutil.copyfile(Path(__file__).parent / "data" / "shipped-pipeline-format-1.json", old / "pipeline.json")
    assert json.loads((old / "pipeline.json").read_text())["format_version"] == 1
    v1 = UnclipPipeline.from_pretrained(old)
    ddpm = {name: StageSampling(sampler="ddpm", steps=steps, guidance=guidance) for name, steps, guidance in
            (("prior", 6, 1.0), ("decoder", 25, 3.0), ("upsampler-1", 3, 1.0), ("upsampler-2", 2, 1.0))}
    assert v1.sampling == Sampling(best_of=4, stages=ddpm)
    assert v1.names == ["prior", "decoder", "upsampler-1", "upsampler-2"] and v1.image_size == 128

    new = v1.save_pretrained(tmp_path / "format-2")
    meta = json.loads((new / "pipeline.json").read_text())
    assert meta["format_version"] == 2 and meta["stages"] == v1.names
    v2 = UnclipPipeline.from_pretrained(new)
    assert v2.sampling == v1.sampling == shipped.sampling  # the shipped directory, in format 2 now
    torch.testing.assert_close(v2.generate_tensors(CAPTION, 1, seed=0, **FAST),
                               shipped.generate_tensors(CAPTION, 1, seed=0, **FAST), rtol=0, atol=0)


# ----- a pipeline without a prior --------------------------------------------------------------------------------
def test_a_pipeline_without_a_prior_decodes_and_upsamples_but_cannot_generate(cascade, tmp_path):
    pipe = UnclipPipeline(cascade.clip, [cascade.decoder, *cascade.upsamplers])
    assert pipe.prior is None and pipe.names == ["decoder", "upsampler-1", "upsampler-2"]
    with pytest.raises(ValueError, match="no prior"):
        pipe.generate(CAPTION, 1, seed=0)
    g = torch.Generator().manual_seed(0)
    image_embed = F.normalize(torch.randn(2, 32, generator=g), dim=-1)
    decoded = pipe.decoder.sample(CascadeState(image_embed=image_embed), pipe.sampling.of("decoder"), SamplingRun(),
                                  name="decoder").images
    assert decoded.shape == (2, 3, 8, 8) and 0 <= decoded.min() and decoded.max() <= 1
    up = pipe.upsample(decoded, generator=torch.Generator().manual_seed(1))
    assert up.shape == (2, 3, 32, 32)
    assert torch.equal(up, cascade.upsample(decoded, generator=torch.Generator().manual_seed(1)))
    assert len(unclip.vary(torch.rand(1, 3, 32, 32), n=2, pipeline=pipe)) == 2  # image -> (z_i, x_T) -> images
    loaded = UnclipPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "no-prior"))
    assert loaded.prior is None and loaded.names == pipe.names


# ----- layering --------------------------------------------------------------------------------------------------
def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_unclip_imports_no_stage():
    stages = _python("import unclip, sys; "
                     "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prior', 'decoder', 'upsamplers')))")
    assert stages == "[]"


@pytest.mark.parametrize(("first", "kind"), [("prior", "prior"), ("decoder", "decoder"), ("upsamplers", "upsampler")])
def test_each_stage_imports_first_without_a_cycle(first, kind):
    """A stage package imported before anything else brings the foundation it needs; the library then finds the
    stage's class by its kind."""
    out = _python(f"import {first}, unclip; from unclip.stage import stage_class; "
                  f"print(stage_class('{kind}').__module__)")
    assert out == f"{first}.model"
