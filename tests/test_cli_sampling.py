"""The CLI's sampling settings come from `StageSampling`'s fields: a flag per field and stage group, today's flag
names, `--set KEY=VALUE`, one overrides mapping for the pipeline, and captions.json records what was resolved."""

from __future__ import annotations

import dataclasses
import json

import pytest

import unclip.cli.pipeline_commands as commands
import unclip.cli.sampling as cli_sampling
from unclip.cli.main import build_parser, main
from unclip.cli.sampling import STAGE_GROUPS, sampling_overrides
from unclip.config import config_to_dict
from unclip.diffusion import SAMPLERS
from unclip.settings import Sampling, StageSampling, sampling_fields

CAPTION = "a red circle on a blue background"


def parse(*flags: str) -> dict:
    """The overrides `unclip generate` hands the pipeline for these flags."""
    return sampling_overrides(build_parser().parse_args(["generate", CAPTION, *flags]))


def help_lines(command: str, capsys, monkeypatch) -> dict[str, str]:
    """option -> what `unclip COMMAND --help` says of it (printed wide enough not to wrap the help texts)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    entries: dict[str, str] = {}
    option = None
    for line in capsys.readouterr().out.splitlines():
        line = line.strip()
        if line.startswith("-"):
            option = line.split()[0].rstrip(",")
            entries[option] = line
        elif option is not None and line:
            entries[option] += " " + line
        else:
            option = None
    return entries


def example(f: dataclasses.Field) -> str:
    return "ddpm" if f.name == "sampler" else str(f.default + 1)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_every_field_is_a_flag_of_every_stage_group_with_its_help(command, capsys, monkeypatch):
    lines = help_lines(command, capsys, monkeypatch)
    for group in STAGE_GROUPS:
        for f in sampling_fields():
            assert f.metadata["help"] in lines[f"--{group}-{f.name}"]
            value = type(f.default)(example(f))
            argv = [command, *([CAPTION] if command == "generate" else []), f"--{group}-{f.name}", example(f)]
            assert sampling_overrides(build_parser().parse_args(argv)) == {f"{group}.{f.name}": value}
    assert "--sampler" in lines and "--best-of" in lines and "--set" in lines


@pytest.mark.parametrize("flag", ["--sampler", "--prior-sampler", "--decoder-sampler", "--upsampler-sampler"])
def test_the_sampler_flags_offer_the_registered_samplers(flag, capsys):
    key = "sampler" if flag == "--sampler" else flag.removeprefix("--").replace("-", ".", 1)
    for name in SAMPLERS:
        assert parse(flag, name) == {key: name}
    with pytest.raises(SystemExit) as e:
        parse(flag, "euler")
    assert e.value.code == 2 and "invalid choice: 'euler'" in capsys.readouterr().err
    assert "analytic_ddpm" in SAMPLERS


def test_a_field_added_to_stage_sampling_is_a_flag(capsys, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class WithClamp(StageSampling):
        clamp: float = dataclasses.field(default=1.0, metadata={"help": "a new knob"})

    monkeypatch.setattr(cli_sampling, "StageSampling", WithClamp)
    monkeypatch.setattr(cli_sampling, "sampling_fields", lambda: dataclasses.fields(WithClamp))
    assert "a new knob" in help_lines("generate", capsys, monkeypatch)["--decoder-clamp"]
    assert parse("--decoder-clamp", "2", "--upsampler-clamp", "1", "3") == {"decoder.clamp": 2.0,
                                                                           "upsampler.clamp": [1.0, 3.0]}


@pytest.mark.parametrize("flags, overrides", [
    (["--sampler", "ddim"], {"sampler": "ddim"}),
    (["--prior-sampler", "analytic_ddpm"], {"prior.sampler": "analytic_ddpm"}),
    (["--upsampler-sampler", "dpmpp_2m"], {"upsampler.sampler": "dpmpp_2m"}),
    (["--prior-steps", "6"], {"prior.steps": 6}),
    (["--prior-guidance", "2"], {"prior.guidance": 2.0}),
    (["--best-of", "3"], {"best_of": 3}),
    (["--decoder-steps", "25"], {"decoder.steps": 25}),
    (["--decoder-guidance", "3.5"], {"decoder.guidance": 3.5}),
    (["--decoder-eta", "0.5"], {"decoder.eta": 0.5}),
    (["--upsampler-steps", "3", "2"], {"upsampler.steps": [3, 2]}),
    (["--upsampler-steps", "4"], {"upsampler.steps": 4}),  # one value: every upsampler's
    ([], {}),
])
def test_todays_flags_are_overrides(flags, overrides):
    assert parse(*flags) == overrides


def test_todays_flags_set_their_stage(cascade):
    s = cascade.resolve_sampling(parse("--sampler", "ddpm", "--prior-sampler", "ddim", "--prior-steps", "3",
                                       "--prior-guidance", "2", "--best-of", "3", "--decoder-steps", "5",
                                       "--decoder-guidance", "4", "--upsampler-steps", "2", "1"))
    assert s.best_of == 3
    assert s.of("prior") == StageSampling(sampler="ddim", steps=3, guidance=2.0)
    assert s.of("decoder") == StageSampling(sampler="ddpm", steps=5, guidance=4.0)
    assert [s.of(n).steps for n in ("upsampler-1", "upsampler-2")] == [2, 1]
    assert {s.of(n).sampler for n in ("upsampler-1", "upsampler-2")} == {"ddpm"}
    s = cascade.resolve_sampling(parse("--sampler", "ddim", "--decoder-eta", "0.5", "--upsampler-steps", "4"))
    assert s.of("decoder").eta == 0.5 and [s.of(n).steps for n in ("upsampler-1", "upsampler-2")] == [4, 4]


def test_set_reads_yaml_values_and_the_later_setting_wins(cascade):
    assert parse("--set", "decoder.guidance=3", "--set", "upsampler.steps=[3,2]", "--set", "best_of=4") == {
        "decoder.guidance": 3, "upsampler.steps": [3, 2], "best_of": 4}
    assert parse("--decoder-guidance", "2", "--set", "decoder.guidance=5") == {"decoder.guidance": 5}
    assert parse("--set", "decoder.guidance=5", "--decoder-guidance", "2") == {"decoder.guidance": 2.0}
    s = cascade.resolve_sampling(parse("--set", "decoder_guidance=5", "--decoder-guidance", "2",
                                       "--set", "upsampler-2.steps=7"))
    assert s.of("decoder").guidance == 2.0 and s.of("upsampler-2").steps == 7
    assert s.of("upsampler-1") == cascade.sampling.of("upsampler-1")


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("item, message", [
    ("decoder.guidance", "--set expects KEY=VALUE (e.g. decoder.guidance=3), got 'decoder.guidance'"),
    ("=3", "--set expects KEY=VALUE"),
    ("upsampler.steps=[3, 2", "the value is not valid YAML"),
])
def test_a_malformed_set_is_one_line_before_any_work(item, message, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before --set was read")

    monkeypatch.setattr(commands, "_pipeline", no_work)
    for command in (["generate", CAPTION], ["eval"]):
        assert message in _one_line_error([*command, "--set", item], capsys)


@pytest.mark.parametrize("flags, message", [
    (["--set", "decoder.colour=3"], "unknown sampling setting 'decoder.colour'"),
    (["--set", "upscaler.steps=3"], "unknown sampling setting 'upscaler.steps'"),
    (["--decoder-steps", "0"], "steps must be a whole number >= 1"),
    (["--upsampler-steps", "1", "2", "3"], "gives 3 values for 2 upsampler(s)"),
    (["--prior-guidance", "-1"], "guidance must be a finite number >= 0"),
    (["--best-of", "0"], "best_of must be a whole number >= 1"),
    (["--sampler", "ddpm", "--decoder-eta", "0.5"], "eta applies to samplers that take it"),
    (["--set", "decoder.sampler=euler"], "'euler'"),  # named, with the registered ones
    (["--prior-sampler", "analytic_ddpm"], "Analytic-DPM moments"),  # an uncalibrated prior
])
def test_bad_sampling_values_are_one_line(cascade_dir, tmp_path, capsys, flags, message):
    argv = ["generate", CAPTION, "--pipeline", str(cascade_dir), "--device", "cpu", "--out", str(tmp_path / "g.png")]
    assert message in _one_line_error([*argv, *flags], capsys)
    assert not (tmp_path / "g.png").exists()


def test_captions_json_records_the_resolved_sampling(tmp_path, capsys):
    """On the shipped model: the settings given, and every other one at the pipeline's own value."""
    from unclip.pipeline.default import load_pipeline

    out_dir = tmp_path / "images"
    assert main(["generate", CAPTION, "-n", "1", "--prior-steps", "2", "--decoder-steps", "2", "--upsampler-steps",
                 "1", "1", "--device", "cpu", "--out", str(tmp_path / "g.png"), "--out-dir", str(out_dir)]) == 0
    record = json.loads((out_dir / "captions.json").read_text())
    assert record["captions"] == [CAPTION] and record["seed"] == 0 and record["num_images"] == 1
    shipped = load_pipeline(device="cpu").sampling
    want = shipped.stages | {"prior": dataclasses.replace(shipped.of("prior"), steps=2),
                             "decoder": dataclasses.replace(shipped.of("decoder"), steps=2),
                             "upsampler-1": dataclasses.replace(shipped.of("upsampler-1"), steps=1),
                             "upsampler-2": dataclasses.replace(shipped.of("upsampler-2"), steps=1)}
    assert record["sampling"] == config_to_dict(Sampling(best_of=shipped.best_of, stages=want))
    assert record["sampling"]["best_of"] == 4 and record["sampling"]["stages"]["decoder"] == {
        "sampler": "ddpm", "steps": 2, "guidance": 3.0, "eta": 0.0}


