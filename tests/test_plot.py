"""Tests of `gapkit plot` (gapkit/plot.py, gapkit/commands/plot.py)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gapkit import plot as gp
from gapkit.cli import app
from gapkit.store import load_embeddings, write_set

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_set(
    path: Path,
    labels: list[str],
    *,
    d: int = 16,
    captions: int = 1,
    seed: int = 0,
    shift: float = 1.0,
) -> Path:
    """An embedding set with one image per label entry, ``captions`` texts per image, a label
    column, images and texts offset from each other by ``shift`` along one axis."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    centers = {lab: rng.standard_normal(d) * 2 for lab in sorted(set(labels))}
    offset = np.zeros(d)
    offset[0] = shift * 3
    images = np.stack([centers[lab] + rng.standard_normal(d) * 0.3 + offset for lab in labels])
    rows = np.repeat(np.arange(n), captions)
    texts = np.stack([centers[labels[r]] + rng.standard_normal(d) * 0.3 - offset for r in rows])
    write_set(
        path,
        images.astype(np.float32),
        texts.astype(np.float32),
        image_row=rows,
        image_meta=[{"id": i, "label": lab} for i, lab in enumerate(labels)],
        text_meta=[{"text": f"caption {j}", "label": labels[r]} for j, r in enumerate(rows)],
    )
    return path


def collections(fig, panel: int, modality: str):
    ax = fig.axes[panel]
    return [c for c in ax.collections if (c.get_gid() or "").startswith(f"{panel}:{modality}:")]


def n_points(fig, panel: int, modality: str) -> int:
    return sum(len(c.get_offsets()) for c in collections(fig, panel, modality))


def marker_vertices(marker: str) -> np.ndarray:
    from matplotlib.markers import MarkerStyle

    ms = MarkerStyle(marker)
    return ms.get_path().transformed(ms.get_transform()).vertices


