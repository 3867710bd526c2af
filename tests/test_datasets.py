"""Tests for gapkit.datasets: the four layouts, pairing, path safety, image loading and errors.

Real images come from ../shared/data/medpix when it is present (tiny generated images
otherwise, so the layout tests also run in a fresh clone).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gapkit.datasets import (
    ImageLoadError,
    PairedDataset,
    detect_format,
    expand_shards,
    open_dataset,
    to_rgb,
)
from gapkit.errors import GapkitError

MEDPIX = Path(
    os.environ.get("GAPKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
) / "medpix"  # as tests/conftest.py locates it


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, bytes, str]]:
    """Eight (file name, JPEG bytes, caption) triples: real MedPix pairs when available."""
    meta = MEDPIX / "train" / "metadata.jsonl"
    if meta.exists():
        rows = [json.loads(line) for line in meta.read_text().splitlines()[:8]]
        return [(r["file_name"], (MEDPIX / "train" / r["file_name"]).read_bytes(), r["text"]) for r in rows]
    out = []
    rng = np.random.default_rng(0)
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append((f"img{i}.jpg", buf.getvalue(), f"caption number {i}"))
    return out


def decoded(data: bytes) -> np.ndarray:
    """Reference decoding, independent of gapkit: Pillow straight to RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


def test_medpix_imagefolder_matches_metadata_and_files(medpix: Path) -> None:
    root = medpix / "train"
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    ds = open_dataset(root)
    assert ds.format == "imagefolder"
    assert len(ds) == len(rows) == 1653 and ds.n_texts == 1653
    for i in (0, 1, 777, len(rows) - 1):
        rec, row = ds[i], rows[i]
        assert rec.image_id == row["file_name"] and rec.texts == [row["text"].strip()]
        assert rec.meta == {k: v for k, v in row.items() if k not in ("file_name", "text")}
        assert rec.text_meta == [{}]
        img = ds.load_image(i)
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), decoded((root / row["file_name"]).read_bytes()))
    info = ds.describe()
    json.dumps(info)  # JSON-able
    assert info["n_images"] == 1653 and info["columns"]["text"] == "text"
    assert set(info["columns"]["image_meta"]) == {"label", "location", "modality", "modality_detail", "plane", "case"}
    assert open_dataset(root, limit=5).records == ds.records[:5]
    assert len(open_dataset(medpix / "dev")) == 197


def test_medpix_root_error_points_at_splits(medpix: Path) -> None:
    with pytest.raises(GapkitError) as err:
        open_dataset(medpix)
    msg = str(err.value)
    assert "metadata.jsonl" in msg and "dev, train" in msg and str(medpix) in msg


def test_imagefolder_csv_several_captions_per_image(tmp_path: Path, samples) -> None:
    (tmp_path / "sub").mkdir()
    for name, data, _ in samples[:3]:
        (tmp_path / "sub" / name).write_bytes(data)
    a, b, c = (f"sub/{s[0]}" for s in samples[:3])
    (tmp_path / "metadata.csv").write_text(
        "file_name,caption,caption_id,label\n"
        f"{a},first of a,1,x\n"
        f"{b},only b,2,y\n"
        f'{a},"second of a, with a comma",3,x\n'
        f"{c},,4,z\n"  # empty caption: kept, the pipeline decides
        f"./{a},third of a,5,x\n"
    )
    ds = open_dataset(tmp_path)
    assert ds.format == "imagefolder"
    assert [r.image_id for r in ds] == [a, b, c]
    assert ds[0].texts == ["first of a", "second of a, with a comma", "third of a"]
    assert ds[0].meta == {"caption_id": "1", "label": "x"}
    assert ds[0].text_meta == [{"caption_id": "1"}, {"caption_id": "3"}, {"caption_id": "5"}]
    assert ds[2].texts == [""]
    assert ds.n_texts == 5 and len(ds) == 3
    assert ds[0].line == 2 and ds[1].line == 3  # line numbers of the CSV (header is line 1)
    assert np.array_equal(np.asarray(ds.load_image(1)), decoded(samples[1][1]))
    assert open_dataset(tmp_path, limit=1).records[0].texts == ds[0].texts


