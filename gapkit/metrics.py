"""Modality-gap statistics of image and text embeddings.

Every metric of the design table, computed exactly on L2-normalised rows. Notation: ``x_i`` the
normalised image rows, ``y_j`` the normalised text rows, ``r(j)`` the image row of text ``j``
(``image_row``); a *pair* is ``(x_{r(j)}, y_j)``, so with one caption per image the pairs are
``(x_i, y_i)``. With several captions per image:

* pair metrics (cos_true_pairs, angle_true_pairs, l2_true_pairs, alignment, the RMG numerator,
  centroid_uniformity) average over the ``n_texts`` pairs;
* centroid metrics (gap, centroid_cosine) compare the mean of the distinct image rows with the
  mean of the text rows; cone cosines and uniformity run over distinct rows of each modality;
* cos_random_pairs averages over every (image, text) combination that is not a true pair;
* retrieval follows CLIP_benchmark: an image->text query is a hit at K when any of the image's
  captions is among the top K texts; a text->image query when its image is in the top K images.

:func:`measure` computes any subset in one streaming pass over (possibly memory-mapped, float16)
rows, in blocks: memory does not grow with N for the O(N*D) metrics. Retrieval is chunked (the
text gallery is held in memory, never an N x N matrix). Uniformity is exact up to
``UNIFORMITY_EXACT_MAX`` rows and runs on a seeded random subsample above it; the result says so
in ``result.notes`` and ``result.samples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import GapkitError
from .progress import Reporter, ensure
from .store import _to_numpy, check_block

# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------

STREAM_METRICS = [
    "gap",
    "centroid_cosine",
    "cos_true_pairs",
    "angle_true_pairs",
    "cos_random_pairs",
    "l2_true_pairs",
    "rmg",
    "cone_cosine_image",
    "cone_cosine_text",
    "alignment",
]
RETRIEVAL_KS = (1, 5, 10)
RETRIEVAL_METRICS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in RETRIEVAL_KS]
UNIFORMITY_METRICS = ["uniformity_image", "uniformity_text", "centroid_uniformity"]
LABEL_METRICS = ["vmeasure", "nmi", "ari"]
ALL_METRICS = STREAM_METRICS + UNIFORMITY_METRICS + ["linear_separability"] + RETRIEVAL_METRICS + LABEL_METRICS
#: the paper table, fast: every O(N*D) statistic and retrieval recall (label metrics are added
#: automatically when labels are given)
DEFAULT_METRICS = STREAM_METRICS + RETRIEVAL_METRICS
#: names that stand for several metrics in ``metrics=`` / ``--metrics``
METRIC_GROUPS: dict[str, list[str]] = {
    "default": DEFAULT_METRICS,
    "all": ALL_METRICS,
    "retrieval": RETRIEVAL_METRICS,
    "uniformity": UNIFORMITY_METRICS,
    "labels": LABEL_METRICS,
}

#: uniformity (and centroid_uniformity) is exact up to this many rows, else a seeded subsample
UNIFORMITY_EXACT_MAX = 10_000
#: linear_separability uses at most this many rows of each modality (seeded subsample)
LINSEP_MAX = 5_000
#: label clustering (vmeasure, nmi, ari) uses at most this many pairs (seeded subsample)
LABELS_MAX = 10_000
#: rows per block of the streaming pass
STREAM_CHUNK = 4096
#: bytes of one retrieval score block (rows x gallery x 4)
RETRIEVAL_BLOCK_BYTES = 1 << 27


def resolve_metrics(metrics: Sequence[str] | str | None, have_labels: bool = False) -> list[str]:
    """Expand a metric selection (names, group names, or a comma-separated string) in table order.

    ``None`` gives DEFAULT_METRICS, plus vmeasure/nmi/ari when labels are given. Unknown names
    raise GapkitError listing the valid ones.
    """
    if metrics is None:
        chosen = list(DEFAULT_METRICS) + (LABEL_METRICS if have_labels else [])
    else:
        if isinstance(metrics, str):
            metrics = [m for m in metrics.split(",")]
        chosen = []
        for m in metrics:
            m = m.strip()
            if not m:
                continue
            if m == "all" and not have_labels:  # "all" = everything that can be computed
                chosen.extend(x for x in ALL_METRICS if x not in LABEL_METRICS)
            elif m in METRIC_GROUPS:
                chosen.extend(METRIC_GROUPS[m])
            elif m in ALL_METRICS:
                chosen.append(m)
            else:
                raise GapkitError(
                    f"unknown metric {m!r}; choose from {', '.join(ALL_METRICS)} "
                    f"or the groups {', '.join(METRIC_GROUPS)}"
                )
        if not chosen:
            raise GapkitError("no metrics chosen")
    wanted = set(chosen)
    return [m for m in ALL_METRICS if m in wanted]


# --------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------


@dataclass
class MeasureResult:
    """Metric values of one embedding set: ``result["gap"]``, ``result.to_dict()``, ``print(result)``.

    ``ci`` maps each metric to its 95 % bootstrap percentile interval ``(lo, hi)`` when
    ``bootstrap > 0``; ``notes`` says which metrics ran on a subsample (``samples``: rows used).
    """

    values: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_images: int = 0
    n_texts: int = 0
    dim: int = 0
    bootstrap: int = 0
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=dict)
    name: str = ""

    def __getitem__(self, key: str) -> float:
        try:
            return self.values[key]
        except KeyError:
            raise KeyError(f"{key!r} was not measured; have {', '.join(self.values)}") from None

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def keys(self) -> list[str]:
        return list(self.values)

    def items(self) -> list[tuple[str, float]]:
        return list(self.values.items())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: metrics, intervals, counts, notes."""
        return {
            "name": self.name,
            "n_images": self.n_images,
            "n_texts": self.n_texts,
            "dim": self.dim,
            "metrics": {k: _json_float(v) for k, v in self.values.items()},
            "ci95": {k: [_json_float(lo), _json_float(hi)] for k, (lo, hi) in self.ci.items()},
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "samples": dict(self.samples),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        width = max((len(k) for k in self.values), default=0)
        head = f"MeasureResult({self.name or 'set'}: {self.n_images} images, {self.n_texts} texts, d={self.dim})"
        lines = [head]
        for k, v in self.values.items():
            line = f"  {k:<{width}}  {v: .4f}"
            if k in self.ci:
                lo, hi = self.ci[k]
                line += f"  [{lo:.4f}, {hi:.4f}]"
            lines.append(line)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _json_float(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm, as float32: ``x_i / ‖x_i‖₂``.

    Raises GapkitError on NaN/inf or an all-zero row (which cannot be normalised).
    """
    x = _as_2d(x, "array")
    return _normalize_block(np.asarray(x, dtype=np.float32), "array", 0)


def _as_2d(x: Any, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = _to_numpy(x, name)
    if x.ndim != 2:
        raise GapkitError(f"expected a 2-D array (rows x dims), got shape {tuple(x.shape)}", path=name)
    if x.shape[0] == 0:
        raise GapkitError("empty array: no rows", path=name)
    if x.shape[1] == 0:
        raise GapkitError("rows have 0 dimensions", path=name)
    if x.dtype.kind not in "fiu":
        raise GapkitError(f"expected numbers, found dtype {x.dtype}", path=name)
    return x


def _normalize_block(block: np.ndarray, name: str, start: int) -> np.ndarray:
    """Normalise a float32 block in place-free fashion, checking it in the same pass."""
    sq = np.einsum("ij,ij->i", block, block)
    if not (np.isfinite(sq).all() and (sq > 0).all()):
        # the rare path: say which row is bad, or rescue overflow / underflow of the square
        check_block(block, name, start)
        scale = np.abs(block).max(axis=1, keepdims=True).astype(np.float64)
        b64 = block.astype(np.float64) / scale
        return (b64 / np.sqrt(np.einsum("ij,ij->i", b64, b64))[:, None]).astype(np.float32)
    return block * (1.0 / np.sqrt(sq))[:, None]


def _read(arr: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    return np.asarray(arr[rows], dtype=np.float32)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# formulas from sufficient statistics (shared by the full pass and the bootstrap)
# --------------------------------------------------------------------------------------------


def _stream_values(
    sx: np.ndarray, nx: float, sy: np.ndarray, ny: float, s_cos: float, s_ang: float, s_l2: float, npairs: float
) -> dict[str, float]:
    """All O(N*D) metrics from sums: sx = Σx_i over images (nx of them), sy = Σy_j over texts
    (ny), and the sums over the npairs true pairs of cos, angle (degrees) and distance."""
    mx, my = sx / nx, sy / ny
    cos_true = s_cos / npairs
    # mean over i != k of <x_i, x_k> = (‖Σx‖² − Σ‖x_i‖²) / (n(n − 1)), ‖x_i‖ = 1
    cone_i = _ratio(float(sx @ sx) - nx, nx * nx - nx)
    cone_t = _ratio(float(sy @ sy) - ny, ny * ny - ny)
    d_true = (1.0 - cos_true) / 2.0
    den = d_true + 0.5 * ((1.0 - cone_i) / 2.0 + (1.0 - cone_t) / 2.0)
    return {
        "gap": float(np.linalg.norm(mx - my)),
        "centroid_cosine": _cos(mx, my),
        "cos_true_pairs": float(cos_true),
        "angle_true_pairs": float(s_ang / npairs),
        "cos_random_pairs": _ratio(float(sx @ sy) - s_cos, nx * ny - npairs),
        "l2_true_pairs": float(s_l2 / npairs),
        "rmg": _ratio(d_true, den),
        "cone_cosine_image": cone_i,
        "cone_cosine_text": cone_t,
        "alignment": float(2.0 - 2.0 * cos_true),
    }


def _angle_l2(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angle in degrees and L2 distance of unit row pairs with cosines ``c``."""
    ang = np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))
    l2 = np.sqrt(np.maximum(2.0 - 2.0 * c.astype(np.float64), 0.0))
    return ang, l2


