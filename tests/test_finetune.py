"""Heads, the heads-mode trainer and `gapkit finetune` (CLI via Typer's CliRunner)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gapkit.cli import app
from gapkit.errors import GapkitError
from gapkit.finetune import (
    EarlyStopping,
    TrainConfig,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    split_pairs,
    train_heads,
    validation_metrics,
)
from gapkit.heads import build_heads, load_heads, save_heads
from gapkit.store import load_embeddings, open_set, write_set

runner = CliRunner()


def _synthetic(n: int = 160, d: int = 16, captions: int = 1, seed: int = 0, d_text: int | None = None):
    """Pairs sharing a latent meaning, with each modality pushed to its own cone (a gap)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    a, b = rng.normal(size=(8, d)), rng.normal(size=(8, d_text or d))
    off_i = np.zeros(d)
    off_i[0] = 6.0
    off_t = np.zeros(d_text or d)
    off_t[1] = 6.0
    images = (z @ a + off_i + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    rows = np.repeat(np.arange(n), captions)
    texts = (z[rows] @ b + off_t + 0.5 * rng.normal(size=(n * captions, d_text or d))).astype(np.float32)
    return images, texts, rows


def _set(tmp_path: Path, name: str = "emb", **kw) -> Path:
    im, tx, rows = _synthetic(**kw)
    meta = [{"id": f"img{i}", "case": f"case{i // 4}"} for i in range(len(im))]
    tmeta = [{"text": f"caption {j}"} for j in range(len(tx))]
    return write_set(tmp_path / name, im, tx, image_row=rows, image_meta=meta, text_meta=tmeta)


FAST = dict(epochs=8, batch_size=32, lr=1e-2, patience=0)


# ---------------------------------------------------------------------------------------- heads


def test_identity_heads_keep_the_input_and_isometries_when_widening():
    h = build_heads(16, 16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(h.project_images(x), x)
    torch.testing.assert_close(h.project_texts(x), x)
    wide = build_heads(16, 12, dim=16, seed=3)  # text 12 -> 16: an isometry (inner products kept)
    t = torch.randn(6, 12)
    pt = wide.project_texts(t).detach()
    torch.testing.assert_close(pt @ pt.T, t @ t.T, rtol=1e-4, atol=1e-4)
    mlp = build_heads(16, 16, kind="mlp")
    torch.testing.assert_close(mlp.project_images(x), x)  # residual branch starts at zero
    rnd = build_heads(16, 16, init="random", seed=1)
    assert not torch.allclose(rnd.project_images(x), x)
    torch.testing.assert_close(build_heads(16, 16, init="random", seed=1).project_images(x), rnd.project_images(x))


def test_heads_save_load_roundtrip_and_errors(tmp_path: Path):
    h = build_heads(8, 6, dim=4, kind="mlp", init="random", seed=2)
    save_heads(h, tmp_path / "run", extra={"loss": "clip"})
    back = load_heads(tmp_path / "run")
    x, t = torch.randn(3, 8), torch.randn(3, 6)
    torch.testing.assert_close(back.project_images(x), h.project_images(x))
    torch.testing.assert_close(back.project_texts(t), h.project_texts(t))
    assert json.loads((tmp_path / "run" / "heads.json").read_text())["loss"] == "clip"

    with pytest.raises(GapkitError, match="no such heads folder"):
        load_heads(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GapkitError, match="heads.json is missing"):
        load_heads(tmp_path / "empty")
    w = tmp_path / "run" / "heads.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(GapkitError, match="heads.safetensors: not a readable safetensors"):
        load_heads(tmp_path / "run")
    torch.save(h.state_dict(), w)  # a pickle in disguise is refused, not unpickled
    with pytest.raises(GapkitError, match="pickle"):
        load_heads(tmp_path / "run")
    w.write_bytes(good)
    cfg = json.loads((tmp_path / "run" / "heads.json").read_text())
    (tmp_path / "run" / "heads.json").write_text(json.dumps(dict(cfg, dim=5)))
    with pytest.raises(GapkitError, match="do not match"):
        load_heads(tmp_path / "run")


# ------------------------------------------------------------------------------- split, metrics


def test_split_keeps_captions_and_groups_together(tmp_path: Path):
    emb = open_set(_set(tmp_path, n=60, captions=3))
    tr, va = split_pairs(emb, 0.25, seed=1)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == emb.n_texts
    assert not set(emb.image_row[tr]) & set(emb.image_row[va])
    assert abs(len(set(emb.image_row[va])) - 15) <= 1
    tr2, va2 = split_pairs(emb, 0.25, seed=1)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_pairs(emb, 0.25, seed=2)[1])
    cases = emb.labels("case")
    tr, va = split_pairs(emb, 0.25, seed=0, group_by="case")
    assert not set(cases[tr]) & set(cases[va])
    with pytest.raises(GapkitError, match="no metadata column 'nope'"):
        split_pairs(emb, 0.25, group_by="nope")


def test_validation_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    im = rng.normal(size=(30, 5)).astype(np.float32)
    rows = np.repeat(np.arange(30), 2)
    tx = (im[rows] + rng.normal(scale=1.0, size=(60, 5))).astype(np.float32)
    m = validation_metrics(im, tx, rows)
    x = im / np.linalg.norm(im, axis=1, keepdims=True)
    y = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    assert m["gap"] == pytest.approx(np.linalg.norm(x.mean(0) - y.mean(0)), rel=1e-5)
    assert m["cos_true_pairs"] == pytest.approx(np.mean([x[rows[j]] @ y[j] for j in range(60)]), rel=1e-5)
    sim = x @ y.T
    for k in (1, 5):
        i2t = np.mean([any(rows[j] == i for j in np.argsort(-sim[i])[:k]) for i in range(30)])
        t2i = np.mean([rows[j] in np.argsort(-sim[:, j])[:k] for j in range(60)])
        assert m[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert m[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < m["i2t_R@1"] < 1


def test_early_stopping_directions():
    es = EarlyStopping("val_gap", patience=2)
    assert es.mode == "min"
    for e, v in enumerate([0.5, 0.4, 0.45, 0.41]):
        es.update(e, {"val_gap": v})
    assert es.best_epoch == 1 and es.stop
    assert EarlyStopping("val_i2t_R@10").mode == "max"
    with pytest.raises(GapkitError, match="not among"):
        es.update(5, {"val_loss": 1.0})


def test_checkpoint_roundtrip(tmp_path: Path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    save_checkpoint(tmp_path / "c.safetensors", modules={"m": m}, optimizer=opt, generator=gen, state={"epoch": 3})
    expect_next = torch.randperm(10, generator=gen)
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
    gen2 = torch.Generator()
    state, _ = load_checkpoint(tmp_path / "c.safetensors", modules={"m": m2}, optimizer=opt2, generator=gen2)
    assert state == {"epoch": 3}
    torch.testing.assert_close(m2.weight, m.weight)
    assert opt2.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.randperm(10, generator=gen2), expect_next)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(GapkitError, match="bad.safetensors: unreadable checkpoint"):
        load_checkpoint(tmp_path / "bad.safetensors", modules={"m": m2})


# ------------------------------------------------------------------------------------ training


def test_train_heads_closes_the_gap_and_writes_the_run(tmp_path: Path):
    src = _set(tmp_path, n=160, captions=2)
    emb = open_set(src)
    res = train_heads(emb, tmp_path / "run", TrainConfig(loss="clip+atp+cu", **FAST))
    assert res.after["gap"] < 0.7 * res.before["gap"]
    assert res.after["cos_true_pairs"] > res.before["cos_true_pairs"]
    run = tmp_path / "run"
    for f in ("heads.safetensors", "heads.json", "metrics.jsonl", "run.json", "result.json", "checkpoint.safetensors"):
        assert (run / f).is_file(), f
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(0, 9))
    for key in ("step", "time_s", "lr", "temperature", "train_loss", "train_clip", "train_atp", "train_cu",
                "val_gap", "val_cos_true_pairs", "val_i2t_R@1", "val_i2t_R@10", "val_t2i_R@5"):
        assert key in rows[-1], key
    assert json.loads((run / "run.json").read_text())["loss"] == "clip+atp+cu"
    # RUN/val holds exactly the validation pairs, projected by the saved heads
    tr, va = split_pairs(emb, 0.2, seed=0)
    val = open_set(run / "val")
    assert val.n_texts == len(va)
    assert [m["text"] for m in val.text_meta] == [f"caption {j}" for j in va]
    heads = load_heads(run)
    sub = emb.select_texts(va)
    with torch.no_grad():
        np.testing.assert_allclose(val.texts, heads.project_texts(torch.from_numpy(sub.texts)).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(val.images, heads.project_images(torch.from_numpy(sub.images)).numpy(), rtol=1e-5, atol=1e-5)
    assert open_set(run / "train").n_texts == len(tr)
    assert validation_metrics(val.images, val.texts, val.image_row)["gap"] == pytest.approx(res.after["gap"], rel=1e-5)


def test_different_widths_and_clip_only_vs_atp_cu(tmp_path: Path):
    im, tx, rows = _synthetic(n=160, d=12, d_text=8, seed=1)
    emb = load_embeddings(images=im, texts=tx)
    clip = train_heads(emb, tmp_path / "clip", TrainConfig(loss="clip", dim=10, **FAST))
    ours = train_heads(emb, tmp_path / "ours", TrainConfig(loss="clip+atp+cu", dim=10, **FAST))
    assert clip.before_label == "initial heads"
    assert load_heads(tmp_path / "ours").config["dim"] == 10
    assert ours.after["gap"] < clip.after["gap"]
    assert ours.after["cos_true_pairs"] > clip.after["cos_true_pairs"]


def test_seeded_runs_are_identical_and_resume_equals_one_run(tmp_path: Path):
    emb = open_set(_set(tmp_path, n=96))
    cfg = TrainConfig(epochs=4, batch_size=16, lr=3e-3, patience=0, seed=7)
    train_heads(emb, tmp_path / "a", cfg)
    train_heads(emb, tmp_path / "b", cfg)
    assert (tmp_path / "a" / "heads.safetensors").read_bytes() == (tmp_path / "b" / "heads.safetensors").read_bytes()
    train_heads(emb, tmp_path / "c", dataclasses.replace(cfg, epochs=2))
    with pytest.raises(GapkitError, match="not empty"):
        train_heads(emb, tmp_path / "c", cfg)
    with pytest.raises(GapkitError, match="settings differ"):
        train_heads(emb, tmp_path / "c", dataclasses.replace(cfg, lr=1.0), resume=True)
    train_heads(emb, tmp_path / "c", cfg, resume=True)
    assert (tmp_path / "a" / "heads.safetensors").read_bytes() == (tmp_path / "c" / "heads.safetensors").read_bytes()
    a, c = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "c")
    assert [r["epoch"] for r in c] == [0, 1, 2, 3, 4]
    assert [r["train_loss"] for r in c] == pytest.approx([r["train_loss"] for r in a], rel=1e-6)
    other = train_heads(emb, tmp_path / "d", dataclasses.replace(cfg, seed=8))
    assert other.after != read_metrics(tmp_path / "a")[-1]


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path):
    emb = open_set(_set(tmp_path, n=96))
    cfg = TrainConfig(epochs=10, batch_size=16, lr=3e-3, patience=2, early_stop="val_gap")
    res = train_heads(emb, tmp_path / "r", cfg)
    gaps = [r["val_gap"] for r in read_metrics(tmp_path / "r")]
    assert res.best_epoch == int(np.argmin(gaps)) and res.best_epoch > 0
    assert res.after["gap"] == pytest.approx(min(gaps), rel=1e-5)
    # asking for the largest gap: training only shrinks it, so epoch 0 (the identity heads) stays
    # best, training stops after `patience` epochs and the saved heads are the starting ones
    res = train_heads(emb, tmp_path / "r2", dataclasses.replace(cfg, early_stop="max:val_gap"))
    assert res.stopped_early and res.best_epoch == 0 and res.epochs_run == 2
    assert res.after["gap"] == pytest.approx(res.before["gap"], rel=1e-5)


def test_real_clip_coco_features(coco_features: Path, tmp_path: Path):
    """The issue's claim on 500 real CLIP pairs, 20 % held out, seed 0, default settings."""
    emb = load_embeddings(coco_features)
    clip = train_heads(emb, tmp_path / "clip", TrainConfig(loss="clip"))
    ours = train_heads(emb, tmp_path / "ours", TrainConfig(loss="clip+atp+cu"))
    assert ours.before["gap"] == pytest.approx(clip.before["gap"])
    assert ours.after["gap"] < ours.before["gap"] and ours.after["gap"] < clip.after["gap"]
    assert ours.after["cos_true_pairs"] > ours.before["cos_true_pairs"]
    assert ours.after["cos_true_pairs"] > clip.after["cos_true_pairs"]
    for d in ("i2t", "t2i"):
        assert ours.after[f"{d}_R@10"] >= clip.after[f"{d}_R@10"] - 0.03


# ------------------------------------------------------------------------------------------ CLI


def _files(tmp_path: Path, **kw) -> tuple[Path, Path]:
    im, tx, _ = _synthetic(**kw)
    np.save(tmp_path / "im.npy", im)
    np.save(tmp_path / "tx.npy", tx)
    return tmp_path / "im.npy", tmp_path / "tx.npy"


def test_cli_trains_and_prints_the_table(tmp_path: Path):
    im, tx = _files(tmp_path, n=120)
    args = ["finetune", "--images", str(im), "--texts", str(tx), "-o", str(tmp_path / "run"),
            "--epochs", "3", "--batch-size", "32", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "input" in r.stdout and "after (clip+atp+cu)" in r.stdout and "cos_true_pairs" in r.stdout
    assert load_heads(tmp_path / "run").config["image_dim"] == 16
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "not empty" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, args + ["--overwrite", "--json", "--loss", "clip", "--fixed-temperature"])
    doc = json.loads(r.stdout)
    assert doc["after"]["gap"] < doc["before"]["gap"] + 1.0 and doc["epochs_run"] == 3
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["learn_temperature"] is False


def test_cli_bad_input_names_file_and_row(tmp_path: Path):
    im, tx = _files(tmp_path, n=40)
    a = np.load(tx)
    a[17, 3] = np.nan
    np.save(tx, a)
    r = runner.invoke(app, ["finetune", "--images", str(im), "--texts", str(tx), "-o", str(tmp_path / "run")])
    assert r.exit_code == 2
    assert "tx.npy" in r.output and "row 17" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["finetune", str(im), "-o", str(tmp_path / "run2"), "--loss", "clip+nope"])
    assert r.exit_code == 2 and "unknown loss term 'nope'" in r.output


