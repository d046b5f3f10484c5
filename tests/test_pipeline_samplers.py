"""Per-stage samplers: each stage samples with its own `StageSampling.sampler`; `sampler` sets every stage's but a
stage whose own sampler the same call names; per call, in pipeline.json and on the command line."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch
from conftest import build_tiny_pipeline

import unclip.stage as stage_module
from unclip.cli.main import main
from unclip.config import ConfigError
from unclip.pipeline.manipulations import text_diff, vary
from unclip.pipeline.pipeline import UnclipPipeline
from unclip.settings import StageSampling

CAPTION = "a red circle on a blue background"
STAGES = ("clip", "prior", "decoder", "upsampler-1", "upsampler-2")


def with_sampling(pipe: UnclipPipeline, **settings) -> UnclipPipeline:
    """The same stages with the pipeline's sampling under `settings` (as `generate` takes them) as its own."""
    return UnclipPipeline(pipe.clip, list(pipe.stages), pipe.resolve_sampling(**settings))


def spy_samplers(monkeypatch) -> tuple[dict[str, list[str]], dict[str, list[torch.Tensor]]]:
    """Record, per stage name, the sampler each stage's sampling loop ran and what it returned (the stages run it
    through `unclip.stage.run_sampler`, which then runs as usual)."""
    calls: dict[str, list[str]] = defaultdict(list)
    outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    real = stage_module.sample

    def spy(name, *args, label, **kwargs):
        calls[label].append(name)
        outputs[label].append(real(name, *args, label=label, **kwargs).clone())
        return outputs[label][-1]

    monkeypatch.setattr(stage_module, "sample", spy)
    return calls, outputs


def bars(err: str) -> dict[str, str]:
    """{stage: sampler} of the progress bars the sampling loops drew ("dpm++2m" for dpmpp_2m, ...)."""
    return dict(re.findall(r"\r(prior|decoder|upsampler-\d) \(([^)]+)\):", err))


def test_each_stage_samples_with_its_own_sampler(cascade, monkeypatch, capsys):
    calls, _ = spy_samplers(monkeypatch)
    cascade.generate_tensors(CAPTION, 1, seed=0, sampler="ddim", prior_sampler="ddpm", upsampler_sampler="dpmpp_2m",
                             progress=True)
    assert calls == {"prior": ["ddpm"], "decoder": ["ddim"], "upsampler-1": ["dpmpp_2m"], "upsampler-2": ["dpmpp_2m"]}
    assert bars(capsys.readouterr().err) == {"prior": "ddpm", "decoder": "ddim", "upsampler-1": "dpm++2m",
                                             "upsampler-2": "dpm++2m"}
    cascade.generate(CAPTION, 1, seed=0, sampler="dpmpp_2m_sde")  # only `sampler`: every stage
    assert {stage: runs[-1] for stage, runs in calls.items()} == dict.fromkeys(cascade.names, "dpmpp_2m_sde")
    cascade.generate(CAPTION, 1, seed=0, sampling={"upsampler-2.sampler": "ddpm", "sampler": "ddim"})
    assert {stage: runs[-1] for stage, runs in calls.items()} == {
        "prior": "ddim", "decoder": "ddim", "upsampler-1": "ddim", "upsampler-2": "ddpm"}


def test_stored_stage_samplers_are_defaults_that_a_call_overrides(cascade, monkeypatch):
    pipe = with_sampling(cascade, decoder_sampler="dpmpp_2m", prior_sampler="ddpm", upsampler_sampler="ddim")
    calls, _ = spy_samplers(monkeypatch)
    pipe.generate(CAPTION, 1, seed=0)
    pipe.generate(CAPTION, 1, seed=0, sampler="dpmpp_2m_sde")  # every stage's, the stored ones too
    pipe.generate(CAPTION, 1, seed=0, sampler="dpmpp_2m_sde", prior_sampler="ddim")  # all but the one named apart
    pipe.generate(CAPTION, 1, seed=0, prior_sampler="ddim", upsampler_sampler="ddpm")  # the decoder keeps its own
    assert calls == {"prior": ["ddpm", "dpmpp_2m_sde", "ddim", "ddim"],
                     "decoder": ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde", "dpmpp_2m"],
                     "upsampler-1": ["ddim", "dpmpp_2m_sde", "dpmpp_2m_sde", "ddpm"],
                     "upsampler-2": ["ddim", "dpmpp_2m_sde", "dpmpp_2m_sde", "ddpm"]}
    s = cascade.resolve_sampling(sampler="ddpm")
    assert [s.of(name).sampler for name in cascade.names] == ["ddpm"] * 4
    assert pipe.sampling.of("decoder").sampler == "dpmpp_2m"  # a call changes nothing stored