def _raw_inv(block: np.ndarray, name: str, start: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, 1/‖row‖) with the block checked (NaN/inf, all-zero) in the same pass.

    ``rows * inv[:, None]`` are the normalised rows; sums of normalised rows are ``inv @ rows``
    (one BLAS call, no normalised copy)."""
    sq = np.einsum("ij,ij->i", block, block)
    if not (np.isfinite(sq).all() and (sq > 0).all()):
        nb = _normalize_block(block, name, start)  # raises, or rescues over/underflow
        return nb, np.ones(len(nb), dtype=np.float32)
    return block, (1.0 / np.sqrt(sq)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the public pure functions (dense, one pair per row: x[i] with y[i])
# --------------------------------------------------------------------------------------------


def _one(name: str, x: Any, y: Any, **kw: Any) -> float:
    return measure(x, y, metrics=[name], **kw)[name]


def gap(x: Any, y: Any) -> float:
    """Modality gap: ‖mean_i x_i − mean_i y_i‖₂ on L2-normalised rows.

    Source: Liang et al. 2022, "Mind the Gap" (their modality gap ‖Δ‖); Schrodi et al. 2024
    call it L2M. With several captions per image (``measure``): images averaged over distinct
    image rows, texts over text rows.
    """
    return _one("gap", x, y)


def centroid_cosine(x: Any, y: Any) -> float:
    """cos(mean_i x_i, mean_i y_i) of L2-normalised rows. Source: Fahim et al. 2024."""
    return _one("centroid_cosine", x, y)


def cos_true_pairs(x: Any, y: Any) -> float:
    """mean_i ⟨x_i, y_i⟩ over true pairs of L2-normalised rows ("Cos True Pairs", Grassucci et al.)."""
    return _one("cos_true_pairs", x, y)


def angle_true_pairs(x: Any, y: Any) -> float:
    """mean_i arccos⟨x_i, y_i⟩ in degrees over true pairs (the seed paper reports ~80° for cos 0.20)."""
    return _one("angle_true_pairs", x, y)


def cos_random_pairs(x: Any, y: Any) -> float:
    """mean over i ≠ j of ⟨x_i, y_j⟩, exactly in O(N·D):

    ((Σ_i x_i)·(Σ_j y_j) − Σ_i ⟨x_i, y_i⟩) / (N(N − 1)). With several captions per image: over
    every (image, text) that is not a true pair, (Σx·Σy − Σ_pairs cos) / (n_img·n_txt − n_txt).
    """
    return _one("cos_random_pairs", x, y)


def l2_true_pairs(x: Any, y: Any) -> float:
    """mean_i ‖x_i − y_i‖₂ over true pairs (Schrodi et al. 2024, L2I)."""
    return _one("l2_true_pairs", x, y)


def rmg(x: Any, y: Any) -> float:
    """Relative modality gap (Schrodi et al. 2024), with d(a, b) = (1 − cos(a, b)) / 2:

    RMG = mean_i d(x_i, y_i) / [mean_i d(x_i, y_i) + ½(mean_{i≠j} d(x_i, x_j) + mean_{i≠j} d(y_i, y_j))].
    The within-modality means are exact through sums: mean_{i≠j} d(x_i, x_j) = (1 − cone_cosine_image)/2.
    """
    return _one("rmg", x, y)


def cone_cosine_image(x: Any, y: Any | None = None) -> float:
    """mean over i ≠ j of ⟨x_i, x_j⟩ (how narrow the image cone is; Liang et al. 2022), exactly:
    (‖Σ_i x_i‖² − N) / (N(N − 1))."""
    return _one("cone_cosine_image", x, x if y is None else y)


def cone_cosine_text(x: Any, y: Any | None = None) -> float:
    """mean over i ≠ j of ⟨y_i, y_j⟩ (the text cone; Liang et al. 2022): (‖Σ y‖² − N)/(N(N − 1)).

    Called with one array, that array is the text side."""
    t = x if y is None else y
    return _one("cone_cosine_text", t, t)


def alignment(x: Any, y: Any) -> float:
    """mean_i ‖x_i − y_i‖₂² = 2 − 2·cos_true_pairs (Wang & Isola 2020, α = 2)."""
    return _one("alignment", x, y)


def uniformity(x: Any, max_rows: int = UNIFORMITY_EXACT_MAX, seed: int = 0) -> float:
    """log mean over i ≠ j of exp(−2‖x_i − x_j‖²) (Wang & Isola 2020, t = 2).

    Computed in row chunks (never an N×N matrix); exact up to ``max_rows`` rows, above that on a
    seeded random subsample of ``max_rows`` rows. uniformity_image / uniformity_text apply it to
    the distinct image rows / the text rows.
    """
    xn = normalize(x)
    if xn.shape[0] > max_rows:
        rng = np.random.default_rng(seed)
        xn = xn[np.sort(rng.choice(xn.shape[0], max_rows, replace=False))]
    return float(np.log(_uniformity_rowsums(xn).sum() / (xn.shape[0] * (xn.shape[0] - 1))))


def uniformity_image(x: Any, y: Any | None = None) -> float:
    """uniformity of the image rows: log mean_{i≠j} exp(−2‖x_i − x_j‖²) (Wang & Isola 2020, t = 2)."""
    return uniformity(x)


def uniformity_text(x: Any, y: Any | None = None) -> float:
    """uniformity of the text rows: log mean_{i≠j} exp(−2‖y_i − y_j‖²); one array = the texts."""
    return uniformity(x if y is None else y)


def centroid_uniformity(x: Any, y: Any) -> float:
    """Uniformity of the pair centroids μ_i = normalise((x_i + y_i)/2):
    log mean_{i≠j} exp(−2‖μ_i − μ_j‖²), the value of the L_CU loss (Grassucci et al.)."""
    return _one("centroid_uniformity", x, y)


def linear_separability(x: Any, y: Any, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression telling image rows from text rows (Fahim et al. 2024).

    scikit-learn LogisticRegression on the normalised rows, stratified 75/25 split with ``seed``;
    at most LINSEP_MAX rows per modality (seeded subsample). 0.5 = inseparable, 1.0 = separable.
    """
    return _one("linear_separability", x, y, seed=seed)


