"""Readers for paired image-text datasets: (image, captions, metadata) records.

Four layouts are read, detected automatically (``format=`` forces one):

``imagefolder``
    A Hugging Face imagefolder: ``metadata.jsonl`` or ``metadata.csv`` at the root with a
    ``file_name`` column (the image, relative to the root) and a text column (``text``,
    ``caption`` or ``captions``, or ``text_column=``). Every other column is kept as metadata.
``sidecar``
    Images with a caption file beside them, searched recursively: ``a/b.jpg`` pairs with
    ``a/b.txt`` (or ``a/b.jpg.txt``). The whole ``.txt`` file, stripped, is one caption.
``manifest``
    A CSV, TSV (also ``.txt``) or JSON-lines / JSON file with an image column and a text column;
    paths are relative to the manifest's folder (or ``image_root=``). ``columns=`` names the
    columns of a header-less CSV/TSV and ``image_template=`` builds the path from the column's
    value, so ROCO's ``id<TAB>caption`` with ``images/<id>.jpg`` is
    ``columns=["id", "caption"], image_column="id", image_template="images/{}.jpg"``.
``webdataset``
    WebDataset tar shards: one ``.tar`` file, a folder of them, a brace pattern
    ``data-{000..009}.tar`` or a glob. Members sharing a key (``dir/name`` up to the first dot)
    form a sample: the image is ``.jpg``/``.jpeg``/``.png``/``.webp``, the caption ``.txt`` or a
    field (``caption``, ``text``, ``captions`` or ``text_column=``) of ``.json``.

The same image on several rows becomes one :class:`ImageRecord` with several captions (in order
of first appearance). Image paths must stay inside the dataset root; a path that leaves it is
refused at open time, naming the row. Images are read only by :meth:`PairedDataset.load_image`
(in DataLoader workers), so a missing or broken image is reported there, as an
:class:`ImageLoadError` that names the file, the record and the reason; empty captions are kept
(the embedding pipeline decides whether to stop or skip).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import posixpath
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import GapkitError
from .progress import Reporter, ensure

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageRecord",
    "PairedDataset",
    "detect_format",
    "expand_shards",
    "open_dataset",
    "to_rgb",
]

#: the layouts open_dataset reads
FORMATS = ("imagefolder", "sidecar", "manifest", "webdataset")
#: file extensions treated as images in sidecar folders
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: text columns tried, in order, when text_column is not given (imagefolder, manifest)
TEXT_COLUMNS = ("text", "caption", "captions")
#: image columns tried, in order, when image_column is not given (manifest)
IMAGE_COLUMNS = ("file_name", "image", "image_path", "path", "filepath", "filename", "file", "img")
#: image member extensions tried, in order, in a WebDataset sample
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
#: caption fields tried, in order, in a WebDataset sample's .json
JSON_CAPTION_FIELDS = ("caption", "text", "captions")
#: small text members of a WebDataset sample kept as metadata (besides the .json fields)
WDS_META_KEYS = ("cls", "label")

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".ndjson", ".txt")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's key/extension split


# --------------------------------------------------------------------------------------------
# records and errors
# --------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """One image and its captions.

    ``meta`` holds the other columns of the image's first row; ``text_meta[k]`` holds, for
    caption ``k``, the columns whose value differs between rows of one image somewhere in the
    dataset (per-caption columns such as a caption id); it is ``{}`` when there are none.
    """

    image_id: str
    source: str
    texts: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    text_meta: list[dict[str, Any]] = field(default_factory=list)
    #: line of the table (manifest / metadata file) where the image first appears, 1-based
    line: int | None = None
    #: where the bytes are: None for a file under the root; (shard, offset, size) in a tar
    location: tuple[int, int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.text_meta:
            self.text_meta = [{} for _ in self.texts]


class ImageLoadError(GapkitError):
    """An image that cannot be read: ``reason`` is "missing", "truncated" or "undecodable".

    ``index`` is the record's position in the dataset, ``image_id`` its id; ``str(err)`` is one
    line naming the file, the record and what is wrong.
    """

    def __init__(self, message: str, *, path: str, reason: str, index: int, image_id: str) -> None:
        self.reason = reason
        self.index = index
        self.image_id = image_id
        super().__init__(message, path=path)

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the fields across DataLoader workers
        return (
            _rebuild_load_error,
            (self.message, self.path, self.reason, self.index, self.image_id),
        )


def _rebuild_load_error(message: str, path: str, reason: str, index: int, image_id: str) -> ImageLoadError:
    return ImageLoadError(message, path=path, reason=reason, index=index, image_id=image_id)


# --------------------------------------------------------------------------------------------
# image conversion
# --------------------------------------------------------------------------------------------

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB, as image encoders expect.

    - RGB: returned as is.
    - With transparency (RGBA, LA, PA, or P / L / RGB with a transparent colour): composited on
      a white background.
    - 16-bit and 32-bit grayscale (I;16*, I) and float (F): rescaled linearly from the image's
      own minimum..maximum to 0..255 (what a viewer shows; 12-bit CT or X-ray stored in 16 bits
      would otherwise be near black, and Pillow's own conversion clips at 255, leaving it
      white), then replicated to three channels. A constant image becomes black.
    - L, 1, P, CMYK, YCbCr, HSV and others: Pillow's conversion.
    """
    mode = img.mode
    if mode == "RGB" and img.info.get("transparency") is None:
        return img
    if mode in _ALPHA_MODES or (
        mode in ("P", "L", "RGB") and img.info.get("transparency") is not None
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(img).astype(np.float64)
        finite = np.isfinite(arr)
        if finite.any():
            lo, hi = float(arr[finite].min()), float(arr[finite].max())
        else:
            lo = hi = 0.0
        arr = np.where(finite, arr, lo)
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        u8 = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(u8, mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise GapkitError(f"cannot convert an image of mode {mode} to RGB ({err})") from err


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


class PairedDataset:
    """A paired image-text dataset: a list of :class:`ImageRecord` and a way to load images.

    ``len(ds)`` is the number of images, ``ds.n_texts`` the number of captions, ``ds[i]`` the
    i-th record, ``ds.load_image(i)`` its image as RGB. Pickle-able: tar shards are opened
    lazily in each process (DataLoader workers included) and never shared between processes.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        format: str,
        records: list[ImageRecord],
        *,
        path: str | None = None,
        shards: Sequence[str] = (),
        table: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.format = format
        self.records = records
        #: what the user pointed at (folder, manifest file, shard pattern)
        self.path = path if path is not None else str(self.root)
        #: tar shard paths relative to root (webdataset)
        self.shards = list(shards)
        #: the manifest / metadata file the rows come from (manifest, imagefolder)
        self.table = table
        self.details = dict(details or {})
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    # ---- sequence protocol
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"PairedDataset({self.format}, {self.path!r}, {len(self)} images, {self.n_texts} texts)"

    @property
    def n_texts(self) -> int:
        """Number of captions over all images."""
        return sum(len(r.texts) for r in self.records)

    def subset(self, indices: Iterable[int]) -> "PairedDataset":
        """A dataset with the records at ``indices`` (in that order), sharing the same files."""
        sub = PairedDataset(
            self.root,
            self.format,
            [self.records[int(i)] for i in indices],
            path=self.path,
            shards=self.shards,
            table=self.table,
            details=self.details,
        )
        return sub

    # ---- pickling: file handles stay in their process
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close the tar shards this process opened (they reopen on the next load_image)."""
        for h in self._handles.values():
            try:
                if isinstance(h, int):
                    os.close(h)
                else:
                    h.close()
            except OSError:
                pass
        self._handles = {}

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if getattr(self, "_pid", None) == os.getpid():
                self.close()
        except Exception:
            pass

    # ---- describing
    def describe(self) -> dict[str, Any]:
        """JSON-able summary for info.json: root, format, path, columns, counts."""
        out: dict[str, Any] = {
            "format": self.format,
            "path": self.path,
            "root": str(self.root),
            "n_images": len(self),
            "n_texts": self.n_texts,
        }
        out.update(self.details)
        if self.shards:
            out["shards"] = list(self.shards)
        return out

    def where(self, i: int) -> str:
        """Where record ``i``'s image is: an absolute path, or ``shard.tar::member``."""
        return str(self.root / self.records[i].source)

    def _origin(self, rec: ImageRecord, i: int) -> str:
        if self.table is not None and rec.line is not None:
            return f"record {i}, {Path(self.table).name} row {rec.line}"
        return f"record {i}, id {rec.image_id!r}"

    # ---- loading
    def check_files(self) -> list[tuple[int, str]]:
        """(index, reason) of every image file that is missing or empty, without decoding.

        One ``stat`` per image (fast even for 10^5 files); tar members always exist. Lets the
        pipeline stop before any work under ``--on-error fail``.
        """
        bad: list[tuple[int, str]] = []
        if self.format == "webdataset":
            for k, shard in enumerate(self.shards):
                if not (self.root / shard).is_file():
                    bad.extend((i, "missing") for i, r in enumerate(self.records) if r.location and r.location[0] == k)
            return bad
        for i, rec in enumerate(self.records):
            try:
                st = os.stat(self.root / rec.source)
            except FileNotFoundError:
                bad.append((i, "missing"))
                continue
            except OSError as err:
                bad.append((i, f"unreadable ({err.strerror or err})"))
                continue
            if not os.path.isfile(self.root / rec.source):
                bad.append((i, "not a file"))
            elif st.st_size == 0:
                bad.append((i, "empty file"))
        return bad

    def load_bytes(self, i: int) -> bytes:
        """The raw (encoded) bytes of record ``i``'s image; ImageLoadError when missing."""
        rec = self.records[i]
        where = self.where(i)
        try:
            if rec.location is None:
                with open(self.root / rec.source, "rb") as fh:
                    return fh.read()
            return self._read_member(rec.location)
        except FileNotFoundError as err:
            raise self._error(rec, i, where, "missing", "image file is missing") from err
        except IsADirectoryError as err:
            raise self._error(rec, i, where, "undecodable", "is a folder, not an image file") from err
        except _TruncatedMember as err:
            raise self._error(rec, i, where, "truncated", f"truncated image: {err}") from err
        except OSError as err:
            raise self._error(rec, i, where, "undecodable", f"cannot read ({err.strerror or err})") from err

    def load_image(self, i: int) -> Image.Image:
        """Record ``i``'s image, decoded, EXIF-rotated and converted with :func:`to_rgb`.

        Raises :class:`ImageLoadError` (a GapkitError) naming the file and the record for a
        missing, truncated or undecodable image.
        """
        rec = self.records[i]
        where = self.where(i)
        if rec.location is None:
            source: Any = self.root / rec.source
        else:
            source = io.BytesIO(self.load_bytes(i))
        try:
            with Image.open(source) as im:
                im.load()
                if "exif" in im.info or im.format in ("TIFF", "MPO"):  # rotate as EXIF says
                    ImageOps.exif_transpose(im, in_place=True)
            return to_rgb(im)
        except FileNotFoundError as err:
            raise self._error(rec, i, where, "missing", "image file is missing") from err
        except IsADirectoryError as err:
            raise self._error(rec, i, where, "undecodable", "is a folder, not an image file") from err
        except UnidentifiedImageError as err:
            raise self._error(rec, i, where, "undecodable", "not an image Pillow can decode") from err
        except Image.DecompressionBombError as err:
            raise self._error(rec, i, where, "undecodable", f"image too large: {err}") from err
        except GapkitError as err:
            raise self._error(rec, i, where, "undecodable", err.message) from err
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as err:
            text = str(err)
            if "truncated" in text.lower() or isinstance(err, EOFError):
                raise self._error(rec, i, where, "truncated", f"truncated image: {text}") from err
            raise self._error(rec, i, where, "undecodable", f"cannot decode image: {text or type(err).__name__}") from err

    def _error(self, rec: ImageRecord, i: int, where: str, reason: str, what: str) -> ImageLoadError:
        return ImageLoadError(
            f"{what}; {self._origin(rec, i)}", path=where, reason=reason, index=i, image_id=rec.image_id
        )

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():  # forked: never share a descriptor's offset with the parent
            self._handles = {}
            self._pid = os.getpid()
        h = self._handles.get(shard)
        if h is None:
            path = self.root / self.shards[shard]
            if _compressed(path.name):
                h = _open_compressed(path)
            elif hasattr(os, "pread"):
                h = os.open(path, os.O_RDONLY)  # pread: no shared file offset
            else:  # pragma: no cover - Windows
                h = open(path, "rb")
            self._handles[shard] = h
        return h

    def _read_member(self, location: tuple[int, int, int]) -> bytes:
        shard, offset, size = location
        h = self._handle(shard)
        if isinstance(h, int):
            data = os.pread(h, size, offset)
        else:
            h.seek(offset)
            data = h.read(size)
        if len(data) < size:
            raise _TruncatedMember(f"the shard ends after {len(data)} of its {size} bytes")
        return data


class _TruncatedMember(OSError):
    """A tar member whose bytes run past the end of its shard."""


def _open_compressed(path: Path) -> Any:
    import bz2
    import gzip
    import lzma

    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    return gzip.open(path, "rb")


# --------------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------------


def _is_pattern(spec: str) -> bool:
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", spec)) or any(c in spec for c in "*?[")


def _compressed(name: str) -> bool:
    return name.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(_TAR_SUFFIXES)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The layout of ``path``: "webdataset", "manifest", "imagefolder" or "sidecar".

    Order: a tar file, a shard pattern or a folder of tar files -> webdataset; another file
    -> manifest; a folder with metadata.jsonl / metadata.csv -> imagefolder; a folder with
    images that have .txt captions beside them -> sidecar. Raises GapkitError naming what was
    looked for otherwise.
    """
    spec = os.fspath(path)
    p = Path(spec)
    if not p.exists():
        if _is_pattern(spec):
            return "webdataset"
        raise GapkitError("no such file or folder", path=spec)
    if p.is_file():
        if _is_tar_name(p.name):
            return "webdataset"
        if p.suffix.lower() in _MANIFEST_SUFFIXES:
            return "manifest"
        raise GapkitError(
            f"not a dataset file gapkit knows (a manifest {', '.join(_MANIFEST_SUFFIXES)}, or a .tar shard); "
            "--format manifest reads it as CSV/TSV",
            path=spec,
        )
    if any((p / m).is_file() for m in _METADATA_FILES):
        return "imagefolder"
    if _first_sidecar_pair(p) is not None:
        return "sidecar"
    if any(_is_tar_name(c.name) and c.is_file() for c in p.iterdir()):
        return "webdataset"
    hint = ""
    splits = sorted(c.name for c in p.iterdir() if c.is_dir() and any((c / m).is_file() for m in _METADATA_FILES))
    if splits:
        hint = f"; the subfolders {', '.join(splits)} hold one: point at one of them"
    raise GapkitError(
        "no paired dataset found: looked for metadata.jsonl or metadata.csv (imagefolder), "
        "images with a .txt caption beside them (sidecar) and .tar shards (webdataset); "
        "for a CSV/TSV/JSONL manifest, pass the file itself" + hint,
        path=spec,
    )


def open_dataset(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    image_template: str | None = None,
    columns: Sequence[str] | str | None = None,
    image_root: str | os.PathLike[str] | None = None,
    reporter: Reporter | None = None,
) -> PairedDataset:
    """Open a paired image-text dataset (layout detected by :func:`detect_format` or forced).

    ``text_column`` / ``image_column`` choose the caption and image columns (imagefolder,
    manifest; for webdataset, the caption's member extension or .json field and the image's
    member extension). ``label_column`` copies a column into ``meta["label"]`` (sidecar: only
    "folder", the image's folder relative to the root). ``limit`` keeps the first N images.
    Manifest only: ``columns`` names the columns of a CSV/TSV without a header line;
    ``image_template`` builds the image path from the image column's value (``{}``) and the
    row's columns (``{name}``); ``image_root`` is the folder paths are relative to (default:
    the manifest's folder). Raises GapkitError on structural problems (no text column, a row
    without an image path, a path that leaves the root, no pairs at all).
    """
    spec = os.fspath(path)
    if format is not None and format not in FORMATS:
        raise GapkitError(f"unknown dataset format {format!r} (choose from {', '.join(FORMATS)})")
    if limit is not None and int(limit) < 1:
        raise GapkitError(f"limit must be at least 1, not {limit}")
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    fmt = format or detect_format(spec)
    if fmt not in ("manifest", "imagefolder"):
        for name, value in (("image_template", image_template), ("columns", columns)):
            if value is not None:
                raise GapkitError(f"{name} applies to manifests and imagefolders, not to {fmt} datasets", path=spec)
    if fmt not in ("manifest",) and image_root is not None:
        raise GapkitError(f"image_root applies to manifests, not to {fmt} datasets", path=spec)
    reporter = ensure(reporter)
    if fmt == "imagefolder":
        ds = _open_imagefolder(spec, text_column, image_column, label_column, limit, image_template, columns)
    elif fmt == "manifest":
        ds = _open_manifest(
            spec, text_column, image_column, label_column, limit, image_template, columns, image_root
        )
    elif fmt == "sidecar":
        if text_column is not None or image_column is not None:
            raise GapkitError("sidecar datasets have no columns to choose (captions are the .txt files)", path=spec)
        ds = _open_sidecar(spec, label_column, limit, reporter)
    else:
        ds = _open_webdataset(spec, text_column, image_column, label_column, limit, reporter)
    if len(ds) == 0:
        raise GapkitError("no image-text pairs found", path=spec)
    if limit is not None:
        ds.details["limit"] = int(limit)
    return ds


# ---- tables (CSV / TSV / JSON lines / JSON)


def _read_table(path: Path, names: Sequence[str] | None) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line, row) pairs and the column names of a CSV/TSV/JSONL/JSON file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise GapkitError("no such file", path=path)
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            if names is not None:
                raise GapkitError("columns (--columns) applies to CSV/TSV files without a header, not JSON", path=path)
            return _read_json_rows(path)
        return _read_csv_rows(path, names)
    except UnicodeDecodeError as err:
        raise GapkitError(f"not UTF-8 text ({err.reason} at byte {err.start})", path=path) from err


def _read_json_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    cols: dict[str, None] = {}
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise GapkitError(f"invalid JSON ({err.msg})", path=path, row=err.lineno) from err
        items: Iterable[tuple[int, Any]] = enumerate(data, start=1)
    else:
        def _lines() -> Iterator[tuple[int, Any]]:
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    raise GapkitError(f"invalid JSON ({err.msg})", path=path, row=n) from err

        items = _lines()
    for n, obj in items:
        if not isinstance(obj, dict):
            raise GapkitError(f"expected a JSON object, found {type(obj).__name__}", path=path, row=n)
        cols.update(dict.fromkeys(obj))
        rows.append((n, obj))
    return rows, list(cols)


def _read_csv_rows(path: Path, names: Sequence[str] | None) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        first = fh.readline()
        fh.seek(0)
        if path.suffix.lower() == ".csv":
            delim = ","
        elif path.suffix.lower() == ".tsv":
            delim = "\t"
        else:
            delim = "\t" if "\t" in first else ","
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = csv.reader(fh, delimiter=delim)
        header: list[str] | None = [str(c).strip() for c in names] if names is not None else None
        rows: list[tuple[int, dict[str, Any]]] = []
        start = 1
        try:
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields or all(not f.strip() for f in fields):
                    continue
                if header is None:
                    header = [f.strip() for f in fields]
                    if len(set(header)) != len(header):
                        dup = sorted({h for h in header if header.count(h) > 1})
                        raise GapkitError(f"duplicate column names in the header: {', '.join(dup)}", path=path, row=line)
                    continue
                if len(fields) != len(header):
                    raise GapkitError(
                        f"{len(fields)} fields, but the header has {len(header)} ({', '.join(header)}); "
                        "quote fields that contain the delimiter",
                        path=path,
                        row=line,
                    )
                rows.append((line, dict(zip(header, fields))))
        except csv.Error as err:
            raise GapkitError(f"malformed CSV ({err})", path=path, row=reader.line_num) from err
    return rows, list(header or [])


def _inside(root: Path, value: str, table: Path | str, line: int | None) -> str:
    """``value`` as a normalised POSIX path relative to ``root``; GapkitError when it leaves it."""
    if "://" in value:
        raise GapkitError(f"image path {value!r} is a URL; download the images and use local paths", path=table, row=line)
    if os.path.isabs(value):
        ap = os.path.normpath(value)
        rr = os.path.normpath(str(root))
        if not ap.startswith(rr.rstrip(os.sep) + os.sep):
            raise GapkitError(f"image path {value!r} leaves the dataset root {rr}", path=table, row=line)
        rel = os.path.relpath(ap, rr)
    else:
        rel = os.path.normpath(value)
    rel = Path(rel).as_posix()
    if rel in (".", "") or rel == ".." or rel.startswith("../"):
        if rel in (".", ""):
            raise GapkitError(f"image path {value!r} names the dataset root, not a file", path=table, row=line)
        raise GapkitError(f"image path {value!r} leaves the dataset root {root}", path=table, row=line)
    return rel


def _texts_of(value: Any) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, (list, tuple)):
        return [("" if v is None else str(v)).strip() for v in value] or [""]
    return [str(value).strip()]


def _pick_column(given: str | None, choices: Sequence[str], cols: Sequence[str], what: str, option: str,
                 table: Path, hint: str = "") -> str:
    if given is not None:
        if given not in cols:
            raise GapkitError(
                f"no {what} column {given!r} (columns: {', '.join(cols) or 'none'}){hint}", path=table
            )
        return given
    for c in choices:
        if c in cols:
            return c
    raise GapkitError(
        f"no {what} column: looked for {', '.join(choices)}; columns are {', '.join(cols) or 'none'}; "
        f"choose one with {option}{hint}",
        path=table,
    )


def _group_table(
    table: Path,
    root: Path,
    rows: list[tuple[int, dict[str, Any]]],
    cols: list[str],
    image_col: str,
    text_col: str,
    label_col: str | None,
    template: str | None,
    limit: int | None,
) -> tuple[list[ImageRecord], list[str], list[str]]:
    """Rows -> records (one per distinct image path), image meta columns, text meta columns."""
    groups: dict[str, dict[str, Any]] = {}
    for line, row in rows:
        raw = row.get(image_col)
        if isinstance(raw, dict):  # Hugging Face exports: {"path": ..., "bytes": ...}
            raw = raw.get("path")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise GapkitError(f"no image path (column {image_col!r} is empty)", path=table, row=line)
        value = str(raw).strip()
        if template is not None:
            try:
                value = template.format(value, **{str(k): v for k, v in row.items()})
            except (KeyError, IndexError, ValueError) as err:
                raise GapkitError(f"image template {template!r} does not apply to this row ({err})", path=table, row=line) from err
        rel = _inside(root, value, table, line)
        # the image column is the id (image_id) unless a template built the path from it
        skip = (text_col,) if template is not None else (image_col, text_col)
        extra = {k: v for k, v in row.items() if k not in skip}
        if label_col is not None:
            extra["label"] = row.get(label_col)
        texts = _texts_of(row.get(text_col))
        g = groups.get(rel)
        if g is None:
            if limit is not None and len(groups) >= limit:
                continue
            g = groups[rel] = {"line": line, "texts": [], "rows": []}
        g["texts"].extend(texts)
        g["rows"].extend([extra] * len(texts))
    # per-caption columns: those whose value differs between the rows of one image
    varying: dict[str, None] = {}
    meta_cols: dict[str, None] = {}
    for g in groups.values():
        first = g["rows"][0]
        meta_cols.update(dict.fromkeys(first))
        for other in g["rows"][1:]:
            for k in set(first) | set(other):
                if k not in varying and first.get(k) != other.get(k):
                    varying[k] = None
    text_cols = [c for c in cols if c in varying] + [c for c in varying if c not in cols]
    records = [
        ImageRecord(
            image_id=rel,
            source=rel,
            texts=g["texts"],
            meta=dict(g["rows"][0]),
            text_meta=[{c: r.get(c) for c in text_cols} for r in g["rows"]],
            line=g["line"],
        )
        for rel, g in groups.items()
    ]
    return records, list(meta_cols), text_cols


def _open_table(
    spec: str,
    fmt: str,
    table: Path,
    root: Path,
    text_column: str | None,
    image_column: str | None,
    label_column: str | None,
    limit: int | None,
    template: str | None,
    names: Sequence[str] | None,
    image_choices: Sequence[str],
) -> PairedDataset:
    rows, cols = _read_table(table, names)
    if not rows:
        raise GapkitError("no rows", path=table)
    hint = "" if names is not None or table.suffix.lower() in (".jsonl", ".json", ".ndjson") else (
        "; if the file has no header line, name its columns with --columns"
    )
    text_col = _pick_column(text_column, TEXT_COLUMNS, cols, "text", "--text-column", table, hint)
    image_col = _pick_column(image_column, image_choices, cols, "image", "--image-column", table, hint)
    if image_col == text_col:
        raise GapkitError(f"the image and text columns are both {image_col!r}", path=table)
    if label_column is not None and label_column not in cols:
        raise GapkitError(f"no label column {label_column!r} (columns: {', '.join(cols)})", path=table)
    records, meta_cols, text_cols = _group_table(
        table, root, rows, cols, image_col, text_col, label_column, template, limit
    )
    details = {
        "table": str(table),
        "columns": {
            "image": image_col,
            "text": text_col,
            "label": label_column,
            "image_template": template,
            "image_meta": meta_cols,
            "text_meta": text_cols,
        },
        "n_rows": len(rows),
    }
    return PairedDataset(root, fmt, records, path=spec, table=str(table), details=details)


def _open_imagefolder(
    spec: str,
    text_column: str | None,
    image_column: str | None,
    label_column: str | None,
    limit: int | None,
    template: str | None,
    names: Sequence[str] | None,
) -> PairedDataset:
    root = Path(os.path.abspath(spec))
    if not root.is_dir():
        raise GapkitError("an imagefolder dataset is a folder with metadata.jsonl or metadata.csv", path=spec)
    found = [root / m for m in _METADATA_FILES if (root / m).is_file()]
    if not found:
        raise GapkitError("no metadata.jsonl or metadata.csv in this imagefolder", path=spec)
    if len(found) > 1:
        raise GapkitError("both metadata.jsonl and metadata.csv are here; keep one", path=spec)
    return _open_table(
        spec, "imagefolder", found[0], root, text_column, image_column, label_column, limit, template, names,
        ("file_name",),
    )


def _open_manifest(
    spec: str,
    text_column: str | None,
    image_column: str | None,
    label_column: str | None,
    limit: int | None,
    template: str | None,
    names: Sequence[str] | None,
    image_root: str | os.PathLike[str] | None,
) -> PairedDataset:
    table = Path(os.path.abspath(spec))
    if table.is_dir():
        raise GapkitError("a manifest is a CSV, TSV or JSON-lines file, not a folder", path=spec)
    if table.is_file() and _is_tar_name(table.name):
        raise GapkitError("a tar file is a webdataset shard, not a manifest", path=spec)
    root = Path(os.path.abspath(image_root)) if image_root is not None else table.parent
    if image_root is not None and not root.is_dir():
        raise GapkitError("image root is not a folder", path=image_root)
    return _open_table(
        spec, "manifest", table, root, text_column, image_column, label_column, limit, template, names,
        IMAGE_COLUMNS,
    )


# ---- sidecar


def _visible_walk(root: Path) -> Iterator[tuple[str, list[str]]]:
    """(folder relative to root in POSIX form, sorted visible file names), folders sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(os.path.relpath(dirpath, root)).as_posix()
        yield ("" if rel == "." else rel), sorted(f for f in filenames if not f.startswith("."))


def _caption_file(name: str, files: set[str]) -> str | None:
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
        return None
    for cand in (name + ".txt", stem + ".txt"):
        if cand in files:
            return cand
    return None


def _first_sidecar_pair(root: Path) -> str | None:
    for rel, files in _visible_walk(root):
        fs = set(files)
        for f in files:
            if _caption_file(f, fs) is not None:
                return posixpath.join(rel, f)
    return None


def _open_sidecar(spec: str, label_column: str | None, limit: int | None, reporter: Reporter) -> PairedDataset:
    root = Path(os.path.abspath(spec))
    if not root.is_dir():
        raise GapkitError("a sidecar dataset is a folder of images with .txt captions beside them", path=spec)
    if label_column is not None and label_column != "folder":
        raise GapkitError(
            f"sidecar datasets have one metadata column, 'folder', not {label_column!r}", path=spec
        )
    pairs: list[tuple[str, str]] = []
    unpaired = 0
    used_txt: set[str] = set()
    n_txt = 0
    for rel, files in _visible_walk(root):
        fs = set(files)
        for f in files:
            if f.lower().endswith(".txt"):
                n_txt += 1
                continue
            if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            cap = _caption_file(f, fs)
            if cap is None:
                unpaired += 1
                continue
            pairs.append((posixpath.join(rel, f), posixpath.join(rel, cap)))
            used_txt.add(posixpath.join(rel, cap))
    pairs.sort()
    n_pairs = len(pairs)
    if limit is not None:
        pairs = pairs[: int(limit)]
    records = []
    with reporter.task("reading captions", total=len(pairs), unit="files") as task:
        for img_rel, txt_rel in pairs:
            txt_path = root / txt_rel
            try:
                text = txt_path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as err:
                raise GapkitError(f"caption is not UTF-8 text ({err.reason} at byte {err.start})", path=txt_path) from err
            except OSError as err:
                raise GapkitError(f"cannot read caption ({err.strerror or err})", path=txt_path) from err
            folder = posixpath.dirname(img_rel)
            meta: dict[str, Any] = {"folder": folder, "caption_file": txt_rel}
            if label_column == "folder":
                meta["label"] = folder
            records.append(ImageRecord(image_id=img_rel, source=img_rel, texts=[text.strip()], meta=meta))
            task.advance()
    if unpaired:
        reporter.note(f"{unpaired} images without a .txt caption beside them were left out")
    details = {
        "columns": {"label": label_column, "image_meta": ["folder", "caption_file"], "text_meta": []},
        "n_pairs_found": n_pairs,
        "unpaired_images": unpaired,
        "unused_txt_files": n_txt - len(used_txt),
    }
    return PairedDataset(root, "sidecar", records, path=spec, details=details)


# ---- webdataset


def _expand_braces(spec: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero-padded as written) and ``{a,b}`` lists, left to right."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if m is None:
        return [spec]
    head, body, tail = spec[: m.start()], m.group(1), spec[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        lo, hi = int(a), int(b)
        width = max(len(a), len(b)) if (a.lstrip("-").startswith("0") and len(a.lstrip("-")) > 1) or (
            b.lstrip("-").startswith("0") and len(b.lstrip("-")) > 1
        ) else 0
        step = 1 if hi >= lo else -1
        items = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # a literal brace: keep it and expand what follows
        return [head + "{" + body + "}" + rest for rest in _expand_braces(tail)]
    out = []
    for item in items:
        for rest in _expand_braces(head + item + tail):
            out.append(rest)
    return out


def expand_shards(spec: str | os.PathLike[str]) -> list[Path]:
    """The tar shards named by ``spec``: a file, a folder (its tar files), a brace pattern or a glob.

    Raises GapkitError naming the first shard that does not exist.
    """
    spec = os.fspath(spec)
    p = Path(spec)
    if p.is_dir():
        shards = sorted(c for c in p.iterdir() if c.is_file() and _is_tar_name(c.name))
        if not shards:
            raise GapkitError("no .tar shards in this folder", path=spec)
        return shards
    if p.is_file():
        return [p]
    out: list[Path] = []
    for s in _expand_braces(spec):
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s))
            if not hits:
                raise GapkitError("no shard matches this pattern", path=s)
            out.extend(Path(h) for h in hits)
        else:
            if not Path(s).is_file():
                raise GapkitError("shard not found" if _is_pattern(spec) else "no such file or folder", path=s)
            out.append(Path(s))
    for s in out:
        if not _is_tar_name(s.name):
            raise GapkitError("not a tar shard (.tar, .tar.gz, .tgz)", path=s)
    return out


def _decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise GapkitError(f"not UTF-8 text ({err.reason} at byte {err.start})", path=where) from err


def _open_webdataset(
    spec: str,
    text_column: str | None,
    image_column: str | None,
    label_column: str | None,
    limit: int | None,
    reporter: Reporter,
) -> PairedDataset:
    shard_paths = [Path(os.path.abspath(s)) for s in expand_shards(spec)]
    root = Path(os.path.commonpath([str(s.parent) for s in shard_paths]))
    shard_rel = [s.relative_to(root).as_posix() for s in shard_paths]
    image_keys = (image_column.lower().lstrip("."),) if image_column else WDS_IMAGE_KEYS
    text_ext = text_column.lower().lstrip(".") if text_column else None
    wanted_text = {"txt", "json", *WDS_META_KEYS}
    if text_ext:
        wanted_text.add(text_ext)
    if label_column:
        wanted_text.add(label_column.lower())
    records: list[ImageRecord] = []
    seen: dict[str, str] = {}
    found_text = False
    found_label = False

    def flush(k: int, key: str, members: dict[str, Any]) -> None:
        nonlocal found_text, found_label
        where = f"{shard_rel[k]}::{key}"
        if key in seen:
            raise GapkitError(f"sample key {key!r} appears twice (also in {seen[key]})", path=str(shard_paths[k]))
        seen[key] = shard_rel[k]
        img_ext = next((e for e in image_keys if e in members), None)
        if img_ext is None:
            raise GapkitError(
                f"sample {key!r} has no image (looked for .{', .'.join(image_keys)}; it has "
                f".{', .'.join(sorted(members))})",
                path=str(shard_paths[k]),
            )
        name, offset, size = members[img_ext]
        meta: dict[str, Any] = {}
        js: Any = None
        if "json" in members:
            try:
                js = json.loads(_decode_text(members["json"], where + ".json"))
            except json.JSONDecodeError as err:
                raise GapkitError(f"invalid JSON ({err.msg})", path=f"{shard_paths[k]}::{key}.json") from err
        texts: list[str] | None = None
        if text_ext and text_ext in members and text_ext != "json":
            texts = [_decode_text(members[text_ext], f"{where}.{text_ext}").strip()]
        elif text_column and isinstance(js, dict) and text_column in js:
            texts = _texts_of(js[text_column])
        elif not text_column and "txt" in members:
            texts = [_decode_text(members["txt"], f"{where}.txt").strip()]
        if texts is None and not text_column and isinstance(js, dict):
            for f in JSON_CAPTION_FIELDS:
                if f in js:
                    texts = _texts_of(js[f])
                    break
        if texts is None:
            texts = [""]
        else:
            found_text = True
        if isinstance(js, dict):
            caption_fields = {text_column} if text_column else set(JSON_CAPTION_FIELDS)
            meta.update({k2: v for k2, v in js.items() if k2 not in caption_fields})
        for mk in WDS_META_KEYS:
            if mk in members and mk not in meta:
                meta[mk] = _decode_text(members[mk], f"{where}.{mk}").strip()
        if label_column:
            lc = label_column.lower()
            if label_column in meta:
                meta["label"] = meta[label_column]
                found_label = True
            elif lc in members:
                meta["label"] = _decode_text(members[lc], f"{where}.{lc}").strip()
                found_label = True
        records.append(
            ImageRecord(
                image_id=key,
                source=f"{shard_rel[k]}::{name}",
                texts=texts,
                meta=meta,
                location=(k, offset, size),
            )
        )

    truncated: list[str] = []
    with reporter.task("reading shards", total=len(shard_paths), unit="shards") as task:
        for k, shard in enumerate(shard_paths):
            if limit is not None and len(records) >= limit:
                break
            key: str | None = None
            members: dict[str, Any] = {}
            n_members = 0
            try:
                with tarfile.open(shard, "r:*") as tf:
                    try:
                        for m in tf:
                            n_members += 1
                            if not m.isfile():
                                continue
                            mm = _WDS_NAME.match(m.name)
                            if mm is None:
                                continue
                            mkey, ext = mm.group(1), mm.group(2).lower()
                            if posixpath.basename(mkey).startswith("__"):
                                continue
                            if mkey != key:
                                if key is not None:
                                    flush(k, key, members)
                                    if limit is not None and len(records) >= limit:
                                        key = None
                                        break
                                key, members = mkey, {}
                            if ext in image_keys or ext in WDS_IMAGE_KEYS:
                                members[ext] = (m.name, m.offset_data, m.size)
                            elif ext in wanted_text:
                                fh = tf.extractfile(m)
                                members[ext] = fh.read() if fh is not None else b""
                            else:
                                members.setdefault(ext, None)
                    except (tarfile.ReadError, EOFError) as err:
                        if n_members == 0:
                            raise
                        # a cut-off shard: keep what was read; the cut image fails in load_image
                        truncated.append(shard_rel[k])
                        reporter.note(f"{shard}: the shard is truncated ({err}); its last sample may be incomplete")
                    if key is not None:
                        flush(k, key, members)
            except (tarfile.TarError, EOFError, OSError) as err:
                raise GapkitError(f"unreadable tar shard ({err})", path=str(shard)) from err
            task.advance()
    if records and text_column and not found_text:
        raise GapkitError(
            f"no sample has a caption in {text_column!r} (a member extension or a .json field)", path=spec
        )
    if records and not found_text:
        raise GapkitError(
            "no sample has a caption: looked for .txt members and the .json fields "
            f"{', '.join(JSON_CAPTION_FIELDS)}",
            path=spec,
        )
    if records and label_column and not found_label:
        raise GapkitError(f"no sample has the label {label_column!r} (a .json field or a member extension)", path=spec)
    if limit is not None:
        records = records[: int(limit)]
    meta_cols: dict[str, None] = {}
    for r in records:
        meta_cols.update(dict.fromkeys(r.meta))
    details = {
        "columns": {
            "image": image_column,
            "text": text_column,
            "label": label_column,
            "image_meta": list(meta_cols),
            "text_meta": [],
        },
    }
    if truncated:
        details["truncated_shards"] = truncated
    return PairedDataset(root, "webdataset", records, path=spec, shards=shard_rel, details=details)
