"""The CLIP wrapper against open_clip's own outputs, its three construction paths and its errors."""

import pickle
import socket

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unclip import hub
from unclip.checkpoint import CheckpointError
from unclip.clip import CaptionError, Clip, ClipConfig, load_clip
from unclip.config import load_config

CAPTIONS = ["a red circle on a blue background", "a green square", "cross"]


def _images():
    return [Image.new("RGB", (40, 48), (220, 30, 30)), Image.new("L", (32, 32), 128)]


def _outputs(clip: Clip):
    enc = clip.encode_text(CAPTIONS)
    return enc.text_embed, enc.text_states, clip.encode_image(_images())


def _assert_same(a: Clip, b: Clip):
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)


def test_text_embedding_equals_open_clip(tiny_clip):
    enc = tiny_clip.encode_text(CAPTIONS)
    tokens = tiny_clip.tokenizer(CAPTIONS)
    reference = tiny_clip.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(enc.text_embed, reference, rtol=0, atol=1e-6)
    assert enc.text_embed.shape == (3, tiny_clip.embed_dim)
    torch.testing.assert_close(enc.text_embed.norm(dim=-1), torch.ones(3))


def test_token_states_are_the_final_layer_normed_states(tiny_clip):
    """Recompute open_clip's text tower by hand and compare the per-token states and the mask."""
    model = tiny_clip.model
    tokens = tiny_clip.tokenizer(CAPTIONS)
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    enc = tiny_clip.encode_text(CAPTIONS)
    assert enc.text_states.shape == (3, tiny_clip.context_length, tiny_clip.text_width)
    torch.testing.assert_close(enc.text_states, x, rtol=0, atol=1e-5)
    words = [len(tiny_clip.tokenizer.encode(c)) for c in CAPTIONS]
    assert enc.text_mask.dtype == torch.bool
    assert enc.text_mask.sum(dim=1).tolist() == [n + 2 for n in words]  # + start and end tokens
    assert enc.text_mask[:, 0].all()


def test_image_embedding_equals_open_clip(tiny_clip):
    transform = open_clip.image_transform(tiny_clip.image_size, is_train=False)
    pixels = torch.stack([transform(im.convert("RGB")) for im in _images()])
    reference = tiny_clip.model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(tiny_clip.encode_image(_images()), reference, rtol=0, atol=1e-6)


def test_tensor_images_at_model_size_match_pil(tiny_clip):
    rgb = torch.rand(2, 3, tiny_clip.image_size, tiny_clip.image_size)
    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for x in rgb]
    quantised = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pil]) / 255
    torch.testing.assert_close(tiny_clip.encode_image(quantised), tiny_clip.encode_image(pil), rtol=0, atol=1e-5)
    assert tiny_clip.encode_image(torch.rand(3, 3, 64, 80)).shape == (3, tiny_clip.embed_dim)
    with pytest.raises(ValueError, match=r"\(b, 3, h, w\)"):
        tiny_clip.encode_image(torch.rand(3, 64, 64))


def test_conditioner_is_frozen(tiny_clip):
    assert not tiny_clip.training
    assert not any(p.requires_grad for p in tiny_clip.parameters())