def test_the_upsampler_sampler_changes_the_upsampled_images_and_nothing_before(cascade, monkeypatch):
    _, outputs = spy_samplers(monkeypatch)
    default = cascade.generate_tensors(CAPTION, 2, seed=0)  # sampler ddim everywhere
    same = cascade.generate_tensors(CAPTION, 2, seed=0, upsampler_sampler="ddim")
    other = cascade.generate_tensors(CAPTION, 2, seed=0, upsampler_sampler="ddpm")
    bases = outputs["decoder"]
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[0], bases[2])  # same prior and decoder output
    assert torch.equal(default, same) and (default - other).abs().max() > 1e-3
    prior_ddpm = cascade.generate_tensors(CAPTION, 2, seed=0, prior_sampler="ddpm")
    assert not torch.equal(bases[3], bases[0]) and not torch.equal(prior_ddpm, default)


def test_pipeline_json_records_the_stage_samplers_and_loads_without_them(cascade, cascade_dir, tmp_path):
    meta = json.loads((cascade_dir / "pipeline.json").read_text())
    assert {name: spec["sampler"] for name, spec in meta["sampling"]["stages"].items()} == dict.fromkeys(
        cascade.names, "ddim")
    edits = {"unnamed": {"best_of": 2, "stages": {}},
             "stored": {**meta["sampling"], "stages": {**meta["sampling"]["stages"],
                                                       "prior": {"sampler": "ddpm", "steps": 4},
                                                       "upsampler-1": {"sampler": "dpmpp_2m", "steps": 3},
                                                       "upsampler-2": {"sampler": "dpmpp_2m", "steps": 3}}}}
    for name, sampling in edits.items():
        (tmp_path / name).mkdir()
        for stage in STAGES:
            (tmp_path / name / stage).symlink_to(cascade_dir / stage)
        (tmp_path / name / "pipeline.json").write_text(json.dumps({**meta, "sampling": sampling}))
    unnamed = UnclipPipeline.from_pretrained(tmp_path / "unnamed")  # each stage samples with its own defaults
    assert unnamed.sampling.stages == {name: stage.default_sampling() for name, stage in cascade.named_stages()}
    stored = UnclipPipeline.from_pretrained(tmp_path / "stored")
    assert stored.sampling == cascade.resolve_sampling(prior_sampler="ddpm", upsampler_sampler="dpmpp_2m")
    again = UnclipPipeline.from_pretrained(stored.save_pretrained(tmp_path / "again"))
    assert again.sampling == stored.sampling


@pytest.mark.parametrize("key", ["sampler", "prior_sampler", "decoder_sampler", "upsampler_sampler"])
def test_a_bad_stage_sampler_is_a_value_error_naming_the_registered_ones(cascade, key):
    with pytest.raises(ConfigError, match=r"^sampler: 'euler' is not a registered sampler; expected one of ddim, "
                                          r"ddpm, dpmpp_2m, dpmpp_2m_sde, analytic_ddpm"):
        StageSampling(sampler="euler")
    with pytest.raises(ValueError, match=r"^(prior|decoder|upsampler-1).sampler: 'euler' is not a registered "
                                         r"sampler; expected one of ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, analytic_ddpm"):
        cascade.generate(CAPTION, 1, **{key: "euler"})  # the message names the stage


def test_decoder_eta_concerns_the_decoders_sampler_only(cascade):
    s = cascade.resolve_sampling(decoder_eta=0.5, prior_sampler="ddpm", upsampler_sampler="dpmpp_2m")
    assert (s.of("decoder").sampler, s.of("decoder").eta) == ("ddim", 0.5)
    assert s.of("prior").eta == 0.0 and s.of("upsampler-1").eta == 0.0
    with pytest.raises(ValueError, match=r"decoder: eta applies to samplers that take it \(ddim\)"):
        cascade.resolve_sampling(sampler="ddpm", decoder_eta=0.5, prior_sampler="ddim", upsampler_sampler="ddim")
    assert cascade.resolve_sampling(prior_eta=1.0).of("prior").eta == 1.0  # each stage has its own


def test_manipulations_upsample_with_the_pipelines_upsampler_sampler(cascade, monkeypatch, capsys):
    pipe = with_sampling(cascade, sampler="dpmpp_2m", upsampler_sampler="ddpm")
    calls, _ = spy_samplers(monkeypatch)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vary(pipe, image, 1, progress=True)
    text_diff(pipe, image, "a red circle", "a blue square", 2)
    assert calls == {"decoder": ["ddim", "ddim"], "upsampler-1": ["ddpm", "ddpm"], "upsampler-2": ["ddpm", "ddpm"]}
    assert bars(capsys.readouterr().err) == {"decoder": "ddim", "upsampler-1": "ddpm", "upsampler-2": "ddpm"}


