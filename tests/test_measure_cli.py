"""`gapkit measure` through Typer's CliRunner: outputs, several sets, labels, every bad input."""

from __future__ import annotations

import csv
import io
import json
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gapkit.cli import app
from gapkit.store import write_set

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["measure", *args])


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture()
def pair_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = (x + rng.normal(size=(64, 8))).astype(np.float32)
    np.save(tmp_path / "img.npy", x)
    np.save(tmp_path / "txt.npy", y)
    return tmp_path / "img.npy", tmp_path / "txt.npy", x, y


@pytest.fixture()
def labelled_set(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 4
    lab = np.repeat(np.arange(3), 20)
    x = centres[lab] + rng.normal(size=(60, 16)) * 0.2
    y = centres[lab] + rng.normal(size=(60, 16)) * 0.2
    names = ["head", "thorax", "spine"]
    path = write_set(
        tmp_path / "set",
        x,
        y,
        image_meta=[{"id": i, "region": names[c]} for i, c in enumerate(lab)],
        text_meta=[{"text": f"caption {i}"} for i in range(60)],
        info={"encoders": {"image": "tiny-vit", "text": "tiny-bert"}},
    )
    return path, lab, x, y


def _one_error_line(result, *must_contain: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr  # one error line (a progress bar may precede it)
    err = lines[0]
    for piece in must_contain:
        assert piece in err, (piece, err)
    return err


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def test_table_on_stdout(pair_files):
    a, b, x, y = pair_files
    r = run("--images", str(a), "--texts", str(b), "--quiet")
    assert r.exit_code == 0, r.output
    gap = np.linalg.norm(_unit(x).mean(0) - _unit(y).mean(0))
    assert "gap" in r.stdout and f"{gap:.4f}" in r.stdout
    assert "t2i_R@10" in r.stdout and "rmg" in r.stdout
    assert r.stderr == ""  # quiet: no progress, no notes


def test_progress_goes_to_stderr(pair_files):
    a, b, _, _ = pair_files
    r = run("--images", str(a), "--texts", str(b))
    assert r.exit_code == 0
    assert "rows/s" in r.stderr and "rows/s" not in r.stdout


def test_json_with_provenance(labelled_set, tmp_path):
    path, _, x, y = labelled_set
    out = tmp_path / "r.json"
    r = run(str(path), "-o", str(out), "--metrics", "gap,cos_true_pairs", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["gapkit_version"] and doc["metrics"] == ["gap", "cos_true_pairs"]
    s = doc["sets"][0]
    assert s["input"] == str(path) and s["n_images"] == 60 and s["n_texts"] == 60
    assert s["image_dim"] == 16 and s["text_dim"] == 16
    assert s["encoders"] == {"image": "tiny-vit", "text": "tiny-bert"}
    cos = (_unit(x) * _unit(y)).sum(1).mean()
    assert s["metrics"]["cos_true_pairs"] == pytest.approx(cos, abs=1e-6)


def test_several_sets_one_column_each(pair_files, tmp_path):
    a, b, x, y = pair_files
    np.save(tmp_path / "stacked.npy", np.stack([x, x]))  # identical modalities: gap 0
    np.savez(tmp_path / "pair.npz", images=x, texts=y)
    r = run(
        str(tmp_path / "stacked.npy"), str(tmp_path / "pair.npz"),
        "--names", "same,noisy", "--format", "csv", "--metrics", "gap,t2i_R@1", "-q",
    )
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["metric", "same", "noisy"]
    body = {row[0]: row[1:] for row in rows[1:]}
    assert float(body["gap"][0]) == pytest.approx(0, abs=1e-6)
    assert float(body["t2i_R@1"][0]) == 1.0
    assert float(body["gap"][1]) == pytest.approx(np.linalg.norm(_unit(x).mean(0) - _unit(y).mean(0)), abs=1e-6)


def test_bootstrap_intervals_in_markdown_and_latex(pair_files):
    a, b, _, _ = pair_files
    r = run("--images", str(a), "--texts", str(b), "--bootstrap", "100", "-f", "markdown", "--metrics", "gap", "-q")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stdout.splitlines() if x.startswith("| gap"))
    assert "±" in line
    r2 = run("--images", str(a), "--texts", str(b), "--bootstrap", "100", "-f", "latex", "--metrics", "gap", "-q")
    assert "\\begin{tabular}" in r2.stdout and "$\\pm$" in r2.stdout and "\\toprule" in r2.stdout
    r3 = run("--images", str(a), "--texts", str(b), "--bootstrap", "100", "-f", "json", "--metrics", "gap", "-q")
    lo, hi = json.loads(r3.stdout)["sets"][0]["ci95"]["gap"]
    assert lo < json.loads(r3.stdout)["sets"][0]["metrics"]["gap"] < hi


def test_output_format_from_suffix(pair_files, tmp_path):
    a, b, _, _ = pair_files
    r = run("--images", str(a), "--texts", str(b), "-o", str(tmp_path / "t.tex"), "-q", "--metrics", "gap")
    assert r.exit_code == 0
    assert (tmp_path / "t.tex").read_text().startswith("\\begin{tabular}")


def test_label_column_and_labels_file(labelled_set, tmp_path):
    path, lab, _, _ = labelled_set
    r = run(str(path), "--label", "region", "-f", "json", "-q")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["sets"][0]["metrics"]
    assert m["vmeasure"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)
    (tmp_path / "labels.txt").write_text("\n".join(str(v) for v in lab) + "\n")
    r = run(str(path), "--labels", str(tmp_path / "labels.txt"), "--metrics", "labels", "-f", "json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sets"][0]["metrics"]["nmi"] == pytest.approx(1.0)


def test_several_captions_per_image_set(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 8))
    rows = np.repeat(np.arange(10), 3)
    y = x[rows] * 2
    write_set(tmp_path / "s", x, y, image_row=rows)
    r = run(str(tmp_path / "s"), "-f", "json", "-q")
    m = json.loads(r.stdout)["sets"][0]["metrics"]
    assert m["gap"] == pytest.approx(0, abs=1e-6) and m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0


def test_real_clip_features(coco_features):
    r = run(str(coco_features), "-f", "json", "-q", "--metrics", "gap")
    assert r.exit_code == 0, r.output
    feats = np.load(coco_features)
    ref = np.linalg.norm(_unit(feats[0]).mean(0) - _unit(feats[1]).mean(0))
    assert json.loads(r.stdout)["sets"][0]["metrics"]["gap"] == pytest.approx(ref, abs=1e-5)


def test_help_lists_options():
    r = runner.invoke(app, ["measure", "--help"])
    assert r.exit_code == 0
    for opt in ("--images", "--texts", "--names", "--metrics", "--label", "--labels", "--bootstrap", "--format", "--quiet"):
        assert opt in r.stdout


# --------------------------------------------------------------------------------------------
# bad input: one line naming the file (and row), non-zero exit, no traceback
# --------------------------------------------------------------------------------------------


def test_mismatched_row_counts(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((6, 4), np.float32))
    _one_error_line(run("--images", str(tmp_path / "a.npy"), "--texts", str(tmp_path / "b.npy")), "a.npy", "image_row")


def test_different_dims_mention_finetune(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((5, 3), np.float32))
    _one_error_line(run("--images", str(tmp_path / "a.npy"), "--texts", str(tmp_path / "b.npy")), "b.npy", "finetune")


@pytest.mark.parametrize("bad, words", [(np.nan, "NaN"), (np.inf, "inf"), (0.0, "all-zero")])
def test_bad_values_name_file_and_row(tmp_path, bad, words):
    x = np.ones((9, 4), np.float32)
    y = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    y[5] = bad if bad == 0.0 else y[5]
    if bad != 0.0:
        y[5, 2] = bad
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    _one_error_line(run("--images", str(tmp_path / "a.npy"), "--texts", str(tmp_path / "b.npy")), "b.npy", "row 5", words)


def test_bad_row_in_embedding_set(tmp_path):
    x = np.ones((9, 4), np.float32)
    x[3] = 0
    write_set(tmp_path / "s", x, np.ones((9, 4)))
    _one_error_line(run(str(tmp_path / "s")), "images.npy", "row 3", "all-zero")


def test_empty_and_wrong_ndim(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((0, 4), np.float32))
    np.save(tmp_path / "f.npy", np.ones((5, 4), np.float32))
    np.save(tmp_path / "g.npy", np.ones((5, 4, 2), np.float32))
    _one_error_line(run("--images", str(tmp_path / "e.npy"), "--texts", str(tmp_path / "f.npy")), "e.npy", "empty")
    _one_error_line(run("--images", str(tmp_path / "g.npy"), "--texts", str(tmp_path / "f.npy")), "g.npy", "2-D")
    _one_error_line(run(str(tmp_path / "f.npy")), "f.npy", "(2, N, D)")


def test_unknown_metric_and_label_column(labelled_set):
    path, _, _, _ = labelled_set
    _one_error_line(run(str(path), "--metrics", "gap,bogus"), "bogus", "choose from")
    _one_error_line(run(str(path), "--label", "colour"), "colour", "region")


def test_unreadable_and_pickled_files(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"this is not numpy")
    _one_error_line(run(str(tmp_path / "junk.npy")), "junk.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _one_error_line(run(str(tmp_path / "obj.npy")), "obj.npy", "pickle")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"images": torch.ones(3, 2), "texts": Evil()}, tmp_path / "evil.pt")
    r = run(str(tmp_path / "evil.pt"))
    _one_error_line(r, "evil.pt", "weights_only")
    assert "pwned" not in r.output
    with open(tmp_path / "raw.pt", "wb") as fh:
        pickle.dump({"images": [1]}, fh)
    _one_error_line(run(str(tmp_path / "raw.pt")), "raw.pt")
    _one_error_line(run(str(tmp_path / "missing.npy")), "missing.npy")


def test_usage_errors(pair_files):
    a, b, _, _ = pair_files
    _one_error_line(run(), "nothing to measure")
    _one_error_line(run("--images", str(a)), "--texts")
    _one_error_line(run("--images", str(a), "--texts", str(b), "--names", "x,y"), "--names")
    _one_error_line(run("--images", str(a), "--texts", str(b), "-f", "xml"), "xml")
    _one_error_line(run("--images", str(a), "--texts", str(b), "--metrics", "nmi"), "labels")
