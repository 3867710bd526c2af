"""`gapkit embed`: every layout gives rows equal to the model's own encoding of the right image and
caption; errors stop or are skipped and recorded; a killed run resumes without recomputing."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import gapkit
from gapkit.cli import app
from gapkit.embed import dist_info, embed
from gapkit.errors import GapkitError
from tests.tiny_models import tiny_open_clip

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def oc(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_open_clip(tmp_path_factory.mktemp("oc"))


@pytest.fixture(scope="module")
def reference(oc: str):
    """The tiny model through open_clip itself, independent of gapkit's encoders and datasets."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(oc)
    tok = open_clip.get_tokenizer(oc)
    model.eval()

    def image(path: Path) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_image(preprocess(Image.open(path).convert("RGB"))[None])[0].numpy()

    def text(caption: str) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_text(tok([caption]))[0].numpy()

    return image, text


@pytest.fixture(scope="module")
def medpix_rows(medpix: Path) -> list[dict]:
    rows = [json.loads(line) for line in (medpix / "dev" / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        r["path"] = medpix / "dev" / r["file_name"]
    return rows


def _check_pairs(out: Path, expected: list[tuple[Path, str]], reference, n_images: int | None = None) -> gapkit.EmbeddingSet:
    """Every (image file, caption) pair is a text row whose image row is that image, and the rows
    equal the model's own encoding of that file and that caption."""
    image, text = reference
    emb = gapkit.open_set(out)
    assert emb.n_texts == len(expected)
    if n_images is not None:
        assert emb.n_images == n_images
    for j, (path, caption) in enumerate(expected):
        assert emb.text_meta[j]["text"] == caption
        r = int(emb.image_row[j])
        np.testing.assert_allclose(emb.texts[j], text(caption), atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(emb.images[r], image(path), atol=2e-4, rtol=1e-3)
    return emb


def test_imagefolder_rows_are_the_models_encoding(oc: str, medpix: Path, medpix_rows: list[dict], reference, tmp_path: Path) -> None:
    out = tmp_path / "set"
    res = runner.invoke(app, ["embed", str(medpix / "dev"), "--model", oc, "-o", str(out), "--limit", "20",
                              "--shard-size", "8", "--batch-size", "3", "--workers", "1", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n_images"] == 20 and summary["computed_shards"] == [0, 1, 2]
    emb = _check_pairs(out, [(r["path"], r["text"]) for r in medpix_rows[:20]], reference, n_images=20)
    assert emb.image_meta[0]["label"] == medpix_rows[0]["label"]  # metadata columns kept
    assert emb.info["encoders"]["model"] == oc and emb.info["dataset"]["format"] == "imagefolder"
    assert emb.info["skipped"] == []
    # a finished set is left alone
    before = (out / "images.npy").stat().st_mtime_ns
    res = runner.invoke(app, ["embed", str(medpix / "dev"), "--model", oc, "-o", str(out), "--limit", "20"])
    assert res.exit_code == 0 and "already a finished" in flat(res.output)
    assert (out / "images.npy").stat().st_mtime_ns == before


def test_several_captions_per_image(oc: str, medpix_rows: list[dict], reference, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    picks = medpix_rows[:3]
    for r in picks:
        shutil.copy(r["path"], data / r["file_name"])
    lines, expected = [], []
    for r, caps in zip(picks, (["first a", "second a"], ["only b"], ["c one", "c two", "c three"])):
        for c in caps:
            lines.append({"file_name": r["file_name"], "text": c, "label": r["label"]})
    # interleave rows of one image with others': still grouped by image, first appearance order
    lines = [lines[0], lines[2], lines[1], lines[3], lines[4], lines[5]]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    expected = [(picks[0]["path"], "first a"), (picks[0]["path"], "second a"), (picks[1]["path"], "only b"),
                (picks[2]["path"], "c one"), (picks[2]["path"], "c two"), (picks[2]["path"], "c three")]
    embed(data, tmp_path / "set", model=oc, batch_size=2, shard_size=2, workers=0)
    emb = _check_pairs(tmp_path / "set", expected, reference, n_images=3)
    assert emb.image_row.tolist() == [0, 0, 1, 2, 2, 2]


def test_sidecar_manifest_and_webdataset_layouts(oc: str, medpix_rows: list[dict], reference, tmp_path: Path) -> None:
    picks = medpix_rows[:5]
    # sidecar: nested folders, a/b.jpg beside a/b.txt
    side = tmp_path / "side"
    expected = []
    for k, r in enumerate(picks):
        sub = side / ("ct" if k % 2 else "mr") / "cases"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["path"], sub / f"img{k}.jpg")
        (sub / f"img{k}.txt").write_text(r["text"] + "\n")
    embed(side, tmp_path / "s1", model=oc, workers=0)
    emb = gapkit.open_set(tmp_path / "s1")
    expected = []
    for m, tm in zip(emb.image_meta, emb.text_meta):  # order is the reader's; pairing must hold
        k = int(Path(m["path"]).stem[3:])
        expected.append((picks[k]["path"], picks[k]["text"]))
    _check_pairs(tmp_path / "s1", expected, reference, n_images=5)

    # manifest in ROCO's layout: id<TAB>caption, no header, images/<id>.jpg
    roco = tmp_path / "roco"
    (roco / "images").mkdir(parents=True)
    rows = []
    for k, r in enumerate(picks):
        shutil.copy(r["path"], roco / "images" / f"ROCO_{k:05d}.jpg")
        rows.append(f"ROCO_{k:05d}\t{r['text']}")
    (roco / "captions.txt").write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["embed", str(roco / "captions.txt"), "--model", oc, "-o", str(tmp_path / "s2"),
                              "--format", "manifest", "--columns", "id,caption", "--image-column", "id",
                              "--text-column", "caption", "--image-template", "images/{}.jpg", "--workers", "0"])
    assert res.exit_code == 0, res.output
    _check_pairs(tmp_path / "s2", [(r["path"], r["text"]) for r in picks], reference, n_images=5)

    # webdataset: two tar shards, jpg + txt (and one sample with a json caption)
    wds = tmp_path / "wds"
    wds.mkdir()
    for s in range(2):
        with tarfile.open(wds / f"data-{s:03d}.tar", "w") as tar:
            for k in range(s * 3, min(s * 3 + 3, 5)):
                r = picks[k]
                cap = r["text"].encode() if k != 4 else json.dumps({"caption": r["text"]}).encode()
                for name, payload in ((f"s{k:04d}.jpg", r["path"].read_bytes()), (f"s{k:04d}.{'txt' if k != 4 else 'json'}", cap)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    res = runner.invoke(app, ["embed", str(wds / "data-{000..001}.tar"), "--model", oc, "-o", str(tmp_path / "s3"),
                              "--workers", "1", "--shard-size", "2"])
    assert res.exit_code == 0, res.output
    _check_pairs(tmp_path / "s3", [(r["path"], r["text"]) for r in picks], reference, n_images=5)


def _broken_dataset(medpix_rows: list[dict], root: Path, *, truncated: bool, missing: bool, empty: bool = False) -> Path:
    root.mkdir()
    lines = []
    for k, r in enumerate(medpix_rows[:6]):
        shutil.copy(r["path"], root / r["file_name"])
        lines.append({"file_name": r["file_name"], "text": r["text"]})
    if truncated:
        p = root / medpix_rows[1]["file_name"]
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    if missing:
        (root / medpix_rows[3]["file_name"]).unlink()
    if empty:
        lines[4]["text"] = "   "
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


@pytest.mark.parametrize("kind", ["truncated", "missing", "empty"])
def test_on_error_fail_names_the_file(kind: str, oc: str, medpix_rows: list[dict], tmp_path: Path) -> None:
    data = _broken_dataset(medpix_rows, tmp_path / "data", truncated=kind == "truncated", missing=kind == "missing",
                           empty=kind == "empty")
    res = runner.invoke(app, ["embed", str(data), "--model", oc, "-o", str(tmp_path / "out"), "--workers", "1", "-q"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    msg = flat(res.output)
    assert msg.startswith("error:")
    bad = {"truncated": 1, "missing": 3, "empty": 4}[kind]
    assert medpix_rows[bad]["file_name"] in msg.replace(" ", "")  # rich may wrap inside the path
    assert {"truncated": "truncated", "missing": "missing", "empty": "empty caption"}[kind] in msg
    assert not (tmp_path / "out" / "info.json").exists()


def test_on_error_skip_records_and_counts(oc: str, medpix_rows: list[dict], reference, tmp_path: Path) -> None:
    data = _broken_dataset(medpix_rows, tmp_path / "data", truncated=True, missing=True, empty=True)
    out = tmp_path / "out"
    res = runner.invoke(app, ["embed", str(data), "--model", oc, "-o", str(out), "--on-error", "skip",
                              "--workers", "1", "--batch-size", "2", "--shard-size", "4"])
    assert res.exit_code == 0, res.output
    assert "3 skipped" in flat(res.output)
    skipped = json.loads((out / "info.json").read_text())["skipped"]
    assert {s["id"] for s in skipped} == {medpix_rows[k]["file_name"] for k in (1, 3, 4)}
    reasons = " ".join(s["reason"] for s in skipped)
    assert "truncated" in reasons and "missing" in reasons and "empty caption" in reasons
    assert all(s["path"].endswith(s["id"]) for s in skipped)
    kept = [0, 2, 5]
    _check_pairs(out, [(medpix_rows[k]["path"], medpix_rows[k]["text"]) for k in kept], reference, n_images=3)


def test_bad_options_and_mixed_settings(oc: str, medpix: Path, tmp_path: Path) -> None:
    for args, text in ((["--on-error", "ignore"], "--on-error"), (["--precision", "fp8"], "--precision"),
                       (["--dtype", "int8"], "--dtype")):
        res = runner.invoke(app, ["embed", str(medpix / "dev"), "--model", oc, "-o", str(tmp_path / "x")] + args)
        assert res.exit_code == 2 and text in flat(res.output)
    res = runner.invoke(app, ["embed", str(medpix / "dev"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--model" in flat(res.output)
    # an unfinished run with other settings is not mixed in
    out = tmp_path / "part"
    embed(medpix / "dev", out, model=oc, limit=6, shard_size=3, workers=0)
    shutil.rmtree(out)
    from gapkit.store import ShardWriter

    ShardWriter(out, {"shard_size": 99}, 1)
    with pytest.raises(GapkitError, match="different settings"):
        embed(medpix / "dev", out, model=oc, limit=6, shard_size=3, workers=0)
    # a folder that is not an embedding set is not written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GapkitError, match="not empty"):
        embed(medpix / "dev", tmp_path / "mine", model=oc, limit=2, workers=0, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_overwrite_recomputes(oc: str, medpix: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    embed(medpix / "dev", out, model=oc, limit=4, workers=0)
    r = embed(medpix / "dev", out, model=oc, limit=6, workers=0, overwrite=True, dtype="float16")
    assert r.n_images == 6 and not r.already_finished
    emb = gapkit.open_set(out)
    assert emb.images.dtype == np.float16 and emb.n_images == 6


def test_kill_9_and_resume(oc: str, medpix: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    args = [sys.executable, "-m", "gapkit", "embed", str(medpix / "train"), "--model", oc, "-o", str(out),
            "--limit", "96", "--shard-size", "6", "--batch-size", "3", "--workers", "1", "-q", "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    shards = out / ".shards"
    while time.time() < deadline and proc.poll() is None:
        if len(list(shards.glob("shard-*.npz"))) >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its DataLoader workers, mid-run
    proc.wait()
    done_before = {p.name for p in shards.glob("shard-*.npz")}
    assert 1 <= len(done_before) < 16 and not (out / "info.json").exists()
    # the same command again (in this process, to spare a second start-up of torch and open_clip)
    res = runner.invoke(app, args[3:])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    recomputed = {f"shard-{k:06d}.npz" for k in summary["computed_shards"]}
    assert summary["n_shards"] == 16 and summary["reused_shards"] >= len(done_before)
    assert not recomputed & done_before and len(recomputed) + summary["reused_shards"] == 16
    # the same set as an uninterrupted run
    whole = tmp_path / "whole"
    embed(medpix / "train", whole, model=oc, limit=96, shard_size=6, batch_size=3, workers=1)
    a, b = gapkit.open_set(out), gapkit.open_set(whole)
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)
    np.testing.assert_allclose(a.texts, b.texts, atol=1e-6)
    assert a.image_row.tolist() == b.image_row.tolist()
    assert a.image_meta == b.image_meta and a.text_meta == b.text_meta
    assert not (out / ".shards").exists()


def test_heads_are_applied(oc: str, medpix: Path, medpix_rows: list[dict], reference, tmp_path: Path) -> None:
    heads_mod = pytest.importorskip("gapkit.heads")
    heads = heads_mod.build_heads(32, 32, dim=16, init="random", seed=3)
    run = tmp_path / "run"
    heads_mod.save_heads(heads, run)
    out = tmp_path / "set"
    res = runner.invoke(app, ["embed", str(medpix / "dev"), "--model", oc, "--heads", str(run), "-o", str(out),
                              "--limit", "5", "--workers", "0"])
    assert res.exit_code == 0, res.output
    emb = gapkit.open_set(out)
    image, text = reference
    assert emb.images.shape == (5, 16) and emb.info["heads"] == str(run.resolve())
    with torch.inference_mode():
        for j in range(5):
            r = medpix_rows[j]
            want_i = heads.project_images(torch.from_numpy(image(r["path"]))[None])[0].numpy()
            want_t = heads.project_texts(torch.from_numpy(text(r["text"]))[None])[0].numpy()
            np.testing.assert_allclose(emb.images[j], want_i, atol=2e-4, rtol=1e-3)
            np.testing.assert_allclose(emb.texts[j], want_t, atol=2e-4, rtol=1e-3)


def test_heads_run_with_trained_encoders(oc: str, medpix: Path, tmp_path: Path) -> None:
    heads_mod = pytest.importorskip("gapkit.heads")
    from safetensors.torch import save_file

    from gapkit.encoders import load_encoders

    enc = load_encoders(oc, device="cpu")
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(1.1)
    run = tmp_path / "run"
    heads_mod.save_heads(heads_mod.build_heads(32, 32, dim=32, init="identity"), run)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(run / "encoders.safetensors"))
    (run / "encoders.json").write_text(json.dumps({"model": oc, "image_model": None, "text_model": None}))
    r = embed(medpix / "dev", tmp_path / "set", heads=run, limit=4, workers=0)
    emb = gapkit.open_set(tmp_path / "set")
    from gapkit.datasets import open_dataset

    ds = open_dataset(medpix / "dev", limit=4)
    with torch.inference_mode():
        want = enc.encode_image(torch.stack([enc.image_transform(ds.load_image(i)) for i in range(4)])).numpy()
    np.testing.assert_allclose(emb.images, want, atol=2e-4, rtol=1e-3)
    assert r.n_images == 4 and emb.info["encoders"]["weights"].endswith("encoders.safetensors")


def test_dist_info_reads_torchrun_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert (dist_info().rank, dist_info().world) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    d = dist_info()
    assert (d.rank, d.world, d.local_rank, d.source) == (3, 8, 1, "slurm")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (dist_info().rank, dist_info().world, dist_info().source) == (1, 2, "torchrun")


def test_hf_towers_through_the_pipeline(medpix: Path, tmp_path: Path) -> None:
    """Separate transformers towers (tiny ViT, real MiniLM): rows equal each pair encoded alone,
    so padding captions of different lengths into one batch changes nothing."""
    from gapkit.datasets import open_dataset
    from gapkit.encoders import load_encoders
    from tests.tiny_models import minilm_path, tiny_hf_vit

    vit = tiny_hf_vit(tmp_path)
    out = tmp_path / "set"
    embed(medpix / "dev", out, image_model=vit, text_model=minilm_path(), limit=6, batch_size=3, workers=1)
    emb = gapkit.open_set(out)
    assert emb.images.shape == (6, 48) and emb.texts.shape == (6, 384)
    assert emb.info["encoders"]["text_pooling"] == "mean"
    enc = load_encoders(image_model=vit, text_model=minilm_path(), device="cpu")
    ds = open_dataset(medpix / "dev", limit=6)
    with torch.inference_mode():
        for i in range(6):
            im = enc.encode_image(enc.image_transform(ds.load_image(i))[None])[0].numpy()
            tx = enc.encode_text(enc.tokenize([ds.records[i].texts[0]]))[0].numpy()
            np.testing.assert_allclose(emb.images[i], im, atol=1e-4, rtol=1e-3)
            np.testing.assert_allclose(emb.texts[i], tx, atol=1e-4, rtol=1e-3)