def recall_at_k(
    images: Any, texts: Any, image_row: Sequence[int] | np.ndarray | None = None, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float]:
    """Retrieval recall@K both ways (CLIP_benchmark convention), chunked, exact.

    i2t_R@K = fraction of images (with at least one caption) for which some caption of the image
    is among the K texts of highest cosine; t2i_R@K = fraction of texts whose image is among the
    K images of highest cosine. Rank of the true match = number of candidates whose cosine beats
    it (ties count for the true match); a hit at K is a rank below K. Never builds an N×N matrix.
    """
    im = _as_2d(images, "images")
    tx = _as_2d(texts, "texts")
    rows = _check_image_row(image_row, im.shape[0], tx.shape[0], "images", "texts")
    xs = _Sides(im, tx, rows, ("images", "texts"))
    yg = np.empty(tx.shape, dtype=np.float32)
    s_true = np.empty(tx.shape[0], dtype=np.float32)
    for s, xb, yb in xs.pair_blocks(STREAM_CHUNK):
        yg[s : s + len(yb)] = yb
        s_true[s : s + len(yb)] = np.einsum("ij,ij->i", xb, yb)
    hits_i, hits_t, _ = _retrieval(xs, yg, s_true, tuple(ks), ensure(None))
    out = {f"i2t_R@{k}": float(hits_i[k].mean()) for k in ks}
    out.update({f"t2i_R@{k}": float(hits_t[k].mean()) for k in ks})
    return out


