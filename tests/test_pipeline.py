"""The pipeline: generate end to end, save/load, dtype, manipulations, the public API and its CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import unclip
import unclip.stage as stage_module
from unclip.checkpoint import CheckpointError
from unclip.cli.main import main
from unclip.clip import CaptionError
from unclip.diffusion import SAMPLERS, sampler_options
from unclip.pipeline.default import load_pipeline
from unclip.pipeline.manipulations import encode_image, interpolate, slerp, text_diff, vary
from unclip.pipeline.pipeline import UnclipPipeline
from unclip.settings import Sampling, StageSampling

CAPTIONS = ["a red circle on a blue background", "a green cross on a white background"]
UNCALIBRATED = [name for name in SAMPLERS if not any(sampler_options(name).values())]  # what any stage can run


def test_generate_gives_caption_major_pil_images_at_the_last_stage_side(cascade):
    images = cascade.generate(CAPTIONS, num_images=3, seed=0)
    assert len(images) == 6 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    assert cascade.image_size == 32


def test_generate_is_seeded_and_captions_matter(cascade):
    a = cascade.generate_tensors(CAPTIONS, 1, seed=0)
    b = cascade.generate_tensors(CAPTIONS, 1, seed=0)
    c = cascade.generate_tensors(CAPTIONS, 1, seed=1)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    swapped = cascade.generate_tensors(CAPTIONS[::-1], 1, seed=0)
    assert not torch.allclose(swapped, a)


def test_settings_override_the_pipelines_and_unknown_ones_are_refused(cascade):
    s = cascade.resolve_sampling(decoder_steps=7, upsampler_steps=2, sampler="dpmpp_2m")
    assert s.of("decoder").steps == 7 and [s.of(f"upsampler-{i}").steps for i in (1, 2)] == [2, 2]
    assert {spec.sampler for spec in s.stages.values()} == {"dpmpp_2m"}
    assert s.of("prior").steps == cascade.sampling.of("prior").steps and s.best_of == cascade.sampling.best_of
    assert cascade.resolve_sampling({"decoder.steps": 7, "upsampler.steps": [2, 2], "sampler": "dpmpp_2m"}) == s
    assert cascade.resolve_sampling() == cascade.sampling
    with pytest.raises(ValueError, match="unknown sampling setting 'decoder_stepz'"):
        cascade.resolve_sampling(decoder_stepz=3)


def test_progress_bars_name_their_stage(cascade, capsys):
    cascade.generate_tensors(CAPTIONS[0], 1, seed=0, sampler="ddpm", progress=True)
    err = capsys.readouterr().err
    labels = ("prior (ddpm)", "decoder (ddpm)", "upsampler-1 (ddpm)", "upsampler-2 (ddpm)")
    for label in labels:
        assert f"\r{label}:" in err, f"no bar labelled {label!r} in {err!r}"
    assert [err.index(f"\r{label}:") for label in labels] == sorted(err.index(f"\r{label}:") for label in labels)


@pytest.mark.parametrize("sampler", UNCALIBRATED)
def test_every_sampler_runs_every_stage(cascade, sampler):
    out = cascade.generate_tensors(CAPTIONS[:1], 2, seed=0, sampler=sampler)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(cascade.generate_tensors(CAPTIONS[:1], 2, seed=0, sampler=sampler), out)  # seeded


def test_bad_input_is_refused_clearly(cascade):
    with pytest.raises(CaptionError):
        cascade.generate([""], 1)
    with pytest.raises(CaptionError, match="no captions"):
        cascade.generate([], 1)
    with pytest.raises(ValueError, match="num_images"):
        cascade.generate(CAPTIONS, 0)


def test_save_load_round_trip_gives_the_same_images(cascade, cascade_dir):
    loaded = UnclipPipeline.from_pretrained(cascade_dir)
    meta = json.loads((cascade_dir / "pipeline.json").read_text())
    assert meta["format_version"] == 2 and meta["image_sizes"] == [8, 16, 32]
    assert meta["stages"] == ["prior", "decoder", "upsampler-1", "upsampler-2"] and meta["clip"] == "clip"
    assert loaded.sampling == cascade.sampling and loaded.names == cascade.names
    assert torch.equal(loaded.generate_tensors(CAPTIONS, 1, seed=3), cascade.generate_tensors(CAPTIONS, 1, seed=3))


def test_half_precision_storage_halves_the_files_and_stays_close(cascade, tmp_path):
    full = cascade.save_pretrained(tmp_path / "f32")
    half = cascade.save_pretrained(tmp_path / "f16", dtype=torch.float16)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.safetensors"))  # noqa: E731
    assert size(half) < 0.55 * size(full)
    loaded = UnclipPipeline.from_pretrained(half)
    assert loaded.dtype == torch.float32  # stored half, computed in float32
    g = torch.Generator().manual_seed(0)
    x, embed = torch.randn(2, 3, 8, 8, generator=g), F.normalize(torch.randn(2, 32, generator=g), dim=-1)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        a, b = (p.decoder(x, t, image_embed=embed) for p in (cascade, loaded))
    assert not torch.equal(a, b) and (a - b).abs().max() < 1e-2 * a.abs().max()  # rounded, not broken


def test_bfloat16_runs_on_the_cpu_and_float16_is_refused_there(cascade_dir):
    pipe = UnclipPipeline.from_pretrained(cascade_dir, dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.clip.model.logit_scale.dtype == torch.float32
    out = pipe.generate_tensors(CAPTIONS[:1], 1, seed=0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="float16"):
        UnclipPipeline.from_pretrained(cascade_dir, device="cpu", dtype=torch.float16)


def test_loading_refuses_broken_or_mismatched_directories(cascade, cascade_dir, tmp_path, tiny_clip):
    with pytest.raises(CheckpointError, match="not found"):
        UnclipPipeline.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="pipeline.json"):
        UnclipPipeline.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="upsampler-1 takes 16px images but the stage before it makes 8px ones"):
        UnclipPipeline(tiny_clip, [cascade.prior, cascade.decoder, cascade.upsamplers[1]])
    with pytest.raises(ValueError, match=r"upsampler-3 takes 8px .* 32px ones \(upsamplers go lowest resolution"):
        UnclipPipeline(tiny_clip, [cascade.prior, cascade.decoder, *cascade.upsamplers, cascade.upsamplers[0]])
    with pytest.raises(ValueError, match="an optional prior, one decoder, then upsamplers"):
        UnclipPipeline(tiny_clip, [cascade.decoder, cascade.prior, *cascade.upsamplers])
    with pytest.raises(ValueError, match=r"sampling settings for \['upsampler-3'\], which this pipeline does not"):
        UnclipPipeline(tiny_clip, [cascade.prior, cascade.decoder], Sampling(stages={"upsampler-3": StageSampling()}))


def _set(meta, dotted, value):
    """`meta` with the entry at a dotted key replaced (DELETE: removed); the empty key replaces the whole."""
    if not dotted:
        return value
    *parents, leaf = dotted.split(".")
    node = meta
    for p in parents:
        node = node[int(p) if isinstance(node, list) else p]
    leaf = int(leaf) if isinstance(node, list) else leaf
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return meta


DELETE = object()
STAGE_DIRS = ("clip", "prior", "decoder", "upsampler-1", "upsampler-2")


def format_1(meta: dict) -> dict:
    """The pipeline.json an earlier unclip wrote for the same directory: one flat set of sampling defaults."""
    s = meta["sampling"]["stages"]
    return {"format_version": 1,
            "stages": {"clip": "clip", "prior": "prior", "decoder": "decoder",
                       "upsamplers": ["upsampler-1", "upsampler-2"]},
            "defaults": {"sampler": s["decoder"]["sampler"], "prior_steps": s["prior"]["steps"],
                         "prior_guidance": s["prior"]["guidance"], "best_of": meta["sampling"]["best_of"],
                         "decoder_steps": s["decoder"]["steps"], "decoder_guidance": s["decoder"]["guidance"],
                         "decoder_eta": s["decoder"]["eta"],
                         "upsampler_steps": [s["upsampler-1"]["steps"], s["upsampler-2"]["steps"]]},
            "clip_fingerprint": meta["clip_fingerprint"], "image_sizes": meta["image_sizes"]}


def write_pipeline_json(cascade_dir, out, meta):
    """A pipeline directory at `out` with the stages of `cascade_dir` and `meta` as its pipeline.json."""
    out.mkdir(exist_ok=True)
    for stage in STAGE_DIRS:
        (out / stage).symlink_to(cascade_dir / stage)
    (out / "pipeline.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("stages", DELETE, "missing required config key 'stages'"),
        ("clip", DELETE, "missing required config key 'clip'"),
        ("stages.1", 3, r"stages\[1\]: expected a string, got 3"),
        ("stages", "decoder", "stages: expected a list"),
        ("sampling", [], "sampling: expected a mapping"),
        ("sampling.stages.decoder.steps", "ten", "decoder.steps: expected an integer, got 'ten'"),
        ("sampling.stages.decoder.stpes", 5, "unknown sampling setting 'decoder.stpes'. Did you mean 'decoder.steps'"),
        ("sampling.stages.decoder.sampler", "euler", "'euler' is not a registered sampler; expected one of ddim"),
        ("sampling.stages.decoder.steps", 0, "steps must be a whole number >= 1, got 0"),
        ("sampling.stages.decoder.eta", 0.5, r"decoder: eta applies to samplers that take it \(ddim\)"),
        ("sampling.best_of", 0, "best_of must be a whole number >= 1, got 0"),
        ("sampling.stages.upsampler-3", {"steps": 2}, r"unknown sampling setting 'upsampler-3.steps'"),
        ("format_version", "1", "format_version: expected an integer"),
        ("stagse", [], "unknown config key 'stagse'.*Did you mean 'stages'"),
        ("", [], "the top level must be a mapping"),
    ],
)
def test_a_malformed_pipeline_json_is_one_line_naming_the_file_and_key(cascade_dir, tmp_path, key, value, message):
    meta = json.loads((cascade_dir / "pipeline.json").read_text())
    if key == "sampling.stages.decoder.eta":
        meta["sampling"]["stages"]["decoder"]["sampler"] = "ddpm"  # a sampler without DDIM's noise
    write_pipeline_json(cascade_dir, tmp_path, _set(meta, key, value))
    with pytest.raises(CheckpointError, match=message) as e:
        UnclipPipeline.from_pretrained(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'pipeline.json'}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("stages.decoder", DELETE, "missing required config key 'stages.decoder'"),
        ("stages.prior", 3, "stages.prior: expected a string, got 3"),
        ("stages.upsamplers", "upsampler-1", "stages.upsamplers: expected a list"),
        ("defaults", [], "defaults: expected a mapping"),
        ("defaults.decoder_steps", "ten", "defaults.decoder_steps: expected an integer, got 'ten'"),
        ("defaults.decoder_stpes", 5, "unknown config key 'defaults.decoder_stpes'.*Did you mean 'decoder_steps'"),
        ("defaults.sampler", "euler", "'euler' is not a registered sampler; expected one of ddim, ddpm"),
        ("defaults.upsampler_sampler", "dpm", "sampler 'dpm'|'dpm' is not a registered sampler"),
        ("defaults.decoder_steps", 0, "decoder: steps must be a whole number >= 1, got 0"),
        ("defaults.upsampler_steps", [3], r"defaults.upsampler_steps gives 1 step count\(s\) for 2 upsampler"),
    ],
)
def test_a_malformed_format_1_pipeline_json_is_one_line_naming_the_file_and_key(cascade_dir, tmp_path, key, value,
                                                                                 message):
    meta = format_1(json.loads((cascade_dir / "pipeline.json").read_text()))
    write_pipeline_json(cascade_dir, tmp_path, _set(meta, key, value))
    with pytest.raises(CheckpointError, match=message) as e:
        UnclipPipeline.from_pretrained(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'pipeline.json'}: ") and "\n" not in str(e.value)


def test_a_format_1_pipeline_json_loads_as_the_sampling_it_describes(cascade, cascade_dir, tmp_path):
    """Format 1's `sampler` was every stage's but where prior_sampler / upsampler_sampler set theirs apart; its
    decoder_eta was the decoder's, unused (and dropped) under a sampler without DDIM's noise."""
    meta = format_1(json.loads((cascade_dir / "pipeline.json").read_text()))
    old = UnclipPipeline.from_pretrained(write_pipeline_json(cascade_dir, tmp_path / "same", meta))
    assert old.sampling == cascade.sampling
    meta["defaults"] |= {"sampler": "ddpm", "prior_sampler": "dpmpp_2m", "decoder_eta": 0.5, "upsampler_steps": []}
    apart = UnclipPipeline.from_pretrained(write_pipeline_json(cascade_dir, tmp_path / "apart", meta))
    assert {name: spec.sampler for name, spec in apart.sampling.stages.items()} == {
        "prior": "dpmpp_2m", "decoder": "ddpm", "upsampler-1": "ddpm", "upsampler-2": "ddpm"}
    assert apart.sampling.of("decoder").eta == 0.0
    assert [apart.sampling.of(f"upsampler-{i}").steps for i in (1, 2)] == [u.default_sampling().steps
                                                                          for u in cascade.upsamplers]


def test_cli_reports_a_malformed_pipeline_json_in_one_line(cascade_dir, tmp_path, capsys):
    meta = json.loads((cascade_dir / "pipeline.json").read_text())
    meta["sampling"]["stages"]["decoder"]["steps"] = "ten"
    write_pipeline_json(cascade_dir, tmp_path, meta)
    assert main(["generate", "x", "--pipeline", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pipeline.json" in err
    assert "decoder.steps: expected an integer" in err


def test_from_stages_refuses_a_decoder_trained_on_another_clip(cascade, tmp_path, tiny_arch):
    from prior import DiffusionPriorNetwork
    from unclip.clip import Clip

    cascade.clip.save_pretrained(tmp_path / "clip")
    cascade.prior.save_pretrained(tmp_path / "prior")
    cascade.decoder.clip_source, cascade.decoder.clip_fingerprint = "x", cascade.clip.fingerprint()
    cascade.decoder.save_pretrained(tmp_path / "decoder")
    pipe = UnclipPipeline.from_stages(tmp_path / "clip", [tmp_path / "prior", tmp_path / "decoder"])
    assert len(pipe.upsamplers) == 0 and pipe.image_size == 8
    torch.manual_seed(1)
    Clip.from_architecture(tiny_arch, model_name="other").save_pretrained(tmp_path / "other-clip")
    with pytest.raises(CheckpointError, match="decoder .* another CLIP"):
        UnclipPipeline.from_stages(tmp_path / "other-clip", [tmp_path / "prior", tmp_path / "decoder"])
    prior_on_other = DiffusionPriorNetwork.from_pretrained(tmp_path / "prior")
    prior_on_other.clip_fingerprint = Clip.from_pretrained(tmp_path / "other-clip").fingerprint()
    prior_on_other.save_pretrained(tmp_path / "prior-on-other")
    with pytest.raises(CheckpointError, match="the prior .*prior-on-other was trained on the embeddings of another"):
        UnclipPipeline.from_stages(tmp_path / "clip", [tmp_path / "prior-on-other", tmp_path / "decoder"])


def test_a_pipeline_stored_in_half_precision_reassembles_from_its_own_stages(cascade, tmp_path):
    from safetensors import safe_open

    from unclip.clip import Clip

    fingerprint = cascade.clip.fingerprint()
    cascade.prior.clip_fingerprint = fingerprint
    cascade.decoder.clip_source, cascade.decoder.clip_fingerprint = "x", fingerprint
    pipe = UnclipPipeline(cascade.clip, [cascade.prior, cascade.decoder, *cascade.upsamplers])
    out = pipe.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    with safe_open(str(out / "clip" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    stored = Clip.from_pretrained(out / "clip")
    assert stored.fingerprint() == fingerprint  # the weights differ from the float32 ones; the identity does not
    UnclipPipeline.from_stages(out / "clip", [out / "prior", out / "decoder", out / "upsampler-1"])
    with torch.no_grad():
        next(stored.model.parameters()).add_(1e-2)  # changed after loading (fine-tuned): no longer that CLIP
    assert stored.fingerprint() != fingerprint


def test_the_shipped_pipeline_reassembles_from_its_stages():
    from unclip.pipeline.default import DEFAULT_PIPELINE as d

    pipe = UnclipPipeline.from_stages(d / "clip", [d / "prior", d / "decoder", d / "upsampler-1", d / "upsampler-2"])
    assert pipe.clip.fingerprint() == json.loads((d / "pipeline.json").read_text())["clip_fingerprint"]
    assert pipe.prior.eps_moments is not None  # calibrated by train-prior: the paper's analytic_ddpm is available


def test_slerp_keeps_norms_and_hits_both_ends():
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    t = torch.linspace(0, 1, 5)[:, None]
    path = slerp(a[None], b[None], t)
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    assert torch.allclose(path.norm(dim=-1), torch.ones(5), atol=1e-6)
    angles = torch.arccos((path[:-1] * path[1:]).sum(-1).clamp(-1, 1))
    assert torch.allclose(angles, angles[0].expand(4), atol=1e-5)  # constant angular speed
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel inputs: no division by zero


def test_vary_at_eta_zero_is_deterministic_and_eta_one_varies(tiny_pipeline, cascade):
    """On the decoder's output (the upsamplers add their own noise): eta 0 repeats, eta 1 varies."""
    image = Image.new("RGB", (32, 32), (220, 30, 30))
    same = vary(tiny_pipeline, image, n=2, eta=0.0)
    assert len(same) == 2 and same[0].size == (8, 8)
    assert same[0].tobytes() == same[1].tobytes()
    varied = vary(tiny_pipeline, image, n=2, eta=1.0, seed=0)
    assert varied[0].tobytes() != varied[1].tobytes()
    assert all(im.size == (32, 32) for im in vary(cascade, image, n=2))