def test_cli_generate_and_eval_take_per_stage_samplers(cascade_dir, tmp_path, monkeypatch, capsys):
    import unclip.pipeline.evaluation as evaluation

    common = ["--pipeline", str(cascade_dir), "--device", "cpu"]
    assert main(["generate", CAPTION, "-n", "1", *common, "--out", str(tmp_path / "grid.png"), "--out-dir",
                 str(tmp_path / "images"), "--prior-sampler", "ddpm", "--upsampler-sampler", "dpmpp_2m"]) == 0
    assert bars(capsys.readouterr().err) == {"prior": "ddpm", "decoder": "ddim", "upsampler-1": "dpm++2m",
                                             "upsampler-2": "dpm++2m"}
    record = json.loads((tmp_path / "images" / "captions.json").read_text())
    assert {name: spec["sampler"] for name, spec in record["sampling"]["stages"].items()} == {
        "prior": "ddpm", "decoder": "ddim", "upsampler-1": "dpmpp_2m", "upsampler-2": "dpmpp_2m"}
    seen = {}

    def evaluate(pipe, **kwargs):
        seen.update(kwargs)
        raise ValueError("stopped before generating")

    monkeypatch.setattr(evaluation, "evaluate_pipeline", evaluate)
    assert main(["eval", *common, "--sampler", "ddpm", "--upsampler-sampler", "ddim"]) == 2
    assert seen["sampling"] == {"sampler": "ddpm", "upsampler.sampler": "ddim"}
    with pytest.raises(SystemExit):
        main(["generate", CAPTION, *common, "--prior-sampler", "euler"])
    assert "argument --prior-sampler: invalid choice: 'euler'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--sampler {ddim,ddpm,dpmpp_2m,dpmpp_2m_sde,analytic_ddpm} every stage's sampler, but for a stage whose " \
           "own --STAGE-sampler is given" in help_text
    assert "--prior-sampler {ddim,ddpm,dpmpp_2m,dpmpp_2m_sde,analytic_ddpm}" in help_text
    assert "--upsampler-sampler {ddim,ddpm,dpmpp_2m,dpmpp_2m_sde,analytic_ddpm}" in help_text


def test_the_prior_samples_with_analytic_variances_once_calibrated(tiny_clip, tmp_path):
    """prior_sampler "analytic_ddpm" (the paper's) needs a calibrated prior: refused before sampling without the
    moments, honoured with them, and the moments survive a float16 pipeline at full precision."""
    from prior.analytic import calibrate_prior

    pipe = build_tiny_pipeline(tiny_clip)
    with pytest.raises(ValueError, match="prior: sampler 'analytic_ddpm' needs the prior's Analytic-DPM moments"):
        pipe.generate([CAPTION], prior_sampler="analytic_ddpm", progress=False)
    with pytest.raises(ValueError, match="'analytic' is not a registered sampler; expected one of .*analytic_ddpm"):
        StageSampling(sampler="analytic")
    with pytest.raises(ValueError, match="the decoder's sampler analytic_ddpm needs moments"):
        pipe.resolve_sampling(decoder_sampler="analytic_ddpm")  # the calibrated prior's alone
    text = tiny_clip.encode_text([CAPTION, "a blue square on a red background"])
    calibrate_prior(pipe.prior, text, text.text_embed, progress=False)
    moments = pipe.prior.eps_moments.clone()
    pipe.prior.eps_moments = torch.full_like(moments, 0.25)  # wide variances: visibly not DDPM's
    images = {s: pipe.generate_tensors([CAPTION], prior_sampler=s, seed=0, progress=False)
              for s in ("ddpm", "analytic_ddpm")}
    assert images["analytic_ddpm"].shape == images["ddpm"].shape
    assert not torch.allclose(images["analytic_ddpm"], images["ddpm"])
    pipe.prior.eps_moments = moments
    stored = with_sampling(pipe, prior_sampler="analytic_ddpm").save_pretrained(tmp_path / "p", dtype=torch.float16)
    loaded = UnclipPipeline.from_pretrained(stored)
    assert loaded.sampling.of("prior").sampler == "analytic_ddpm"
    torch.testing.assert_close(loaded.prior.eps_moments, moments, rtol=0, atol=0)
