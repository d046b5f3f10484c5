"""Per-stage samplers: `sampler` is the decoder's and the other stages' default; `prior_sampler` and
`upsampler_sampler` set the prior's and the upsamplers' apart, per call, in pipeline.json and on the command line."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny_pipeline

import unclip.pipeline.pipeline as pipeline_module
from unclip.cli.main import main
from unclip.pipeline.manipulations import text_diff, vary
from unclip.pipeline.pipeline import GenerationDefaults, UnclipPipeline

CAPTION = "a red circle on a blue background"
STAGES = ("clip", "prior", "decoder", "upsampler-1", "upsampler-2")


def with_defaults(pipe: UnclipPipeline, **defaults) -> UnclipPipeline:
    """The same stages with other generation defaults."""
    return UnclipPipeline(pipe.clip, pipe.prior, pipe.decoder, pipe.upsamplers, replace(pipe.defaults, **defaults))


def spy_stages(monkeypatch) -> dict[str, list[str]]:
    """Record the sampler the pipeline hands each stage's sampling function (which then runs as usual)."""
    calls: dict[str, list[str]] = {"prior": [], "decoder": [], "upsamplers": []}

    def spy(stage: str, real):
        def run(*args, **kwargs):
            calls[stage].append(kwargs["sampler"])
            return real(*args, **kwargs)
        return run

    for name, stage in (("sample_image_embeds", "prior"), ("decode", "decoder"), ("run_cascade", "upsamplers")):
        monkeypatch.setattr(pipeline_module, name, spy(stage, getattr(pipeline_module, name)))
    return calls


def bars(err: str) -> dict[str, str]:
    """{stage: sampler} of the progress bars the sampling loops drew ("dpm++2m" for dpmpp_2m, ...)."""
    return dict(re.findall(r"\r(prior|decoder|upsampler \d+->\d+) \(([^)]+)\):", err))


def test_each_stage_samples_with_its_own_sampler(cascade, monkeypatch, capsys):
    calls = spy_stages(monkeypatch)
    cascade.generate_tensors(CAPTION, 1, seed=0, sampler="ddim", prior_sampler="ddpm", upsampler_sampler="dpmpp_2m",
                             progress=True)
    assert calls == {"prior": ["ddpm"], "decoder": ["ddim"], "upsamplers": ["dpmpp_2m"]}
    assert bars(capsys.readouterr().err) == {"prior": "ddpm", "decoder": "ddim", "upsampler 8->16": "dpm++2m",
                                             "upsampler 16->32": "dpm++2m"}
    cascade.generate(CAPTION, 1, seed=0, sampler="dpmpp_2m_sde")  # only `sampler`: every stage, as before
    assert calls == {"prior": ["ddpm", "dpmpp_2m_sde"], "decoder": ["ddim", "dpmpp_2m_sde"],
                     "upsamplers": ["dpmpp_2m", "dpmpp_2m_sde"]}


def test_stored_stage_samplers_are_defaults_that_a_call_overrides(cascade, monkeypatch):
    pipe = with_defaults(cascade, sampler="dpmpp_2m", prior_sampler="ddpm", upsampler_sampler="ddim")
    calls = spy_stages(monkeypatch)
    pipe.generate(CAPTION, 1, seed=0)
    pipe.generate(CAPTION, 1, seed=0, sampler="dpmpp_2m_sde")  # the decoder's only: the others have their own
    pipe.generate(CAPTION, 1, seed=0, prior_sampler="ddim", upsampler_sampler="ddpm")
    assert calls == {"prior": ["ddpm", "ddpm", "ddim"], "decoder": ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m"],
                     "upsamplers": ["ddim", "ddim", "ddpm"]}
    s = cascade.settings(sampler="ddpm")  # stored None: follow `sampler`
    assert (s.prior_sampler, s.upsampler_sampler) == (None, None)
    assert [s.sampler_of(stage) for stage in ("prior", "decoder", "upsampler")] == ["ddpm"] * 3


