"""gapkit.metrics against analytic cases, dense numpy references and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gapkit
from gapkit import metrics as M
from gapkit.errors import GapkitError

# --------------------------------------------------------------------------------------------
# a plain dense numpy reference, written from DESIGN.md's table (not from the library)
# --------------------------------------------------------------------------------------------


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def reference(images, texts, image_row=None, ks=(1, 5, 10)):
    x, y = _unit(images), _unit(texts)
    n_i, n_t = len(x), len(y)
    r = np.arange(n_t) if image_row is None else np.asarray(image_row)
    xp = x[r]
    cos = (xp * y).sum(1)
    out = {}
    out["gap"] = np.linalg.norm(x.mean(0) - y.mean(0))
    mx, my = x.mean(0), y.mean(0)
    out["centroid_cosine"] = mx @ my / np.linalg.norm(mx) / np.linalg.norm(my)
    out["cos_true_pairs"] = cos.mean()
    out["angle_true_pairs"] = np.degrees(np.arccos(np.clip(cos, -1, 1))).mean()
    s = x @ y.T
    true = np.zeros_like(s, dtype=bool)
    true[r, np.arange(n_t)] = True
    out["cos_random_pairs"] = s[~true].mean()
    out["l2_true_pairs"] = np.linalg.norm(xp - y, axis=1).mean()
    gx, gy = x @ x.T, y @ y.T
    off_x, off_y = ~np.eye(n_i, dtype=bool), ~np.eye(n_t, dtype=bool)
    out["cone_cosine_image"] = gx[off_x].mean()
    out["cone_cosine_text"] = gy[off_y].mean()
    d = lambda c: (1 - c) / 2  # noqa: E731
    num = d(cos).mean()
    out["rmg"] = num / (num + 0.5 * (d(gx[off_x]).mean() + d(gy[off_y]).mean()))
    out["alignment"] = (np.linalg.norm(xp - y, axis=1) ** 2).mean()
    sqd = lambda g: 2 - 2 * g  # noqa: E731  ‖a-b‖² of unit rows
    out["uniformity_image"] = np.log(np.exp(-2 * sqd(gx[off_x])).mean())
    out["uniformity_text"] = np.log(np.exp(-2 * sqd(gy[off_y])).mean())
    mu = _unit(xp + y)
    gm = mu @ mu.T
    out["centroid_uniformity"] = np.log(np.exp(-2 * sqd(gm[~np.eye(n_t, dtype=bool)])).mean())
    # retrieval by full argsort (CLIP_benchmark: i2t hit if any caption of the image is in top K)
    order_i2t = np.argsort(-s, axis=1, kind="stable")
    order_t2i = np.argsort(-s.T, axis=1, kind="stable")
    has = np.bincount(r, minlength=n_i) > 0
    for k in ks:
        hit_i = np.array([(r[order_i2t[i, :k]] == i).any() for i in range(n_i)])
        out[f"i2t_R@{k}"] = hit_i[has].mean()
        out[f"t2i_R@{k}"] = np.array([(order_t2i[j, :k] == r[j]).any() for j in range(n_t)]).mean()
    return {k: float(v) for k, v in out.items()}


QUADRATIC_OK = M.STREAM_METRICS + M.UNIFORMITY_METRICS + M.RETRIEVAL_METRICS


def _close(res, ref, names, tol=2e-5):
    for m in names:
        t = tol * 60 if m == "angle_true_pairs" else tol  # degrees: d(angle) = 57.3° d(cos)/sin
        assert res[m] == pytest.approx(ref[m], abs=t), m


# --------------------------------------------------------------------------------------------
# analytic cases
# --------------------------------------------------------------------------------------------


def test_identical_modalities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    r = M.measure(x, x * 3.0, metrics="all")  # scale does not matter: rows are normalised
    assert r["gap"] == pytest.approx(0, abs=1e-6)
    assert r["cos_true_pairs"] == pytest.approx(1, abs=1e-6)
    assert r["angle_true_pairs"] == pytest.approx(0, abs=0.1)  # arccos is steep at 1
    assert r["l2_true_pairs"] == pytest.approx(0, abs=1e-3)
    assert r["alignment"] == pytest.approx(0, abs=1e-6)
    assert r["rmg"] == pytest.approx(0, abs=1e-6)
    assert r["centroid_cosine"] == pytest.approx(1, abs=1e-6)
    for k in M.RETRIEVAL_KS:
        assert r[f"i2t_R@{k}"] == 1.0 and r[f"t2i_R@{k}"] == 1.0
    assert r["uniformity_image"] == pytest.approx(r["uniformity_text"], abs=1e-6)
    assert r["linear_separability"] < 0.65  # identical rows cannot be told apart


def test_known_shift_gives_known_gap():
    # x_i = cos t e1 + sin t u_i, y_i = cos t e2 + sin t u_i with u_i ⊥ e1, e2 unit vectors:
    # mean x - mean y = cos t (e1 - e2)  ->  gap = sqrt(2) cos t ;  <x_i, y_i> = sin² t
    rng = np.random.default_rng(1)
    n, d, t = 400, 16, 0.6
    u = rng.normal(size=(n, d))
    u[:, :2] = 0
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    e1, e2 = np.eye(d)[0], np.eye(d)[1]
    x = math.cos(t) * e1 + math.sin(t) * u
    y = math.cos(t) * e2 + math.sin(t) * u
    r = M.measure(x, y, metrics=["gap", "cos_true_pairs", "angle_true_pairs", "alignment"])
    assert r["gap"] == pytest.approx(math.sqrt(2) * math.cos(t), abs=1e-5)
    assert r["cos_true_pairs"] == pytest.approx(math.sin(t) ** 2, abs=1e-5)
    assert r["angle_true_pairs"] == pytest.approx(math.degrees(math.acos(math.sin(t) ** 2)), abs=1e-3)
    assert r["alignment"] == pytest.approx(2 - 2 * math.sin(t) ** 2, abs=1e-5)


def test_opposite_modalities():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 8))
    r = M.measure(x, -x, metrics=["cos_true_pairs", "angle_true_pairs", "l2_true_pairs", "rmg"])
    assert r["cos_true_pairs"] == pytest.approx(-1, abs=1e-6)
    assert r["angle_true_pairs"] == pytest.approx(180, abs=0.1)
    assert r["l2_true_pairs"] == pytest.approx(2, abs=1e-5)


# --------------------------------------------------------------------------------------------
# against the dense reference
# --------------------------------------------------------------------------------------------


def test_matches_dense_reference_one_to_one(monkeypatch):
    rng = np.random.default_rng(3)
    n, d = 230, 24
    x = rng.normal(size=(n, d)) + 0.5
    y = x + rng.normal(size=(n, d)) * 1.5 - 0.5
    monkeypatch.setattr(M, "RETRIEVAL_BLOCK_BYTES", 4 * n * 20)  # 20-row score blocks
    r = M.measure(x, y, metrics="all", chunk=37)  # many uneven streaming blocks
    _close(r, reference(x, y), QUADRATIC_OK)


def test_several_captions_per_image(monkeypatch):
    rng = np.random.default_rng(4)
    n_img, d = 60, 16
    x = rng.normal(size=(n_img, d))
    # 1..5 captions per image, some images without a caption, shuffled text order
    counts = rng.integers(0, 6, size=n_img)
    rows = rng.permutation(np.repeat(np.arange(n_img), counts))
    y = x[rows] + rng.normal(size=(len(rows), d)) * 1.2
    monkeypatch.setattr(M, "RETRIEVAL_BLOCK_BYTES", 4 * len(rows) * 16)
    r = M.measure(x, y, image_row=rows, metrics="all", chunk=50)
    ref = reference(x, y, rows)
    _close(r, ref, QUADRATIC_OK)
    assert r.n_images == n_img and r.n_texts == len(rows)


def test_i2t_hit_when_any_caption_is_in_top_k():
    # image 0 has two captions: one far away, one identical -> hit at 1; image 1 has only a far one
    x = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    y = np.array([[0, 0.5, 1.0], [1.0, 0, 0], [0, -1.0, 0.2]])
    rows = np.array([0, 0, 1])
    r = M.recall_at_k(x, y, rows, ks=(1, 2))
    assert r["i2t_R@1"] == 0.5  # image 0 hits (caption 1); image 1's caption is last for it
    assert r["t2i_R@1"] == pytest.approx(1 / 3)  # only caption 1 ranks its own image first


@given(
    n=st.integers(2, 40),
    d=st.integers(2, 9),
    seed=st.integers(0, 10_000),
    chunk=st.integers(1, 17),
)
@settings(max_examples=25, deadline=None)
def test_chunked_equals_dense(n, d, seed, chunk):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) + rng.normal(size=d)
    r = M.measure(x, y, metrics=M.STREAM_METRICS + M.UNIFORMITY_METRICS, chunk=chunk)
    _close(r, reference(x, y), M.STREAM_METRICS + M.UNIFORMITY_METRICS, tol=5e-5)


@given(seed=st.integers(0, 10_000), n=st.integers(3, 60))
@settings(max_examples=20, deadline=None)
def test_permuting_pairs_together_changes_nothing(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    y = x + rng.normal(size=(n, 6))
    p = rng.permutation(n)
    names = M.STREAM_METRICS + M.RETRIEVAL_METRICS + M.UNIFORMITY_METRICS
    a = M.measure(x, y, metrics=names)
    b = M.measure(x[p], y[p], metrics=names)
    for m in names:
        assert a[m] == pytest.approx(b[m], abs=2e-5), m


@given(seed=st.integers(0, 10_000), n=st.integers(2, 50), d=st.integers(1, 8))
@settings(max_examples=25, deadline=None)
def test_bounds_hold(seed, n, d):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.01, 100)
    y = rng.normal(size=(n, d)) + rng.normal(size=d)
    r = M.measure(x, y, metrics=M.STREAM_METRICS + M.RETRIEVAL_METRICS + M.UNIFORMITY_METRICS)
    eps = 1e-6
    assert 0 <= r["gap"] <= 2 + eps
    for m in ("centroid_cosine", "cos_true_pairs", "cos_random_pairs", "cone_cosine_image", "cone_cosine_text"):
        if m == "centroid_cosine" and math.isnan(r[m]):  # undefined: a centroid is the zero vector
            assert min(np.linalg.norm(_unit(x).mean(0)), np.linalg.norm(_unit(y).mean(0))) < 1e-6
            continue
        assert -1 - eps <= r[m] <= 1 + eps, m
    assert 0 <= r["angle_true_pairs"] <= 180 + eps
    assert 0 <= r["l2_true_pairs"] <= 2 + eps
    assert 0 <= r["alignment"] <= 4 + eps
    if math.isnan(r["rmg"]):  # 0/0: every row of both modalities points the same way
        assert r["cos_true_pairs"] > 1 - 1e-5 and r["cone_cosine_image"] > 1 - 1e-5
    else:
        assert -eps <= r["rmg"] <= 1 + eps
    for m in M.UNIFORMITY_METRICS:
        assert -8 - eps <= r[m] <= eps, m
    for m in M.RETRIEVAL_METRICS:
        assert 0 <= r[m] <= 1
    for k1, k2 in ((1, 5), (5, 10)):
        assert r[f"i2t_R@{k1}"] <= r[f"i2t_R@{k2}"]


# --------------------------------------------------------------------------------------------
# inputs: torch, float16, memory maps, the public pure functions
# --------------------------------------------------------------------------------------------


def test_torch_float16_and_memmap_inputs(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 16)).astype(np.float16)
    y = (x + rng.normal(size=(120, 16))).astype(np.float16)
    ref = reference(x.astype(np.float32), y.astype(np.float32))
    names = M.STREAM_METRICS + M.RETRIEVAL_METRICS
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ym = np.load(tmp_path / "y.npy", mmap_mode="r")
    _close(M.measure(xm, ym, metrics=names, chunk=33), ref, names, tol=1e-4)
    _close(M.measure(torch.from_numpy(x), torch.from_numpy(y), metrics=names), ref, names, tol=1e-4)
    _close(gapkit.measure(torch.from_numpy(x).bfloat16(), y, metrics=["gap"]), ref, ["gap"], tol=1e-2)


def test_pure_functions_match_measure():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(80, 10))
    y = x + rng.normal(size=(80, 10))
    ref = reference(x, y)
    for name in M.STREAM_METRICS:
        f = getattr(M, name)
        assert f(x, y) == pytest.approx(ref[name], abs=2e-5), name
    assert M.uniformity_image(x, y) == pytest.approx(ref["uniformity_image"], abs=2e-5)
    assert M.uniformity_text(x, y) == pytest.approx(ref["uniformity_text"], abs=2e-5)
    assert M.centroid_uniformity(x, y) == pytest.approx(ref["centroid_uniformity"], abs=2e-5)
    rec = M.recall_at_k(x, y)
    assert set(rec) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for k, v in rec.items():
        assert v == pytest.approx(ref[k])
    nx = M.normalize(x)
    assert nx.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(nx, axis=1), 1, atol=1e-6)


def test_result_object():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 8))
    r = gapkit.measure(x, x + rng.normal(size=(40, 8)), metrics="gap,retrieval", bootstrap=50)
    assert list(r) == ["gap"] + M.RETRIEVAL_METRICS
    assert "gap" in r and "rmg" not in r
    d = r.to_dict()
    assert d["metrics"]["gap"] == r["gap"] and d["n_texts"] == 40
    assert set(r.ci) == set(r.values)
    assert "gap" in str(r) and "[" in str(r)
    with pytest.raises(KeyError, match="rmg"):
        r["rmg"]


def test_default_metrics_cover_the_paper_table():
    for m in ("gap", "cos_true_pairs", "angle_true_pairs", "rmg", "i2t_R@10", "t2i_R@1"):
        assert m in M.DEFAULT_METRICS
    assert set(M.DEFAULT_METRICS) <= set(M.ALL_METRICS)
    assert M.resolve_metrics(None, have_labels=True)[-3:] == M.LABEL_METRICS
    assert M.resolve_metrics("retrieval,gap") == ["gap"] + M.RETRIEVAL_METRICS


# --------------------------------------------------------------------------------------------
# subsampling, labels, linear separability, bootstrap
# --------------------------------------------------------------------------------------------


def test_uniformity_subsample_is_reported(monkeypatch):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 8))
    exact = M.measure(x, x, metrics=["uniformity_image"])
    monkeypatch.setattr(M, "UNIFORMITY_EXACT_MAX", 150)
    r = M.measure(x, x, metrics=["uniformity_image"], seed=3)
    assert r.samples == {"uniformity_image": 150}
    assert any("subsample of 150 of 300" in n for n in r.notes)
    assert r["uniformity_image"] == pytest.approx(exact["uniformity_image"], abs=0.1)
    assert M.measure(x, x, metrics=["uniformity_image"], seed=3)["uniformity_image"] == r["uniformity_image"]
    assert not exact.notes


def test_label_metrics():
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(4, 32)) * 5
    lab = np.repeat(np.arange(4), 50)
    x = centres[lab] + rng.normal(size=(200, 32)) * 0.1
    y = centres[lab] + rng.normal(size=(200, 32)) * 0.1
    r = M.measure(x, y, labels=[f"c{i}" for i in lab])
    assert r["vmeasure"] == pytest.approx(1.0) and r["nmi"] == pytest.approx(1.0) and r["ari"] == pytest.approx(1.0)
    shuffled = rng.permutation(lab)
    r2 = M.label_scores(x, y, shuffled)
    assert abs(r2["ari"]) < 0.05 and r2["vmeasure"] < 0.1
    with pytest.raises(GapkitError, match="need labels"):
        M.measure(x, y, metrics="vmeasure")


def test_linear_separability_separable_vs_not():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(200, 16))
    shifted = x + 3.0 * np.eye(16)[0]
    assert M.linear_separability(x, rng.normal(size=(200, 16)) + 4 * np.eye(16)[0]) > 0.95
    assert M.linear_separability(x, x) < 0.65
    assert shifted.shape == x.shape


def test_bootstrap_intervals():
    rng = np.random.default_rng(11)
    n = 400
    x = rng.normal(size=(n, 12))
    y = x + rng.normal(size=(n, 12)) * 1.5
    a = M.measure(x, y, bootstrap=300, seed=1)
    b = M.measure(x, y, bootstrap=300, seed=1)
    c = M.measure(x, y, bootstrap=300, seed=2)
    assert a.ci == b.ci and a.ci != c.ci
    for m, (lo, hi) in a.ci.items():
        assert lo <= a[m] + 1e-9 and a[m] <= hi + 1e-9, m
    # the interval of a mean matches the normal-theory standard error
    cos = (_unit(x) * _unit(y)).sum(1)
    se = cos.std(ddof=1) / math.sqrt(n)
    lo, hi = a.ci["cos_true_pairs"]
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.25)
    # recall intervals match a binomial proportion's
    p = a["t2i_R@1"]
    lo, hi = a.ci["t2i_R@1"]
    assert (hi - lo) == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.3)


def test_bootstrap_several_captions_and_quadratic():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(30, 8))
    rows = np.repeat(np.arange(30), 3)
    y = x[rows] + rng.normal(size=(90, 8))
    r = M.measure(x, y, image_row=rows, metrics="all", bootstrap=100)
    assert set(r.ci) == set(r.values)
    for m, (lo, hi) in r.ci.items():
        assert lo <= hi


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message, row",
    [
        (np.nan, "NaN or inf", 7),
        (np.inf, "NaN or inf", 7),
        (0.0, "all-zero row", 7),
    ],
)
def test_bad_rows_named(bad, message, row):
    x = np.ones((20, 4))
    y = np.ones((20, 4))
    y[7] = bad
    with pytest.raises(GapkitError, match=message) as err:
        M.measure(x, y, names=("a.npy", "b.npy"), chunk=3)
    assert err.value.row == row and err.value.path == "b.npy"


def test_bad_image_row_named_when_gathered():
    x = np.ones((10, 4))
    x[6] = 0
    y = np.ones((12, 4))
    rows = np.arange(12) % 10
    with pytest.raises(GapkitError, match="all-zero") as err:
        M.measure(x, y, image_row=rows, names=("im.npy", "tx.npy"))
    assert err.value.row == 6 and err.value.path == "im.npy"


def test_shape_errors():
    with pytest.raises(GapkitError, match="finetune"):
        M.measure(np.ones((5, 4)), np.ones((5, 3)))
    with pytest.raises(GapkitError, match="image_row"):
        M.measure(np.ones((5, 4)), np.ones((6, 4)))
    with pytest.raises(GapkitError, match="empty"):
        M.measure(np.ones((0, 4)), np.ones((0, 4)))
    with pytest.raises(GapkitError, match="2-D"):
        M.measure(np.ones((2, 5, 4)), np.ones((5, 4)))
    with pytest.raises(GapkitError, match="unknown metric 'bogus'"):
        M.measure(np.ones((5, 4)), np.ones((5, 4)), metrics="gap,bogus")
    with pytest.raises(GapkitError, match="outside"):
        M.measure(np.ones((5, 4)), np.ones((5, 4)), image_row=[0, 1, 2, 3, 5])


def test_huge_and_tiny_finite_values_are_normalised():
    x = np.array([[1e30, 1e30], [1e-30, 0.0], [1.0, 2.0]], dtype=np.float32)
    r = M.measure(x, x, metrics=["cos_true_pairs", "gap"])
    assert r["cos_true_pairs"] == pytest.approx(1, abs=1e-6)


# --------------------------------------------------------------------------------------------
# real CLIP embeddings (Liang et al.) against a plain numpy computation
# --------------------------------------------------------------------------------------------


def test_real_clip_coco_features(coco_features, coco_features_random):
    feats = np.load(coco_features)
    x, y = feats[0], feats[1]
    r = M.measure(x, y, metrics="all")
    ref = reference(x, y)
    _close(r, ref, QUADRATIC_OK, tol=1e-4)
    assert 0.75 < r["gap"] < 0.9  # Liang et al. report 0.82 on 5,000 pairs; these are 500 of them
    assert r["linear_separability"] > 0.95  # CLIP's modalities are linearly separable
    rnd = np.load(coco_features_random)
    rr = M.measure(rnd[0], rnd[1], metrics=["gap", "t2i_R@10", "cos_true_pairs"])
    assert rr["t2i_R@10"] < 0.1 < r["t2i_R@10"]  # random weights retrieve at chance (10/500)


def test_bootstrap_replicate_equals_measuring_the_resample():
    # one replicate's interval is that replicate's value: it must equal measure() on the same
    # resample of the pairs built explicitly (duplicates as separate rows)
    rng = np.random.default_rng(13)
    n = 5000  # spans several weight pieces
    x = rng.normal(size=(n, 6)) + 0.3
    y = x + rng.normal(size=(n, 6))
    seed = 4
    w = M._PairWeights(n, 1, seed)
    counts = np.concatenate([w.piece(p)[0] for p in range(len(w.starts))]).astype(int)
    assert counts.sum() == n
    idx = np.repeat(np.arange(n), counts)
    boot = M.measure(x, y, metrics=M.STREAM_METRICS, bootstrap=1, seed=seed)
    direct = M.measure(x[idx], y[idx], metrics=M.STREAM_METRICS)
    for m in M.STREAM_METRICS:
        assert boot.ci[m][0] == pytest.approx(direct[m], abs=2e-5), m