def label_scores(x: Any, y: Any, labels: Sequence[Any], seed: int = 0) -> dict[str, float]:
    """vmeasure, nmi, ari of KMeans (k = number of labels) on both modalities together.

    Rows: the normalised images and texts, each with its pair's label; clusters scored against the
    labels with scikit-learn's v_measure_score, normalized_mutual_info_score and
    adjusted_rand_score (ISPAMM, "Closing the Modality Gap Aligns Group-Wise Semantics").
    """
    r = measure(x, y, labels=labels, metrics=LABEL_METRICS, seed=seed)
    return {k: r[k] for k in LABEL_METRICS}


# --------------------------------------------------------------------------------------------
# reading both sides
# --------------------------------------------------------------------------------------------


def _check_image_row(image_row: Any, n_images: int, n_texts: int, im_name: str, tx_name: str) -> np.ndarray:
    if image_row is None:
        if n_images != n_texts:
            raise GapkitError(
                f"{n_images} image rows but {n_texts} text rows and no image_row mapping; "
                f"row i must pair with row i ({im_name}, {tx_name})",
                path=tx_name,
            )
        return np.arange(n_texts, dtype=np.int64)
    rows = np.asarray(_to_numpy(image_row, "image_row") if not isinstance(image_row, (np.ndarray, list, tuple)) else image_row)
    rows = rows.astype(np.int64)
    if rows.shape != (n_texts,):
        raise GapkitError(f"image_row has shape {rows.shape} but there are {n_texts} texts", path=tx_name)
    bad = (rows < 0) | (rows >= n_images)
    if bad.any():
        raise GapkitError(f"image_row points outside the {n_images} images", path=tx_name, row=int(np.flatnonzero(bad)[0]))
    return rows