def test_cli_compare_writes_four_runs(tmp_path: Path):
    src = _set(tmp_path, n=120)
    r = runner.invoke(app, ["finetune", str(src), "-o", str(tmp_path / "cmp"), "--compare", "--epochs", "3",
                            "--batch-size", "32", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["variant"] for x in rows] == ["input", "clip (learnable τ)", "clip (fixed τ)", "clip+atp+cu",
                                            "clip+align+unif (Fahim et al.)"]
    for name in ("clip_learned_tau", "clip_fixed_tau", "clip_atp_cu", "fahim"):
        assert (tmp_path / "cmp" / name / "heads.safetensors").is_file()
    fixed = read_metrics(tmp_path / "cmp" / "clip_fixed_tau")
    assert {round(x["temperature"], 6) for x in fixed} == {0.07}
    learned = read_metrics(tmp_path / "cmp" / "clip_learned_tau")
    assert learned[-1]["temperature"] != pytest.approx(0.07, abs=1e-6)


def test_cli_end_to_end_path_without_the_module(tmp_path: Path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gapkit.endtoend", None)  # as if it were not built
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "x"}\n')
    r = runner.invoke(app, ["finetune", str(tmp_path / "ds"), "-o", str(tmp_path / "run"), "--model", "tiny"])
    assert r.exit_code == 2 and "not built yet" in r.output


def test_cli_end_to_end_wiring_matches_the_trainer(tmp_path: Path, monkeypatch):
    """The CLI's call binds to gapkit.endtoend.finetune_end_to_end's real signature."""
    import inspect

    import gapkit.endtoend as e2e

    real = inspect.signature(e2e.finetune_end_to_end)
    seen = {}

    def fake(*args, **kwargs):
        real.bind(*args, **kwargs)  # raises TypeError when the CLI passes what it does not take
        seen.update(kwargs, data=args[0], config=args[2])
        return {"before": {"gap": 0.9}, "after": {"gap": 0.5}, "before_label": "initial", "best_epoch": 1}

    monkeypatch.setattr(e2e, "finetune_end_to_end", fake)
    (tmp_path / "ds").mkdir()
    r = runner.invoke(app, ["finetune", str(tmp_path / "ds"), "-o", str(tmp_path / "run"), "--model", "M",
                            "--unlock-last", "2", "--freeze", "text", "--grad-accum", "4", "--limit", "10",
                            "--loss", "clip", "--epochs", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert seen["model"] == "M" and seen["unlock_last"] == 2 and seen["freeze"] == "text"
    assert seen["grad_accum"] == 4 and seen["dataset_options"] == {"limit": 10}
    assert seen["config"].loss == "clip" and seen["config"].epochs == 3
    assert "0.500" in r.stdout