def test_imagefolder_text_column_choice_and_errors(tmp_path: Path, samples) -> None:
    name, data, _ = samples[0]
    (tmp_path / name).write_bytes(data)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": name, "report": "long report", "title": "short"}])
    with pytest.raises(GapkitError) as err:
        open_dataset(tmp_path)
    assert "no text column" in str(err.value) and "report" in str(err.value) and "metadata.jsonl" in str(err.value)
    ds = open_dataset(tmp_path, text_column="title")
    assert ds[0].texts == ["short"] and ds[0].meta == {"report": "long report"}
    with pytest.raises(GapkitError, match="no text column 'nope'"):
        open_dataset(tmp_path, text_column="nope")
    ds = open_dataset(tmp_path, text_column="title", label_column="report")
    assert ds[0].meta["label"] == "long report"


# --------------------------------------------------------------------------------------------
# sidecar
# --------------------------------------------------------------------------------------------


def test_sidecar_pairs_by_path_without_extension(tmp_path: Path, samples) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    files = {
        "a/b/scan.1.jpg": "caption of scan.1",  # a dot inside the stem
        "a/first.jpg": "  caption of first\n",
        "z.JPG": "upper-case extension",
    }
    for (rel, text), (_, data, _) in zip(files.items(), samples):
        (tmp_path / rel).write_bytes(data)
        (tmp_path / rel).with_suffix(".txt").write_text(text)
    (tmp_path / "a" / "full.png").write_bytes(samples[3][1])
    (tmp_path / "a" / "full.png.txt").write_text("named with the image's full name")
    (tmp_path / "a" / "alone.jpg").write_bytes(samples[4][1])  # no caption: left out, counted
    (tmp_path / ".cache" / "x.jpg").write_bytes(samples[5][1])
    (tmp_path / ".cache" / "x.txt").write_text("hidden folder")
    (tmp_path / "notes.txt").write_text("no image")

    assert detect_format(tmp_path) == "sidecar"
    ds = open_dataset(tmp_path)
    ids = [r.image_id for r in ds]
    assert ids == ["a/b/scan.1.jpg", "a/first.jpg", "a/full.png", "z.JPG"]
    texts = {r.image_id: r.texts for r in ds}
    assert texts["a/b/scan.1.jpg"] == ["caption of scan.1"]
    assert texts["a/first.jpg"] == ["caption of first"]
    assert texts["a/full.png"] == ["named with the image's full name"]
    assert ds[0].meta["folder"] == "a/b"
    info = ds.describe()
    assert info["unpaired_images"] == 1 and info["unused_txt_files"] == 1
    for i, rel in enumerate(ids):
        assert np.array_equal(np.asarray(ds.load_image(i)), decoded((tmp_path / rel).read_bytes()))
    labelled = open_dataset(tmp_path, label_column="folder", limit=2)
    assert [r.meta["label"] for r in labelled] == ["a/b", "a"]
    with pytest.raises(GapkitError, match="folder"):
        open_dataset(tmp_path, label_column="label")


# --------------------------------------------------------------------------------------------
# manifests
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def image_dir(tmp_path: Path, samples) -> Path:
    d = tmp_path / "data" / "imgs"
    d.mkdir(parents=True)
    for name, data, _ in samples:
        (d / name).write_bytes(data)
    return tmp_path / "data"


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json"])
def test_manifest_formats(image_dir: Path, samples, kind: str) -> None:
    rows = [{"path": f"imgs/{n}", "caption": c, "region": f"r{i % 2}"} for i, (n, _, c) in enumerate(samples)]
    rows.append({"path": f"imgs/{samples[0][0]}", "caption": "another caption", "region": "r0"})
    man = image_dir / f"manifest.{kind}"
    if kind == "jsonl":
        write_jsonl(man, rows)
    elif kind == "json":
        man.write_text(json.dumps(rows))
    else:
        sep = "," if kind == "csv" else "\t"
        quote = (lambda v: '"' + v.replace('"', '""') + '"') if kind == "csv" else (lambda v: v)
        man.write_text("path" + sep + "caption" + sep + "region\n" + "".join(
            sep.join(quote(r[k]) for k in ("path", "caption", "region")) + "\n" for r in rows))
    assert detect_format(man) == "manifest"
    ds = open_dataset(man, label_column="region")
    assert ds.root == image_dir
    assert len(ds) == len(samples) and ds.n_texts == len(samples) + 1
    assert ds[0].texts == [samples[0][2].strip(), "another caption"]
    for i, (name, data, caption) in enumerate(samples):
        assert ds[i].image_id == f"imgs/{name}" and ds[i].texts[0] == caption.strip()
        assert ds[i].meta == {"region": f"r{i % 2}", "label": f"r{i % 2}"}
    assert np.array_equal(np.asarray(ds.load_image(5)), decoded(samples[5][1]))


