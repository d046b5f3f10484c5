"""`unclip embed`: shards hold exactly what the CLIP computes, resume after interruption, skip bad rows."""

import io
import json

import datasets
import pytest
import torch

from unclip.data import make_shapes
from unclip.data.embeddings import EmbeddingShards, embed_dataset
from unclip.data.image_text import DataError, decode_image, load_image_text_dataset


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
        torch.testing.assert_close(item["text_states"].float(), direct.text_states[i], atol=1e-2, rtol=1e-2)
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


def image_folder(root, files: dict[str, bytes | None], caption: str = "a red circle on a blue background"):
    """An image folder whose metadata lists `files` in order; a None file is listed but not written."""
    root.mkdir()
    for name, data in files.items():
        if data is not None:
            (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "caption": caption}) + "\n"
                                                 for n in files))
    return root


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_shapes(1, seed=seed)[0]["image"].save(buf, format="PNG")
    return buf.getvalue()


def test_a_dataset_with_no_usable_row_is_an_error_naming_it(tiny_clip, tmp_path):
    folder = image_folder(tmp_path / "data", {f"b{i}.png": b"" for i in range(3)})
    data = load_image_text_dataset(folder)
    with pytest.raises(DataError, match=rf"no row of {folder} could be embedded: all 3 were skipped \(first: row 0: "
                                        rf"{folder / 'b0.png'}: empty file \(0 bytes\); row 1: "):
        embed_dataset(tiny_clip, data, tmp_path / "emb", source=str(folder), progress=False)
    with pytest.raises(DataError, match=rf"{tmp_path / 'emb'} holds no embeddings: none of the 3 rows of {folder}"):
        EmbeddingShards(tmp_path / "emb")  # what train-prior reads: not "the training dataset is empty"


def test_a_rerun_embeds_the_rows_skipped_before(tiny_clip, tmp_path):
    good = png_bytes()
    files = {"r0.png": None, "r1.png": good, "r2.png": good, "r3.png": b"", "r4.png": good}
    folder = image_folder(tmp_path / "data", files)
    data = load_image_text_dataset(folder)
    out = tmp_path / "emb"
    with pytest.warns(UserWarning, match="2 row.* skipped .*running the same command again tries them again"):
        embed_dataset(tiny_clip, data, out, source="d", shard_size=2, batch_size=1, progress=False)
    assert [int(item["index"]) for item in EmbeddingShards(out)] == [1, 2, 4]
    shards = sorted(out.glob("shard-*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    with pytest.warns(UserWarning, match="2 row"):  # still unusable: tried again, nothing is rewritten
        embed_dataset(tiny_clip, data, out, source="d", shard_size=2, batch_size=1, progress=False)
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    (folder / "r0.png").write_bytes(png_bytes(seed=1))  # the user fixes the images
    (folder / "r3.png").write_bytes(good)
    embed_dataset(tiny_clip, data, out, source="d", shard_size=2, batch_size=1, progress=False)
    assert shards[2].stat().st_mtime_ns == stamps[2]  # the shard that lacked nothing is left alone
    reread = EmbeddingShards(out)
    assert [int(item["index"]) for item in reread] == [0, 1, 2, 3, 4]
    direct = tiny_clip.encode_image([decode_image(folder / f"r{i}.png") for i in range(5)])
    for i, item in enumerate(reread):
        assert item["caption"] == "a red circle on a blue background"
        torch.testing.assert_close(item["image_embed"].float(), direct[i], atol=2e-3, rtol=0)