def test_the_upsampler_sampler_changes_the_upsampled_images_and_nothing_before(cascade, monkeypatch):
    bases = []
    real = pipeline_module.run_cascade

    def keep_base(images, *args, **kwargs):
        bases.append(images.clone())
        return real(images, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "run_cascade", keep_base)
    default = cascade.generate_tensors(CAPTION, 2, seed=0)  # sampler ddim everywhere
    same = cascade.generate_tensors(CAPTION, 2, seed=0, upsampler_sampler="ddim")
    other = cascade.generate_tensors(CAPTION, 2, seed=0, upsampler_sampler="ddpm")
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[0], bases[2])  # same prior and decoder output
    assert torch.equal(default, same) and (default - other).abs().max() > 1e-3
    prior_ddpm = cascade.generate_tensors(CAPTION, 2, seed=0, prior_sampler="ddpm")
    assert not torch.equal(bases[3], bases[0]) and not torch.equal(prior_ddpm, default)


def test_pipeline_json_records_the_stage_samplers_and_loads_without_them(cascade, cascade_dir, tmp_path):
    meta = json.loads((cascade_dir / "pipeline.json").read_text())
    assert meta["defaults"]["prior_sampler"] is None and meta["defaults"]["upsampler_sampler"] is None
    for name, edit in (("old", {}), ("stored", {"prior_sampler": "ddpm", "upsampler_sampler": "dpmpp_2m"})):
        (tmp_path / name).mkdir()
        for stage in STAGES:
            (tmp_path / name / stage).symlink_to(cascade_dir / stage)
        defaults = {k: v for k, v in meta["defaults"].items() if k not in ("prior_sampler", "upsampler_sampler")}
        (tmp_path / name / "pipeline.json").write_text(json.dumps({**meta, "defaults": {**defaults, **edit}}))
    old = UnclipPipeline.from_pretrained(tmp_path / "old")  # written before the keys existed
    assert old.defaults == cascade.defaults and old.defaults.sampler_of("prior") == cascade.defaults.sampler
    stored = UnclipPipeline.from_pretrained(tmp_path / "stored")
    assert stored.defaults == replace(cascade.defaults, prior_sampler="ddpm", upsampler_sampler="dpmpp_2m")
    again = UnclipPipeline.from_pretrained(stored.save_pretrained(tmp_path / "again"))
    assert again.defaults == stored.defaults


@pytest.mark.parametrize("key", ["prior_sampler", "upsampler_sampler"])
def test_a_bad_stage_sampler_is_a_value_error_naming_its_key(cascade, key):
    names = "ddim, ddpm, dpmpp_2m, dpmpp_2m_sde" + (", analytic_ddpm" if key == "prior_sampler" else "")
    message = rf"^{key} must be one of {names} \(or None: use `sampler`\), got 'euler'$"
    with pytest.raises(ValueError, match=message):
        GenerationDefaults(**{key: "euler"})
    with pytest.raises(ValueError, match=message):
        cascade.generate(CAPTION, 1, **{key: "euler"})


def test_decoder_eta_concerns_the_decoders_sampler_only(cascade):
    s = cascade.settings(decoder_eta=0.5, prior_sampler="ddpm", upsampler_sampler="dpmpp_2m")
    assert (s.sampler, s.decoder_eta) == ("ddim", 0.5)
    with pytest.raises(ValueError, match=r"decoder_eta \(DDIM's noise\) applies to the ddim sampler only"):
        cascade.settings(sampler="ddpm", decoder_eta=0.5, prior_sampler="ddim", upsampler_sampler="ddim")


def test_manipulations_upsample_with_the_pipelines_upsampler_sampler(cascade, monkeypatch, capsys):
    pipe = with_defaults(cascade, sampler="dpmpp_2m", upsampler_sampler="ddpm")
    calls = spy_stages(monkeypatch)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vary(pipe, image, 1, progress=True)
    text_diff(pipe, image, "a red circle", "a blue square", 2)
    assert calls["upsamplers"] == ["ddpm", "ddpm"]
    assert bars(capsys.readouterr().err) == {"decoder": "ddim", "upsampler 8->16": "ddpm", "upsampler 16->32": "ddpm"}


