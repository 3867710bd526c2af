"""The embedding set on disk, and loaders for embeddings in other people's formats.

An embedding set is a folder that numpy alone can read::

    images.npy      (n_images, d_image)  float32 or float16, as the encoder produced them
    texts.npy       (n_texts, d_text)    (not normalised; metrics normalise)
    image_row.npy   (n_texts,) int64     row in images.npy of each text's image
    images.jsonl    one JSON object per image row: id, path, label and the dataset's columns
    texts.jsonl     one JSON object per text row: text, image_row and the dataset's columns
    info.json       format, version, counts, dims, dtype, encoders, dataset, creation time,
                    gapkit version, and what was skipped and why

``info.json`` is written last: a folder without it is unfinished. While ``gapkit embed`` runs,
finished shards live in ``.shards/`` (one ``shard-000012.npz`` per shard, each written to a
temporary name and renamed, so a shard file exists only when complete); ``.shards/plan.json``
records the settings so that a resumed run can refuse to mix different ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import GapkitError

FORMAT_NAME = "gapkit-embeddings"
FORMAT_VERSION = 1

#: keys tried, in order, for the image and text arrays inside .npz / .safetensors / .pt files
IMAGE_KEYS = (
    "images", "image", "image_embeds", "image_embeddings", "image_features", "image_feats",
    "img", "img_emb", "img_feats", "x",
)
TEXT_KEYS = (
    "texts", "text", "text_embeds", "text_embeddings", "text_features", "text_feats",
    "txt", "text_emb", "txt_feats", "y",
)

CHECK_CHUNK = 65536


# --------------------------------------------------------------------------------------------
# the in-memory view
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise GapkitError(f"invalid JSON ({err.msg})", path=path, row=i) from err
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str))
            fh.write("\n")


@dataclass
class EmbeddingSet:
    """Image and text embeddings with their pairing and metadata.

    ``images[image_row[j]]`` is the image of text ``j``. Arrays may be memory-mapped. Metadata
    lists are read lazily from the folder the first time they are used.
    """

    images: np.ndarray
    texts: np.ndarray
    image_row: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    source: str = ""
    _image_meta: list[dict[str, Any]] | None = None
    _text_meta: list[dict[str, Any]] | None = None
    _labels: np.ndarray | None = None

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_texts(self) -> int:
        return int(self.texts.shape[0])

    @property
    def one_to_one(self) -> bool:
        """True when text j belongs to image j for every j."""
        return self.n_images == self.n_texts and bool(
            np.array_equal(self.image_row, np.arange(self.n_texts))
        )

    @property
    def image_meta(self) -> list[dict[str, Any]]:
        if self._image_meta is None:
            p = self.path / "images.jsonl" if self.path is not None else None
            self._image_meta = _read_jsonl(p) if p is not None and p.exists() else [
                {} for _ in range(self.n_images)
            ]
        return self._image_meta

    @property
    def text_meta(self) -> list[dict[str, Any]]:
        if self._text_meta is None:
            p = self.path / "texts.jsonl" if self.path is not None else None
            self._text_meta = _read_jsonl(p) if p is not None and p.exists() else [
                {"image_row": int(r)} for r in self.image_row
            ]
        return self._text_meta

    @property
    def name(self) -> str:
        """A short name for tables: the folder or file name."""
        if self.path is not None:
            return self.path.name
        return Path(self.source).name if self.source else "set"

    def label_columns(self) -> list[str]:
        """Metadata columns usable as labels (present on images or texts)."""
        cols: dict[str, None] = {}
        for meta in (self.image_meta[:1], self.text_meta[:1]):
            for row in meta:
                cols.update({k: None for k in row if k not in ("image_row",)})
        return list(cols)

    def labels(self, column: str | None = "label") -> np.ndarray | None:
        """One label per text row, from ``column`` of the text or the image metadata.

        Labels given with ``load_embeddings(labels=...)`` win. Returns None when ``column`` is
        None and no labels were given; raises GapkitError naming the available columns when the
        column does not exist.
        """
        if self._labels is not None:
            return self._labels
        if column is None:
            return None
        tm = self.text_meta
        if tm and column in tm[0]:
            return np.asarray([str(r.get(column)) for r in tm], dtype=object)
        im = self.image_meta
        if im and column in im[0]:
            per_image = [str(r.get(column)) for r in im]
            return np.asarray([per_image[int(r)] for r in self.image_row], dtype=object)
        have = ", ".join(self.label_columns()) or "none"
        raise GapkitError(
            f"no metadata column {column!r} (columns: {have})",
            path=self.path or self.source or None,
        )

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(image of each text, text): two arrays with one row per true pair."""
        if self.one_to_one:
            return self.images, self.texts
        return np.asarray(self.images)[self.image_row], self.texts

    def check(self) -> None:
        """Raise GapkitError on an empty array, NaN/inf, or an all-zero row (file and row named)."""
        for which, arr in (("images", self.images), ("texts", self.texts)):
            check_rows(arr, name=self._array_name(which))

    def _array_name(self, which: str) -> str:
        if self.path is not None:
            return str(self.path / f"{which}.npy")
        return f"{self.source or 'embeddings'} ({which})"

    def select_texts(self, text_idx: Sequence[int] | np.ndarray) -> "EmbeddingSet":
        """A new in-memory set with the given text rows and only the images they use."""
        text_idx = np.asarray(text_idx, dtype=np.int64)
        img_used, new_row = np.unique(self.image_row[text_idx], return_inverse=True)
        sub = EmbeddingSet(
            images=np.asarray(self.images[img_used]),
            texts=np.asarray(self.texts[text_idx]),
            image_row=new_row.astype(np.int64),
            info=dict(self.info),
            path=None,
            source=self.source or (str(self.path) if self.path else ""),
        )
        sub._image_meta = [self.image_meta[int(i)] for i in img_used]
        sub._text_meta = [dict(self.text_meta[int(j)], image_row=int(r)) for j, r in zip(text_idx, new_row)]
        if self._labels is not None:
            sub._labels = self._labels[text_idx]
        return sub


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def check_rows(arr: np.ndarray, name: str, start: int = 0, chunk: int = CHECK_CHUNK) -> None:
    """Raise GapkitError unless ``arr`` is a non-empty 2-D array of finite, non-zero rows.

    ``start`` offsets the row numbers in messages (for blocks of a larger array).
    """
    if arr.ndim != 2:
        raise GapkitError(f"expected a 2-D array (rows x dims), got shape {tuple(arr.shape)}", path=name)
    if arr.shape[0] == 0 and start == 0:
        raise GapkitError("empty array: no rows", path=name)
    if arr.shape[1] == 0:
        raise GapkitError("rows have 0 dimensions", path=name)
    for s in range(0, arr.shape[0], chunk):
        block = np.asarray(arr[s : s + chunk], dtype=np.float32)
        check_block(block, name, start + s)