def test_encode_image_gives_the_bipartite_latent(cascade):
    """(z_i, x_T): the CLIP's image embedding and an image-dependent decoder latent at the decoder's side
    (that DDIM maps x_T back to the image is tested with the inversion itself, in test_diffusion_samplers)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g)
    latent = encode_image(cascade, pixels, steps=5)
    assert latent.image_embed.shape == (2, 32) and latent.x_T.shape == (2, 3, 8, 8)
    assert torch.allclose(latent.image_embed, cascade.clip.encode_image(pixels))
    again = encode_image(cascade, pixels.flip(0), steps=5)
    assert torch.allclose(again.x_T.flip(0), latent.x_T, atol=1e-5) and not torch.allclose(again.x_T, latent.x_T)


def test_interpolate_and_text_diff_shapes_and_ends(cascade):
    a, b = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 70, 220))
    frames = interpolate(cascade, a, b, n=4)
    assert len(frames) == 4 and frames[0].tobytes() != frames[-1].tobytes()
    edits = text_diff(cascade, a, "a red circle", "a red square", n=3)
    assert len(edits) == 3 and edits[0].tobytes() != edits[-1].tobytes()
    with pytest.raises(ValueError):
        interpolate(cascade, a, b, n=1)


def test_interpolate_and_text_diff_are_seeded(cascade, cascade_dir, tmp_path):
    """The decoding is deterministic (DDIM eta 0 from the inverted latent), the upsamplers are not: the seed makes
    identical runs give identical images, in the library, the one-call API and the CLI."""
    a, b = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 70, 220))
    runs = {
        "interpolate": lambda seed: interpolate(cascade, a, b, n=2, seed=seed),
        "text_diff": lambda seed: text_diff(cascade, a, "a red circle", "a red square", n=2, seed=seed),
        "unclip.interpolate": lambda seed: unclip.interpolate(a, b, n=2, pipeline=cascade, seed=seed),
        "unclip.text_diff": lambda seed: unclip.text_diff(a, "a red circle", "a red square", n=2, pipeline=cascade,
                                                          seed=seed),
    }
    for name, run in runs.items():
        first, again, other = run(5), run(5), run(6)
        assert [im.tobytes() for im in first] == [im.tobytes() for im in again], name
        assert [im.tobytes() for im in first] != [im.tobytes() for im in other], name
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    commands = {"interpolate": ["interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png")],
                "text-diff": ["text-diff", str(tmp_path / "a.png"), "--from", "a red circle", "--to", "a red square"]}
    for name, args in commands.items():
        outputs = []
        for i in range(2):
            outputs.append(tmp_path / f"{name}-{i}.png")
            assert main([*args, "-n", "2", "--seed", "3", "--pipeline", str(cascade_dir), "--device", "cpu",
                         "--out", str(outputs[-1])]) == 0
        assert Image.open(outputs[0]).tobytes() == Image.open(outputs[1]).tobytes(), name


def test_public_api_loads_a_directory_once(cascade_dir):
    images = unclip.generate(CAPTIONS[0], num_images=2, pipeline=cascade_dir, seed=0)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert load_pipeline(cascade_dir) is load_pipeline(cascade_dir)  # cached
    assert len(unclip.vary(images[0], n=2, pipeline=cascade_dir)) == 2


def test_cli_generate_writes_a_labelled_grid_and_the_images(cascade_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["generate", *CAPTIONS, "-n", "2", "--pipeline", str(cascade_dir), "--out", str(out),
               "--out-dir", str(tmp_path / "imgs"), "--decoder-steps", "2", "--device", "cpu"])
    assert rc == 0 and out.is_file()
    grid = Image.open(out)
    assert grid.width >= 2 * 32 and grid.height > 2 * 32  # two rows of two, with caption lines
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 4


def test_cli_errors_are_one_clear_line(cascade_dir, tmp_path, capsys):
    assert main(["generate", "x", "--pipeline", str(tmp_path / "missing")]) == 2
    assert "pipeline directory not found" in capsys.readouterr().err
    assert main(["vary", str(tmp_path / "nope.png"), "--pipeline", str(cascade_dir)]) == 2
    assert "image not found" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["vary", str(tmp_path / "bad.png"), "--pipeline", str(cascade_dir)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "x", "--pipeline", str(cascade_dir), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--from", "--to"])
def test_cli_text_diff_names_an_empty_caption_option(cascade_dir, tmp_path, capsys, option):
    Image.new("RGB", (32, 32), (220, 30, 30)).save(tmp_path / "a.png")
    captions = {"--from": "a red circle", "--to": "a red square", option: " "}
    assert main(["text-diff", str(tmp_path / "a.png"), *(x for kv in captions.items() for x in kv),
                 "--pipeline", str(cascade_dir), "--device", "cpu", "--out", str(tmp_path / "out.png")]) == 2
    assert capsys.readouterr().err == f"unclip text-diff: error: {option} is empty; give a caption\n"


def test_cli_assemble_then_eval(cascade, tmp_path, capsys):
    for name in ("clip", "prior"):
        getattr(cascade, name).save_pretrained(tmp_path / name)
    cascade.decoder.clip_source, cascade.decoder.clip_fingerprint = "x", cascade.clip.fingerprint()
    cascade.decoder.save_pretrained(tmp_path / "decoder")
    for i, up in enumerate(cascade.upsamplers):
        up.save_pretrained(tmp_path / f"up{i}")
    (tmp_path / "defaults.yaml").write_text(
        "best_of: 3\nstages:\n  prior: {sampler: ddim, steps: 2}\n  decoder: {sampler: ddim, steps: 2, guidance: 3}\n"
        "  upsampler-1: {sampler: ddim, steps: 2}\n")
    (tmp_path / "bad.yaml").write_text("stages:\n  decoder: {stepz: 2}\n")
    rc = main(["assemble", "--clip", str(tmp_path / "clip"), "--prior", str(tmp_path / "prior"), "--decoder",
               str(tmp_path / "decoder"), "--upsamplers", str(tmp_path / "up0"), str(tmp_path / "up1"),
               "--out", str(tmp_path / "pipe"), "--store-dtype", "float16", "--defaults",
               str(tmp_path / "defaults.yaml")])
    assert rc == 0 and "32px output" in capsys.readouterr().out
    assert main(["assemble", "--clip", str(tmp_path / "clip"), "--prior", str(tmp_path / "prior"), "--decoder",
                 str(tmp_path / "decoder"), "--out", str(tmp_path / "pipe2"), "--defaults",
                 str(tmp_path / "bad.yaml")]) == 2
    assert "stepz" in capsys.readouterr().err and not (tmp_path / "pipe2").exists()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a training run, say: never replaced by a pipeline
    (tmp_path / "run" / "notes.txt").write_text("precious")
    assert main(["assemble", "--clip", str(tmp_path / "clip"), "--prior", str(tmp_path / "prior"), "--decoder",
                 str(tmp_path / "decoder"), "--out", str(tmp_path / "run")]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "precious" and (tmp_path / "run" / "checkpoints").is_dir()
    pipe = UnclipPipeline.from_pretrained(tmp_path / "pipe")
    two = {"prior": StageSampling("ddim", 2), "decoder": StageSampling("ddim", 2, guidance=3.0),
           "upsampler-1": StageSampling("ddim", 2), "upsampler-2": cascade.upsamplers[1].default_sampling()}
    assert pipe.sampling == Sampling(best_of=3, stages=two)  # a stage the file does not name: its own defaults
    rc = main(["eval", "--pipeline", str(tmp_path / "pipe"), "--images-per-caption", "1", "--real-samples", "30",
               "--out", str(tmp_path / "eval.json"), "--device", "cpu"])
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["accuracy"]) == {"shape", "fg", "bg", "all"} and len(report["per_caption"]) == 25
    assert report["judge"] == {"source": "pipeline", "fingerprint": cascade.clip.fingerprint()}
    out = capsys.readouterr().out
    assert report["fid"] > 0 and "compositional accuracy" in out
    assert f"judged by the pipeline's own CLIP (fingerprint {cascade.clip.fingerprint()})" in out


def test_eval_with_a_fixed_judge(cascade, cascade_dir, tiny_arch, tmp_path, capsys):
    """`judge` replaces the pipeline's CLIP as judge, CLIP-score model and FID / KID features, and is named."""
    from unclip.clip import Clip
    from unclip.pipeline.evaluation import evaluate_pipeline

    torch.manual_seed(7)
    other = Clip.from_architecture(tiny_arch, model_name="other-judge")
    other.save_pretrained(tmp_path / "judge")
    kwargs = dict(images_per_caption=1, real_samples=4, progress=False, seed=0)
    own, fixed = evaluate_pipeline(cascade, **kwargs), evaluate_pipeline(cascade, judge=other, **kwargs)
    assert own["judge"] == {"source": "pipeline", "fingerprint": cascade.clip.fingerprint()}
    assert fixed["judge"] == {"source": "given", "fingerprint": other.fingerprint()} != own["judge"]
    assert fixed["clip_score"] != own["clip_score"] and fixed["fid"] != own["fid"]  # the same images, another CLIP
    rc = main(["eval", "--pipeline", str(cascade_dir), "--images-per-caption", "1", "--real-samples", "4",
               "--judge", str(tmp_path / "judge"), "--out", str(tmp_path / "eval.json"), "--device", "cpu"])
    assert rc == 0 and f"judged by the CLIP {tmp_path / 'judge'} (fingerprint {other.fingerprint()})" in \
        capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["judge"] == {"source": str(tmp_path / "judge"), "fingerprint": other.fingerprint()}
    assert main(["eval", "--pipeline", str(cascade_dir), "--judge", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert "--judge: no CLIP at" in capsys.readouterr().err


def never_sample(monkeypatch) -> None:
    """Make any stage's sampling loop an error (every stage runs its sampler through `unclip.stage.run_sampler`)."""

    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(stage_module, "sample", never)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"decoder_guidance": float("nan")}, "decoder: guidance must be a finite number >= 0"),
        ({"prior_guidance": -2.0}, "prior: guidance must be a finite number >= 0"),
        ({"decoder_eta": 5.0}, r"decoder: eta \(DDIM's noise\) must lie in \[0, 1\]"),
        ({"decoder_steps": 0}, "decoder: steps must be a whole number >= 1"),
        ({"decoder_steps": 2.5}, "decoder.steps: expected an integer, got 2.5"),
        ({"best_of": 0}, "best_of must be a whole number >= 1"),
        ({"upsampler_steps": 0}, "upsampler-1: steps must be a whole number >= 1"),
        ({"upsampler_steps": [3]}, r"upsampler_steps gives 1 values for 2 upsampler\(s\)"),
        ({"decoder_steps": [3, 4]}, "decoder_steps gives 2 values for one stage"),
        ({"decoder_stepz": 3}, "unknown sampling setting 'decoder_stepz'. Did you mean 'decoder.steps'"),
        ({"sampler": "euler"}, r"^prior.sampler: 'euler' is not a registered sampler; expected one of ddim, ddpm"),
        ({"prior_sampler": "euler"}, r"^prior.sampler: 'euler' is not a registered sampler"),
        ({"upsampler_sampler": "euler"}, r"^upsampler-1.sampler: 'euler' is not a registered sampler"),
        ({"prior_sampler": "analytic_ddpm"}, "prior: sampler 'analytic_ddpm' needs the prior's Analytic-DPM moments"),
    ],
)
def test_bad_generation_settings_fail_before_sampling(cascade, setting, message, monkeypatch):
    never_sample(monkeypatch)
    with pytest.raises(ValueError, match=message):
        cascade.generate_tensors("a red circle", **setting)