def test_cli_generate_and_eval_take_per_stage_samplers(cascade_dir, tmp_path, monkeypatch, capsys):
    import unclip.pipeline.evaluation as evaluation

    common = ["--pipeline", str(cascade_dir), "--device", "cpu"]
    assert main(["generate", CAPTION, "-n", "1", *common, "--out", str(tmp_path / "grid.png"), "--out-dir",
                 str(tmp_path / "images"), "--prior-sampler", "ddpm", "--upsampler-sampler", "dpmpp_2m"]) == 0
    assert bars(capsys.readouterr().err) == {"prior": "ddpm", "decoder": "ddim", "upsampler 8->16": "dpm++2m",
                                             "upsampler 16->32": "dpm++2m"}
    record = json.loads((tmp_path / "images" / "captions.json").read_text())
    assert (record["prior_sampler"], record["upsampler_sampler"]) == ("ddpm", "dpmpp_2m")
    seen = {}

    def evaluate(pipe, **kwargs):
        seen.update(kwargs)
        raise ValueError("stopped before generating")

    monkeypatch.setattr(evaluation, "evaluate_pipeline", evaluate)
    assert main(["eval", *common, "--sampler", "ddpm", "--upsampler-sampler", "ddim"]) == 2
    assert (seen["sampler"], seen["upsampler_sampler"]) == ("ddpm", "ddim") and "prior_sampler" not in seen
    with pytest.raises(SystemExit):
        main(["generate", CAPTION, *common, "--prior-sampler", "euler"])
    assert "argument --prior-sampler: invalid choice: 'euler'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--prior-sampler {ddim,ddpm,dpmpp_2m,dpmpp_2m_sde,analytic_ddpm} the prior's sampler (default: the " \
           "pipeline's prior_sampler, or where that is None, the decoder's sampler)" in help_text
    assert "every upsampler's sampler (default: the pipeline's upsampler_sampler, or where that is None" in help_text


def test_the_prior_samples_with_analytic_variances_once_calibrated(tiny_clip, tmp_path):
    """prior_sampler "analytic_ddpm" (the paper's) needs a calibrated prior: refused before sampling without the
    moments, honoured with them, and the moments survive a float16 pipeline at full precision."""
    from prior.analytic import calibrate_prior

    pipe = build_tiny_pipeline(tiny_clip)
    with pytest.raises(ValueError, match="analytic_ddpm needs the prior's Analytic-DPM moments"):
        pipe.generate([CAPTION], prior_sampler="analytic_ddpm", progress=False)
    with pytest.raises(ValueError, match="prior_sampler must be one of .*analytic_ddpm"):
        GenerationDefaults(prior_sampler="analytic")
    with pytest.raises(ValueError, match="upsampler_sampler must be one of ddim, ddpm, dpmpp_2m, dpmpp_2m_sde \\("):
        GenerationDefaults(upsampler_sampler="analytic_ddpm")  # the prior's alone
    text = tiny_clip.encode_text([CAPTION, "a blue square on a red background"])
    calibrate_prior(pipe.prior, text, text.text_embed, progress=False)
    moments = pipe.prior.eps_moments.clone()
    pipe.prior.eps_moments = torch.full_like(moments, 0.25)  # wide variances: visibly not DDPM's
    images = {s: pipe.generate_tensors([CAPTION], prior_sampler=s, seed=0, progress=False)
              for s in ("ddpm", "analytic_ddpm")}
    assert images["analytic_ddpm"].shape == images["ddpm"].shape
    assert not torch.allclose(images["analytic_ddpm"], images["ddpm"])
    pipe.prior.eps_moments = moments
    stored = with_defaults(pipe, prior_sampler="analytic_ddpm").save_pretrained(tmp_path / "p", dtype=torch.float16)
    loaded = UnclipPipeline.from_pretrained(stored)
    assert loaded.defaults.prior_sampler == "analytic_ddpm"
    torch.testing.assert_close(loaded.prior.eps_moments, moments, rtol=0, atol=0)