def test_the_shipped_defaults_file_holds_the_shipped_pipelines_sampling():
    """configs/pipeline/shapes-tiny.yaml is what `unclip assemble --defaults` reads: `Sampling`-shaped settings over
    each stage's own defaults."""
    from pathlib import Path

    from unclip.pipeline.default import load_pipeline
    from unclip.pipeline.pipeline import UnclipPipeline
    from unclip.settings import read_sampling_file

    shipped = load_pipeline(device="cpu")
    path = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "shapes-tiny.yaml"
    fresh = UnclipPipeline(shipped.clip, list(shipped.stages))  # every stage at its own defaults
    assert fresh.sampling != shipped.sampling
    assert fresh.resolve_sampling(read_sampling_file(path)) == shipped.sampling


def test_a_sampling_file_naming_some_fields_keeps_the_stages_own_defaults_for_the_rest(cascade, tmp_path):
    from unclip.pipeline.pipeline import UnclipPipeline
    from unclip.settings import read_sampling_file

    cascade = UnclipPipeline(cascade.clip, list(cascade.stages))  # every stage at its own defaults
    (tmp_path / "s.yaml").write_text("best_of: 3\nstages:\n  decoder: {steps: 10}\n")
    s = cascade.resolve_sampling(read_sampling_file(tmp_path / "s.yaml"))
    own = cascade.decoder.default_sampling()
    assert s.best_of == 3 and s.of("decoder") == own.__class__(own.sampler, 10, own.guidance, own.eta)
    (tmp_path / "bad.yaml").write_text("stages:\n  decoder: {stepz: 10}\n")
    with pytest.raises(ValueError, match="unknown sampling setting 'decoder.stepz'"):
        cascade.resolve_sampling(read_sampling_file(tmp_path / "bad.yaml"))