def test_eta_given_with_a_sampler_that_ignores_it_is_refused(cascade, cascade_dir, monkeypatch, capsys):
    """Only DDIM has eta: given with ddpm (say) it would change nothing, so it is an error before any sampling;
    a stored eta is simply dropped when only the sampler is overridden."""
    never_sample(monkeypatch)
    message = r"decoder: eta applies to samplers that take it \(ddim\); the sampler is ddpm"
    with pytest.raises(ValueError, match=message):
        cascade.generate_tensors("a red circle", sampler="ddpm", decoder_eta=0.7)
    stages = [cascade.prior, cascade.decoder, *cascade.upsamplers]
    ddpm_default = UnclipPipeline(cascade.clip, stages, cascade.resolve_sampling(sampler="ddpm"))
    with pytest.raises(ValueError, match=message):
        ddpm_default.resolve_sampling(decoder_eta=0.7)
    assert ddpm_default.resolve_sampling(decoder_eta=0.0).of("decoder").eta == 0.0  # no noise asked for
    assert ddpm_default.resolve_sampling(sampler="ddim", decoder_eta=0.7).of("decoder").eta == 0.7
    with pytest.raises(ValueError, match=message.removeprefix("decoder: ")):
        StageSampling(sampler="ddpm", eta=0.5)  # nor can a pipeline store one
    stored = UnclipPipeline(cascade.clip, stages, cascade.resolve_sampling(decoder_eta=0.5))
    s = stored.resolve_sampling(sampler="ddpm")
    assert s.of("decoder") == replace(stored.sampling.of("decoder"), sampler="ddpm", eta=0.0)
    assert stored.resolve_sampling(decoder_sampler="dpmpp_2m").of("decoder").eta == 0.0
    monkeypatch.undo()
    assert len(vary(ddpm_default, torch.rand(1, 3, 32, 32), 1, eta=1.0)) == 1  # vary decodes with DDIM anyway
    for command in ("generate", "eval"):
        args = [command, *(["x"] if command == "generate" else []), "--pipeline", str(cascade_dir), "--device", "cpu"]
        assert main([*args, "--sampler", "ddpm", "--decoder-eta", "0.7"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "eta applies to samplers that take it" in err


def test_eval_refuses_fewer_than_two_real_samples_before_generating(cascade, cascade_dir, monkeypatch, capsys):
    """FID and KID need two real images: one is refused up front, not after generating every image."""
    from unclip.pipeline.evaluation import evaluate_pipeline

    def never(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(UnclipPipeline, "generate_tensors", never)
    with pytest.raises(ValueError, match="real_samples must be >= 2"):
        evaluate_pipeline(cascade, real_samples=1, progress=False)
    with pytest.raises(ValueError, match="images_per_caption must be >= 1"):
        evaluate_pipeline(cascade, images_per_caption=0, progress=False)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--pipeline", str(cascade_dir), "--device", "cpu", "--real-samples", "1"])
    assert e.value.code == 2 and "argument --real-samples: must be >= 2, got 1" in capsys.readouterr().err


def test_manipulations_check_their_settings(cascade):
    from unclip.pipeline.manipulations import text_diff, vary

    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"decoder: eta \(DDIM's noise\) must lie in \[0, 1\], got 50"):
        vary(cascade, image, 2, eta=50.0)
    with pytest.raises(ValueError, match="have the same CLIP text embedding"):
        text_diff(cascade, image, "a red circle", "a red circle")
    with pytest.raises(ValueError, match="max_angle"):
        text_diff(cascade, image, "a red circle", "a blue square", max_angle=-3)


def test_manipulations_take_image_paths(cascade, tmp_path):
    from unclip.pipeline.manipulations import vary

    Image.new("RGB", (32, 32), (220, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert len(vary(cascade, tmp_path / "red.png", 2)) == 2 and len(vary(cascade, str(tmp_path / "red.png"), 1)) == 1
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        vary(cascade, tmp_path / "bad.png", 1)
    with pytest.raises(TypeError, match="PIL images, image file paths or a"):
        vary(cascade, 42, 1)


def test_manipulations_cut_a_wide_image_to_its_centre_square(tiny_pipeline, tmp_path):
    """As the decoder's and CLIP's training images are cut (SquareImage), not stretched to a square."""
    from unclip.images import pil_to_tensor, tensor_to_pil

    wide = torch.rand(3, 16, 32, generator=torch.Generator().manual_seed(0))
    wide = pil_to_tensor(tensor_to_pil(wide))[None]  # (1, 3, h, w) on the 8-bit grid, as a PNG holds it
    centre = encode_image(tiny_pipeline, wide[..., 8:24], steps=3)
    tensor_to_pil(wide[0]).save(tmp_path / "wide.png")
    for image in (wide, tmp_path / "wide.png", Image.open(tmp_path / "wide.png")):
        latent = encode_image(tiny_pipeline, image, steps=3)
        assert torch.allclose(latent.image_embed, centre.image_embed, atol=1e-5), type(image)
        assert torch.allclose(latent.x_T, centre.x_T, atol=1e-5), type(image)
    square = tensor_to_pil(wide[0, :, :, 8:24])
    assert vary(tiny_pipeline, tmp_path / "wide.png", 1, eta=0.0)[0].tobytes() == vary(tiny_pipeline, square, 1,
                                                                                           eta=0.0)[0].tobytes()
