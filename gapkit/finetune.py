"""Closing the gap by training: projection heads on stored embeddings (Mode 1), and the pieces
that the end-to-end trainer (``gapkit.endtoend``, Mode 2) shares with it.

Shared pieces: :class:`TrainConfig` (every training setting), :func:`split_pairs` (validation
split by image or by a metadata column), :func:`validation_metrics` (gap, cos_true_pairs and
R@K of a projected validation set), :func:`append_metrics` / :func:`read_metrics` (the run's
``metrics.jsonl``), :func:`save_checkpoint` / :func:`load_checkpoint` (one atomic safetensors
file holding weights, optimizer state, RNG state and a JSON state), :class:`EarlyStopping`,
:func:`resolve_device`, :func:`write_run_json`.

Mode 1: :func:`train_heads` trains one linear (or MLP) head per modality with a
:class:`gapkit.losses.GapLoss` and writes the run folder::

    RUN/heads.safetensors, RUN/heads.json   the heads (best epoch by the early-stopping metric)
    RUN/train/, RUN/val/                    projected embedding sets (RUN/val: the validation pairs)
    RUN/metrics.jsonl                       one JSON object per epoch (epoch 0: before training)
    RUN/run.json                            the config, the loss, the data, the split sizes
    RUN/result.json                         the before/after table of the validation pairs
    RUN/checkpoint.safetensors              the last finished epoch (for --resume)

:func:`compare_variants` trains the same heads with the four objectives of the paper's table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from .errors import GapkitError
from .heads import Heads, build_heads, save_heads
from .losses import GapLoss, parse_loss
from .progress import Reporter, ensure
from .store import EmbeddingSet, atomic_write_bytes, write_set

__all__ = [
    "TrainConfig",
    "resolve_device",
    "split_pairs",
    "validation_metrics",
    "VAL_METRICS",
    "append_metrics",
    "read_metrics",
    "truncate_metrics",
    "save_checkpoint",
    "load_checkpoint",
    "EarlyStopping",
    "write_run_json",
    "train_heads",
    "compare_variants",
    "VARIANTS",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
RESULT_FILE = "result.json"

#: validation metrics, in table order (names as in gapkit.metrics)
VAL_METRICS = (
    "gap",
    "cos_true_pairs",
    "i2t_R@1",
    "i2t_R@5",
    "i2t_R@10",
    "t2i_R@1",
    "t2i_R@5",
    "t2i_R@10",
)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every training setting shared by heads mode and end-to-end mode.

    ``early_stop``: the validation metric that picks the best epoch and stops training after
    ``patience`` epochs without improvement (0: never stop early; the best epoch is still the one
    kept). ``"val_loss"`` (default) is the training objective on the validation pairs; any key of
    metrics.jsonl works (``val_gap``, ``val_i2t_R@10``, ``val_rsum`` = sum of the six recalls,
    ...); loss, gap and l2 metrics are minimised, the others maximised (``min:``/``max:`` prefix
    to say it explicitly).
    """

    loss: str = "clip+atp+cu"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    dim: int | None = None
    head: str = "linear"
    head_init: str = "identity"
    hidden: int | None = None
    atp_weight: float = 1.0
    cu_weight: float = 1.0
    align_weight: float = 1.0
    unif_weight: float = 1.0
    schedule: bool = False
    temperature: float = 0.07
    learn_temperature: bool = True
    val_fraction: float = 0.2
    group_by: str | None = None
    seed: int = 0
    device: str = "auto"
    patience: int = 5
    early_stop: str = "val_loss"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        """Raise GapkitError for a setting that cannot work."""
        parse_loss(self.loss)
        if self.epochs < 1:
            raise GapkitError(f"--epochs must be >= 1, not {self.epochs}")
        if self.batch_size < 2:
            raise GapkitError(f"--batch-size must be >= 2 (contrastive losses need pairs), not {self.batch_size}")
        if not self.lr > 0:
            raise GapkitError(f"--lr must be > 0, not {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise GapkitError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.temperature <= 0:
            raise GapkitError(f"--temperature must be > 0, not {self.temperature}")
        if self.head not in ("linear", "mlp"):
            raise GapkitError(f"--head must be linear or mlp, not {self.head!r}")
        if self.head_init not in ("identity", "random"):
            raise GapkitError(f"--init must be identity or random, not {self.head_init!r}")
        if self.patience < 0:
            raise GapkitError(f"--patience must be >= 0, not {self.patience}")

    def make_loss(self, gather: bool = True) -> GapLoss:
        """The :class:`GapLoss` these settings describe."""
        return GapLoss(
            self.loss,
            atp_weight=self.atp_weight,
            cu_weight=self.cu_weight,
            align_weight=self.align_weight,
            unif_weight=self.unif_weight,
            schedule=self.schedule,
            temperature=self.temperature,
            learn_temperature=self.learn_temperature,
            gather=gather,
        )


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto``: CUDA when there is a GPU, then Apple's mps, then the CPU (as ``gapkit embed``);
    otherwise torch's spelling (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    from .encoders import pick_device

    return pick_device(None if device in (None, "", "auto") else device)


# --------------------------------------------------------------------------------------------
# validation split and metrics
# --------------------------------------------------------------------------------------------


def split_pairs(
    emb: EmbeddingSet, val_fraction: float, seed: int = 0, group_by: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train text rows, validation text rows), split by group so no group straddles both.

    Groups are images (all captions of one image go to the same side) or, with ``group_by``,
    the values of that metadata column (e.g. MedPix's ``case``). Uses scikit-learn's
    ``GroupShuffleSplit`` (``test_size=val_fraction`` of the groups, ``random_state=seed``).
    """
    from sklearn.model_selection import GroupShuffleSplit

    n = emb.n_texts
    if val_fraction <= 0:
        return np.arange(n), np.arange(0)
    groups = emb.image_row if group_by is None else emb.labels(group_by)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise GapkitError(
            f"cannot split {n_groups} group(s) into train and validation"
            + (f" (column {group_by!r})" if group_by else ""),
            path=emb.path or emb.source or None,
        )
    gss = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    tr, va = next(gss.split(np.zeros(n), groups=groups))
    if len(va) < 2 or len(tr) < 2:
        raise GapkitError(
            f"the split left {len(tr)} training and {len(va)} validation pairs; need at least 2 each "
            "(change --val-fraction)",
            path=emb.path or emb.source or None,
        )
    return np.sort(tr), np.sort(va)


def validation_metrics(
    images: Tensor | np.ndarray,
    texts: Tensor | np.ndarray,
    image_row: Tensor | np.ndarray | None = None,
) -> dict[str, float]:
    """gap, cos_true_pairs, i2t_R@K and t2i_R@K (K = 1, 5, 10) and rsum of a (projected) set.

    Computed by :func:`gapkit.metrics.measure` (formulas in DESIGN.md: gap = ‖mean_i x̂_i −
    mean_j ŷ_j‖, Liang et al. 2022; cos_true_pairs = mean_j ⟨x̂_{row(j)}, ŷ_j⟩; recall in the
    CLIP_benchmark convention). ``rsum`` = the sum of the six recalls (in [0, 6]), one retrieval
    figure for early stopping (the usual "rsum" of retrieval papers, as fractions).
    """
    from .metrics import measure

    def arr(a: Any) -> np.ndarray:
        return a.detach().float().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a, dtype=np.float32)

    rows = None if image_row is None else arr(image_row).astype(np.int64)
    res = measure(arr(images), arr(texts), image_row=rows, metrics=list(VAL_METRICS))
    out = {k: float(res[k]) for k in VAL_METRICS}
    out["rsum"] = sum(v for k, v in out.items() if "_R@" in k)
    return out


# --------------------------------------------------------------------------------------------
# metrics.jsonl, run.json
# --------------------------------------------------------------------------------------------


def append_metrics(run_dir: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one flat JSON object (one epoch) to RUN/metrics.jsonl, flushed to disk."""
    path = Path(run_dir) / METRICS_FILE
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of RUN/metrics.jsonl (GapkitError naming the row for a broken line)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise GapkitError(f"invalid JSON ({err.msg})", path=path, row=i) from err
    return rows


def truncate_metrics(run_dir: str | os.PathLike[str], last_epoch: int) -> None:
    """Keep only the rows with epoch <= ``last_epoch`` (used when resuming from a checkpoint)."""
    rows = [r for r in read_metrics(run_dir) if int(r.get("epoch", 0)) <= last_epoch]
    atomic_write_bytes(
        Path(run_dir) / METRICS_FILE, "".join(json.dumps(r, default=float) + "\n" for r in rows).encode()
    )


def write_run_json(run_dir: str | os.PathLike[str], config: TrainConfig, **info: Any) -> None:
    """RUN/run.json: the config, the loss name and anything else given (data, sizes, mode)."""
    from . import __version__

    doc = {"loss": "+".join(parse_loss(config.loss)), "config": config.to_dict(), "gapkit_version": __version__}
    doc.update(info)
    atomic_write_bytes(Path(run_dir) / RUN_FILE, (json.dumps(doc, indent=2, default=str) + "\n").encode())


# --------------------------------------------------------------------------------------------
# checkpoints and early stopping
# --------------------------------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_load(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    state: dict[str, Any] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> None:
    """Write one safetensors file atomically (temporary name, fsync, rename).

    It holds each module's state dict (keys ``<name>.<param>``), the optimizer's tensors, the
    shuffling generator's and torch's global RNG states, any extra ``tensors`` (keys
    ``extra.<name>``), and, in the file's metadata, the JSON ``state`` (epoch, step, early
    stopping, ...) plus the optimizer's hyper-parameters. Nothing is pickled.
    """
    from safetensors.torch import save

    out: dict[str, Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            out[f"{name}.{k}"] = v.detach().cpu().contiguous()
    meta: dict[str, Any] = {"state": state or {}}
    if optimizer is not None:
        t, m = _optimizer_tensors(optimizer)
        out.update(t)
        meta["optimizer"] = m
    if generator is not None:
        out["rng.generator"] = generator.get_state()
    out["rng.torch"] = torch.get_rng_state()
    for k, v in (tensors or {}).items():
        out[f"extra.{k}"] = v.detach().cpu().contiguous()
    atomic_write_bytes(Path(path), save(out, metadata={"gapkit": json.dumps(meta, default=float)}))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Restore what :func:`save_checkpoint` wrote; returns (state, extra tensors).

    GapkitError (naming the file) for a missing, corrupt or mismatching checkpoint.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GapkitError("no checkpoint to resume from", path=path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("gapkit", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise GapkitError(f"unreadable checkpoint ({err}); delete it to start over", path=path) from err
    try:
        for name, mod in modules.items():
            prefix = f"{name}."
            sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            mod.load_state_dict(sd, strict=True)
        if optimizer is not None and "optimizer" in meta:
            _optimizer_load(optimizer, tensors, meta["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        msg = str(err).splitlines()[0]
        raise GapkitError(f"checkpoint does not match these settings ({msg})", path=path) from err
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return meta.get("state", {}), extra


class EarlyStopping:
    """Tracks the best value of one metric; ``stop`` once ``patience`` epochs pass without a gain.

    Direction: minimise metrics whose name contains ``loss``, ``gap``, ``l2`` or ``rmg``,
    maximise the others; ``"min:NAME"`` / ``"max:NAME"`` say it explicitly. ``patience`` 0 never
    stops (the best epoch is still tracked).
    """

    def __init__(self, metric: str = "val_loss", patience: int = 5, mode: str | None = None) -> None:
        if mode is None and metric[:4] in ("min:", "max:"):
            mode, metric = metric[:3], metric[4:]
        self.metric = metric
        self.patience = int(patience)
        low = metric.lower()
        self.mode = mode or ("min" if any(t in low for t in ("loss", "gap", "l2", "rmg")) else "max")
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Record one epoch; True when it is the best so far."""
        if self.metric not in metrics:
            raise GapkitError(
                f"early-stopping metric {self.metric!r} is not among the validation metrics "
                f"({', '.join(k for k in metrics if k.startswith('val_'))})"
            )
        v = float(metrics[self.metric])
        better = self.best is None or (v < self.best if self.mode == "min" else v > self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = v, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = d.get("best"), d.get("best_epoch"), int(d.get("bad_epochs", 0))


# --------------------------------------------------------------------------------------------
# heads mode
# --------------------------------------------------------------------------------------------


def _as_tensor(a: np.ndarray, device: torch.device, chunk: int = 65536) -> Tensor:
    out = torch.empty(tuple(a.shape), dtype=torch.float32)
    for s in range(0, a.shape[0], chunk):
        out[s : s + chunk] = torch.from_numpy(np.array(a[s : s + chunk], dtype=np.float32, copy=True))
    return out.to(device)


def _one_caption_per_image(image_row: np.ndarray, gen: torch.Generator | None) -> np.ndarray:
    """Text rows with one caption per image: a random one (``gen``) or the first (``None``)."""
    if gen is None:
        _, first = np.unique(image_row, return_index=True)
        return np.sort(first)
    order = torch.randperm(len(image_row), generator=gen).numpy()
    _, pick = np.unique(image_row[order], return_index=True)
    return np.sort(order[pick])


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch; a last batch of a single row joins the one before it."""
    spans = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < 2:
        spans[-2] = (spans[-2][0], spans[-1][1])
        spans.pop()
    return spans


@torch.no_grad()
def _project(heads: Heads, arr: Tensor, which: str, chunk: int = 65536) -> Tensor:
    heads.eval()
    fn = heads.project_images if which == "images" else heads.project_texts
    return torch.cat([fn(arr[s : s + chunk]) for s in range(0, arr.shape[0], chunk)])


@torch.no_grad()
def _eval_loss(
    heads: Heads, loss: GapLoss, images: Tensor, texts: Tensor, image_row: np.ndarray, batch_size: int, progress: float
) -> dict[str, float]:
    """The objective on fixed batches (first caption of each image), averaged over batches."""
    heads.eval()
    rows = _one_caption_per_image(image_row, None)
    sums: dict[str, float] = {}
    n = 0
    for s, e in _batches(len(rows), batch_size):
        if e - s < 2:
            continue
        idx = torch.as_tensor(rows[s:e], device=texts.device)
        x = heads.project_images(images[torch.as_tensor(image_row, device=texts.device)[idx]])
        y = heads.project_texts(texts[idx])
        total, parts = loss(x, y, progress)
        w = e - s
        sums["loss"] = sums.get("loss", 0.0) + float(total) * w
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * w
        n += w
    return {k: v / n for k, v in sums.items()} if n else {}


@dataclass
class FinetuneResult:
    """What :func:`train_heads` returns: the run folder, before/after metrics and history."""

    run_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    before_label: str
    best_epoch: int | None
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "before_label": self.before_label,
            "before": self.before,
            "after": self.after,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
        }


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Create RUN; returns True when resuming from a checkpoint that exists."""
    if out.exists() and not out.is_dir():
        raise GapkitError("exists and is not a folder", path=out)
    ckpt = out / CHECKPOINT_FILE
    if resume:
        if ckpt.is_file():
            return True
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise GapkitError(f"--resume given but there is no {CHECKPOINT_FILE} here", path=out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise GapkitError("run folder is not empty: pass --resume to continue it or --overwrite to replace it", path=out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


def _comparable_config(d: dict[str, Any]) -> dict[str, Any]:
    """Config keys that must match to resume (epochs, patience and device may change)."""
    return {k: v for k, v in d.items() if k not in ("epochs", "patience", "device", "extra")}


def train_heads(
    data: EmbeddingSet,
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    val: EmbeddingSet | None = None,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    description: str = "training heads",
) -> FinetuneResult:
    """Train projection heads on stored embeddings and write the run folder ``out``.

    The validation pairs are ``val`` (another embedding set) or a ``config.val_fraction`` split of
    ``data`` by image (or by ``config.group_by``), seeded by ``config.seed``. Each epoch draws one
    caption per image (so no image appears twice in a batch), shuffles with a generator seeded by
    ``config.seed`` and takes AdamW steps on ``config.make_loss()``; then the validation metrics
    go to metrics.jsonl and a checkpoint is written. The saved heads are those of the best epoch
    by ``config.early_stop`` (the last epoch when there is no validation set).
    """
    config = config or TrainConfig()
    config.validate()
    reporter = ensure(reporter)
    out = Path(out)
    device = resolve_device(config.device)
    data.check()

    # ---- split
    if val is not None:
        val.check()
        train_set, val_set = data, val
        split = {"val": val.source or str(val.path), "n_train_texts": data.n_texts, "n_val_texts": val.n_texts}
    elif config.val_fraction > 0:
        tr, va = split_pairs(data, config.val_fraction, config.seed, config.group_by)
        train_set, val_set = data.select_texts(tr), data.select_texts(va)
        split = {"val_fraction": config.val_fraction, "group_by": config.group_by,
                 "n_train_texts": len(tr), "n_val_texts": len(va)}
    else:
        train_set, val_set = data, None
        split = {"val_fraction": 0.0, "n_train_texts": data.n_texts, "n_val_texts": 0}
    d_im, d_tx = int(train_set.images.shape[1]), int(train_set.texts.shape[1])
    if val_set is not None and (val_set.images.shape[1] != d_im or val_set.texts.shape[1] != d_tx):
        raise GapkitError(
            f"validation set dims ({val_set.images.shape[1]}, {val_set.texts.shape[1]}) differ from the "
            f"training set's ({d_im}, {d_tx})",
            path=val_set.path or val_set.source or None,
        )
    if train_set.n_images < 2:
        raise GapkitError("need at least 2 training images", path=data.path or data.source or None)

    resuming = _prepare_run_dir(out, resume, overwrite)

    # ---- model, loss, optimiser
    torch.manual_seed(config.seed)
    heads = build_heads(d_im, d_tx, config.dim, kind=config.head, init=config.head_init, seed=config.seed,
                        hidden=config.hidden).to(device)
    loss_fn = config.make_loss(gather=False).to(device)
    params = list(heads.parameters()) + [p for p in loss_fn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    stopper = EarlyStopping(config.early_stop, config.patience)

    tr_im = _as_tensor(train_set.images, device)
    tr_tx = _as_tensor(train_set.texts, device)
    tr_rows = np.asarray(train_set.image_row)
    tr_rows_t = torch.as_tensor(tr_rows, device=device)
    if val_set is not None:
        va_im = _as_tensor(val_set.images, device)
        va_tx = _as_tensor(val_set.texts, device)
        va_rows = np.asarray(val_set.image_row)

    n_pairs = train_set.n_images  # one caption per image per epoch
    steps_per_epoch = len(_batches(n_pairs, config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    start_epoch, step = 1, 0
    best_state = copy.deepcopy(heads.state_dict())
    best_scale = float(loss_fn.logit_scale.detach())
    t_offset = 0.0

    if resuming:
        ckpt_config = json.loads((out / RUN_FILE).read_text())["config"] if (out / RUN_FILE).is_file() else {}
        if _comparable_config(ckpt_config) != _comparable_config(config.to_dict()):
            diff = sorted(k for k in _comparable_config(config.to_dict())
                          if ckpt_config.get(k) != config.to_dict().get(k))
            raise GapkitError(
                f"cannot resume: settings differ from the checkpoint's run (in: {', '.join(diff)})", path=out
            )
        best_heads = build_heads(d_im, d_tx, config.dim, kind=config.head, init=config.head_init,
                                 seed=config.seed, hidden=config.hidden)
        state, extra = load_checkpoint(out / CHECKPOINT_FILE, modules={"heads": heads, "loss": loss_fn, "best": best_heads},
                                       optimizer=opt, generator=gen)
        best_state = copy.deepcopy(best_heads.to(device).state_dict())
        best_scale = float(state.get("best_logit_scale", best_scale))
        stopper.load_state_dict(state.get("early_stopping", {}))
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        t_offset = float(state.get("time_s", 0.0))
        truncate_metrics(out, int(state["epoch"]))
        if state.get("stopped"):
            start_epoch = config.epochs + 1
        reporter.note(f"resuming {out} after epoch {state['epoch']}")
    write_run_json(out, config, mode="heads", data=data.source or str(data.path), device=str(device),
                   image_dim=d_im, text_dim=d_tx, **split)

    # ---- before: the input (when the dims match) or the initial heads
    before_label = "input"
    if val_set is not None:
        if d_im == d_tx:
            before = validation_metrics(va_im, va_tx, va_rows)
        else:
            init = build_heads(d_im, d_tx, config.dim, kind=config.head, init=config.head_init, seed=config.seed,
                               hidden=config.hidden).to(device)
            before = validation_metrics(_project(init, va_im, "images"), _project(init, va_tx, "texts"), va_rows)
            before_label = "initial heads"
    else:
        before = {}

    def evaluate(epoch: int, progress: float) -> dict[str, Any]:
        row: dict[str, Any] = {}
        if val_set is None:
            return row
        pim, ptx = _project(heads, va_im, "images"), _project(heads, va_tx, "texts")
        m = validation_metrics(pim, ptx, va_rows)
        vl = _eval_loss(heads, loss_fn, va_im, va_tx, va_rows, config.batch_size, progress)
        row["val_loss"] = vl.get("loss", float("nan"))
        for k, v in vl.items():
            if k != "loss":
                row[f"val_{k}"] = v
        for k, v in m.items():
            row[f"val_{k}"] = v
        return row

    t0 = time.perf_counter()
    if not resuming:
        # epoch 0: the starting point, for plots of the whole run
        tl = _eval_loss(heads, loss_fn, tr_im, tr_tx, tr_rows, config.batch_size, 0.0)
        row0 = {"epoch": 0, "step": 0, "time_s": 0.0, "lr": config.lr, "temperature": loss_fn.temperature,
                "train_loss": tl.get("loss")}
        row0.update({f"train_{k}": v for k, v in tl.items() if k != "loss"})
        row0.update(evaluate(0, 0.0))
        append_metrics(out, row0)
        if val_set is not None:
            stopper.update(0, row0)
        t0 = time.perf_counter()  # time_s counts training (and per-epoch validation), not epoch 0

    stopped = False
    epochs_run = start_epoch - 1
    history: list[dict[str, Any]] = []
    with reporter.task(description, total=(config.epochs - start_epoch + 1) * n_pairs if start_epoch <= config.epochs else 0,
                       unit="pairs") as task:
        for epoch in range(start_epoch, config.epochs + 1):
            heads.train()
            rows = _one_caption_per_image(tr_rows, gen)
            perm = rows[torch.randperm(len(rows), generator=gen).numpy()]
            perm_t = torch.as_tensor(perm, device=device)
            sums: dict[str, float] = {}
            seen = 0
            for s, e in _batches(len(perm), config.batch_size):
                idx = perm_t[s:e]
                progress = step / max(total_steps, 1)
                x = heads.project_images(tr_im[tr_rows_t[idx]])
                y = heads.project_texts(tr_tx[idx])
                total, parts = loss_fn(x, y, progress)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                if loss_fn.learn_temperature:
                    loss_fn.clamp_()
                step += 1
                w = e - s
                seen += w
                sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) * w
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * w
                task.advance(w)
            task.set_description(f"epoch {epoch}/{config.epochs} loss {sums['loss'] / seen:.4f}")
            row = {"epoch": epoch, "step": step, "time_s": round(t_offset + time.perf_counter() - t0, 3),
                   "lr": opt.param_groups[0]["lr"], "temperature": loss_fn.temperature,
                   "train_loss": sums["loss"] / seen}
            row.update({f"train_{k}": v / seen for k, v in sums.items() if k != "loss"})
            row.update(evaluate(epoch, step / max(total_steps, 1)))
            append_metrics(out, row)
            history.append(row)
            epochs_run = epoch
            if val_set is not None:
                if stopper.update(epoch, row):
                    best_state = copy.deepcopy(heads.state_dict())
                    best_scale = float(loss_fn.logit_scale.detach())
                stopped = stopper.stop
            else:
                best_state = copy.deepcopy(heads.state_dict())
                best_scale = float(loss_fn.logit_scale.detach())
            best_heads = build_heads(d_im, d_tx, config.dim, kind=config.head, init=config.head_init,
                                     seed=config.seed, hidden=config.hidden)
            best_heads.load_state_dict(best_state)
            save_checkpoint(
                out / CHECKPOINT_FILE,
                modules={"heads": heads, "loss": loss_fn, "best": best_heads},
                optimizer=opt,
                generator=gen,
                state={"epoch": epoch, "step": step, "time_s": row["time_s"], "stopped": stopped,
                       "early_stopping": stopper.state_dict(), "best_logit_scale": best_scale},
            )
            if stopped:
                reporter.note(
                    f"early stop after epoch {epoch}: {config.early_stop} did not improve for "
                    f"{config.patience} epochs (best at epoch {stopper.best_epoch})"
                )
                break

    # ---- finish: best heads, projected sets, result table
    heads.load_state_dict(best_state)
    best_epoch = stopper.best_epoch if val_set is not None else epochs_run
    final_tau = 1.0 / min(math.exp(best_scale), 100.0)
    save_heads(heads, out, extra={"loss": "+".join(parse_loss(config.loss)), "temperature": final_tau,
                                  "epoch": best_epoch, "trained_on": data.source or str(data.path)})
    _write_projected(heads, train_set, tr_im, tr_tx, out / "train", out)
    after: dict[str, float] = {}
    if val_set is not None:
        _write_projected(heads, val_set, va_im, va_tx, out / "val", out)
        after = validation_metrics(_project(heads, va_im, "images"), _project(heads, va_tx, "texts"), va_rows)
    result = FinetuneResult(out, before, after, before_label, best_epoch, epochs_run, stopped, read_metrics(out))
    atomic_write_bytes(out / RESULT_FILE, (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    return result


def _write_projected(heads: Heads, src: EmbeddingSet, im: Tensor, tx: Tensor, path: Path, run: Path) -> None:
    pim = _project(heads, im, "images").cpu().numpy()
    ptx = _project(heads, tx, "texts").cpu().numpy()
    write_set(
        path, pim, ptx, image_row=src.image_row, image_meta=src.image_meta, text_meta=src.text_meta,
        info={"heads": str(run), "projected_from": src.source or str(src.path), "encoders": src.info.get("encoders"),
              "dataset": src.info.get("dataset")},
        overwrite=True,
    )


# --------------------------------------------------------------------------------------------
# the paper's comparison
# --------------------------------------------------------------------------------------------

#: folder name -> (label, settings that differ from the user's config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "clip_learned_tau": ("clip (learnable τ)", {"loss": "clip", "learn_temperature": True}),
    "clip_fixed_tau": ("clip (fixed τ)", {"loss": "clip", "learn_temperature": False}),
    "clip_atp_cu": ("clip+atp+cu", {"loss": "clip+atp+cu"}),
    "fahim": ("clip+align+unif (Fahim et al.)", {"loss": "clip+align+unif"}),
}


def compare_variants(
    data: EmbeddingSet,
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    val: EmbeddingSet | None = None,
    variants: Iterable[str] = tuple(VARIANTS),
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> list[tuple[str, dict[str, float]]]:
    """Train the same heads (same split, seed, epochs) with each objective into RUN/<variant>/.

    Returns table rows [(label, validation metrics)], the input (or initial heads) first.
    ``clip+atp+cu`` and Fahim's loss keep the user's temperature setting (learnable by default);
    the two clip baselines set it learnable and fixed (at ``config.temperature``).
    """
    config = config or TrainConfig()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise GapkitError("run folder is not empty: pass --resume to continue it or --overwrite to replace it", path=out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, dict[str, float]]] = []
    for name in variants:
        if name not in VARIANTS:
            raise GapkitError(f"unknown variant {name!r} (variants: {', '.join(VARIANTS)})")
        label, changes = VARIANTS[name]
        cfg = dataclasses.replace(config, **changes)
        res = train_heads(data, out / name, cfg, val=val, resume=resume, overwrite=overwrite,
                          reporter=reporter, description=label)
        if not rows:
            rows.append((res.before_label, res.before))
        rows.append((label, res.after))
    (out / "compare.json").write_text(json.dumps([{"variant": l, **m} for l, m in rows], indent=2) + "\n")
    return rows