def test_manifest_json_lists_of_captions_and_image_root(tmp_path: Path, image_dir: Path, samples) -> None:
    man = tmp_path / "elsewhere" / "pairs.jsonl"
    man.parent.mkdir()
    write_jsonl(man, [{"image": f"imgs/{samples[1][0]}", "captions": ["one", "two", None]}])
    ds = open_dataset(man, image_root=image_dir)
    assert ds[0].texts == ["one", "two", ""] and ds.n_texts == 3
    assert np.array_equal(np.asarray(ds.load_image(0)), decoded(samples[1][1]))
    with pytest.raises(GapkitError, match="leaves the dataset root"):  # without image_root: ../data/... escapes
        write_jsonl(man, [{"image": f"../data/imgs/{samples[1][0]}", "text": "x"}])
        open_dataset(man)


def test_roco_layout_headerless_tsv_with_template(tmp_path: Path, samples) -> None:
    (tmp_path / "images").mkdir()
    lines = []
    for i, (_, data, caption) in enumerate(samples):
        rid = f"ROCO_{i:05d}"
        (tmp_path / "images" / f"{rid}.jpg").write_bytes(data)
        lines.append(f"{rid}\t {caption}\n")
    cap = tmp_path / "captions.txt"
    cap.write_text("".join(lines))
    with pytest.raises(GapkitError) as err:  # without --columns the first row is taken as the header
        open_dataset(cap)
    assert "--columns" in str(err.value)
    ds = open_dataset(cap, columns="id,caption", image_column="id", image_template="images/{}.jpg")
    assert ds.format == "manifest" and len(ds) == len(samples)
    for i, (_, data, caption) in enumerate(samples):
        assert ds[i].image_id == f"images/ROCO_{i:05d}.jpg"
        assert ds[i].texts == [caption.strip()] and ds[i].meta == {"id": f"ROCO_{i:05d}"}
        assert ds[i].line == i + 1
    assert np.array_equal(np.asarray(ds.load_image(3)), decoded(samples[3][1]))
    ds2 = open_dataset(cap, columns=["id", "caption"], image_column="id", image_template="images/{id}.jpg")
    assert [r.image_id for r in ds2] == [r.image_id for r in ds]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("../secret.jpg", "leaves the dataset root"),
        ("imgs/../../secret.jpg", "leaves the dataset root"),
        ("/etc/passwd", "leaves the dataset root"),
        ("", "no image path"),
        ("https://example.org/a.jpg", "URL"),
    ],
)
def test_manifest_refuses_bad_paths_naming_the_row(image_dir: Path, samples, bad: str, message: str) -> None:
    man = image_dir / "m.csv"
    man.write_text(f"image,text\nimgs/{samples[0][0]},fine\nimgs/{samples[1][0]},fine too\n{bad},bad row\n")
    with pytest.raises(GapkitError) as err:
        open_dataset(man)
    assert message in str(err.value)
    assert err.value.row == 4 and err.value.path == str(man)
    assert str(err.value).startswith(f"{man}: row 4: ")


def test_manifest_accepts_absolute_path_inside_root(image_dir: Path, samples) -> None:
    man = image_dir / "m.jsonl"
    write_jsonl(man, [{"file_name": str(image_dir / "imgs" / samples[2][0]), "text": "abs"}])
    ds = open_dataset(man)
    assert ds[0].image_id == f"imgs/{samples[2][0]}"


def test_manifest_structural_errors(image_dir: Path, samples) -> None:
    man = image_dir / "m.jsonl"
    write_jsonl(man, [{"file_name": f"imgs/{samples[0][0]}", "text": "ok"}, {"text": "no path here"}])
    with pytest.raises(GapkitError) as err:
        open_dataset(man)
    assert err.value.row == 2 and "no image path" in str(err.value)
    man.write_text('{"file_name": "a.jpg", "text": "x"}\n{not json\n')
    with pytest.raises(GapkitError) as err:
        open_dataset(man)
    assert err.value.row == 2 and "invalid JSON" in str(err.value)
    csvf = image_dir / "m.csv"
    csvf.write_text("image,text\na.jpg,x,extra\n")
    with pytest.raises(GapkitError, match="3 fields, but the header has 2"):
        open_dataset(csvf)
    csvf.write_text("image,caption_text\n")
    with pytest.raises(GapkitError, match="no rows"):
        open_dataset(csvf)
    with pytest.raises(GapkitError, match="unknown dataset format"):
        open_dataset(csvf, format="parquet")
    with pytest.raises(GapkitError, match="limit"):
        open_dataset(csvf, limit=0)