def test_our_format_round_trip(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    _assert_same(tiny_clip, Clip.from_pretrained(tmp_path / "clip"))
    _assert_same(tiny_clip, load_clip(tmp_path / "clip"))
    _assert_same(tiny_clip, Clip.from_config(load_config(ClipConfig, {"checkpoint": str(tmp_path / "clip")})))


@pytest.mark.parametrize("fmt", ["training-pt", "plain-pt", "safetensors"])
def test_open_clip_format_round_trip(tiny_clip, tiny_arch, tmp_path, fmt):
    state = tiny_clip.model.state_dict()
    if fmt == "training-pt":  # what open_clip's training script writes (DDP prefix included)
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif fmt == "plain-pt":
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = Clip.from_config(ClipConfig(architecture=tiny_arch, checkpoint=str(path)))
    _assert_same(tiny_clip, loaded)


def test_named_open_clip_model_with_local_pretrained_file(tiny_clip, tiny_arch, tmp_path):
    """The pretrained-by-name path: an architecture registered with open_clip, weights from a local file."""
    name = "unclip-test-tiny"
    open_clip.factory._MODEL_CONFIGS[name] = tiny_arch
    try:
        path = tmp_path / "weights.pt"
        torch.save(tiny_clip.model.state_dict(), path)
        _assert_same(tiny_clip, Clip.from_open_clip(name, pretrained=str(path)))
        _assert_same(tiny_clip, load_clip(name, pretrained=str(path)))
        fresh = Clip.from_open_clip(name)  # open_clip.create_model with random weights
        assert fresh.embed_dim == tiny_clip.embed_dim and fresh.context_length == 16
    finally:
        del open_clip.factory._MODEL_CONFIGS[name]


def test_checkpoint_for_another_architecture_is_refused(tiny_clip, tiny_arch, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    other = {**tiny_arch, "embed_dim": 24}
    path = tmp_path / "w.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="another architecture") as e:
        Clip.from_config(ClipConfig(architecture=other, checkpoint=str(path)))
    assert "text_projection" in str(e.value) and "shape mismatch" in str(e.value)
    with pytest.raises(CheckpointError, match="not a 'clip' one"):
        from unclip.checkpoint import save_pretrained_dir

        save_pretrained_dir(tmp_path / "prior", kind="prior", config={}, state_dict={"w": torch.ones(1)})
        Clip.from_pretrained(tmp_path / "prior")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_needing_full_unpickling_are_refused(tiny_arch, tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(CheckpointError, match="never unpickles"):
        Clip.from_config(ClipConfig(architecture=tiny_arch, checkpoint=str(path)))


def test_caption_errors(tiny_clip):
    with pytest.raises(CaptionError, match="caption #1 is empty"):
        tiny_clip.encode_text(["ok", "   "])
    with pytest.raises(CaptionError, match=r"caption #0 is empty: it has no printable characters \('\\x01\\x02'\)"):
        tiny_clip.encode_text(["\x01\x02", "ok"])  # the tokenizer would read start and end tokens alone
    assert tiny_clip.encode_text(["...", "ünïcode 🙂"]).text_embed.shape[0] == 2  # punctuation, emoji: fine
    with pytest.raises(CaptionError, match="no captions"):
        tiny_clip.encode_text([])
    long = " ".join(["red"] * 40)
    with pytest.warns(UserWarning, match="longer than the 16-token context"):
        enc = tiny_clip.encode_text([long])
    assert enc.text_mask.all()  # truncated to fill the whole context
    with pytest.raises(CaptionError, match="longer than"):
        tiny_clip.encode_text([long], truncate=False)
    with pytest.warns(UserWarning, match=r"first: row 7 'red red"):  # a data loader's captions: their dataset row
        tiny_clip.encode_text(["ok", long], rows=torch.tensor([3, 7]))


def test_config_validation_and_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="needs a model_name"):
        ClipConfig()
    with pytest.raises(ValueError, match="not both"):
        ClipConfig(model_name="ViT-B-32", pretrained="openai", checkpoint="x.pt")
    with pytest.raises(ValueError, match="neither a directory"):
        load_clip(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        Clip.from_open_clip("ViT-Nonexistent")


@pytest.fixture()
def tiny_name(tiny_arch, monkeypatch):
    """The tiny architecture registered with open_clip under a name, as if it were one of its built-in models."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "unclip-test-tiny", tiny_arch)
    return "unclip-test-tiny"


@pytest.fixture()
def no_network(monkeypatch):
    """A machine without network: no host name resolves, and huggingface_hub's retry waits are recorded (returning
    at once) instead of slept."""
    import huggingface_hub.utils._http as hub_http

    def unresolvable(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    waits = []
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)
    return waits


@pytest.fixture()
def unreachable_hub(monkeypatch, tmp_path, no_network):
    """A hub that cannot be reached although its name seems to resolve (so unclip asks it, as behind a firewall):
    huggingface_hub retries, then fails. An empty cache; the files asked of the hub are recorded."""
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "_resolves", lambda host: True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    calls, download = [], huggingface_hub.hf_hub_download

    def recorded(repo_id, filename, **kwargs):
        calls.append(filename)
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recorded)
    return calls


def test_pretrained_weights_that_cannot_be_had_are_one_clear_error(tiny_name, tmp_path, unreachable_hub):
    """A missing file, a file that holds no weights, an unknown tag, and a tag that cannot be downloaded: each a
    ClipWeightsError (a CheckpointError, one line on the command line) naming what was given; no download tried
    for files and unknown tags."""
    with pytest.raises(CheckpointError, match="pretrained weights file not found: .*missing.pt"):
        Clip.from_open_clip(tiny_name, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="CLIP checkpoint not found"):
        Clip.from_config(ClipConfig(model_name=tiny_name, checkpoint=str(tmp_path / "missing.pt")))
    (tmp_path / "notes.pt").write_text("hello world, not weights\n")
    with pytest.raises(CheckpointError, match=r"notes.pt is not a readable CLIP checkpoint.*text file starting 'hell"):
        Clip.from_open_clip(tiny_name, pretrained=str(tmp_path / "notes.pt"))
    torch.save({"epoch": 3, "w": torch.ones(1)}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta.pt is not a CLIP checkpoint: it holds a dict .*'epoch': int"):
        load_clip(tiny_name, pretrained=str(tmp_path / "meta.pt"))
    with pytest.raises(CheckpointError, match="'nosuchtag' is neither a file nor a pretrained tag of ViT-B-32 "
                                               r"\(its tags: openai, "):
        Clip.from_open_clip("ViT-B-32", pretrained="nosuchtag")
    with pytest.raises(CheckpointError, match=r"is a directory: give an open_clip weights file"):
        Clip.from_open_clip(tiny_name, pretrained=str(tmp_path))
    assert unreachable_hub == []
    with pytest.raises(CheckpointError, match="the open_clip weights 'openai' of ViT-B-32 could not be downloaded "
                                               r"\(offline\?\): .* give a local open_clip weights file"):
        load_clip("ViT-B-32", pretrained="openai")
    assert unreachable_hub == ["open_clip_model.safetensors"]  # the unreachable hub is not asked for the .bin too


def test_a_name_without_weights_or_a_file_instead_of_a_directory_is_refused(tiny_clip, tiny_name, tmp_path):
    """load_clip (what users type) never hands out random weights; Clip.from_open_clip(name) still builds them."""

    with pytest.raises(CheckpointError, match=f"{tiny_name} is an open_clip architecture name without weights"):
        load_clip(tiny_name)
    with pytest.raises(CheckpointError, match=r"pretrained=TAG\|FILE \(a pretrained tag \(openai, .*\)"):
        load_clip("ViT-B-32")
    assert Clip.from_open_clip(tiny_name).embed_dim == tiny_clip.embed_dim  # random on purpose
    path = tmp_path / "epoch_32.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    for load in (Clip.from_pretrained, load_clip):
        with pytest.raises(CheckpointError, match="epoch_32.pt is a file, not a CLIP directory") as e:
            load(path)
        assert f"Clip.from_open_clip(NAME, pretrained='{path}')" in str(e.value)
        assert f"--clip NAME --pretrained {path}" in str(e.value)


def test_architecture_typos_are_config_errors_naming_the_closest_key(tiny_arch, tmp_path, capsys):
    """A misspelt key in a train-clip config's `architecture:` block (or a --set into it) is one line naming the
    key's path and the closest field of open_clip's CLIPVisionCfg / CLIPTextCfg / CLIP, before any training."""
    import yaml

    from unclip.cli.train_clip import main as train_clip
    from unclip.config import ConfigError

    arch = {**tiny_arch, "vision_cfg": {**tiny_arch["vision_cfg"], "head_widht": 32}}
    del arch["vision_cfg"]["head_width"]
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"model": {"architecture": arch}, "train": {"max_steps": 1}}))
    out = ["--output-dir", str(tmp_path / "run")]
    assert train_clip([str(path), *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: unknown config key 'model.architecture.vision_cfg.head_widht' for " \
        "open_clip's CLIPVisionCfg. Did you mean 'head_width'?" in err
    path.write_text(yaml.safe_dump({"model": {"architecture": tiny_arch}, "train": {"max_steps": 1}}))
    for key, close in (("vision_cfg.widht", "width"), ("text_cfg.head", "heads"), ("embed_dims", "embed_dim")):
        assert train_clip([str(path), *out, "--set", f"model.architecture.{key}=3"]) == 2
        assert f"'model.architecture.{key}'" in (err := capsys.readouterr().err) and f"Did you mean '{close}'?" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"'architecture.text_cfg.heds' for open_clip's CLIPTextCfg. Did you mean"):
        Clip.from_architecture({**tiny_arch, "text_cfg": {**tiny_arch["text_cfg"], "heds": 2}})
    from unclip.clip.model import check_architecture

    for name in open_clip.list_models():  # every open_clip CLIP config passes (CoCa is another model class)
        if not name.startswith("coca"):
            check_architecture(open_clip.get_model_config(name))


def test_a_pretrained_tag_offline_loads_from_the_cache_or_fails_without_retrying(tiny_name, tmp_path, monkeypatch,
                                                                                 no_network):
    """huggingface_hub retries an unresolvable host (~25 s per file, two files) before it fails on a tag it has not
    cached: without network that is one error at once, and a cached tag still loads."""
    from huggingface_hub import constants

    pretrained = {"hf_hub": "unclip-test/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_name, {"cached": pretrained,
                                                                     "elsewhere": {**pretrained, "hf_hub": "x/y/"}})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = Clip.from_open_clip(tiny_name)
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--unclip-test--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(source.model.state_dict(), str(repo / "snapshots" / revision / "open_clip_model.safetensors"))

    clip = Clip.from_open_clip(tiny_name, pretrained="cached")
    assert no_network == [] and not constants.HF_HUB_OFFLINE  # from the cache at once; no library's setting changed
    assert clip.fingerprint() == source.fingerprint()
    reference = open_clip.create_model(tiny_name, pretrained="cached")  # open_clip alone: its cache after the retries
    assert dict(clip.model.visual.preprocess_cfg) == dict(reference.visual.preprocess_cfg)  # the tag's preprocessing
    assert tuple(clip.preprocess_cfg.mean) == (0.5, 0.5, 0.5)
    no_network.clear()
    with pytest.raises(CheckpointError, match="'elsewhere' of unclip-test-tiny could not be downloaded .*not in the "
                                               "local cache and the Hugging Face Hub's host does not resolve"):
        Clip.from_open_clip(tiny_name, pretrained="elsewhere")
    assert no_network == []


def test_the_hub_is_offline_when_told_or_when_its_host_does_not_resolve(monkeypatch):
    """HF_HUB_OFFLINE is honoured without a look-up; an unresolvable host counts only without a proxy (which resolves
    names itself)."""
    from huggingface_hub import constants

    lookups = []
    monkeypatch.setattr(hub, "_resolves", lambda host: lookups.append(host) or False)
    for variable in hub.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.offline_reason() == "HF_HUB_OFFLINE is set" and lookups == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.is_offline() and len(lookups) == 1  # the endpoint's host, looked up
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert not hub.is_offline()