def one_error_line(result) -> str:
    """The error message of a failed command (rich may wrap it at the terminal width)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = result.stderr
    assert err.startswith("error: ")
    return " ".join(err.split())


# --------------------------------------------------------------------------------------------
# Figure 2 (umap / pca)
# --------------------------------------------------------------------------------------------


def test_umap_pca_png_opens_with_the_right_points_and_markers(tmp_path):
    from PIL import Image

    a = make_set(tmp_path / "a", ["x"] * 12 + ["y"] * 8, seed=1)
    b = make_set(tmp_path / "b", ["x"] * 5 + ["y"] * 5 + ["z"] * 4, captions=2, seed=2)
    out = tmp_path / "figs" / "fig2.png"
    res = runner.invoke(
        app, ["plot", "umap", str(a), str(b), "--method", "pca", "--titles", "first,second", "-o", str(out), "--dpi", "80"]
    )
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 50

    r = gp.plot_umap([load_embeddings(a), load_embeddings(b)], tmp_path / "lib.png", method="pca", dpi=60)
    fig = r.figure
    assert n_points(fig, 0, "image") == 20 and n_points(fig, 0, "text") == 20
    assert n_points(fig, 1, "image") == 14 and n_points(fig, 1, "text") == 28
    tri, dia = marker_vertices("^"), marker_vertices("D")
    for k in (0, 1):
        for c in collections(fig, k, "image"):
            np.testing.assert_allclose(c.get_paths()[0].vertices, tri)
        for c in collections(fig, k, "text"):
            np.testing.assert_allclose(c.get_paths()[0].vertices, dia)
    titles = [ax.get_title(loc="left") for ax in fig.axes[:2]]
    assert titles == ["a", "b"]  # default titles: the set names
    # one legend, on the figure (outside the panels), explaining shapes and labels
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:2] == ["image", "text"] and set(texts[2:]) == {"x", "y", "z"}


def test_label_colour_is_the_same_in_every_panel(tmp_path):
    # label frequencies differ between the sets, so per-panel colour orders would differ
    a = make_set(tmp_path / "a", ["cat"] * 10 + ["dog"] * 3 + ["eel"] * 2, seed=1)
    b = make_set(tmp_path / "b", ["cat"] * 2 + ["dog"] * 4 + ["eel"] * 12 + ["fox"] * 3, seed=2)
    r = gp.plot_umap([load_embeddings(a), load_embeddings(b)], tmp_path / "c.png", method="pca", color_by="label", dpi=60)
    colour: dict[str, tuple] = {}
    for k in (0, 1):
        for modality in ("image", "text"):
            for c in collections(r.figure, k, modality):
                lab = c.get_gid().split(":", 2)[2]
                rgba = tuple(np.round(c.get_facecolor()[0][:3], 4))
                assert colour.setdefault(lab, rgba) == rgba, f"{lab} changes colour"
    assert set(colour) == {"cat", "dog", "eel", "fox"}
    assert len(set(colour.values())) == 4  # distinct labels, distinct colours
    # the legend's swatch of each label has the colour used in the panels
    leg = r.figure.legends[0]
    for h, t in zip(leg.legend_handles, leg.get_texts()):
        if t.get_text() in colour:
            from matplotlib.colors import to_rgb

            assert tuple(np.round(to_rgb(h.get_color()), 4)) == colour[t.get_text()]


def test_colour_by_modality_without_labels_and_pair_lines(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((25, 8)).astype(np.float32)
    y = (x + 0.1 * rng.standard_normal((25, 8))).astype(np.float32)
    np.save(tmp_path / "feat.npy", np.stack([x, y]))
    emb = load_embeddings(tmp_path / "feat.npy")
    r = gp.plot_umap([emb], tmp_path / "m.svg", method="pca", pair_lines=7)
    fig = r.figure
    assert [c.get_gid() for c in collections(fig, 0, "image")][0] == "0:image:*"
    img_c = {tuple(c.get_facecolor()[0][:3]) for c in collections(fig, 0, "image")}
    txt_c = {tuple(c.get_facecolor()[0][:3]) for c in collections(fig, 0, "text")}
    assert len(img_c) == 1 and len(txt_c) == 1 and img_c != txt_c
    lines = [c for c in fig.axes[0].collections if c.get_gid() == "0:pairs"]
    assert len(lines) == 1
    segs = lines[0].get_segments()
    assert len(segs) == 7
    p = r.panels[0]
    for seg in segs:  # each line joins a text to its own image
        j = int(np.flatnonzero(np.all(np.isclose(p.text_xy, seg[0]), axis=1))[0])
        np.testing.assert_allclose(seg[1], p.image_xy[p.text_pair[j]])
    ET.parse(tmp_path / "m.svg")  # a well-formed SVG


def test_pdf_output_and_unknown_extension(tmp_path):
    a = make_set(tmp_path / "a", ["x"] * 6 + ["y"] * 6)
    res = runner.invoke(app, ["plot", "umap", str(a), "--method", "pca", "-o", str(tmp_path / "f.pdf")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    res = runner.invoke(app, ["plot", "umap", str(a), "--method", "pca", "-o", str(tmp_path / "f.jpgx")])
    msg = one_error_line(res)
    assert "f.jpgx" in msg and ".png" in msg


def test_cached_coordinates_are_reused_when_only_styling_changes(tmp_path, monkeypatch):
    a = make_set(tmp_path / "a", ["x"] * 15 + ["y"] * 15, seed=3)
    b = make_set(tmp_path / "b", ["x"] * 10 + ["y"] * 10, seed=4)
    out = tmp_path / "fig.png"
    calls: list[int] = []
    real_fit = gp.fit_2d

    def counting_fit(x, **kw):
        calls.append(len(x))
        return real_fit(x, **kw)

    monkeypatch.setattr(gp, "fit_2d", counting_fit)
    args = ["plot", "umap", str(a), str(b), "--method", "umap", "--n-neighbors", "5", "-o", str(out)]
    res = runner.invoke(app, args + ["--dpi", "60"])
    assert res.exit_code == 0, res.output
    assert calls == [60, 40]
    npz, js = gp.coords_paths(out)
    assert npz.exists() and js.exists()
    settings = json.loads(js.read_text())["panels"][0]["settings"]
    assert settings["method"] == "umap" and settings["n_neighbors"] == 5 and settings["metric"] == "cosine"
    first = np.load(npz)

    # styling only: titles, dpi, size, colours, pair lines, another format -> no refit
    res = runner.invoke(
        app,
        args[:-1] + [str(tmp_path / "fig.pdf"), "--titles", "A,B", "--dpi", "50", "--size", "5,3", "--color-by", "modality", "--pair-lines", "3"],
    )
    assert res.exit_code == 0, res.output
    assert calls == [60, 40], "styling change refitted"
    assert "reused cached" in " ".join(res.stderr.split())
    r = gp.plot_umap([load_embeddings(a), load_embeddings(b)], out, method="umap", n_neighbors=5)
    assert calls == [60, 40] and all(p.reused for p in r.panels)
    np.testing.assert_array_equal(r.panels[0].image_xy, first[f"{r.panels[0].key}_image_xy"])

    # a setting that changes the coordinates -> refit (only the panels whose key changed)
    res = runner.invoke(app, ["plot", "umap", str(a), "--n-neighbors", "5", "--min-dist", "0.3", "-o", str(out)])
    assert res.exit_code == 0 and calls == [60, 40, 60]
    pca = ["plot", "umap", str(a), str(b), "--method", "pca", "-o", str(out)]
    res = runner.invoke(app, pca)
    assert res.exit_code == 0 and calls == [60, 40, 60, 60, 40]
    res = runner.invoke(app, pca + ["--titles", "A,B"])
    assert res.exit_code == 0 and len(calls) == 5
    # changed data -> refit that panel only
    import shutil

    make_set(tmp_path / "b2", ["x"] * 10 + ["y"] * 10, seed=5)
    shutil.rmtree(b)
    (tmp_path / "b2").rename(b)
    res = runner.invoke(app, pca)
    assert res.exit_code == 0 and calls == [60, 40, 60, 60, 40, 40]
    # --refit forces a new fit
    res = runner.invoke(app, pca + ["--refit", "-q"])
    assert res.exit_code == 0 and len(calls) == 8


def test_max_points_samples_stratified_and_says_so(tmp_path):
    labels = ["big"] * 150 + ["mid"] * 45 + ["rare"] * 5
    a = make_set(tmp_path / "a", labels, d=8)
    out = tmp_path / "s.png"
    res = runner.invoke(app, ["plot", "umap", str(a), "--method", "pca", "--max-points", "40", "-o", str(out)])
    assert res.exit_code == 0, res.output
    err = " ".join(res.stderr.split())
    assert "sampled" in err and "40 of 200" in err and "stratified by label" in err
    r = gp.plot_umap([load_embeddings(a)], out, method="pca", max_points=40)
    p = r.panels[0]
    vals, counts = np.unique(p.text_labels, return_counts=True)
    assert dict(zip(vals, counts)) == {"big": 30, "mid": 9, "rare": 1}
    assert n_points(r.figure, 0, "text") == 40 and n_points(r.figure, 0, "image") == 40


def test_stratified_sample_properties():
    labels = np.array(["a"] * 70 + ["b"] * 29 + ["c"])
    idx = gp.stratified_sample(labels, 100, 20, seed=1)
    assert len(idx) == 20 and len(set(idx)) == 20 and np.all(np.diff(idx) > 0)
    got = dict(zip(*np.unique(labels[idx], return_counts=True)))
    assert got["c"] == 1 and abs(got["a"] - 14) <= 1 and got["a"] + got["b"] == 19
    np.testing.assert_array_equal(idx, gp.stratified_sample(labels, 100, 20, seed=1))
    assert not np.array_equal(idx, gp.stratified_sample(labels, 100, 20, seed=2))
    np.testing.assert_array_equal(gp.stratified_sample(labels, 100, 500), np.arange(100))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_missing_colour_column_is_one_clear_line(tmp_path):
    a = make_set(tmp_path / "a", ["x"] * 6)
    res = runner.invoke(app, ["plot", "umap", str(a), "--color-by", "organ", "-o", str(tmp_path / "f.png")])
    msg = one_error_line(res)
    assert "'organ'" in msg and "label" in msg and str(a) in msg
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("command", ["umap", "hist", "shift"])
def test_images_and_texts_of_different_width(tmp_path, command):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bad.npz", images=rng.standard_normal((10, 8)), texts=rng.standard_normal((10, 6)))
    res = runner.invoke(app, ["plot", command, str(tmp_path / "bad.npz"), "-o", str(tmp_path / "f.png")])
    msg = one_error_line(res)
    assert "bad.npz" in msg and "8 dimensions" in msg and "6" in msg


def test_empty_set(tmp_path):
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8), np.float32), texts=np.zeros((0, 8), np.float32))
    res = runner.invoke(app, ["plot", "umap", str(tmp_path / "empty.npz"), "-o", str(tmp_path / "f.png")])
    msg = one_error_line(res)
    assert "empty.npz" in msg and "empty" in msg


def test_nan_row_is_named(tmp_path):
    x = np.ones((5, 4), np.float32)
    y = np.ones((5, 4), np.float32)
    y[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", np.stack([x, y]))
    res = runner.invoke(app, ["plot", "hist", str(tmp_path / "nan.npy"), "-o", str(tmp_path / "f.png")])
    msg = one_error_line(res)
    assert "nan.npy" in msg and "row 3" in msg


def test_unwritable_output_path(tmp_path):
    a = make_set(tmp_path / "a", ["x"] * 6)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = runner.invoke(app, ["plot", "umap", str(a), "--method", "pca", "-o", str(blocker / "f.png")])
    msg = one_error_line(res)
    assert str(blocker) in msg
    res = runner.invoke(app, ["plot", "hist", str(a), "-o", str(tmp_path)])  # a folder
    assert "folder" in one_error_line(res)


# --------------------------------------------------------------------------------------------
# hist, shift, training
# --------------------------------------------------------------------------------------------


def test_hist_marks_the_true_and_random_means(tmp_path):
    a = make_set(tmp_path / "a", ["x"] * 20 + ["y"] * 20, captions=2, shift=0.2, seed=1)
    b = make_set(tmp_path / "b", ["x"] * 20 + ["y"] * 20, shift=1.5, seed=2)
    out = tmp_path / "h.png"
    res = runner.invoke(app, ["plot", "hist", str(a), str(b), "--titles", "near,far", "-o", str(out), "--dpi", "60"])
    assert res.exit_code == 0, res.output and out.exists()
    r = gp.plot_hist([load_embeddings(a), load_embeddings(b)], tmp_path / "h2.png", n_random=5000)
    for k, path in enumerate((a, b)):
        emb = load_embeddings(path)
        x = emb.images / np.linalg.norm(emb.images, axis=1, keepdims=True)
        y = emb.texts / np.linalg.norm(emb.texts, axis=1, keepdims=True)
        true_mean = float(np.mean(np.sum(x[emb.image_row] * y, axis=1)))
        ax = r.figure.axes[k]
        (line,) = [ln for ln in ax.lines if ln.get_gid() == f"{k}:true-mean"]
        assert line.get_xdata()[0] == pytest.approx(true_mean, abs=1e-5)
        # the random-pair mean is near the exact mean over all non-pairs
        s = x @ y.T
        mask = np.ones_like(s, dtype=bool)
        mask[emb.image_row, np.arange(len(emb.image_row))] = False
        (rline,) = [ln for ln in ax.lines if ln.get_gid() == f"{k}:random-mean"]
        assert rline.get_xdata()[0] == pytest.approx(s[mask].mean(), abs=1e-5)
        # the histogram of random pairs is a sample of those cosines: its mean is close
        assert r.data[["a", "b"][k]]["sample_mean_random"] == pytest.approx(s[mask].mean(), abs=0.02)
    # the true pairs of the set with the small gap are more similar
    assert r.data["a"]["cos_true_pairs"] > r.data["b"]["cos_true_pairs"]


def test_shift_gap_at_zero_equals_measure_and_closes_at_one(tmp_path):
    from gapkit import metrics

    a = make_set(tmp_path / "a", ["x"] * 20 + ["y"] * 20, captions=2, shift=1.0, seed=1)
    emb = load_embeddings(a)
    res = gp.shift_experiment(emb, gp.lambda_grid(-0.5, 1.5, 9), temperature=0.05)
    lam = res["lambda"]
    assert 0.0 in lam and 1.0 in lam
    g0 = res["gap"][lam == 0.0][0]
    assert g0 == pytest.approx(metrics.measure_set(emb)["gap"], abs=1e-6)  # what `gapkit measure` reports
    x = emb.images / np.linalg.norm(emb.images, axis=1, keepdims=True)
    y = emb.texts / np.linalg.norm(emb.texts, axis=1, keepdims=True)
    assert g0 == pytest.approx(np.linalg.norm(x.mean(0) - y.mean(0)), abs=1e-5)  # DESIGN.md's formula
    g = res["gap"]
    assert g[lam == 1.0][0] < 0.1 * g0  # the centroids (nearly) meet at λ = 1
    assert np.all(np.diff(g[(lam >= 0) & (lam <= 1)]) < 0)
    assert g[lam == -0.5][0] > g0
    # clip loss at λ = 0: independent numpy cross-entropy on the same (one) batch
    x = emb.images / np.linalg.norm(emb.images, axis=1, keepdims=True)
    y = emb.texts / np.linalg.norm(emb.texts, axis=1, keepdims=True)
    logits = (x[emb.image_row] @ y.T) / 0.05

    def ce(m):
        m = m - m.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(m).sum(1)) - np.diag(m)))

    assert res["clip_loss"][lam == 0.0][0] == pytest.approx(0.5 * (ce(logits) + ce(logits.T)), rel=1e-4)
    out = tmp_path / "shift.png"
    r = runner.invoke(app, ["plot", "shift", str(a), "-o", str(out), "--steps", "5", "--json", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["gap"][data["lambda"].index(0.0)] == pytest.approx(g0, abs=1e-6) and out.exists()


def _write_run(path: Path, loss: str, terms: list[str], epochs: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"loss": loss, "epochs": epochs}))
    with open(path / "metrics.jsonl", "w") as fh:
        for e in range(1, epochs + 1):
            row = {"epoch": e, "step": 10 * e, "time_s": 1.5 * e, "lr": 1e-3, "temperature": 0.07}
            row["train_loss"] = 3.0 / e
            for t in terms:
                row[f"train_{t}"] = float(rng.uniform(0, 1))
            row.update({"val_gap": 0.8 / e, "val_cos_true_pairs": 0.2 + 0.05 * e})
            for d in ("i2t", "t2i"):
                for k in (1, 5, 10):
                    row[f"val_{d}_R@{k}"] = min(1.0, 0.1 * k * e / 3)
            fh.write(json.dumps(row) + "\n")
    return path


def test_training_curves_of_two_runs(tmp_path):
    r1 = _write_run(tmp_path / "run-clip", "clip", ["clip"], 4, 0)
    r2 = _write_run(tmp_path / "run-atp", "clip+atp+cu", ["clip", "atp", "cu"], 6, 1)
    out = tmp_path / "train.png"
    res = runner.invoke(app, ["plot", "training", str(r1), str(r2), "-o", str(out)])
    assert res.exit_code == 0, res.output and out.exists()
    r = gp.plot_training([r1, r2], tmp_path / "t.svg")
    fig = r.figure
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["training loss", "val gap", "val cos true pairs", "val R@10"]
    gap_lines = {ln.get_gid(): ln for ln in fig.axes[1].lines}
    np.testing.assert_allclose(gap_lines["1:val_gap"].get_ydata(), [0.8 / e for e in range(1, 7)])
    np.testing.assert_allclose(gap_lines["0:val_gap"].get_xdata(), [1, 2, 3, 4])
    loss_gids = {ln.get_gid() for ln in fig.axes[0].lines}
    assert {"0:train_loss", "0:train_clip", "1:train_atp", "1:train_cu"} <= loss_gids
    assert "0:train_atp" not in loss_gids
    c0 = gap_lines["0:val_gap"].get_color()
    c1 = gap_lines["1:val_gap"].get_color()
    assert c0 != c1
    leg = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "run-clip" in leg and "run-atp (clip+atp+cu)" in leg


def test_training_bad_metrics_line_names_the_row(tmp_path):
    r1 = _write_run(tmp_path / "run", "clip", ["clip"], 2, 0)
    with open(r1 / "metrics.jsonl", "a") as fh:
        fh.write("{not json\n")
    res = runner.invoke(app, ["plot", "training", str(r1), "-o", str(tmp_path / "t.png")])
    msg = one_error_line(res)
    assert "metrics.jsonl" in msg and "row 2" in msg
    res = runner.invoke(app, ["plot", "training", str(tmp_path / "nope"), "-o", str(tmp_path / "t.png")])
    assert "nope" in one_error_line(res)


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------


def test_real_coco_random_init_vs_clip(tmp_path, coco_features, coco_features_random):
    out = tmp_path / "coco.png"
    res = runner.invoke(
        app,
        ["plot", "umap", str(coco_features_random), str(coco_features), "--method", "pca", "--titles", "random,CLIP",
         "--pair-lines", "20", "-o", str(out), "--dpi", "80"],
    )
    assert res.exit_code == 0, res.output
    r = gp.plot_umap([load_embeddings(coco_features_random), load_embeddings(coco_features)], out, method="pca")
    assert all(p.reused for p in r.panels)
    assert [n_points(r.figure, k, m) for k in (0, 1) for m in ("image", "text")] == [500] * 4
    # Liang et al.: CLIP's gap on MSCOCO is 0.82 (5,000 pairs; these are 500 of them)
    assert r.panels[1].gap == pytest.approx(0.82, abs=0.05)
    sh = gp.shift_experiment(load_embeddings(coco_features), [0.0, 0.5, 1.0])
    assert sh["gap"][0] == pytest.approx(r.panels[1].gap, abs=1e-6)
    assert sh["gap"][2] < 0.1


def test_umap_is_seeded_and_uses_exact_neighbours():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 12)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx, dist = gp.exact_cosine_knn(x, 6, chunk=16)
    sims = x @ x.T
    for i in range(len(x)):  # the same neighbours as a full sort, nearest first, self included
        want = np.argsort(-sims[i], kind="stable")[:6]
        assert set(idx[i]) == set(want) and idx[i][0] == i
        np.testing.assert_allclose(dist[i], 1 - sims[i][idx[i]], atol=1e-5)
        assert np.all(np.diff(dist[i]) >= -1e-6)
    a = gp.fit_2d(x, method="umap", seed=3, n_neighbors=6)
    b = gp.fit_2d(x, method="umap", seed=3, n_neighbors=6)
    assert a.shape == (80, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_labels, distinct, other", [(5, 5, False), (10, 10, False), (12, 9, True)])
def test_many_labels_get_distinct_colours_then_other(tmp_path, n_labels, distinct, other):
    labels = [f"L{k:02d}" for k in range(n_labels) for _ in range(n_labels - k + 1)]
    a = make_set(tmp_path / "a", labels, d=8)
    r = gp.plot_umap([load_embeddings(a)], tmp_path / "m.png", method="pca", dpi=40)
    colours = gp.label_colors(r.panels)
    assert len(colours) == n_labels
    named = {c for c in colours.values() if c != gp.OTHER_COLOR}
    assert len(named) == distinct
    texts = [t.get_text() for t in r.figure.legends[0].get_texts()]
    assert ("other" in texts) == other
    if other:  # the rarest labels are the ones grouped
        assert colours["L11"] == colours["L10"] == gp.OTHER_COLOR and colours["L00"] != gp.OTHER_COLOR