# --------------------------------------------------------------------------------------------
# webdataset
# --------------------------------------------------------------------------------------------


def _png(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG")
    return buf.getvalue()


def _webp(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


@pytest.fixture()
def shards(tmp_path: Path, samples) -> tuple[Path, list[tuple[str, bytes, list[str], dict]]]:
    """Three shards, 8 samples: jpg+txt, png+json(caption), webp+json(captions list), jpg+cls."""
    expected = []
    d = tmp_path / "wds"
    d.mkdir()
    per_shard = [samples[0:3], samples[3:6], samples[6:8]]
    for s, chunk in enumerate(per_shard):
        with tarfile.open(d / f"data-{s:03d}.tar", "w") as tf:
            for j, (name, data, caption) in enumerate(chunk):
                key = f"s{s}/{s * 10 + j:06d}"
                kind = (s * 3 + j) % 4
                if kind == 0:
                    add_member(tf, f"{key}.jpg", data)
                    add_member(tf, f"{key}.txt", caption.encode())
                    expected.append((key, data, [caption.strip()], {}))
                elif kind == 1:
                    png = _png(data)
                    add_member(tf, f"{key}.json", json.dumps({"caption": caption, "source": name}).encode())
                    add_member(tf, f"{key}.png", png)
                    expected.append((key, png, [caption.strip()], {"source": name}))
                elif kind == 2:
                    webp = _webp(data)
                    add_member(tf, f"{key}.webp", webp)
                    add_member(tf, f"{key}.json", json.dumps({"captions": [caption, "second"]}).encode())
                    expected.append((key, webp, [caption.strip(), "second"], {}))
                else:
                    add_member(tf, f"{key}.jpeg", data)
                    add_member(tf, f"{key}.txt", caption.encode())
                    add_member(tf, f"{key}.cls", b"3")
                    expected.append((key, data, [caption.strip()], {"cls": "3"}))
    return d, expected


def test_webdataset_brace_pattern(shards) -> None:
    d, expected = shards
    pattern = str(d / "data-{000..002}.tar")
    assert detect_format(pattern) == "webdataset"
    assert [p.name for p in expand_shards(pattern)] == ["data-000.tar", "data-001.tar", "data-002.tar"]
    ds = open_dataset(pattern)
    assert ds.format == "webdataset" and ds.root == d
    assert [r.image_id for r in ds] == [e[0] for e in expected]
    assert ds.n_texts == sum(len(e[2]) for e in expected)
    for i, (key, data, texts, meta) in enumerate(expected):
        assert ds[i].texts == texts and ds[i].meta == meta
        assert ds[i].source.startswith(f"data-00{i // 3 if i < 6 else 2}.tar::{key}.")
        assert ds.load_bytes(i) == data
        assert np.array_equal(np.asarray(ds.load_image(i)), decoded(data))
    # the folder and a glob give the same; limit stops early
    assert [r.image_id for r in open_dataset(d)] == [r.image_id for r in ds]
    assert [r.image_id for r in open_dataset(str(d / "data-*.tar"), limit=4)] == [e[0] for e in expected[:4]]
    assert open_dataset(d / "data-001.tar").records[0].image_id == expected[3][0]
    with pytest.raises(GapkitError, match="data-003.tar"):
        open_dataset(str(d / "data-{000..003}.tar"))


def test_webdataset_text_column_and_missing_image(tmp_path: Path, samples) -> None:
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        add_member(tf, "k1.jpg", samples[0][1])
        add_member(tf, "k1.json", json.dumps({"report": "from the report field", "caption": "short"}).encode())
    ds = open_dataset(tmp_path / "a.tar", text_column="report")
    assert ds[0].texts == ["from the report field"] and ds[0].meta == {"caption": "short"}
    assert open_dataset(tmp_path / "a.tar")[0].texts == ["short"]
    with tarfile.open(tmp_path / "b.tar", "w") as tf:
        add_member(tf, "k1.jpg", samples[0][1])
        add_member(tf, "k1.txt", b"ok")
        add_member(tf, "k2.txt", b"caption without image")
    with pytest.raises(GapkitError) as err:
        open_dataset(tmp_path / "b.tar")
    assert "'k2' has no image" in str(err.value) and "b.tar" in str(err.value)


def test_webdataset_in_dataloader_workers(shards) -> None:
    torch = pytest.importorskip("torch")
    d, expected = shards
    ds = open_dataset(d)
    ds.load_image(0)  # the parent opens a shard before the workers fork

    class Wrap(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
            return i, np.asarray(ds.load_image(i))

    loader = torch.utils.data.DataLoader(Wrap(), batch_size=2, num_workers=2, collate_fn=lambda b: b)
    got = {i: arr for batch in loader for i, arr in batch}
    assert sorted(got) == list(range(len(expected)))
    for i, (_, data, _, _) in enumerate(expected):
        assert np.array_equal(got[i], decoded(data))
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(np.asarray(clone.load_image(7)), decoded(expected[7][1]))


def test_webdataset_truncated_shard_keeps_samples_and_reports_the_cut_image(tmp_path: Path, samples) -> None:
    full = tmp_path / "full.tar"
    with tarfile.open(full, "w") as tf:
        for j in range(3):
            add_member(tf, f"{j:03d}.txt", samples[j][2].encode())
            add_member(tf, f"{j:03d}.jpg", samples[j][1])
    raw = full.read_bytes()
    # cut inside the last image's bytes
    with tarfile.open(full) as tf:
        last = tf.getmember("002.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: last.offset_data + last.size // 2])
    ds = open_dataset(cut)
    assert len(ds) == 3 and ds.describe()["truncated_shards"] == ["cut.tar"]
    assert np.array_equal(np.asarray(ds.load_image(1)), decoded(samples[1][1]))
    with pytest.raises(ImageLoadError) as err:
        ds.load_image(2)
    assert err.value.reason == "truncated" and "cut.tar::002.jpg" in str(err.value)


# --------------------------------------------------------------------------------------------
# load_image errors
# --------------------------------------------------------------------------------------------


def test_load_image_errors_name_file_record_and_reason(image_dir: Path, samples) -> None:
    name, data, _ = samples[0]
    (image_dir / "imgs" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (image_dir / "imgs" / "noise.jpg").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG")
    (image_dir / "imgs" / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    man = image_dir / "m.csv"
    man.write_text(
        "image,text\n"
        f"imgs/{name},fine\n"
        "imgs/gone.jpg,missing\n"
        "imgs/cut.jpg,truncated\n"
        "imgs/noise.jpg,garbage\n"
        "imgs/cut.png,truncated png\n"
    )
    ds = open_dataset(man)
    assert ds.check_files() == [(1, "missing")]
    ds.load_image(0)
    for i, reason in ((1, "missing"), (2, "truncated"), (3, "undecodable"), (4, "truncated")):
        with pytest.raises(ImageLoadError) as err:
            ds.load_image(i)
        e = err.value
        assert isinstance(e, GapkitError)
        assert e.reason == reason and e.index == i and e.image_id == ds[i].image_id
        assert e.path == str(image_dir / ds[i].source)
        assert f"m.csv row {i + 2}" in str(e)
        again = pickle.loads(pickle.dumps(e))  # survives a DataLoader worker
        assert (again.reason, again.index, str(again)) == (e.reason, e.index, str(e))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "r.txt").write_text("rotated")
    img = open_dataset(tmp_path).load_image(0)
    assert img.size == (10, 30)  # width, height after rotation
    top = np.asarray(img)[:5].mean()
    assert top > 200  # the white left stripe is now on top


# --------------------------------------------------------------------------------------------
# to_rgb
# --------------------------------------------------------------------------------------------


def test_to_rgb_high_bit_depth_rescales_own_range(samples) -> None:
    gray = np.asarray(Image.open(io.BytesIO(samples[0][1])).convert("L")).astype(np.int64)
    twelve = gray * 16 + 7  # a 12-bit image in a 16-bit container
    lo, hi = twelve.min(), twelve.max()
    expect = np.rint((twelve - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(twelve.astype(np.uint16)).save(buf, "PNG")
    img16 = Image.open(io.BytesIO(buf.getvalue()))
    assert img16.mode.startswith("I")
    out = np.asarray(to_rgb(img16))
    assert out.shape == gray.shape + (3,)
    assert np.array_equal(out[..., 0], expect) and np.array_equal(out[..., 0], out[..., 2])
    ct = Image.fromarray((gray * 8 - 1000).astype(np.int32), mode="I")  # negative values (HU)
    assert np.array_equal(np.asarray(to_rgb(ct))[..., 1], np.rint((gray - gray.min()) * 255.0 / np.ptp(gray)).astype(np.uint8))
    f = Image.fromarray(np.full((4, 4), 3.5, np.float32), mode="F")
    assert np.asarray(to_rgb(f)).max() == 0  # constant image


def test_to_rgb_alpha_palette_and_others() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert tuple(out[0, 0]) == (200, 10, 10) and tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out[1, 0])
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[50, 50, 50], [255, 255, 255]]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    assert np.asarray(to_rgb(pal)).tolist() == [[[10, 20, 30], [0, 0, 0]]]
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]
    l8 = Image.fromarray(np.array([[0, 77]], np.uint8), "L")
    assert np.asarray(to_rgb(l8)).tolist() == [[[0, 0, 0], [77, 77, 77]]]
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb


def test_grayscale_png_dataset_loads_as_rgb(tmp_path: Path, samples) -> None:
    gray = Image.open(io.BytesIO(samples[2][1])).convert("L")
    gray.save(tmp_path / "g.png")
    (tmp_path / "g.txt").write_text("grey")
    img = open_dataset(tmp_path).load_image(0)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 1], np.asarray(gray))


# --------------------------------------------------------------------------------------------
# detection, patterns, path safety
# --------------------------------------------------------------------------------------------


def test_detection_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jpg").write_bytes(b"x")
    with pytest.raises(GapkitError) as err:
        detect_format(tmp_path / "empty")
    msg = str(err.value)
    assert "metadata.jsonl" in msg and ".txt caption" in msg and ".tar" in msg
    with pytest.raises(GapkitError, match="no such file or folder"):
        open_dataset(tmp_path / "nothing-here")
    (tmp_path / "pairs.parquet").write_bytes(b"PAR1\x00\x01")
    with pytest.raises(GapkitError, match="not a dataset file"):
        open_dataset(tmp_path / "pairs.parquet")
    with pytest.raises(GapkitError, match="imagefolder"):
        open_dataset(tmp_path / "empty", format="imagefolder")
    with pytest.raises(GapkitError, match="no image-text pairs"):
        open_dataset(tmp_path / "empty", format="sidecar")


@pytest.mark.parametrize(
    "pattern, names",
    [
        ("d-{000..003}.tar", ["d-000.tar", "d-001.tar", "d-002.tar", "d-003.tar"]),
        ("d-{8..11}.tar", ["d-8.tar", "d-9.tar", "d-10.tar", "d-11.tar"]),
        ("{a,b}-{0..1}.tar", ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]),
    ],
)
def test_brace_expansion(tmp_path: Path, pattern: str, names: list[str]) -> None:
    for n in names:
        with tarfile.open(tmp_path / n, "w"):
            pass
    assert [p.name for p in expand_shards(str(tmp_path / pattern))] == names


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "c.jpg"]), min_size=1, max_size=6))
def test_paths_outside_root_are_refused_exactly(parts: list[str]) -> None:
    """A manifest path is accepted iff it resolves (lexically) inside the root."""
    root = Path("/data/set")
    rel = "/".join(parts)
    resolved = os.path.normpath(os.path.join(str(root), rel))
    inside = resolved.startswith(str(root) + os.sep)
    from gapkit.datasets import _inside

    if inside:
        assert (root / _inside(root, rel, "m.csv", 1)).as_posix() == resolved
    else:
        with pytest.raises(GapkitError):
            _inside(root, rel, "m.csv", 1)


