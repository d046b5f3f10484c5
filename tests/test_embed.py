"""`unclip embed`: shards hold exactly what the CLIP computes, resume after interruption, skip bad rows."""

import io

import datasets
import pytest
import torch

from unclip.data import make_shapes
from unclip.data.embeddings import EmbeddingShards, embed_dataset
from unclip.data.image_text import DataError


@pytest.fixture(scope="module")
def rows():
    return make_shapes(20, split="train", seed=3)


def test_shards_match_direct_encoding(tiny_clip, rows, tmp_path):
    out = embed_dataset(tiny_clip, rows, tmp_path / "emb", source="t", shard_size=8, batch_size=5, progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-00000{k}.safetensors" for k in range(3)]
    shards = EmbeddingShards(out)
    assert len(shards) == 20
    direct = tiny_clip.encode_text(rows["caption"])
    image_embed = tiny_clip.encode_image(rows["image"])
    for i in (0, 7, 8, 19):
        item = shards[i]
        assert item["index"] == i and item["caption"] == rows[i]["caption"]
        torch.testing.assert_close(item["text_embed"].float(), direct.text_embed[i], atol=2e-3, rtol=0)
        torch.testing.assert_close(item["image_embed"].float(), image_embed[i], atol=2e-3, rtol=0)
        torch.testing.assert_close(item["text_tokens"].float(), direct.text_tokens[i], atol=1e-2, rtol=1e-2)
        assert torch.equal(item["text_mask"], direct.text_mask[i])


def test_interrupted_run_resumes_without_redoing_complete_shards(tiny_clip, rows, tmp_path):
    out = embed_dataset(tiny_clip, rows, tmp_path / "emb", source="t", shard_size=8, progress=False)
    first, last = out / "shard-000000.safetensors", out / "shard-000002.safetensors"
    before = first.stat().st_mtime_ns
    reference = last.read_bytes()
    last.unlink()  # as if the run had died while writing the last shard
    (out / ".shard-000002.safetensors.tmp-0000").write_bytes(b"partial")
    embed_dataset(tiny_clip, rows, out, source="t", shard_size=8, progress=False)
    assert first.stat().st_mtime_ns == before
    assert last.read_bytes() == reference
    assert len(EmbeddingShards(out)) == 20


def test_refuses_to_mix_embeddings(tiny_clip, rows, tmp_path):
    embed_dataset(tiny_clip, rows, tmp_path / "emb", source="t", shard_size=8, progress=False)
    with pytest.raises(ValueError, match="different source"):
        embed_dataset(tiny_clip, rows, tmp_path / "emb", source="other", shard_size=8, progress=False)


def test_bad_images_are_skipped_and_counted(tiny_clip, tmp_path):
    good = io.BytesIO()
    make_shapes(1)[0]["image"].save(good, format="PNG")
    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}],
         "caption": ["a red circle on a blue background", "broken"]},
        features=datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Value("string")}),
    )
    with pytest.warns(UserWarning, match="1 row"):
        out = embed_dataset(tiny_clip, data, tmp_path / "emb", source="bad", progress=False)
    shards = EmbeddingShards(out)
    assert len(shards) == 1 and shards[0]["index"] == 0


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_a_damaged_shard_is_set_aside_and_embedded_again(tiny_clip, rows, tmp_path, damage):
    out = embed_dataset(tiny_clip, rows, tmp_path / "emb", source="t", shard_size=8, progress=False)
    shard = out / "shard-000001.safetensors"
    reference = shard.read_bytes()
    if damage == "truncate":  # as a copy that ran out of disk would leave it
        shard.write_bytes(reference[: len(reference) // 2])
    else:  # a sound safetensors file that holds another shard's rows (a copy to the wrong name)
        shard.write_bytes((out / "shard-000000.safetensors").read_bytes())
    damaged = shard.read_bytes()
    with pytest.raises(DataError, match="shard-000001"):
        EmbeddingShards(out)  # reading names the bad file instead of failing somewhere in a training run
    with pytest.warns(UserWarning, match="shard-000001.*embedding it again"):
        embed_dataset(tiny_clip, rows, out, source="t", shard_size=8, progress=False)
    assert shard.read_bytes() == reference
    (aside,) = out.glob("shard-000001.safetensors.corrupt-*")
    assert aside.read_bytes() == damaged  # nothing the user had is thrown away
    assert len(EmbeddingShards(out)) == 20


def test_an_unreadable_manifest_is_named(tiny_clip, rows, tmp_path):
    out = embed_dataset(tiny_clip, rows, tmp_path / "emb", source="t", shard_size=8, progress=False)
    (out / "manifest.json").write_text('{"rows": 20,')
    with pytest.raises(DataError, match="manifest.json"):
        EmbeddingShards(out)
    with pytest.raises(DataError, match="manifest.json"):
        embed_dataset(tiny_clip, rows, out, source="t", shard_size=8, progress=False)


def test_captions_that_do_not_fit_their_rows_are_named_on_first_read(tiny_clip, rows, tmp_path):
    """Reading a large set parses no captions up front; a shard's are checked when it is first opened."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = embed_dataset(tiny_clip, rows, tmp_path / "emb", source="t", shard_size=8, progress=False)
    shard = out / "shard-000001.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        captions = json.loads(f.metadata()["captions"])
    save_file(load_file(str(shard)), str(shard), metadata={"captions": json.dumps(captions[:-1])})
    shards = EmbeddingShards(out)
    assert shards[0]["index"] == 0  # the sound shards read as before
    with pytest.raises(DataError, match="shard-000001.* captions do not match its rows"):
        shards[8]
    with pytest.warns(UserWarning, match="shard-000001.*embedding it again"):  # embed checks them all
        embed_dataset(tiny_clip, rows, out, source="t", shard_size=8, progress=False)
    assert EmbeddingShards(out)[8]["caption"] == rows[8]["caption"]
