"""Figures of the modality gap, ready for a two-column paper.

* :func:`plot_umap`: Figure 2 of the modality-gap papers. One panel per embedding set, each set's
  images and texts fitted together by one 2-D map (UMAP, cosine metric, seeded; or PCA, exact
  and fast). Images are triangles, texts diamonds, coloured by a metadata column (or by
  modality). The 2-D coordinates and the settings that determine them are cached beside the
  figure (``FIG.coords.npz`` + ``FIG.coords.json``) and reused when only the styling changes.
* :func:`plot_hist`: true-pair cosines against random-pair cosines, per set.
* :func:`shift_experiment` / :func:`plot_shift`: the embedding-shift experiment of Liang et al.
  (2022): gap, cos_true_pairs, clip loss and R@1 as both modalities move along the gap vector.
* :func:`read_run` / :func:`plot_training`: the curves of ``gapkit finetune`` runs.

All figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot, no global
state, no display needed) inside :func:`paper_style`, a context manager that sets the paper
rcParams only while a figure is built and saved. Library code never prints: progress and notes
go to the ``reporter``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import GapkitError
from .progress import Reporter, ensure
from .store import EmbeddingSet

# --------------------------------------------------------------------------------------------
# style
# --------------------------------------------------------------------------------------------

#: Okabe & Ito (2008) colour-blind-safe palette, ordered so that the first colours are the most
#: distinct on white (yellow and black last).
OKABE_ITO = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
#: seaborn's 10-colour "colorblind" palette (Okabe-Ito based), used for 9 or 10 labels
COLORBLIND10 = (
    "#0173B2", "#DE8F05", "#029E73", "#D55E00", "#CC78BC",
    "#CA9161", "#FBAFE4", "#56B4E9", "#ECE133", "#949494",  # grey last: dropped first
)
#: colour of labels beyond the palette (grouped as "other")
OTHER_COLOR = "#BBBBBB"
#: colours of the two modalities when points are coloured by modality
MODALITY_COLORS = {"image": "#0072B2", "text": "#D55E00"}
#: markers: images as triangles, texts as diamonds
MARKERS = {"image": "^", "text": "D"}

#: widths in inches of a single column and of the full text width of a two-column paper
#: (IEEE / ACL / NeurIPS-style templates: 3.5 in and 7.16 in)
SINGLE_COLUMN_IN = 3.5
DOUBLE_COLUMN_IN = 7.16

FORMATS = (".png", ".pdf", ".svg")

PAPER_RC: dict[str, Any] = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "figure.titlesize": 9,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "legend.frameon": False,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # embed TrueType fonts: what paper submission systems ask for
    "ps.fonttype": 42,
    "svg.fonttype": "none",  # text stays text in SVG
    "image.cmap": "viridis",
}


@contextlib.contextmanager
def paper_style(**overrides: Any) -> Iterator[None]:
    """Paper rcParams (8 pt sans-serif, thin lines, embedded fonts) for the ``with`` block only."""
    import matplotlib

    with matplotlib.rc_context({**PAPER_RC, **overrides}):
        yield


def _new_figure(width: float, height: float) -> Any:
    """A Figure not registered with pyplot (headless, garbage-collected like any object)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def parse_size(size: str | tuple[float, float] | None, default: tuple[float, float]) -> tuple[float, float]:
    """``"single"``, ``"double"``, ``"W,H"`` (inches) or ``"W"`` (height from the default's ratio)."""
    if size is None or size == "":
        return default
    if isinstance(size, tuple):
        return float(size[0]), float(size[1])
    ratio = default[1] / default[0]
    s = str(size).strip().lower()
    if s in ("single", "column", "one-column"):
        return SINGLE_COLUMN_IN, SINGLE_COLUMN_IN * ratio
    if s in ("double", "full", "two-column"):
        return DOUBLE_COLUMN_IN, DOUBLE_COLUMN_IN * ratio
    try:
        parts = [float(p) for p in s.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        return parts[0], parts[0] * ratio
    if len(parts) == 2 and min(parts) > 0:
        return parts[0], parts[1]
    raise GapkitError(f"--size must be 'single', 'double', 'W,H' or 'W' in inches, not {size!r}")


def check_output(output: str | os.PathLike[str]) -> Path:
    """Check that a figure can be written to ``output`` (known extension, writable folder)."""
    out = Path(output)
    if out.is_dir():
        raise GapkitError("is a folder; give a file name such as fig.png", path=out)
    if out.suffix.lower() not in FORMATS:
        raise GapkitError(
            f"unknown figure format {out.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}", path=out
        )
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GapkitError(f"cannot create the output folder: {err.strerror or err}", path=parent) from err
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise GapkitError("cannot write here: permission denied", path=out)
    return out


def save_figure(fig: Any, output: str | os.PathLike[str], dpi: float = 300) -> Path:
    """Save ``fig`` to ``output`` (PNG, PDF or SVG by the extension) inside the paper style."""
    out = check_output(output)
    fmt = out.suffix.lower().lstrip(".")
    try:
        with paper_style():
            fig.savefig(out, format=fmt, dpi=dpi, metadata=_metadata(fmt))
    except OSError as err:
        raise GapkitError(f"cannot write the figure: {err.strerror or err}", path=out) from err
    return out


def _metadata(fmt: str) -> dict[str, Any]:
    from . import __version__

    if fmt == "png":
        return {"Software": f"gapkit {__version__}"}
    if fmt == "pdf":
        return {"Creator": f"gapkit {__version__}", "CreationDate": None}  # reproducible bytes
    if fmt == "svg":
        return {"Creator": f"gapkit {__version__}", "Date": None}
    return {}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _set_name(emb: EmbeddingSet) -> str:
    return str(emb.path) if emb.path is not None else (emb.source or "embeddings")


def check_set(emb: EmbeddingSet) -> None:
    """Raise GapkitError unless images and texts share one space and all rows are usable."""
    if emb.images.ndim != 2 or emb.texts.ndim != 2:
        raise GapkitError("expected 2-D image and text arrays", path=_set_name(emb))
    if emb.n_images == 0 or emb.n_texts == 0:
        raise GapkitError("empty set: no image or no text rows", path=_set_name(emb))
    if emb.images.shape[1] != emb.texts.shape[1]:
        raise GapkitError(
            f"images have {emb.images.shape[1]} dimensions but texts have {emb.texts.shape[1]}; "
            "plotting both modalities needs one shared embedding space",
            path=_set_name(emb),
        )
    emb.check()


def _titles(sets: Sequence[EmbeddingSet], titles: Sequence[str] | None) -> list[str]:
    if titles is None or len(titles) == 0:
        return [emb.name for emb in sets]
    if len(titles) != len(sets):
        raise GapkitError(f"{len(titles)} titles for {len(sets)} sets; give one title per set")
    return [str(t) for t in titles]


def _normalized(arr: np.ndarray) -> np.ndarray:
    from .metrics import normalize

    return np.asarray(normalize(np.asarray(arr, dtype=np.float32)), dtype=np.float32)


def _image_labels(text_labels: np.ndarray, image_row: np.ndarray, n_images: int) -> np.ndarray:
    """The label of each image: the label of its first text."""
    out = np.empty(n_images, dtype=object)
    out[:] = ""
    seen = np.zeros(n_images, dtype=bool)
    for j in range(len(image_row) - 1, -1, -1):  # backwards: the first text wins
        out[image_row[j]] = text_labels[j]
        seen[image_row[j]] = True
    return out


def resolve_color_by(sets: Sequence[EmbeddingSet], color_by: str | None) -> str | None:
    """The metadata column to colour by: ``color_by``; or ``label`` when every set has it; or
    None (colour by modality) for ``None``/``"auto"`` without labels and for ``"modality"``."""
    if color_by in ("modality", "none", ""):
        return None
    if color_by in (None, "auto"):
        for emb in sets:
            if emb._labels is None and "label" not in emb.label_columns():
                return None
        return "label"
    for emb in sets:  # raises a clear error naming the set and the columns it has
        emb.labels(color_by)
    return color_by


# --------------------------------------------------------------------------------------------
# sampling and 2-D maps
# --------------------------------------------------------------------------------------------


def stratified_sample(labels: np.ndarray | None, n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` rows, drawn without replacement.

    With labels, each label keeps its share of the rows (largest-remainder rounding, at least one
    row for every label while the budget allows); the draw is seeded.
    """
    if max_points <= 0 or max_points >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n, size=max_points, replace=False))
    uniq, inv, counts = np.unique(np.asarray(labels).astype(str), return_inverse=True, return_counts=True)
    exact = counts * (max_points / n)
    quota = np.floor(exact).astype(int)
    # every label gets at least one row while the budget allows (rare labels stay visible)
    for k in np.argsort(-counts, kind="stable")[::-1]:
        if quota[k] == 0 and quota.sum() < max_points:
            quota[k] = 1
    remainder = max_points - quota.sum()
    if remainder > 0:
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        for k in order:
            if remainder == 0:
                break
            if quota[k] < counts[k]:
                quota[k] += 1
                remainder -= 1
    picked = [rng.choice(np.flatnonzero(inv == k), size=min(q, c), replace=False) for k, (q, c) in enumerate(zip(quota, counts)) if q]
    return np.sort(np.concatenate(picked))


#: up to this many points, UMAP gets exact cosine neighbours (chunked brute force,
#: :func:`exact_cosine_knn`); above it, umap-learn's own approximate NN-descent (pynndescent)
EXACT_KNN_MAX = 50_000

_NUMBA_CACHE_ENABLED = False


def _enable_umap_kernel_cache() -> None:
    """Let numba cache umap-learn's compiled kernels on disk (as ``@njit(cache=True)`` would).

    umap-learn compiles its kernels (many with ``parallel=True``) at the first fit of every
    process, 20-60 s on a small CPU, and does not ask numba to cache them. Enabling the cache
    (numba's ``Dispatcher.enable_caching``, in ``__pycache__`` or NUMBA_CACHE_DIR) makes that a
    one-time cost per machine. Failure only means no cache.
    """
    global _NUMBA_CACHE_ENABLED
    if _NUMBA_CACHE_ENABLED:
        return
    _NUMBA_CACHE_ENABLED = True
    try:
        import importlib

        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher

        for name in ("umap.umap_", "umap.layouts", "umap.spectral", "umap.distances", "umap.utils", "umap.sparse"):
            mod = importlib.import_module(name)
            for obj in list(vars(mod).values()):
                if isinstance(obj, Dispatcher) and isinstance(getattr(obj, "_cache", None), NullCache):
                    try:
                        obj.enable_caching()
                    except Exception:
                        pass
    except Exception:
        pass


def exact_cosine_knn(x: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine distances 1 − ⟨x̂_i, x̂_j⟩) of the ``k`` nearest rows of every row of the
    L2-normalised ``x`` (itself included), exact: blocks of ``chunk`` rows times all rows with
    torch's multithreaded matmul and ``topk``, never the full N×N matrix."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    idx = np.empty((x.shape[0], k), dtype=np.int32)
    dist = np.empty((x.shape[0], k), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            sims, ix = torch.topk(xt[s : s + chunk] @ xt.T, k, dim=1)
            idx[s : s + len(ix)] = ix.numpy()
            dist[s : s + len(ix)] = np.maximum(1.0 - sims.numpy(), 0.0)
    return idx, dist


def fit_2d(
    x: np.ndarray,
    method: str = "umap",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> np.ndarray:
    """2-D coordinates of the rows of ``x`` (already L2-normalised), one fit for all rows.

    ``umap``: umap-learn's UMAP (McInnes et al. 2018) with the cosine metric and
    ``random_state=seed`` (deterministic; umap-learn then runs single-threaded); up to
    EXACT_KNN_MAX points its neighbour graph is exact (:func:`exact_cosine_knn`, passed as
    ``precomputed_knn``: faster here than NN-descent plus its per-process numba compilation, and
    free of its approximation), above that umap-learn's approximate NN-descent. ``pca``:
    scikit-learn's PCA, exact (covariance eigendecomposition when rows ≫ dims, else full SVD),
    deterministic signs.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if method == "pca":
        from sklearn.decomposition import PCA

        if n < 2:
            return np.zeros((n, 2), dtype=np.float32)
        n_comp = min(2, n, d)
        solver = "covariance_eigh" if n >= 10 * d and d <= 2048 else "full"
        out = PCA(n_components=n_comp, svd_solver=solver).fit_transform(x)
        if n_comp < 2:
            out = np.hstack([out, np.zeros((out.shape[0], 2 - n_comp))])
        return out.astype(np.float32)
    if method == "umap":
        if n < 4:
            raise GapkitError(f"UMAP needs at least 4 points, this set has {n}; use --method pca")
        import umap

        _enable_umap_kernel_cache()
        k = int(min(n_neighbors, n - 1))
        knn = exact_cosine_knn(x, k) if n <= EXACT_KNN_MAX else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs value.*")
            warnings.filterwarnings("ignore", category=UserWarning, module="umap")
            warnings.filterwarnings("ignore", category=FutureWarning)
            reducer = umap.UMAP(
                n_components=2,
                metric="cosine",
                n_neighbors=k,
                min_dist=float(min_dist),
                random_state=int(seed),
                init="spectral" if n > k + 2 else "random",
                precomputed_knn=(knn[0], knn[1], None) if knn is not None else (None, None, None),
            )
            return np.asarray(reducer.fit_transform(x), dtype=np.float32)
    raise GapkitError(f"unknown method {method!r}; use umap or pca")


def _input_identity(emb: EmbeddingSet) -> dict[str, Any]:
    """What identifies the data of a set: file paths, sizes and mtimes; or a content hash."""
    files: list[Path] = []
    if emb.path is not None:
        files = [emb.path / n for n in ("images.npy", "texts.npy", "image_row.npy") if (emb.path / n).exists()]
    elif emb.source and Path(emb.source).is_file():
        files = [Path(emb.source)]
    ident: dict[str, Any] = {
        "n_images": emb.n_images,
        "n_texts": emb.n_texts,
        "dim": int(emb.images.shape[1]),
    }
    if files:
        ident["files"] = [
            {"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files
        ]
    else:
        h = hashlib.blake2b(digest_size=16)
        for arr in (emb.images, emb.texts, emb.image_row):
            h.update(np.ascontiguousarray(arr).tobytes())
        ident["sha"] = h.hexdigest()
    return ident


def coords_paths(output: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The cache files beside a figure: ``FIG.coords.npz`` and ``FIG.coords.json`` (FIG without
    its extension, so fig.png and fig.pdf share them)."""
    out = Path(output)
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".coords.npz"), stem.with_name(stem.name + ".coords.json")


@dataclass
class Panel:
    """One panel's points: the sampled rows, their labels and their 2-D coordinates."""

    title: str
    image_idx: np.ndarray  # rows of the set's images shown
    text_idx: np.ndarray  # rows of the set's texts shown
    image_xy: np.ndarray
    text_xy: np.ndarray
    text_pair: np.ndarray  # for each shown text, the position of its image in image_idx
    image_labels: np.ndarray | None = None
    text_labels: np.ndarray | None = None
    gap: float | None = None
    n_texts_total: int = 0
    reused: bool = False
    key: str = ""


@dataclass
class PlotResult:
    """What a plot function made: the file, the matplotlib Figure, and the data behind it."""

    path: Path
    figure: Any
    panels: list[Any] = field(default_factory=list)
    coords_path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def compute_panels(
    sets: Sequence[EmbeddingSet],
    *,
    titles: Sequence[str] | None = None,
    color_by: str | None = None,
    method: str = "umap",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    max_points: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    refit: bool = False,
    reporter: Reporter | None = None,
) -> list[Panel]:
    """Sample, normalise and map each set to 2-D (reusing cached coordinates when they match).

    ``cache`` is the figure path whose ``.coords.npz``/``.coords.json`` hold earlier fits. A
    panel's cache key covers its data (paths, sizes, mtimes or a content hash), ``method``,
    ``seed``, ``n_neighbors``/``min_dist`` (UMAP), ``max_points`` and the sampling column:
    everything that changes the coordinates, nothing that only changes the styling.
    """
    from .metrics import measure_set

    reporter = ensure(reporter)
    if method not in ("umap", "pca"):
        raise GapkitError(f"unknown method {method!r}; use umap or pca")
    if not sets:
        raise GapkitError("no embedding sets to plot")
    names = _titles(sets, titles)
    for emb in sets:
        check_set(emb)
    column = resolve_color_by(sets, color_by)

    cached: dict[str, dict[str, np.ndarray]] = {}
    npz_path = json_path = None
    if cache is not None:
        npz_path, json_path = coords_paths(cache)
        if not refit and npz_path.exists() and json_path.exists():
            try:
                meta = json.loads(json_path.read_text())
                with np.load(npz_path, allow_pickle=False) as z:
                    for p in meta.get("panels", []):
                        k = p["key"]
                        cached[k] = {a: z[f"{k}_{a}"] for a in ("image_idx", "text_idx", "image_xy", "text_xy")}
            except Exception:  # a damaged cache is refitted, never trusted
                cached = {}

    panels: list[Panel] = []
    to_fit: list[tuple[int, np.ndarray, np.ndarray]] = []
    keys: list[dict[str, Any]] = []
    sampled_notes: list[str] = []
    for i, emb in enumerate(sets):
        labels = emb.labels(column) if column is not None else None
        sampling = max_points is not None and 0 < max_points < emb.n_texts
        settings: dict[str, Any] = {
            "data": _input_identity(emb),
            "method": method,
            "seed": int(seed),
            "max_points": int(max_points) if sampling else None,
            "stratify": column if sampling else None,
            "normalise": "l2",
        }
        if method == "umap":
            settings.update(n_neighbors=int(n_neighbors), min_dist=float(min_dist), metric="cosine")
        key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=10).hexdigest()
        keys.append({"key": key, "title": names[i], "settings": settings})
        if sampling:
            text_idx = stratified_sample(labels, emb.n_texts, int(max_points), seed)
            sampled_notes.append(f"{names[i]}: {len(text_idx):,} of {emb.n_texts:,} pairs")
        else:
            text_idx = np.arange(emb.n_texts)
        image_idx, text_pair = np.unique(emb.image_row[text_idx], return_inverse=True)
        panel = Panel(
            title=names[i],
            image_idx=image_idx,
            text_idx=text_idx,
            image_xy=np.empty((0, 2)),
            text_xy=np.empty((0, 2)),
            text_pair=text_pair.reshape(-1),
            gap=float(measure_set(emb, metrics=["gap"])["gap"]),
            n_texts_total=emb.n_texts,
            key=key,
        )
        if labels is not None:
            panel.text_labels = np.asarray(labels)[text_idx]
            panel.image_labels = _image_labels(np.asarray(labels), emb.image_row, emb.n_images)[image_idx]
        hit = cached.get(key)
        if hit is not None and np.array_equal(hit["text_idx"], text_idx) and np.array_equal(hit["image_idx"], image_idx):
            panel.image_xy, panel.text_xy, panel.reused = hit["image_xy"], hit["text_xy"], True
        else:
            # only the rows shown are read and normalised (a memory map stays on disk)
            to_fit.append((i, _normalized(emb.images[image_idx]), _normalized(emb.texts[text_idx])))
        panels.append(panel)

    if sampled_notes:
        how = f"stratified by {column}" if column else "uniformly"
        reporter.note(f"sampled at most {max_points:,} pairs per set ({how}, seed {seed}): " + "; ".join(sampled_notes))
    reused = [p.title for p in panels if p.reused]
    if reused and npz_path is not None:
        reporter.note(f"reused cached {method} coordinates from {npz_path} for: {', '.join(reused)}")

    if to_fit:
        total = sum(len(a) + len(b) for _, a, b in to_fit)
        with reporter.task(f"fitting {method.upper()}", total=total, unit="points") as task:
            for i, im, tx in to_fit:
                task.set_description(f"fitting {method.upper()} ({panels[i].title})")
                xy = fit_2d(np.vstack([im, tx]), method=method, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist)
                panels[i].image_xy, panels[i].text_xy = xy[: len(im)], xy[len(im) :]
                task.advance(len(im) + len(tx))
        if npz_path is not None and json_path is not None:
            _save_cache(npz_path, json_path, panels, keys)
    return panels


def _save_cache(npz_path: Path, json_path: Path, panels: Sequence[Panel], keys: Sequence[dict[str, Any]]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for p in panels:
        arrays[f"{p.key}_image_idx"] = p.image_idx
        arrays[f"{p.key}_text_idx"] = p.text_idx
        arrays[f"{p.key}_image_xy"] = p.image_xy
        arrays[f"{p.key}_text_xy"] = p.text_xy
    meta = {"format": "gapkit-coords", "version": 1, "panels": list(keys)}
    tmp = npz_path.with_name(f".{npz_path.name}.tmp-{os.getpid()}.npz")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, npz_path)
        json_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise GapkitError(f"cannot write the coordinate cache: {err.strerror or err}", path=npz_path) from err


# --------------------------------------------------------------------------------------------
# Figure 2: the latent space
# --------------------------------------------------------------------------------------------


def label_colors(panels: Sequence[Panel], palette: Sequence[str] | None = None) -> dict[str, str]:
    """One colour per label, shared by all panels: labels by total count (ties by name) take
    the palette in order (Okabe-Ito up to 8 labels, seaborn's 10-colour "colorblind" palette
    above); when there are more labels than colours the rarest share a grey ``other``."""
    counts: dict[str, int] = {}
    for p in panels:
        if p.text_labels is None:
            continue
        for lab in p.text_labels:
            counts[str(lab)] = counts.get(str(lab), 0) + 1
    order = sorted(counts, key=lambda k: (-counts[k], k))
    if palette is None:
        palette = OKABE_ITO if len(order) <= len(OKABE_ITO) else COLORBLIND10
    if len(order) <= len(palette):
        return {lab: palette[i] for i, lab in enumerate(order)}
    keep = len(palette) - 1
    colors = {lab: palette[i] for i, lab in enumerate(order[:keep])}
    colors.update({lab: OTHER_COLOR for lab in order[keep:]})
    return colors


def _marker_size(n_points: int, width_in: float) -> float:
    """Marker area (pt²) that keeps a panel readable from 50 to 50,000 points."""
    base = 10.0 * (width_in / 2.3) ** 2
    return float(np.clip(base * math.sqrt(400.0 / max(n_points, 1)), 0.8, 12.0))


def draw_umap(
    panels: Sequence[Panel],
    *,
    color_by: str | None = None,
    pair_lines: int = 0,
    size: tuple[float, float] | None = None,
    seed: int = 0,
    show_gap: bool = True,
    method: str = "umap",
    ncols: int | None = None,
) -> Any:
    """Draw the panels: images '^' and texts 'D', coloured by label (or by modality), one
    legend below all panels, ``pair_lines`` thin lines between random true pairs per panel.

    Every scatter collection has a gid ``"<panel>:image:<label>"`` / ``"<panel>:text:<label>"``
    (label ``*`` when coloured by modality), lines ``"<panel>:pairs"``, for tests and scripts.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    n = len(panels)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    panel_w = DOUBLE_COLUMN_IN / 3 if n > 1 else SINGLE_COLUMN_IN
    default = (
        min(DOUBLE_COLUMN_IN, panel_w * ncols) if n > 1 else SINGLE_COLUMN_IN,
        (min(DOUBLE_COLUMN_IN, panel_w * ncols) / ncols) * nrows + 0.55,
    )
    width, height = size or default
    colors = label_colors(panels) if color_by else {}
    rng = np.random.default_rng(seed)
    # the gap goes beside every title when all fit (≈ 0.075 in per 8 pt character), else below
    # every panel
    gap_beside = all(0.075 * (len(p.title) + 11) <= width / ncols for p in panels)
    with paper_style():
        fig = _new_figure(width, height)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= n:
                ax.set_axis_off()
                continue
            p = panels[k]
            n_points = len(p.image_xy) + len(p.text_xy)
            ms = _marker_size(n_points, width / ncols)
            layers: list[tuple[str, np.ndarray, np.ndarray | None]] = [
                ("image", p.image_xy, p.image_labels),
                ("text", p.text_xy, p.text_labels),
            ]
            # draw in interleaved chunks (image, text, image, text ...) so that neither modality
            # hides the other when they overlap
            chunks = 4 if n_points > 40 else 1
            parts = []
            for modality, xy, labs in layers:
                order = rng.permutation(len(xy))
                for c, idx in enumerate(np.array_split(order, chunks)):
                    parts.append((c, modality, xy[idx], None if labs is None else labs[idx]))
            parts.sort(key=lambda t: (t[0], t[1] != "image"))
            for _, modality, xy, labs in parts:
                if len(xy) == 0:
                    continue
                if labs is None or not color_by:
                    c = MODALITY_COLORS[modality]
                    col = ax.scatter(xy[:, 0], xy[:, 1], s=ms, marker=MARKERS[modality], c=c, alpha=0.75,
                                     linewidths=0, rasterized=n_points > 3000)
                    col.set_gid(f"{k}:{modality}:*")
                    continue
                for lab in sorted(set(map(str, labs))):
                    m = labs.astype(str) == lab
                    col = ax.scatter(xy[m, 0], xy[m, 1], s=ms, marker=MARKERS[modality], c=colors.get(lab, OTHER_COLOR),
                                     alpha=0.75, linewidths=0, rasterized=n_points > 3000)
                    col.set_gid(f"{k}:{modality}:{lab}")
            if pair_lines > 0 and len(p.text_xy):
                pick = rng.choice(len(p.text_xy), size=min(pair_lines, len(p.text_xy)), replace=False)
                segs = np.stack([p.text_xy[pick], p.image_xy[p.text_pair[pick]]], axis=1)
                lc = LineCollection(segs, colors="0.3", linewidths=0.3, alpha=0.45, zorder=3)
                lc.set_gid(f"{k}:pairs")
                ax.add_collection(lc)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ("top", "right", "left", "bottom"):
                ax.spines[side].set_visible(True)
                ax.spines[side].set_color("0.6")
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_title(p.title, loc="left", fontweight="bold")
            if show_gap and p.gap is not None:
                gap_text = f"gap {p.gap:.2f}"
                if gap_beside:
                    ax.set_title(gap_text, loc="right", color="0.3")
                else:
                    ax.set_xlabel(gap_text, color="0.3")
        # one legend, below the panels: shapes (modality), then colours (labels)
        handles: list[Any] = []
        if color_by:
            handles += [
                Line2D([], [], ls="", marker=MARKERS["image"], color="0.35", markersize=5, label="image"),
                Line2D([], [], ls="", marker=MARKERS["text"], color="0.35", markersize=4.5, label="text"),
            ]
            shown = {c: None for c in colors.values()}
            names = [lab for lab in colors if colors[lab] != OTHER_COLOR]
            handles += [Line2D([], [], ls="", marker="s", color=colors[lab], markersize=5, label=lab) for lab in names]
            if OTHER_COLOR in shown:
                handles.append(Line2D([], [], ls="", marker="s", color=OTHER_COLOR, markersize=5, label="other"))
        else:
            handles += [
                Line2D([], [], ls="", marker=MARKERS["image"], color=MODALITY_COLORS["image"], markersize=5, label="image"),
                Line2D([], [], ls="", marker=MARKERS["text"], color=MODALITY_COLORS["text"], markersize=4.5, label="text"),
            ]
        if pair_lines > 0:
            handles.append(Line2D([], [], color="0.3", lw=0.6, alpha=0.7, label="true pair"))
        # one row when it fits (≈ 0.055 in per character at 7 pt + 0.4 in per entry), else two
        # rows filled column by column: the two shapes stack in the first column
        need = sum(0.055 * len(h.get_label()) + 0.4 for h in handles)
        rows = 1 if need <= width * 0.95 else max(2, math.ceil(need / (width * 0.95)))
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=max(1, math.ceil(len(handles) / rows)),
            title=(f"shape: modality    colour: {color_by}" if color_by else None),
            handletextpad=0.3,
            columnspacing=1.0,
            borderaxespad=0.2,
        )
    return fig


def plot_umap(
    sets: Sequence[EmbeddingSet],
    output: str | os.PathLike[str],
    *,
    titles: Sequence[str] | None = None,
    color_by: str | None = None,
    method: str = "umap",
    pair_lines: int = 0,
    max_points: int | None = None,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    dpi: float = 300,
    size: str | tuple[float, float] | None = None,
    show_gap: bool = True,
    refit: bool = False,
    ncols: int | None = None,
    reporter: Reporter | None = None,
) -> PlotResult:
    """Figure 2: one panel per set, its images and texts mapped to 2-D together; saved to
    ``output`` (PNG/PDF/SVG by extension) with the coordinates cached beside it.

    The gap shown in each panel title is :func:`gapkit.metrics.gap` (‖mean x̂ − mean ŷ‖₂, Liang
    et al. 2022) on the whole set, not only the sampled points.
    """
    reporter = ensure(reporter)
    out = check_output(output)
    column = resolve_color_by(sets, color_by)
    panels = compute_panels(
        sets,
        titles=titles,
        color_by=column if column else "modality",
        method=method,
        seed=seed,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        max_points=max_points,
        cache=out,
        refit=refit,
        reporter=reporter,
    )
    n = len(panels)
    nc = ncols or min(n, 4)
    nr = math.ceil(n / nc)
    base_w = min(DOUBLE_COLUMN_IN, DOUBLE_COLUMN_IN / 3 * nc) if n > 1 else SINGLE_COLUMN_IN
    default = (base_w, base_w / nc * nr + 0.6)
    fig = draw_umap(
        panels,
        color_by=column,
        pair_lines=pair_lines,
        size=parse_size(size, default),
        seed=seed,
        show_gap=show_gap,
        method=method,
        ncols=nc,
    )
    save_figure(fig, out, dpi=dpi)
    npz, _ = coords_paths(out)
    reporter.note(f"wrote {out} ({n} panel{'s' if n > 1 else ''}; coordinates in {npz})")
    return PlotResult(path=out, figure=fig, panels=list(panels), coords_path=npz)


# --------------------------------------------------------------------------------------------
# histogram of cosines
# --------------------------------------------------------------------------------------------


def pair_cosines(
    emb: EmbeddingSet, n_random: int = 100_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(cosine of every true pair, cosines of ``n_random`` random non-pairs drawn uniformly).

    A random pair is (image a, text b) with a not the image of b, drawn with replacement.
    """
    images = _normalized(emb.images)
    texts = _normalized(emb.texts)
    true = np.einsum("ij,ij->i", images[emb.image_row], texts)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, emb.n_images, size=n_random)
    b = rng.integers(0, emb.n_texts, size=n_random)
    keep = emb.image_row[b] != a
    a, b = a[keep], b[keep]
    rand = np.einsum("ij,ij->i", images[a], texts[b])
    return true.astype(np.float64), rand.astype(np.float64)


def plot_hist(
    sets: Sequence[EmbeddingSet],
    output: str | os.PathLike[str],
    *,
    titles: Sequence[str] | None = None,
    n_random: int = 100_000,
    bins: int = 60,
    seed: int = 0,
    dpi: float = 300,
    size: str | tuple[float, float] | None = None,
    reporter: Reporter | None = None,
) -> PlotResult:
    """Per set, the density of true-pair cosines ⟨x̂_i, ŷ_i⟩ against random-pair cosines
    ⟨x̂_a, ŷ_b⟩ (a ≠ image of b, a sample of ``n_random``), with the means marked: cos_true_pairs
    (mean_i ⟨x̂_i, ŷ_i⟩) and cos_random_pairs (the exact mean over all non-pairs,
    ((Σx̂)·(Σŷ) − Σ_i⟨x̂_i, ŷ_i⟩)/(N(N − 1))), both from :func:`gapkit.metrics.measure`.
    """
    from .metrics import measure_set

    reporter = ensure(reporter)
    out = check_output(output)
    names = _titles(sets, titles)
    for emb in sets:
        check_set(emb)
    data = []
    with reporter.task("cosines", total=len(sets), unit="sets") as task:
        for emb in sets:
            true, rand = pair_cosines(emb, n_random=n_random, seed=seed)
            m = measure_set(emb, metrics=["cos_true_pairs", "cos_random_pairs"])
            data.append((true, rand, float(m["cos_true_pairs"]), float(m["cos_random_pairs"])))
            task.advance(1)
    lo = min(min(d[0].min(), d[1].min() if len(d[1]) else 1.0) for d in data)
    hi = max(max(d[0].max(), d[1].max() if len(d[1]) else -1.0) for d in data)
    pad = 0.02 * (hi - lo + 1e-9)
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    n = len(sets)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    w = DOUBLE_COLUMN_IN if n > 1 else SINGLE_COLUMN_IN
    default = (w, (w / ncols) * 0.75 * nrows + 0.45)
    width, height = parse_size(size, default)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    true_c, rand_c = OKABE_ITO[0], "#888888"
    with paper_style():
        fig = _new_figure(width, height)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
        for k, ax in enumerate(axes.flat):
            if k >= n:
                ax.set_axis_off()
                continue
            true, rand, ctp, rmean = data[k]
            ax.hist(rand, bins=edges, density=True, color=rand_c, alpha=0.45, linewidth=0, gid=f"{k}:random")
            ax.hist(true, bins=edges, density=True, color=true_c, alpha=0.6, linewidth=0, gid=f"{k}:true")
            ax.axvline(rmean, color="0.25", ls="--", lw=0.9, gid=f"{k}:random-mean")
            ax.axvline(ctp, color=true_c, ls="--", lw=0.9, gid=f"{k}:true-mean")
            ax.set_title(names[k], loc="left", fontweight="bold")
            ax.set_title(f"true {ctp:.2f} · random {rmean:.2f}", loc="right", color="0.3", fontsize=7)
            ax.set_yticks([])
            ax.spines["left"].set_visible(False)
            ax.set_xlabel("cosine similarity")
        handles = [
            Patch(color=true_c, alpha=0.6, label="true pairs"),
            Patch(color=rand_c, alpha=0.45, label="random pairs"),
            Line2D([], [], color="0.25", ls="--", lw=0.9, label="means"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=3)
    save_figure(fig, out, dpi=dpi)
    reporter.note(f"wrote {out}")
    return PlotResult(
        path=out,
        figure=fig,
        data={
            names[k]: {
                "cos_true_pairs": d[2],
                "cos_random_pairs": d[3],
                "sample_mean_random": float(d[1].mean()) if len(d[1]) else float("nan"),
                "n_random": len(d[1]),
            }
            for k, d in enumerate(data)
        },
    )


# --------------------------------------------------------------------------------------------
# the embedding-shift experiment
# --------------------------------------------------------------------------------------------


def shift_embeddings(images: np.ndarray, texts: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Liang et al. (2022), Sec. 4.2: x ← normalise(x̂ − λΔ/2), y ← normalise(ŷ + λΔ/2), with
    Δ = mean_i x̂_i − mean_j ŷ_j the gap vector of the L2-normalised embeddings x̂, ŷ.
    λ = 0 leaves the embeddings unchanged; λ = 1 makes the centroids meet before renormalising."""
    from .metrics import normalize

    xn = np.asarray(normalize(np.asarray(images, dtype=np.float32)), dtype=np.float32)
    yn = np.asarray(normalize(np.asarray(texts, dtype=np.float32)), dtype=np.float32)
    delta = xn.mean(axis=0, dtype=np.float64) - yn.mean(axis=0, dtype=np.float64)
    half = (0.5 * lam * delta).astype(np.float32)
    return (
        np.asarray(normalize(xn - half), dtype=np.float32),
        np.asarray(normalize(yn + half), dtype=np.float32),
    )


def lambda_grid(lo: float = -0.5, hi: float = 1.5, steps: int = 41) -> np.ndarray:
    """``steps`` evenly spaced λ from ``lo`` to ``hi``, always including λ = 0."""
    if steps < 2 or hi <= lo:
        raise GapkitError(f"need lambda-min < lambda-max and at least 2 steps (got {lo}, {hi}, {steps})")
    grid = np.linspace(lo, hi, steps)
    if lo <= 0 <= hi:
        grid = np.union1d(grid, [0.0])
        grid[np.isclose(grid, 0.0, atol=1e-12)] = 0.0
        grid = np.unique(grid)
    return grid


def shift_experiment(
    emb: EmbeddingSet,
    lambdas: Sequence[float] | np.ndarray | None = None,
    *,
    temperature: float = 0.01,
    batch_size: int = 1024,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> dict[str, np.ndarray]:
    """Shift both modalities along the gap vector (see :func:`shift_embeddings`) and measure, at
    every λ: ``gap`` and ``cos_true_pairs`` (:func:`gapkit.metrics.measure`, so that the gap at
    λ = 0 is exactly the gap ``gapkit measure`` reports), ``clip_loss`` at
    ``temperature`` (:func:`gapkit.losses.clip_loss` with logit scale 1/τ, averaged over the same
    seeded batches of ``batch_size`` true pairs at every λ) and ``i2t_R@1``/``t2i_R@1``
    (:func:`gapkit.metrics.recall_at_k`). Returns one array per quantity, and ``lambda``.
    """
    import torch

    from .losses import clip_loss
    from .metrics import measure, recall_at_k

    reporter = ensure(reporter)
    check_set(emb)
    if temperature <= 0:
        raise GapkitError(f"temperature must be positive, not {temperature}")
    lam = lambda_grid() if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    images = np.asarray(emb.images, dtype=np.float32)
    texts = np.asarray(emb.texts, dtype=np.float32)
    rows = np.asarray(emb.image_row)
    perm = np.random.default_rng(seed).permutation(emb.n_texts)
    bs = max(2, int(batch_size)) if batch_size and batch_size > 0 else emb.n_texts
    batches = [perm[s : s + bs] for s in range(0, len(perm), bs)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches = batches[:-1]
    out: dict[str, list[float]] = {k: [] for k in ("lambda", "gap", "cos_true_pairs", "clip_loss", "i2t_R@1", "t2i_R@1")}
    with reporter.task("shifting along the gap", total=len(lam), unit="λ") as task:
        for lv in lam:
            x, y = shift_embeddings(images, texts, float(lv))
            out["lambda"].append(float(lv))
            m = measure(x, y, image_row=rows, metrics=["gap", "cos_true_pairs"])
            out["gap"].append(float(m["gap"]))
            out["cos_true_pairs"].append(float(m["cos_true_pairs"]))
            with torch.no_grad():
                xt, yt = torch.from_numpy(x), torch.from_numpy(y)
                losses = [
                    float(clip_loss(xt[torch.from_numpy(rows[b])], yt[torch.from_numpy(b)], 1.0 / temperature)) * len(b)
                    for b in batches
                ]
            out["clip_loss"].append(sum(losses) / sum(len(b) for b in batches))
            rec = recall_at_k(x, y, image_row=rows, ks=(1,))
            out["i2t_R@1"].append(float(rec["i2t_R@1"]))
            out["t2i_R@1"].append(float(rec["t2i_R@1"]))
            task.advance(1)
    return {k: np.asarray(v) for k, v in out.items()}


def plot_shift(
    emb: EmbeddingSet,
    output: str | os.PathLike[str],
    *,
    lambdas: Sequence[float] | np.ndarray | None = None,
    temperature: float = 0.01,
    batch_size: int = 1024,
    seed: int = 0,
    title: str | None = None,
    dpi: float = 300,
    size: str | tuple[float, float] | None = None,
    reporter: Reporter | None = None,
) -> PlotResult:
    """Plot :func:`shift_experiment`: gap, cos_true_pairs, clip loss and R@1 against λ, with the
    original embeddings (λ = 0) marked."""
    reporter = ensure(reporter)
    out = check_output(output)
    res = shift_experiment(emb, lambdas, temperature=temperature, batch_size=batch_size, seed=seed, reporter=reporter)
    width, height = parse_size(size, (DOUBLE_COLUMN_IN, 1.9))
    lam = res["lambda"]
    i0 = int(np.argmin(np.abs(lam)))
    panels = [
        ("gap", [("gap", "gap", "-")], "gap  ‖μx − μy‖"),
        ("cos_true_pairs", [("cos_true_pairs", "cos true pairs", "-")], "cos true pairs"),
        ("clip_loss", [("clip_loss", "clip loss", "-")], f"clip loss (τ = {temperature:g})"),
        ("R@1", [("i2t_R@1", "image→text", "-"), ("t2i_R@1", "text→image", "--")], "R@1"),
    ]
    from matplotlib.lines import Line2D

    with paper_style():
        fig = _new_figure(width, height)
        axes = fig.subplots(1, 4, squeeze=False)[0]
        for ax, (name, series, ylabel) in zip(axes, panels):
            for key, label, ls in series:
                ax.plot(lam, res[key], ls=ls, color=OKABE_ITO[0] if ls == "-" else OKABE_ITO[3], lw=1.2, gid=f"shift:{key}", label=label)
                ax.plot([lam[i0]], [res[key][i0]], marker="o", ms=3, color="0.2", ls="", gid=f"shift:{key}:original")
            ax.axvline(0.0, color="0.6", lw=0.6, ls=":")
            ax.set_xlabel("shift λ")
            ax.set_title(ylabel, loc="left")
            if name == "R@1":
                ax.set_ylim(-0.02, 1.02)
        handles = [
            Line2D([], [], color=OKABE_ITO[0], lw=1.2, label="R@1 image→text"),
            Line2D([], [], color=OKABE_ITO[3], lw=1.2, ls="--", label="R@1 text→image"),
            Line2D([], [], color="0.2", marker="o", ms=3, ls="", label="original embeddings (λ = 0)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=3)
        if title:
            fig.suptitle(title, x=0.01, ha="left", fontweight="bold")
    save_figure(fig, out, dpi=dpi)
    reporter.note(f"wrote {out}")
    return PlotResult(path=out, figure=fig, data={k: v.tolist() for k, v in res.items()})


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A finetune run folder's per-epoch metrics (``metrics.jsonl``) and config (``run.json``)."""

    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def name(self) -> str:
        loss = self.config.get("loss")
        plain = self.path.name.replace("+", "-").lower()
        if loss and str(loss).replace("+", "-").lower() not in plain:
            return f"{self.path.name} ({loss})"
        return self.path.name

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of the rows that have a finite number under ``key``."""
        xs, ys = [], []
        for i, r in enumerate(self.rows):
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(float(r.get("epoch", i + 1)))
                ys.append(float(v))
        return np.asarray(xs), np.asarray(ys)

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.update({k: None for k in r})
        return list(seen)


def read_run(path: str | os.PathLike[str]) -> Run:
    """Read a run folder (or its ``metrics.jsonl``); bad lines raise GapkitError with the row."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    mfile = p if p.is_file() else p / "metrics.jsonl"
    if not folder.exists():
        raise GapkitError("no such run folder", path=folder)
    if not mfile.is_file():
        raise GapkitError("not a finetune run: metrics.jsonl is missing", path=folder)
    rows: list[dict[str, Any]] = []
    with open(mfile, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise GapkitError(f"invalid JSON ({err.msg})", path=mfile, row=i) from err
            if not isinstance(row, dict):
                raise GapkitError("expected one JSON object per line", path=mfile, row=i)
            rows.append(row)
    if not rows:
        raise GapkitError("empty: no epochs recorded yet", path=mfile)
    config: dict[str, Any] = {}
    cfile = folder / "run.json"
    if cfile.is_file():
        try:
            config = json.loads(cfile.read_text())
        except json.JSONDecodeError as err:
            raise GapkitError(f"invalid JSON ({err.msg})", path=cfile) from err
    return Run(path=folder, rows=rows, config=config if isinstance(config, dict) else {})


def _curve_label(key: str) -> str:
    """Legend text of a line style: ``train_loss`` -> "total loss", ``train_atp`` -> "atp term",
    ``val_i2t_R@10`` -> "R@10 image→text"."""
    if key == "train_loss":
        return "total loss"
    if key.startswith("train_"):
        return f"{key[6:]} term"
    if key.startswith("val_i2t_"):
        return f"{key[8:]} image→text"
    if key.startswith("val_t2i_"):
        return f"{key[8:]} text→image"
    return key


_TERM_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 2)))


def plot_training(
    runs: Sequence[str | os.PathLike[str] | Run],
    output: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    dpi: float = 300,
    size: str | tuple[float, float] | None = None,
    reporter: Reporter | None = None,
) -> PlotResult:
    """Per-epoch curves of finetune runs, compared in the same panels (one colour per run):
    the training loss and its terms (``train_loss``, ``train_<term>``: one line style per term),
    ``val_gap``, ``val_cos_true_pairs`` and ``val_i2t_R@10``/``val_t2i_R@10``."""
    from matplotlib.lines import Line2D

    reporter = ensure(reporter)
    out = check_output(output)
    rs = [r if isinstance(r, Run) else read_run(r) for r in runs]
    if not rs:
        raise GapkitError("no runs to plot")
    names = [r.name for r in rs] if not labels else list(labels)
    if len(names) != len(rs):
        raise GapkitError(f"{len(names)} labels for {len(rs)} runs; give one label per run")
    terms: list[str] = []
    for r in rs:
        for k in r.keys():
            if k.startswith("train_") and k not in terms and not k.startswith("train_time"):
                terms.append(k)
    terms.sort(key=lambda k: (k != "train_loss", k))
    panels = [
        ("training loss", terms),
        ("val gap", ["val_gap"]),
        ("val cos true pairs", ["val_cos_true_pairs"]),
        ("val R@10", ["val_i2t_R@10", "val_t2i_R@10"]),
    ]
    panels = [(t, ks) for t, ks in panels if any(len(r.series(k)[0]) for r in rs for k in ks)]
    if not panels:
        raise GapkitError(
            "no curves to plot: metrics.jsonl has none of train_loss, train_<term>, val_gap, "
            "val_cos_true_pairs, val_i2t_R@10, val_t2i_R@10",
            path=rs[0].path / "metrics.jsonl",
        )
    width, height = parse_size(size, (DOUBLE_COLUMN_IN, 2.1))
    styles = {k: _TERM_STYLES[i % len(_TERM_STYLES)] for i, k in enumerate(terms)}
    styles.update({"val_i2t_R@10": "-", "val_t2i_R@10": "--", "val_gap": "-", "val_cos_true_pairs": "-"})
    with paper_style():
        fig = _new_figure(width, height)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, ks) in zip(axes, panels):
            for ri, r in enumerate(rs):
                color = OKABE_ITO[ri % len(OKABE_ITO)]
                for k in ks:
                    x, y = r.series(k)
                    if len(x):
                        ax.plot(x, y, color=color, ls=styles[k], lw=1.1, marker="o" if len(x) <= 12 else None,
                                ms=2, gid=f"{ri}:{k}")
            ax.set_title(title, loc="left")
            ax.set_xlabel("epoch")
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        handles = [Line2D([], [], color=OKABE_ITO[i % len(OKABE_ITO)], lw=1.5, label=n) for i, n in enumerate(names)]
        used = [k for _, ks in panels for k in ks if len(ks) > 1]
        handles += [Line2D([], [], color="0.3", ls=styles[k], lw=1.1, label=_curve_label(k)) for k in dict.fromkeys(used)]
        # two rows filled column by column: the runs (colours) first, then the line styles
        rows = 2 if len(handles) > 3 else 1
        fig.legend(handles=handles, loc="outside lower center", ncol=math.ceil(len(handles) / rows))
    save_figure(fig, out, dpi=dpi)
    reporter.note(f"wrote {out}")
    return PlotResult(path=out, figure=fig, data={n: r.rows for n, r in zip(names, rs)})