def test_subset_and_pickle_keep_records(image_dir: Path, samples) -> None:
    man = image_dir / "m.jsonl"
    write_jsonl(man, [{"file_name": f"imgs/{n}", "text": c} for n, _, c in samples])
    ds = open_dataset(man)
    sub = ds.subset([5, 1])
    assert isinstance(sub, PairedDataset) and [r.image_id for r in sub] == [ds[5].image_id, ds[1].image_id]
    assert np.array_equal(np.asarray(sub.load_image(0)), decoded(samples[5][1]))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.records == ds.records and clone.describe() == ds.describe()


def test_webdataset_gzipped_shard(tmp_path: Path, samples) -> None:
    with tarfile.open(tmp_path / "part-0.tar.gz", "w:gz") as tf:
        for j in range(3):
            add_member(tf, f"{j:03d}.jpg", samples[j][1])
            add_member(tf, f"{j:03d}.txt", samples[j][2].encode())
    ds = open_dataset(tmp_path)
    assert ds.format == "webdataset" and [r.texts[0] for r in ds] == [s[2].strip() for s in samples[:3]]
    for i in (2, 0, 1):  # backwards and forwards in the compressed stream
        assert np.array_equal(np.asarray(ds.load_image(i)), decoded(samples[i][1]))
    assert ds.check_files() == []