def test_assemble_without_a_prior_makes_a_pipeline_that_says_it_cannot_caption(cascade, tmp_path, capsys):
    from unclip.pipeline.pipeline import UnclipPipeline

    cascade.clip.save_pretrained(tmp_path / "clip")
    cascade.decoder.save_pretrained(tmp_path / "decoder")
    (tmp_path / "sampling.yaml").write_text("stages:\n  decoder: {sampler: ddpm, steps: 3}\n")
    assert main(["assemble", "--clip", str(tmp_path / "clip"), "--decoder", str(tmp_path / "decoder"), "--out",
                 str(tmp_path / "pipe"), "--defaults", str(tmp_path / "sampling.yaml")]) == 0
    assert "no prior" in capsys.readouterr().out
    pipe = UnclipPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.prior is None and pipe.names == ["decoder"]
    assert pipe.sampling.of("decoder") == StageSampling(sampler="ddpm", steps=3, guidance=3.0)  # its own guidance
    err = _one_line_error(["generate", CAPTION, "--pipeline", str(tmp_path / "pipe"), "--device", "cpu", "--out",
                           str(tmp_path / "g.png")], capsys)
    assert "has no prior" in err
    (tmp_path / "old.yaml").write_text("sampler: ddpm\ndecoder_steps: 25\n")  # the flat format before `Sampling`
    err = _one_line_error(["assemble", "--clip", str(tmp_path / "clip"), "--decoder", str(tmp_path / "decoder"),
                           "--out", str(tmp_path / "pipe2"), "--defaults", str(tmp_path / "old.yaml")], capsys)
    assert err.startswith("unclip assemble: error: --defaults: ")
    assert "unknown key(s) ['decoder_steps', 'sampler']" in err
    assert not (tmp_path / "pipe2").exists()