def check_block(block: np.ndarray, name: str, start: int = 0) -> np.ndarray:
    """Check one block of rows (finite, not all zero); returns the rows' squared norms."""
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise GapkitError("contains NaN or inf", path=name, row=start + bad)
    sq = np.einsum("ij,ij->i", block, block, dtype=np.float64) if block.dtype != np.float64 else (block * block).sum(1)
    zero = sq == 0
    if zero.any():
        bad = int(np.flatnonzero(zero)[0])
        raise GapkitError("is an all-zero row and cannot be normalised", path=name, row=start + bad)
    return sq


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as err:
        raise GapkitError(f"cannot read .npy file ({err.strerror or err})", path=path) from err
    if magic != b"\x93NUMPY":  # np.load would try to unpickle it
        raise GapkitError("not a .npy file (no NumPy header)", path=path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise GapkitError("holds pickled objects, which gapkit does not load", path=path) from err
        raise GapkitError(f"not a readable .npy file ({err})", path=path) from err
    except (OSError, EOFError) as err:
        raise GapkitError(f"cannot read .npy file ({err})", path=path) from err


def is_finished(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a finished embedding set (its info.json exists)."""
    return (Path(path) / "info.json").is_file()


def open_set(path: str | os.PathLike[str]) -> EmbeddingSet:
    """Open a finished embedding set folder, memory-mapped."""
    path = Path(path)
    if not path.is_dir():
        raise GapkitError("no such embedding set folder", path=path)
    info_path = path / "info.json"
    if not info_path.is_file():
        if (path / ".shards").is_dir():
            raise GapkitError(
                "unfinished embedding set (shards but no info.json): rerun the same "
                "`gapkit embed` command to resume it",
                path=path,
            )
        raise GapkitError("not an embedding set: info.json is missing", path=path)
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GapkitError(f"unreadable info.json ({err})", path=info_path) from err
    if info.get("format") != FORMAT_NAME:
        raise GapkitError(f"not a {FORMAT_NAME} info.json", path=info_path)
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise GapkitError(
            f"format version {info.get('format_version')} is newer than this gapkit reads "
            f"({FORMAT_VERSION}); upgrade gapkit",
            path=info_path,
        )
    images = _load_npy(path / "images.npy")
    texts = _load_npy(path / "texts.npy")
    row_path = path / "image_row.npy"
    image_row = (
        np.asarray(_load_npy(row_path, mmap=False), dtype=np.int64)
        if row_path.exists()
        else np.arange(texts.shape[0], dtype=np.int64)
    )
    emb = EmbeddingSet(images=images, texts=texts, image_row=image_row, info=info, path=path, source=str(path))
    _check_shapes(emb, str(path))
    return emb


def _check_shapes(emb: EmbeddingSet, name: str) -> None:
    for which, arr in (("images", emb.images), ("texts", emb.texts)):
        if arr.ndim != 2:
            raise GapkitError(
                f"{which}: expected a 2-D array (rows x dims), got shape {tuple(arr.shape)}", path=name
            )
        if arr.shape[0] == 0:
            raise GapkitError(f"{which}: empty array, no rows", path=name)
    if emb.image_row.shape != (emb.n_texts,):
        raise GapkitError(
            f"image_row has {emb.image_row.shape[0]} entries but there are {emb.n_texts} texts", path=name
        )
    if emb.n_texts and (emb.image_row.min() < 0 or emb.image_row.max() >= emb.n_images):
        bad = int(np.flatnonzero((emb.image_row < 0) | (emb.image_row >= emb.n_images))[0])
        raise GapkitError(f"image_row points outside the {emb.n_images} images", path=name, row=bad)


def _to_numpy(value: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.dtype in (torch.bfloat16,):
                value = value.float()
            return value.numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, np.ndarray):
        return value
    raise GapkitError(f"expected an array or tensor, found {type(value).__name__}", path=name)


def _pick(mapping: dict[str, Any], keys: Sequence[str], name: str, what: str) -> Any:
    for k in keys:
        if k in mapping:
            return mapping[k]
    raise GapkitError(
        f"no {what} array; looked for keys {', '.join(keys)}; found {', '.join(map(str, mapping)) or 'none'}",
        path=name,
    )


def _read_container(path: Path) -> dict[str, Any] | np.ndarray:
    """Read .npy/.npz/.safetensors/.pt: an array, or a dict of arrays."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise GapkitError("no such file", path=path)
    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as err:
            if "pickle" in str(err).lower():
                raise GapkitError("holds pickled objects, which gapkit does not load", path=path) from err
            raise GapkitError(f"not a readable .npz file ({err})", path=path) from err
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise GapkitError(f"not a readable .npz file ({err})", path=path) from err
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types
            try:  # bf16 tensors cannot be read by the numpy backend
                from safetensors.torch import load_file as load_torch

                return {k: _to_numpy(v, str(path)) for k, v in load_torch(str(path)).items()}
            except Exception:
                raise GapkitError(f"not a readable .safetensors file ({err})", path=path) from err
    if suffix in (".pt", ".pth", ".bin"):
        import pickle

        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise GapkitError(
                "holds pickled Python objects beyond tensors; gapkit loads .pt files only with "
                "weights_only=True (save a tensor or a dict of tensors)",
                path=path,
            ) from err
        except Exception as err:
            raise GapkitError(f"not a readable torch file ({err})", path=path) from err
        if isinstance(obj, dict):
            return {str(k): _to_numpy(v, str(path)) for k, v in obj.items() if hasattr(v, "shape")}
        if isinstance(obj, (list, tuple)) and len(obj) == 2:
            return {"images": _to_numpy(obj[0], str(path)), "texts": _to_numpy(obj[1], str(path))}
        return _to_numpy(obj, str(path))
    raise GapkitError(
        "unknown file type; expected .npy, .npz, .safetensors, .pt or an embedding set folder", path=path
    )


def _single_array(path: Path) -> np.ndarray:
    data = _read_container(path)
    if isinstance(data, dict):
        arrays = {k: v for k, v in data.items() if getattr(v, "ndim", 0) == 2}
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        raise GapkitError(
            f"expected one 2-D array, found {len(arrays)} ({', '.join(arrays) or 'none'})", path=path
        )
    return data


def _load_labels(path: Path, n_texts: int) -> np.ndarray:
    if not path.exists():
        raise GapkitError("no such labels file", path=path)
    if path.suffix.lower() == ".npy":
        labels = np.asarray(_load_npy(path, mmap=False))
    elif path.suffix.lower() == ".json":
        try:
            labels = np.asarray(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise GapkitError(f"invalid JSON ({err.msg})", path=path) from err
    else:
        labels = np.asarray([line.rstrip("\n") for line in path.read_text().splitlines()])
    if labels.ndim != 1 or labels.shape[0] != n_texts:
        raise GapkitError(
            f"has {labels.shape[0] if labels.ndim else 0} labels but there are {n_texts} texts "
            "(one label per text row, one per line)",
            path=path,
        )
    return labels.astype(str).astype(object)


def _clip_retrieval(path: Path) -> EmbeddingSet:
    """clip-retrieval's output: img_emb/img_emb_*.npy and text_emb/text_emb_*.npy, row-aligned."""

    def cat(sub: str, prefix: str) -> np.ndarray:
        files = sorted((path / sub).glob(f"{prefix}_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if not files:
            raise GapkitError(f"no {prefix}_*.npy files", path=path / sub)
        arrays = [_load_npy(f) for f in files]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    images, texts = cat("img_emb", "img_emb"), cat("text_emb", "text_emb")
    emb = EmbeddingSet(images=images, texts=texts, image_row=np.arange(texts.shape[0]), source=str(path))
    if images.shape[0] != texts.shape[0]:
        raise GapkitError(
            f"img_emb has {images.shape[0]} rows but text_emb has {texts.shape[0]}", path=path
        )
    emb.info = {"source_format": "clip-retrieval"}
    return emb


def load_embeddings(
    source: str | os.PathLike[str] | None = None,
    *,
    images: str | os.PathLike[str] | np.ndarray | Any | None = None,
    texts: str | os.PathLike[str] | np.ndarray | Any | None = None,
    labels: str | os.PathLike[str] | Sequence[Any] | np.ndarray | None = None,
    image_row: Sequence[int] | np.ndarray | None = None,
) -> EmbeddingSet:
    """Load embeddings from any format gapkit reads.

    ``source`` is one of: an embedding set folder; a clip-retrieval output folder (``img_emb/``,
    ``text_emb/``); a ``.npy`` of shape (2, N, D) (image rows, then text rows, the layout Liang et
    al. released); a ``.npz``/``.safetensors``/``.pt`` holding an image and a text array (keys
    ``images``/``texts`` or the alternatives in ``IMAGE_KEYS``/``TEXT_KEYS``).

    Or give ``images`` and ``texts`` separately: files holding one 2-D array each, or arrays /
    tensors. Without ``image_row`` they must have the same number of rows (row i is a pair).

    ``labels``: one label per text row, as a file (.npy, .json list, or text with one per line)
    or a sequence.
    """
    if source is not None and (images is not None or texts is not None):
        raise GapkitError("give either one source or images and texts, not both")
    if source is not None:
        path = Path(source)
        if not path.exists():
            raise GapkitError("no such file or folder", path=path)
        if path.is_dir():
            if (path / "info.json").exists() or (path / ".shards").is_dir():
                emb = open_set(path)
            elif (path / "img_emb").is_dir() and (path / "text_emb").is_dir():
                emb = _clip_retrieval(path)
            else:
                raise GapkitError(
                    "folder is neither an embedding set (info.json) nor a clip-retrieval output "
                    "(img_emb/, text_emb/)",
                    path=path,
                )
        else:
            data = _read_container(path)
            if isinstance(data, dict) and len(data) == 1:  # e.g. np.savez(f, features) of shape (2, N, D)
                only = next(iter(data.values()))
                if getattr(only, "ndim", 0) == 3:
                    data = _to_numpy(only, str(path))
            if isinstance(data, np.ndarray):
                if data.ndim != 3 or data.shape[0] != 2:
                    raise GapkitError(
                        f"a single array must have shape (2, N, D): image rows then text rows; got "
                        f"{tuple(data.shape)}. For separate files use --images and --texts",
                        path=path,
                    )
                im, tx = data[0], data[1]
            else:
                im = _to_numpy(_pick(data, IMAGE_KEYS, str(path), "image"), str(path))
                tx = _to_numpy(_pick(data, TEXT_KEYS, str(path), "text"), str(path))
            emb = _pair_arrays(im, tx, image_row, str(path), str(path), str(path))
    else:
        if images is None or texts is None:
            raise GapkitError("need both images and texts (or one source)")
        im_name = str(images) if isinstance(images, (str, os.PathLike)) else "images"
        tx_name = str(texts) if isinstance(texts, (str, os.PathLike)) else "texts"
        im = _single_array(Path(images)) if isinstance(images, (str, os.PathLike)) else _to_numpy(images, im_name)
        tx = _single_array(Path(texts)) if isinstance(texts, (str, os.PathLike)) else _to_numpy(texts, tx_name)
        emb = _pair_arrays(im, tx, image_row, im_name, tx_name, f"{im_name}+{tx_name}")
    if labels is not None:
        if isinstance(labels, (str, os.PathLike)):
            emb._labels = _load_labels(Path(labels), emb.n_texts)
        else:
            lab = np.asarray(labels).astype(str).astype(object)
            if lab.shape != (emb.n_texts,):
                raise GapkitError(f"{lab.shape[0]} labels for {emb.n_texts} texts")
            emb._labels = lab
    return emb


def _pair_arrays(
    im: np.ndarray,
    tx: np.ndarray,
    image_row: Sequence[int] | np.ndarray | None,
    im_name: str,
    tx_name: str,
    source: str,
) -> EmbeddingSet:
    for arr, name in ((im, im_name), (tx, tx_name)):
        if arr.ndim != 2:
            raise GapkitError(f"expected a 2-D array (rows x dims), got shape {tuple(arr.shape)}", path=name)
        if arr.shape[0] == 0:
            raise GapkitError("empty array: no rows", path=name)
    if image_row is None:
        if im.shape[0] != tx.shape[0]:
            raise GapkitError(
                f"{im.shape[0]} image rows but {tx.shape[0]} text rows ({im_name}, {tx_name}); "
                "without an image_row mapping (an embedding set's image_row.npy) row i must pair "
                "with row i",
                path=source,
            )
        rows = np.arange(tx.shape[0], dtype=np.int64)
    else:
        rows = np.asarray(image_row, dtype=np.int64)
    emb = EmbeddingSet(images=im, texts=tx, image_row=rows, source=source)
    _check_shapes(emb, source)
    return emb


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _base_info(
    n_images: int, n_texts: int, d_image: int, d_text: int, dtype: str, extra: dict[str, Any] | None
) -> dict[str, Any]:
    from . import __version__

    info: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "n_images": n_images,
        "n_texts": n_texts,
        "image_dim": d_image,
        "text_dim": d_text,
        "dtype": dtype,
        "created": _now(),
        "gapkit_version": __version__,
        "skipped": [],
    }
    if extra:
        for k, v in extra.items():
            if k not in ("format", "format_version", "n_images", "n_texts", "image_dim", "text_dim", "dtype"):
                info[k] = v
    return info


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in ("float32", "float16"):
        raise GapkitError(f"dtype must be float32 or float16, not {dtype!r}")
    return np.dtype(dtype)


def write_set(
    path: str | os.PathLike[str],
    images: np.ndarray,
    texts: np.ndarray,
    *,
    image_row: Sequence[int] | np.ndarray | None = None,
    image_meta: Sequence[dict[str, Any]] | None = None,
    text_meta: Sequence[dict[str, Any]] | None = None,
    info: dict[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write an embedding set folder atomically (to a temporary folder, then renamed).

    ``info`` adds to the standard fields (encoders, dataset, skipped, ...). Raises GapkitError if
    ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    np_dtype = _check_dtype(dtype)
    images = _to_numpy(images, "images")
    texts = _to_numpy(texts, "texts")
    n_im, n_tx = images.shape[0], texts.shape[0]
    rows = np.arange(n_tx, dtype=np.int64) if image_row is None else np.asarray(image_row, dtype=np.int64)
    if image_row is None and n_im != n_tx:
        raise GapkitError(f"{n_im} images but {n_tx} texts and no image_row mapping", path=path)
    if rows.shape != (n_tx,):
        raise GapkitError(f"image_row has {rows.shape[0]} entries for {n_tx} texts", path=path)
    if image_meta is not None and len(image_meta) != n_im:
        raise GapkitError(f"{len(image_meta)} image metadata rows for {n_im} images", path=path)
    if text_meta is not None and len(text_meta) != n_tx:
        raise GapkitError(f"{len(text_meta)} text metadata rows for {n_tx} texts", path=path)
    if path.exists() and not overwrite:
        raise GapkitError("already exists (pass overwrite=True / --overwrite to replace it)", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        np.save(tmp / "images.npy", np.ascontiguousarray(images, dtype=np_dtype))
        np.save(tmp / "texts.npy", np.ascontiguousarray(texts, dtype=np_dtype))
        np.save(tmp / "image_row.npy", rows)
        _write_jsonl(tmp / "images.jsonl", image_meta if image_meta is not None else [{} for _ in range(n_im)])
        tm = (
            [dict(m, image_row=int(r)) for m, r in zip(text_meta, rows)]
            if text_meta is not None
            else [{"image_row": int(r)} for r in rows]
        )
        _write_jsonl(tmp / "texts.jsonl", tm)
        full = _base_info(n_im, n_tx, int(images.shape[1]), int(texts.shape[1]), dtype, info)
        (tmp / "info.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes an embedding set shard by shard, so that an interrupted run resumes.

    The work is cut into ``n_shards`` numbered shards by the caller (independently of the number
    of processes). Each finished shard is one ``.shards/shard-NNNNNN.npz`` file, written under a
    temporary name and renamed: it exists only when complete, so ``kill -9`` at any moment loses
    at most the shards in progress. ``finalize`` concatenates the shards in order into the
    embedding set and removes ``.shards``. Several processes (ranks) may write disjoint shards
    into the same folder; only one calls ``finalize``.

    ``plan`` (a JSON-able dict: dataset, encoders, shard size, ...) is stored in
    ``.shards/plan.json``; resuming with a different plan raises GapkitError.
    """

    def __init__(self, path: str | os.PathLike[str], plan: dict[str, Any], n_shards: int) -> None:
        self.path = Path(path)
        self.shard_dir = self.path / ".shards"
        self.n_shards = int(n_shards)
        self.plan = dict(plan, n_shards=self.n_shards)
        if is_finished(self.path):
            raise GapkitError("already a finished embedding set (use --overwrite to redo it)", path=self.path)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.shard_dir / "plan.json"
        plan_text = json.dumps(self.plan, indent=2, sort_keys=True, default=str)
        if plan_path.exists():
            old = json.loads(plan_path.read_text())
            if old != json.loads(plan_text):
                diff = sorted(k for k in set(old) | set(self.plan) if old.get(k) != json.loads(plan_text).get(k))
                raise GapkitError(
                    f"an unfinished run with different settings is here (differs in: {', '.join(diff)}); "
                    "rerun with the same settings to resume, or --overwrite to start over",
                    path=self.path,
                )
        else:
            atomic_write_bytes(plan_path, plan_text.encode())

    def shard_path(self, k: int) -> Path:
        return self.shard_dir / f"shard-{k:06d}.npz"

    def done(self, k: int) -> bool:
        """True when shard ``k`` was finished (by this or an earlier run)."""
        return self.shard_path(k).exists()

    def n_done(self) -> int:
        return sum(self.done(k) for k in range(self.n_shards))

    def write(
        self,
        k: int,
        images: np.ndarray,
        texts: np.ndarray,
        image_row: np.ndarray,
        image_meta: Sequence[dict[str, Any]],
        text_meta: Sequence[dict[str, Any]],
        skipped: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Store shard ``k``. ``image_row`` indexes ``images`` of this shard (local rows)."""
        if not 0 <= k < self.n_shards:
            raise ValueError(f"shard {k} outside 0..{self.n_shards - 1}")
        tmp = self.shard_dir / f".shard-{k:06d}.tmp-{os.getpid()}.npz"
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                images=np.asarray(images, dtype=np.float32),
                texts=np.asarray(texts, dtype=np.float32),
                image_row=np.asarray(image_row, dtype=np.int64),
                meta=np.asarray(
                    json.dumps(
                        {"images": list(image_meta), "texts": list(text_meta), "skipped": list(skipped)},
                        ensure_ascii=False,
                        default=str,
                    )
                ),
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.shard_path(k))

    def _read(self, k: int) -> dict[str, Any]:
        p = self.shard_path(k)
        try:
            with np.load(p, allow_pickle=False) as z:
                out = {key: z[key] for key in ("images", "texts", "image_row")}
                out["meta"] = json.loads(str(z["meta"]))
        except Exception as err:
            raise GapkitError(f"unreadable shard ({err}); delete it to recompute it", path=p) from err
        return out

    def finalize(self, info: dict[str, Any] | None = None, dtype: str = "float32") -> Path:
        """Merge all shards (in shard order) into the embedding set; returns its path."""
        np_dtype = _check_dtype(dtype)
        missing = [k for k in range(self.n_shards) if not self.done(k)]
        if missing:
            raise GapkitError(f"{len(missing)} shards are not finished (first: {missing[0]})", path=self.path)
        n_im = n_tx = 0
        d_im = d_tx = None
        for k in range(self.n_shards):  # first pass: shapes only (npz headers)
            try:
                with np.load(self.shard_path(k), allow_pickle=False) as z:
                    a, b = z["images"], z["texts"]
            except Exception as err:
                raise GapkitError(
                    f"unreadable shard ({err}); delete it to recompute it", path=self.shard_path(k)
                ) from err
            n_im += a.shape[0]
            n_tx += b.shape[0]
            if a.shape[0]:
                d_im = a.shape[1]
            if b.shape[0]:
                d_tx = b.shape[1]
        if n_im == 0 or n_tx == 0 or d_im is None or d_tx is None:
            raise GapkitError("no pairs were embedded (all skipped or empty dataset)", path=self.path)
        tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=self.path))
        im_out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np_dtype, shape=(n_im, d_im))
        tx_out = np.lib.format.open_memmap(tmp / "texts.npy", mode="w+", dtype=np_dtype, shape=(n_tx, d_tx))
        rows = np.empty(n_tx, dtype=np.int64)
        skipped: list[dict[str, Any]] = []
        oi = ot = 0
        with open(tmp / "images.jsonl", "w", encoding="utf-8") as fim, open(
            tmp / "texts.jsonl", "w", encoding="utf-8"
        ) as ftx:
            for k in range(self.n_shards):
                s = self._read(k)
                a, b, r = s["images"], s["texts"], s["image_row"]
                im_out[oi : oi + len(a)] = a
                tx_out[ot : ot + len(b)] = b
                rows[ot : ot + len(b)] = r + oi
                for m in s["meta"]["images"]:
                    fim.write(json.dumps(m, ensure_ascii=False, default=str) + "\n")
                for m, rr in zip(s["meta"]["texts"], r):
                    ftx.write(json.dumps(dict(m, image_row=int(rr) + oi), ensure_ascii=False, default=str) + "\n")
                skipped.extend(s["meta"]["skipped"])
                oi += len(a)
                ot += len(b)
        im_out.flush()
        tx_out.flush()
        del im_out, tx_out
        np.save(tmp / "image_row.npy", rows)
        extra = dict(info or {})
        extra["skipped"] = skipped
        full = _base_info(n_im, n_tx, int(d_im), int(d_tx), dtype, extra)
        for name in ("images.npy", "texts.npy", "image_row.npy", "images.jsonl", "texts.jsonl"):
            os.replace(tmp / name, self.path / name)
        atomic_write_bytes(self.path / "info.json", (json.dumps(full, indent=2, default=str) + "\n").encode())
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.shard_dir, ignore_errors=True)
        return self.path


def iter_blocks(arr: np.ndarray, chunk: int = CHECK_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, float32 block) over ``arr`` in chunks, reading a memory-map piece by piece."""
    for s in range(0, arr.shape[0], chunk):
        yield s, np.asarray(arr[s : s + chunk], dtype=np.float32)