class _Sides:
    """Images, texts and pairing; yields normalised, checked blocks."""

    def __init__(self, images: np.ndarray, texts: np.ndarray, image_row: np.ndarray, names: tuple[str, str]) -> None:
        self.images, self.texts, self.image_row = images, texts, image_row
        self.im_name, self.tx_name = names
        self.n_images, self.n_texts = images.shape[0], texts.shape[0]
        self.one_to_one = self.n_images == self.n_texts and bool(np.array_equal(image_row, np.arange(self.n_texts)))
        self.captions = np.bincount(image_row, minlength=self.n_images)  # texts per image

    def pair_blocks(self, chunk: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(start, normalised image of each text, normalised text) over the texts."""
        for s in range(0, self.n_texts, chunk):
            yb = _normalize_block(_read(self.texts, slice(s, s + chunk)), self.tx_name, s)
            if self.one_to_one:
                xb = _normalize_block(_read(self.images, slice(s, s + chunk)), self.im_name, s)
            else:
                rows = self.image_row[s : s + len(yb)]
                xb = _gather_normalized(self.images, rows, self.im_name)
            yield s, xb, yb

    def rows(self, which: str, idx: np.ndarray) -> np.ndarray:
        arr, name = (self.images, self.im_name) if which == "images" else (self.texts, self.tx_name)
        return _gather_normalized(arr, idx, name)


def _gather_normalized(arr: np.ndarray, rows: np.ndarray, name: str) -> np.ndarray:
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    block = _read(arr, srt)  # sorted fancy index: sequential reads of a memory map
    try:
        nb = _normalize_block(block, name, 0)
    except GapkitError as err:  # name the real row
        raise GapkitError(err.message, path=name, row=int(srt[err.row or 0])) from None
    out = np.empty_like(nb)
    out[order] = nb
    return out


# --------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------


def measure(
    images: Any,
    texts: Any,
    *,
    image_row: Sequence[int] | np.ndarray | None = None,
    labels: Sequence[Any] | np.ndarray | None = None,
    metrics: Sequence[str] | str | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    reporter: Reporter | None = None,
    names: tuple[str, str] = ("images", "texts"),
    name: str = "",
    chunk: int = STREAM_CHUNK,
) -> MeasureResult:
    """Measure the modality gap of ``images`` and ``texts`` (numpy arrays, memory maps or tensors).

    ``image_row[j]`` is the image row of text ``j`` (default: row j pairs with row j).
    ``labels``: one per text row, for vmeasure/nmi/ari. ``metrics``: names or groups (see
    ALL_METRICS, METRIC_GROUPS); default DEFAULT_METRICS (+ label metrics with labels).
    ``bootstrap``: number of seeded resamples of the pairs for 95 % percentile intervals
    (``result.ci``). ``names``: how error messages name the two arrays (e.g. their files).
    Raises GapkitError on bad input (NaN/inf, all-zero rows, empty arrays, wrong shapes,
    different dims), naming the array and row.
    """
    reporter = ensure(reporter)
    im_name, tx_name = names
    im = _as_2d(images, im_name)
    tx = _as_2d(texts, tx_name)
    if im.shape[1] != tx.shape[1]:
        raise GapkitError(
            f"images have {im.shape[1]} dimensions but texts have {tx.shape[1]} ({im_name}, {tx_name}): "
            "they are not in one space. Heads trained with `gapkit finetune` project both into one "
            "shared space; measure the projected set",
            path=tx_name,
        )
    rows = _check_image_row(image_row, im.shape[0], tx.shape[0], im_name, tx_name)
    lab = None
    if labels is not None:
        lab = np.asarray(_to_numpy(labels, "labels") if hasattr(labels, "detach") else labels)
        lab = lab.astype(str).astype(object)
        if lab.shape != (tx.shape[0],):
            raise GapkitError(f"{lab.shape[0] if lab.ndim else 0} labels for {tx.shape[0]} texts (one per text row)")
    chosen = resolve_metrics(metrics, have_labels=lab is not None)
    if lab is None and any(m in LABEL_METRICS for m in chosen):
        raise GapkitError("vmeasure, nmi and ari need labels (--label COLUMN or --labels FILE)")
    bootstrap = int(bootstrap)
    if bootstrap < 0:
        raise GapkitError("bootstrap must be >= 0")
    chunk = max(1, int(chunk))
    sides = _Sides(im, tx, rows, (im_name, tx_name))
    res = MeasureResult(
        values={}, n_images=sides.n_images, n_texts=sides.n_texts, dim=int(im.shape[1]),
        bootstrap=bootstrap, seed=int(seed), name=name,
    )
    want = set(chosen)
    want_ret = any(m in want for m in RETRIEVAL_METRICS)
    boot: dict[str, np.ndarray] = {}

    # ---- one streaming pass: the O(N*D) metrics, checks, the text gallery for retrieval ----
    d = im.shape[1]
    sx, sy = np.zeros(d), np.zeros(d)
    s_cos = s_ang = s_l2 = 0.0
    s_true = np.empty(sides.n_texts, dtype=np.float32) if want_ret else None
    per_pair = np.empty((sides.n_texts, 3), dtype=np.float32) if bootstrap else None
    gallery = np.empty((sides.n_texts, d), dtype=np.float32) if want_ret else None
    total = sides.n_texts + (0 if sides.one_to_one else sides.n_images)
    rows = sides.image_row
    with reporter.task("measuring (streaming pass)", total=total, unit="rows") as task:
        if not sides.one_to_one:
            for s in range(0, sides.n_images, chunk):
                xb, ix = _raw_inv(_read(im, slice(s, s + chunk)), im_name, s)
                sx += np.einsum("i,ij->j", ix, xb)
                task.advance(len(xb))
        for s in range(0, sides.n_texts, chunk):
            yb, iy = _raw_inv(_read(tx, slice(s, s + chunk)), tx_name, s)
            e = s + len(yb)
            if sides.one_to_one:
                xb, ix = _raw_inv(_read(im, slice(s, e)), im_name, s)
                sx += np.einsum("i,ij->j", ix, xb)
                c = np.einsum("ij,ij->i", xb, yb) * ix * iy
            else:
                xb = _gather_normalized(im, rows[s:e], im_name)
                c = np.einsum("ij,ij->i", xb, yb) * iy
            sy += np.einsum("i,ij->j", iy, yb)
            ang, l2 = _angle_l2(c)
            s_cos += float(c.sum(dtype=np.float64))
            s_ang += float(ang.sum(dtype=np.float64))
            s_l2 += float(l2.sum())
            if want_ret:
                s_true[s:e] = c
                np.multiply(yb, iy[:, None], out=gallery[s:e])
            if per_pair is not None:
                per_pair[s:e, 0], per_pair[s:e, 1], per_pair[s:e, 2] = c, ang, l2
            task.advance(len(yb))
    full = _stream_values(sx, sides.n_images, sy, sides.n_texts, s_cos, s_ang, s_l2, sides.n_texts)
    res.values.update({m: full[m] for m in STREAM_METRICS if m in want})

    # ---- retrieval ----
    hits_i = hits_t = None
    if want_ret:
        hits_i, hits_t, has_caption = _retrieval(sides, gallery, s_true, RETRIEVAL_KS, reporter)
        del gallery
        for k in RETRIEVAL_KS:
            res.values[f"i2t_R@{k}"] = float(hits_i[k][has_caption].mean())
            res.values[f"t2i_R@{k}"] = float(hits_t[k].mean())

    # ---- uniformity (quadratic: exact up to a size, seeded subsample above) ----
    rng_seed = int(seed)
    for m in UNIFORMITY_METRICS:
        if m not in want:
            continue
        n_all = sides.n_texts if m != "uniformity_image" else sides.n_images
        idx = _subsample(n_all, UNIFORMITY_EXACT_MAX, rng_seed)
        if m == "uniformity_image":
            a = sides.rows("images", idx)
        elif m == "uniformity_text":
            a = sides.rows("texts", idx)
        else:
            mu = sides.rows("images", sides.image_row[idx]) + sides.rows("texts", idx)
            nrm = np.linalg.norm(mu, axis=1, keepdims=True)
            a = (mu / np.maximum(nrm, 1e-12)).astype(np.float32)
        if len(idx) < n_all:
            what = {"uniformity_image": "images", "uniformity_text": "texts", "centroid_uniformity": "pairs"}[m]
            res.notes.append(f"{m}: seeded random subsample of {len(idx)} of {n_all} {what} (exact up to {UNIFORMITY_EXACT_MAX})")
            res.samples[m] = len(idx)
        if len(a) < 2:
            res.values[m] = float("nan")
            continue
        with reporter.task(f"{m}", total=len(a), unit="rows") as task:
            rs = _uniformity_rowsums(a, task)
        res.values[m] = float(np.log(rs.sum() / (len(a) * (len(a) - 1))))
        if bootstrap:
            w = _multinomial(len(rs), bootstrap, np.random.default_rng([rng_seed, 11, UNIFORMITY_METRICS.index(m)]))
            boot[m] = np.log((w @ rs) / (w.sum(1) * (len(a) - 1)))

    # ---- linear separability ----
    if "linear_separability" in want:
        acc, correct, note = _linear_separability(sides, rng_seed)
        res.values["linear_separability"] = acc
        if note:
            res.notes.append(note)
            res.samples["linear_separability"] = int(min(sides.n_images, LINSEP_MAX) + min(sides.n_texts, LINSEP_MAX))
        if bootstrap:
            w = _multinomial(len(correct), bootstrap, np.random.default_rng([rng_seed, 12]))
            boot["linear_separability"] = (w @ correct) / w.sum(1)

    # ---- label clustering ----
    if lab is not None and any(m in want for m in LABEL_METRICS):
        vals, bvals, note, n_used = _label_metrics(sides, lab, rng_seed, bootstrap)
        res.values.update({m: vals[m] for m in LABEL_METRICS if m in want})
        if note:
            res.notes.append(note)
            for m in LABEL_METRICS:
                if m in want:
                    res.samples[m] = n_used
        boot.update({m: bvals[m] for m in LABEL_METRICS if m in want and m in bvals})

    # ---- bootstrap of the streaming metrics and retrieval: resample pairs ----
    if bootstrap:
        boot.update(_bootstrap_pairs(sides, per_pair, hits_i, hits_t, want, bootstrap, rng_seed, reporter))
        for m, b in boot.items():
            b = np.asarray(b, dtype=np.float64)
            b = b[np.isfinite(b)]
            if len(b):
                res.ci[m] = (float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5)))
        res.notes.append(
            f"95 % intervals: percentile bootstrap, {bootstrap} resamples of the pairs, seed {rng_seed}"
        )
    res.values = {m: res.values[m] for m in chosen if m in res.values}
    res.ci = {m: res.ci[m] for m in chosen if m in res.ci}
    return res


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------


def _subsample(n: int, cap: int, seed: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7, n]).choice(n, cap, replace=False))


def _uniformity_rowsums(a: np.ndarray, task: Any = None) -> np.ndarray:
    """s_i = Σ_{k≠i} exp(−2‖a_i − a_k‖²) = Σ_{k≠i} exp(4⟨a_i, a_k⟩ − 4) for unit rows, in chunks."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    n = t.shape[0]
    step = max(64, min(n, RETRIEVAL_BLOCK_BYTES // (4 * max(n, 1))))
    out = np.empty(n, dtype=np.float64)
    with torch.no_grad():
        for s in range(0, n, step):
            g = t[s : s + step] @ t.T
            diag = g[torch.arange(g.shape[0]), torch.arange(s, s + g.shape[0])].double()
            e = torch.exp(4.0 * g - 4.0).sum(1, dtype=torch.float64) - torch.exp(4.0 * diag - 4.0)
            out[s : s + g.shape[0]] = e.numpy()
            if task is not None:
                task.advance(g.shape[0])
    return out


def _retrieval(
    sides: _Sides, gallery: np.ndarray, s_true: np.ndarray, ks: tuple[int, ...], reporter: Reporter
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    """Hits per image (i2t) and per text (t2i) at each K, one score block at a time.

    Each block S = X[a:b] Yᵀ serves both directions. Rows: the image's threshold is the best
    cosine among its captions, taken from the block itself; hit at K when the K-th largest score
    of the row is not above it. Columns: per text, count the images whose cosine is above the
    text's true-pair cosine (its own image's entry, from the block, is never counted); hit at K
    when the count is below K. Ties count for the true match.
    """
    import torch

    n_img, n_txt = sides.n_images, sides.n_texts
    kmax = max(ks)
    y = torch.from_numpy(gallery)
    thr_t = torch.from_numpy(np.ascontiguousarray(s_true, dtype=np.float32))
    order = np.argsort(sides.image_row, kind="stable")
    sorted_rows = sides.image_row[order]
    has_caption = sides.captions > 0
    count_t = torch.zeros(n_txt, dtype=torch.int32)
    hits_i = {k: np.zeros(n_img, dtype=bool) for k in ks}
    step = int(max(16, min(4096, RETRIEVAL_BLOCK_BYTES // (4 * n_txt))))
    buf = None
    with torch.no_grad(), reporter.task("retrieval", total=n_img, unit="images") as task:
        for s in range(0, n_img, step):
            xb = torch.from_numpy(_normalize_block(_read(sides.images, slice(s, s + step)), sides.im_name, s))
            scores = xb @ y.T
            b = scores.shape[0]
            lo, hi = np.searchsorted(sorted_rows, [s, s + b])
            js = torch.from_numpy(order[lo:hi])
            rr = torch.from_numpy(sorted_rows[lo:hi] - s)
            own = scores[rr, js]  # true-pair cosines, as this very matmul computed them
            thr_i = torch.full((b,), -float("inf")).scatter_reduce_(0, rr, own, reduce="amax")
            kk = min(kmax, n_txt)
            top = scores.topk(kk, dim=1, sorted=True).values
            for k in ks:
                if k > n_txt:
                    hits_i[k][s : s + b] = True
                else:  # count(S > thr) < K  <=>  K-th largest <= thr
                    hits_i[k][s : s + b] = (top[:, k - 1] <= thr_i).numpy()
            if buf is None or buf.shape[0] != b:
                buf = torch.empty((b, n_txt), dtype=torch.bool)
            torch.gt(scores, thr_t, out=buf)
            count_t += buf.sum(0, dtype=torch.int32)
            count_t.index_add_(0, js, -(own > thr_t[js]).to(torch.int32))  # never count the own image
            task.advance(b)
    cnt = count_t.numpy()
    hits_t = {k: cnt < k for k in ks}
    return hits_i, hits_t, has_caption


def _linear_separability(sides: _Sides, seed: int) -> tuple[float, np.ndarray, str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    ii = _subsample(sides.n_images, LINSEP_MAX, seed)
    jj = _subsample(sides.n_texts, LINSEP_MAX, seed + 1)
    feats = np.concatenate([sides.rows("images", ii), sides.rows("texts", jj)])
    y = np.concatenate([np.zeros(len(ii), dtype=int), np.ones(len(jj), dtype=int)])
    if min(len(ii), len(jj)) < 4:
        return float("nan"), np.zeros(0), "linear_separability: fewer than 4 rows of a modality, undefined"
    xtr, xte, ytr, yte = train_test_split(feats, y, test_size=0.25, random_state=seed, stratify=y)
    clf = LogisticRegression(max_iter=1000)
    clf.fit(xtr, ytr)
    correct = (clf.predict(xte) == yte).astype(np.float64)
    note = ""
    if len(ii) < sides.n_images or len(jj) < sides.n_texts:
        note = (
            f"linear_separability: seeded random subsample of {len(ii)} images and {len(jj)} texts "
            f"(at most {LINSEP_MAX} each)"
        )
    return float(correct.mean()), correct, note


def _label_metrics(
    sides: _Sides, labels: np.ndarray, seed: int, bootstrap: int
) -> tuple[dict[str, float], dict[str, np.ndarray], str, int]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, v_measure_score

    jj = _subsample(sides.n_texts, LABELS_MAX, seed + 2)
    img_of = sides.image_row[jj]
    uimg, first = np.unique(img_of, return_index=True)
    feats = np.concatenate([sides.rows("images", uimg), sides.rows("texts", jj)])
    lab = np.concatenate([labels[jj][first], labels[jj]])
    classes, lab_int = np.unique(lab, return_inverse=True)
    if len(classes) < 2:
        raise GapkitError(f"label metrics need at least 2 distinct labels, found {len(classes)}")
    km = KMeans(n_clusters=len(classes), n_init=4, random_state=seed).fit(feats)
    pred = km.labels_
    fns = {"vmeasure": v_measure_score, "nmi": normalized_mutual_info_score, "ari": adjusted_rand_score}
    vals = {m: float(f(lab_int, pred)) for m, f in fns.items()}
    bvals: dict[str, np.ndarray] = {}
    if bootstrap:
        rng = np.random.default_rng([seed, 13])
        out = {m: np.empty(bootstrap) for m in fns}
        for b in range(bootstrap):
            idx = rng.integers(0, len(lab_int), len(lab_int))
            for m, f in fns.items():
                out[m][b] = f(lab_int[idx], pred[idx])
        bvals = out
    note = ""
    if len(jj) < sides.n_texts:
        note = f"vmeasure/nmi/ari: seeded random subsample of {len(jj)} of {sides.n_texts} pairs (at most {LABELS_MAX})"
    return vals, bvals, note, int(len(feats))


def _multinomial(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """(b, n) counts of b resamples of n units with replacement."""
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


class _PairWeights:
    """Multinomial resampling counts of n pairs for b replicates, generated block by block.

    Exact multinomial(n, uniform) per replicate, drawn hierarchically: first how many draws fall
    in each fixed block of PIECE rows, then where in the block; so memory is O(b * PIECE) and the
    counts do not depend on the streaming chunk size.
    """

    PIECE = 2048

    def __init__(self, n: int, b: int, seed: int) -> None:
        self.n, self.b, self.seed = n, b, seed
        self.starts = np.arange(0, n, self.PIECE)
        sizes = np.minimum(self.PIECE, n - self.starts)
        self.totals = np.random.default_rng([seed, 21]).multinomial(n, sizes / n, size=b)  # (b, pieces)

    def piece(self, p: int) -> np.ndarray:
        size = int(min(self.PIECE, self.n - self.starts[p]))
        tot = self.totals[:, p]
        rng = np.random.default_rng([self.seed, 22, p])
        where = rng.integers(0, size, size=int(tot.sum()))
        rep = np.repeat(np.arange(self.b), tot)
        return np.bincount(rep * size + where, minlength=self.b * size).reshape(self.b, size).astype(np.float32)


def _bootstrap_pairs(
    sides: _Sides,
    per_pair: np.ndarray,
    hits_i: dict[int, np.ndarray] | None,
    hits_t: dict[int, np.ndarray] | None,
    want: set[str],
    b: int,
    seed: int,
    reporter: Reporter,
) -> dict[str, np.ndarray]:
    """Resample the pairs b times (weights w_j); images weigh u_i = Σ_{j: r(j)=i} w_j / c_i
    (c_i = captions of image i; images without captions keep weight 1)."""
    n_t, d = sides.n_texts, sides.images.shape[1]
    weights = _PairWeights(n_t, b, seed)
    inv_c = (1.0 / np.maximum(sides.captions, 1)).astype(np.float32)
    orphan = sides.captions == 0
    sxb = np.zeros((b, d))
    syb = np.zeros((b, d))
    su = np.zeros(b)
    # per-pair columns: cos, angle, l2, t2i hits, i2t hits of the pair's image / c
    cols = [per_pair]
    if hits_t is not None and hits_i is not None:
        cols.append(np.stack([hits_t[k] for k in RETRIEVAL_KS], 1).astype(np.float32))
        cols.append(np.stack([hits_i[k][sides.image_row] for k in RETRIEVAL_KS], 1) * inv_c[sides.image_row][:, None])
    pp = np.concatenate(cols, axis=1).astype(np.float32)
    sp = np.zeros((b, pp.shape[1]))
    sw = np.zeros(b)
    with reporter.task("bootstrap", total=n_t, unit="pairs") as task:
        for p, s in enumerate(weights.starts):
            w = weights.piece(p)
            e = s + w.shape[1]
            blk = next(iter(_SidesSlice(sides, s, e)))
            xb, yb = blk
            wc = w * inv_c[sides.image_row[s:e]][None, :]
            sxb += wc @ xb
            su += wc.sum(1)
            syb += w @ yb
            sw += w.sum(1)
            sp += w @ pp[s:e]
            task.advance(e - s)
    if orphan.any():
        n_orph = float(orphan.sum())
        sx_orph = np.zeros(d)
        for i in np.flatnonzero(orphan):
            sx_orph += sides.rows("images", np.array([i]))[0]
        sxb += sx_orph[None, :]
        su_all = su + n_orph
    else:
        su_all = su
    out: dict[str, list[float]] = {m: [] for m in STREAM_METRICS}
    for r in range(b):
        v = _stream_values(sxb[r], su_all[r], syb[r], sw[r], sp[r, 0], sp[r, 1], sp[r, 2], sw[r])
        for m in STREAM_METRICS:
            out[m].append(v[m])
    res = {m: np.asarray(v) for m, v in out.items() if m in want}
    if hits_t is not None:
        for q, k in enumerate(RETRIEVAL_KS):
            res[f"t2i_R@{k}"] = sp[:, 3 + q] / sw
            res[f"i2t_R@{k}"] = sp[:, 6 + q] / su
    return res


class _SidesSlice:
    """The normalised pair rows s:e (one block)."""

    def __init__(self, sides: _Sides, s: int, e: int) -> None:
        self.sides, self.s, self.e = sides, s, e

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        sd = self.sides
        yb = _normalize_block(_read(sd.texts, slice(self.s, self.e)), sd.tx_name, self.s)
        if sd.one_to_one:
            xb = _normalize_block(_read(sd.images, slice(self.s, self.e)), sd.im_name, self.s)
        else:
            xb = _gather_normalized(sd.images, sd.image_row[self.s : self.e], sd.im_name)
        yield xb, yb


def measure_set(emb: Any, **kwargs: Any) -> MeasureResult:
    """:func:`measure` on an :class:`~gapkit.store.EmbeddingSet` (errors name its files)."""
    kwargs.setdefault("names", (emb._array_name("images"), emb._array_name("texts")))
    kwargs.setdefault("name", emb.name)
    return measure(emb.images, emb.texts, image_row=emb.image_row, **kwargs)
