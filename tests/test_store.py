"""gapkit.store: the embedding set on disk, the shard writer, and loaders of other formats."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from gapkit.errors import GapkitError
from gapkit.store import (
    FORMAT_VERSION,
    ShardWriter,
    check_rows,
    is_finished,
    iter_blocks,
    load_embeddings,
    open_set,
    write_set,
)


def _arrays(n=12, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the embedding set folder
# --------------------------------------------------------------------------------------------


def test_write_and_open_roundtrip_memory_mapped(tmp_path):
    x, y = _arrays()
    p = write_set(
        tmp_path / "set",
        x,
        y,
        image_meta=[{"id": f"im{i}", "label": "a" if i < 6 else "b"} for i in range(12)],
        text_meta=[{"text": f"t{i}"} for i in range(12)],
        info={"encoders": {"image": "E", "text": "T"}},
    )
    assert is_finished(p)
    emb = open_set(p)
    assert isinstance(emb.images, np.memmap) and isinstance(emb.texts, np.memmap)
    np.testing.assert_array_equal(emb.images, x)
    np.testing.assert_array_equal(emb.texts, y)
    assert emb.one_to_one and emb.n_images == 12
    info = json.loads((p / "info.json").read_text())
    assert info["format_version"] == FORMAT_VERSION and info["n_texts"] == 12 and info["image_dim"] == 6
    assert info["encoders"] == {"image": "E", "text": "T"} and info["dtype"] == "float32"
    # numpy alone reads it
    np.testing.assert_array_equal(np.load(p / "texts.npy", mmap_mode="r"), y)
    assert emb.labels("label").tolist() == ["a"] * 6 + ["b"] * 6
    assert emb.text_meta[3] == {"text": "t3", "image_row": 3}
    with pytest.raises(GapkitError, match="no metadata column 'colour'.*label"):
        emb.labels("colour")


def test_float16_and_several_captions(tmp_path):
    x, _ = _arrays(n=4)
    rows = np.array([0, 0, 1, 2, 2, 2, 3])
    y = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)
    p = write_set(tmp_path / "s", x, y, image_row=rows, dtype="float16", image_meta=[{"label": c} for c in "abcd"])
    emb = open_set(p)
    assert emb.images.dtype == np.float16 and emb.texts.dtype == np.float16
    np.testing.assert_allclose(emb.texts, y, atol=1e-2)
    assert not emb.one_to_one and emb.image_row.tolist() == rows.tolist()
    assert emb.labels("label").tolist() == list("aabcccd")  # image labels follow each text
    im, tx = emb.pairs()
    np.testing.assert_array_equal(im, np.asarray(emb.images)[rows])
    sub = emb.select_texts([5, 0])
    assert sub.image_row.tolist() == [1, 0] and sub.n_images == 2
    np.testing.assert_array_equal(sub.images[sub.image_row], np.asarray(emb.images)[rows[[5, 0]]])
    with pytest.raises(GapkitError, match="float32 or float16"):
        write_set(tmp_path / "t", x, x, dtype="int8")


def test_write_set_refuses_bad_input_and_overwrite(tmp_path):
    x, y = _arrays()
    with pytest.raises(GapkitError, match="no image_row"):
        write_set(tmp_path / "a", x, y[:5])
    write_set(tmp_path / "b", x, y)
    with pytest.raises(GapkitError, match="already exists"):
        write_set(tmp_path / "b", x, y)
    write_set(tmp_path / "b", x * 2, y, overwrite=True)
    np.testing.assert_array_equal(open_set(tmp_path / "b").images, x * 2)
    assert not list(tmp_path.glob(".b.tmp-*"))  # no temporary folder left behind


def test_open_set_errors(tmp_path):
    with pytest.raises(GapkitError, match="no such"):
        open_set(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GapkitError, match="info.json is missing"):
        open_set(tmp_path / "empty")
    (tmp_path / "half" / ".shards").mkdir(parents=True)
    with pytest.raises(GapkitError, match="unfinished"):
        open_set(tmp_path / "half")
    x, y = _arrays()
    p = write_set(tmp_path / "new", x, y)
    info = json.loads((p / "info.json").read_text())
    (p / "info.json").write_text(json.dumps(dict(info, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(GapkitError, match="newer"):
        open_set(p)
    (p / "info.json").write_text(json.dumps(dict(info, format="other")))
    with pytest.raises(GapkitError, match="not a gapkit-embeddings"):
        open_set(p)


# --------------------------------------------------------------------------------------------
# the shard writer: resume and finalise
# --------------------------------------------------------------------------------------------


def _shard(k, n_img=3, caps=2, d=4):
    rng = np.random.default_rng(k)
    im = rng.normal(size=(n_img, d)).astype(np.float32)
    tx = rng.normal(size=(n_img * caps, d)).astype(np.float32)
    rows = np.repeat(np.arange(n_img), caps)
    meta_i = [{"id": f"{k}-{i}"} for i in range(n_img)]
    meta_t = [{"text": f"{k}-{j}"} for j in range(n_img * caps)]
    return im, tx, rows, meta_i, meta_t


def test_shard_writer_resumes_and_finalizes(tmp_path):
    plan = {"dataset": "d", "encoder": "e", "shard_size": 3}
    w = ShardWriter(tmp_path / "out", plan, n_shards=3)
    w.write(0, *_shard(0))
    w.write(2, *_shard(2), skipped=[{"row": 7, "why": "broken image"}])
    # an interrupted run: a fresh writer with the same plan sees what is done
    w2 = ShardWriter(tmp_path / "out", plan, n_shards=3)
    assert [w2.done(k) for k in range(3)] == [True, False, True] and w2.n_done() == 2
    with pytest.raises(GapkitError, match="1 shards are not finished"):
        w2.finalize()
    with pytest.raises(GapkitError, match="differs in: shard_size"):
        ShardWriter(tmp_path / "out", dict(plan, shard_size=4), n_shards=3)
    w2.write(1, *_shard(1))
    p = w2.finalize(info={"encoders": {"image": "e"}})
    assert not (p / ".shards").exists()
    emb = open_set(p)
    parts = [_shard(k) for k in range(3)]
    np.testing.assert_array_equal(emb.images, np.concatenate([s[0] for s in parts]))
    np.testing.assert_array_equal(emb.texts, np.concatenate([s[1] for s in parts]))
    assert emb.image_row.tolist() == [r + 3 * k for k in range(3) for r in parts[k][2]]  # local -> global rows
    assert [m["id"] for m in emb.image_meta] == [f"{k}-{i}" for k in range(3) for i in range(3)]
    assert emb.text_meta[7] == {"text": "1-1", "image_row": 3}
    info = json.loads((p / "info.json").read_text())
    assert info["skipped"] == [{"row": 7, "why": "broken image"}] and info["n_texts"] == 18
    with pytest.raises(GapkitError, match="already a finished"):
        ShardWriter(p, plan, n_shards=3)


def test_shard_writer_float16_and_partial_temp_files(tmp_path):
    w = ShardWriter(tmp_path / "o", {"a": 1}, n_shards=2)
    w.write(0, *_shard(0))
    # a crash mid-write leaves only a temporary file, which is not a finished shard
    (w.shard_dir / ".shard-000001.tmp-99.npz").write_bytes(b"partial")
    assert not w.done(1)
    w.write(1, *_shard(1))
    p = w.finalize(dtype="float16")
    emb = open_set(p)
    assert emb.images.dtype == np.float16
    np.testing.assert_allclose(emb.images, np.concatenate([_shard(0)[0], _shard(1)[0]]), atol=1e-2)


def test_unreadable_shard_is_named(tmp_path):
    w = ShardWriter(tmp_path / "o", {"a": 1}, n_shards=1)
    w.shard_path(0).write_bytes(b"garbage")
    with pytest.raises(GapkitError, match="shard-000000.npz"):
        w.finalize()


# --------------------------------------------------------------------------------------------
# other people's formats
# --------------------------------------------------------------------------------------------


def test_liang_layout_npy(tmp_path):
    x, y = _arrays()
    np.save(tmp_path / "f.npy", np.stack([x, y]))
    emb = load_embeddings(tmp_path / "f.npy")
    np.testing.assert_array_equal(emb.images, x)
    np.testing.assert_array_equal(emb.texts, y)
    np.save(tmp_path / "g.npy", x)
    with pytest.raises(GapkitError, match=r"\(2, N, D\)"):
        load_embeddings(tmp_path / "g.npy")


def test_single_stacked_array_in_npz_and_safetensors(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "f.npz", np.stack([x, y]))  # key arr_0
    save_file({"features": np.stack([x, y])}, str(tmp_path / "f.safetensors"))
    for f in ("f.npz", "f.safetensors"):
        emb = load_embeddings(tmp_path / f)
        np.testing.assert_array_equal(emb.images, x)
        np.testing.assert_array_equal(emb.texts, y)


def test_real_liang_features(coco_features):
    emb = load_embeddings(coco_features)
    assert emb.images.shape == (500, 512) and emb.texts.shape == (500, 512) and emb.one_to_one


@pytest.mark.parametrize(
    "keys", [("images", "texts"), ("image_embeds", "text_embeds"), ("img_emb", "text_emb"), ("image_features", "text_features")]
)
def test_npz_and_safetensors_keys(tmp_path, keys):
    x, y = _arrays()
    np.savez(tmp_path / "a.npz", **{keys[0]: x, keys[1]: y})
    save_file({keys[0]: x, keys[1]: y}, str(tmp_path / "a.safetensors"))
    for f in ("a.npz", "a.safetensors"):
        emb = load_embeddings(tmp_path / f)
        np.testing.assert_array_equal(emb.images, x)
        np.testing.assert_array_equal(emb.texts, y)


def test_missing_keys_and_bf16_safetensors(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "a.npz", foo=x, bar=y)
    with pytest.raises(GapkitError, match="no image array.*found foo, bar"):
        load_embeddings(tmp_path / "a.npz")
    save_torch({"images": torch.from_numpy(x).bfloat16(), "texts": torch.from_numpy(y).bfloat16()},
               str(tmp_path / "b.safetensors"))
    emb = load_embeddings(tmp_path / "b.safetensors")
    np.testing.assert_allclose(emb.images, x, atol=3e-2, rtol=1e-2)


def test_torch_files(tmp_path):
    x, y = _arrays()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    torch.save({"images": tx, "texts": ty}, tmp_path / "d.pt")
    torch.save((tx, ty), tmp_path / "t.pt")
    torch.save(torch.stack([tx, ty]), tmp_path / "s.pt")
    for f in ("d.pt", "t.pt", "s.pt"):
        emb = load_embeddings(tmp_path / f)
        np.testing.assert_array_equal(emb.images, x)
        np.testing.assert_array_equal(emb.texts, y)
    torch.save(tx, tmp_path / "i.pt")
    torch.save(ty, tmp_path / "j.pt")
    emb = load_embeddings(images=tmp_path / "i.pt", texts=tmp_path / "j.pt")
    np.testing.assert_array_equal(emb.texts, y)


def test_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "ran.txt"),))

    with open(tmp_path / "evil.pt", "wb") as fh:
        torch.save({"images": Evil()}, fh)
    with pytest.raises(GapkitError, match="weights_only"):
        load_embeddings(tmp_path / "evil.pt")
    with open(tmp_path / "evil.npy", "wb") as fh:
        np.save(fh, np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(GapkitError, match="pickle"):
        load_embeddings(tmp_path / "evil.npy")
    with open(tmp_path / "raw.npy", "wb") as fh:  # a pickle under a .npy name
        pickle.dump(Evil(), fh)
    with pytest.raises(GapkitError, match="not a .npy file"):
        load_embeddings(tmp_path / "raw.npy")
    assert not (tmp_path / "ran.txt").exists()


def test_separate_files_and_mismatch(tmp_path):
    x, y = _arrays()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y[:7])
    with pytest.raises(GapkitError, match="12 image rows but 7 text rows"):
        load_embeddings(images=tmp_path / "x.npy", texts=tmp_path / "y.npy")
    emb = load_embeddings(images=tmp_path / "x.npy", texts=tmp_path / "y.npy", image_row=[0, 0, 1, 1, 2, 3, 11])
    assert emb.n_texts == 7 and not emb.one_to_one
    with pytest.raises(GapkitError, match="outside"):
        load_embeddings(images=tmp_path / "x.npy", texts=tmp_path / "y.npy", image_row=[0, 0, 1, 1, 2, 3, 12])
    with pytest.raises(GapkitError, match="either one source"):
        load_embeddings(tmp_path / "x.npy", images=x)
    with pytest.raises(GapkitError, match="unknown file type"):
        (tmp_path / "a.csv").write_text("1,2\n")
        load_embeddings(tmp_path / "a.csv")


def test_clip_retrieval_folder(tmp_path):
    x, y = _arrays(n=25)
    for sub, arr, pre in (("img_emb", x, "img_emb"), ("text_emb", y, "text_emb")):
        (tmp_path / "cr" / sub).mkdir(parents=True)
        for part, (s, e) in enumerate([(0, 4), (4, 8)] + [(8 + i, 9 + i) for i in range(9)] + [(17, 25)]):
            np.save(tmp_path / "cr" / sub / f"{pre}_{part}.npy", arr[s:e])  # _10 sorts after _9
    emb = load_embeddings(tmp_path / "cr")
    np.testing.assert_array_equal(emb.images, x)
    np.testing.assert_array_equal(emb.texts, y)
    (tmp_path / "cr" / "text_emb" / "text_emb_11.npy").unlink()
    with pytest.raises(GapkitError, match="img_emb has 25 rows but text_emb has 17"):
        load_embeddings(tmp_path / "cr")
    (tmp_path / "other").mkdir()
    with pytest.raises(GapkitError, match="neither an embedding set"):
        load_embeddings(tmp_path / "other")


def test_label_files(tmp_path):
    x, y = _arrays(n=4)
    labs = ["a", "b", "a", "c"]
    np.save(tmp_path / "l.npy", np.array(labs))
    (tmp_path / "l.json").write_text(json.dumps(labs))
    (tmp_path / "l.txt").write_text("\n".join(labs) + "\n")
    for f in ("l.npy", "l.json", "l.txt"):
        emb = load_embeddings(images=x, texts=y, labels=tmp_path / f)
        assert emb.labels().tolist() == labs
    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(GapkitError, match="2 labels but there are 4 texts"):
        load_embeddings(images=x, texts=y, labels=tmp_path / "short.txt")
    assert load_embeddings(images=x, texts=y, labels=[1, 2, 3, 4]).labels().tolist() == ["1", "2", "3", "4"]


def test_check_rows_and_blocks():
    a = np.ones((10, 3), dtype=np.float16)
    check_rows(a, "a")
    a[8, 1] = np.nan
    with pytest.raises(GapkitError, match="row 8: contains NaN") as err:
        check_rows(a, "a", chunk=3)
    assert err.value.path == "a"
    with pytest.raises(GapkitError, match="empty"):
        check_rows(np.ones((0, 3)), "e")
    with pytest.raises(GapkitError, match="2-D"):
        check_rows(np.ones(3), "v")
    blocks = list(iter_blocks(np.arange(20, dtype=np.float16).reshape(10, 2), chunk=4))
    assert [s for s, _ in blocks] == [0, 4, 8] and all(b.dtype == np.float32 for _, b in blocks)
