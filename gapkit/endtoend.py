"""End-to-end fine-tuning: train the encoders themselves (and projection heads) on a paired dataset.

``gapkit finetune DATA --model SPEC ...`` (Mode 2) calls :func:`finetune_end_to_end`. It trains
the image and text towers of :func:`gapkit.encoders.load_encoders` (all of them, only their last
N blocks with ``unlock_last=N``, or one tower frozen with ``freeze="image"|"text"``) together with
the heads of :func:`gapkit.heads.build_heads`, on the objectives of :class:`gapkit.losses.GapLoss`
(``clip``, ``clip+atp+cu``, ...).

Batches. ``config.batch_size`` is the *global* contrastive batch: the pairs one loss value (and one
optimizer step) sees. It is cut into ``world_size`` rank slices (torchrun) and each slice into
``grad_accum`` micro-batches. Gradient accumulation is done as in open_clip's ``accum_freq`` (the
"gradient cache" trick): a first pass without gradients computes the features of every
micro-batch; then each micro-batch is recomputed with gradients and the loss is evaluated on the
full batch (cached features with the live micro-batch in place), so ``clip`` and ``cu`` see all
``batch_size`` pairs, not the micro-batch. The features of all ranks are gathered by GapLoss
(gradient through the local part) and the loss is multiplied by the world size, so that DDP's
gradient average equals the one-process gradient. Hence ``grad_accum`` and the number of
processes change memory and speed, not the mathematics. The last incomplete batch of an epoch is
dropped (contrastive batches should have the same size).

Pairs. Each epoch visits every training image once, with one of its captions drawn at random
(seeded by seed and epoch), so one batch never holds the same image twice (a duplicated image
would be a false negative for ``clip``). MedPix has one caption per image; COCO has five.

Validation. The split is by image (all captions of an image on one side) or by a metadata column
(``config.group_by``, e.g. MedPix ``case``), seeded. After each epoch the validation pairs are
embedded (encoders + heads) and measured; one line per epoch goes to ``RUN/metrics.jsonl``.

Run folder ``RUN``::

    run.json                 settings of the run (a resume must use the same ones)
    split.json               image ids of the training and validation sides
    metrics.jsonl            one JSON line per epoch (train loss and terms, lr, τ, validation metrics)
    checkpoint/              while training: model.safetensors (towers, heads, loss τ) and
                             state.pt (optimizer, scheduler, grad scaler, RNG, epoch; loaded with
                             torch.load(weights_only=True)); replaced atomically after each epoch
    checkpoint.json          present while a run is unfinished (the epoch of the checkpoint)
    encoders.safetensors     final tower weights, keys "image_tower.*" and "text_tower.*"
    encoders.json            model specs that rebuild the towers (load_encoders arguments)
    heads.safetensors, heads.json   final heads (gapkit.heads.save_heads)
    val_before/, val/        embedding sets of the validation pairs, before and after training
    train/                   embedding set of the training pairs after training (when cheap)

``gapkit embed DATA --heads RUN`` rebuilds the towers from encoders.json, loads
encoders.safetensors strictly and applies the heads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import GapkitError
from .store import atomic_write_bytes
from .progress import Reporter, ensure

__all__ = [
    "finetune_end_to_end",
    "split_by_image",
    "set_trainable",
    "find_blocks",
    "ENCODERS_WEIGHTS",
    "ENCODERS_CONFIG",
]

ENCODERS_WEIGHTS = "encoders.safetensors"
ENCODERS_CONFIG = "encoders.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_MARK = "checkpoint.json"
RUN_CONFIG = "run.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"

#: preprocessed training pixels are kept in memory when they take at most this many bytes
PIXEL_CACHE_BYTES = 1 << 30
#: RUN/train is written when the training side has at most this many captions
TRAIN_SET_MAX_TEXTS = 50_000
#: the validation loss is computed on one batch of at most this many pairs
VAL_LOSS_MAX_PAIRS = 4096

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE_CHOICES = ("image", "text")


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _setup_dist(device_name: str | None) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo otherwise)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist()
    here = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device_name is None or str(device_name).startswith("cuda"))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        here = True
    return _Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        initialized_here=here,
    )


def _pick_device(name: str | None, dist_info: _Dist) -> torch.device:
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info.local_rank if dist_info.world > 1 else torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GapkitError(f"device {name!r} asked for, but CUDA is not available here")
        if dist_info.world > 1 and dev.index is None:
            dev = torch.device("cuda", dist_info.local_rank)
    return dev


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def split_by_image(
    records: Sequence[Any],
    val_fraction: float,
    *,
    group_by: str | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) split of image indices, by image or by a metadata group.

    All captions of an image stay with it; with ``group_by`` (a metadata column, e.g. MedPix
    ``case``) all images of a group go to the same side. The split is the one
    :func:`gapkit.finetune.split_pairs` makes of the same pairs as an embedding set:
    scikit-learn's ``GroupShuffleSplit(test_size=val_fraction, random_state=seed)`` over the
    caption rows, grouped by image (or by the column). ``val_fraction`` = 0: no validation side.
    """
    from sklearn.model_selection import GroupShuffleSplit

    n = len(records)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise GapkitError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    if n == 0:
        raise GapkitError("the dataset has no images")
    if val_fraction == 0:
        return np.arange(n), np.arange(0)
    groups: list[Any] = []
    owner: list[int] = []
    for i, rec in enumerate(records):
        if group_by is None:
            key: Any = i
        else:
            meta = getattr(rec, "meta", None) or {}
            if group_by not in meta:
                have = ", ".join(sorted(meta)) or "none"
                raise GapkitError(
                    f"no metadata column {group_by!r} to group the validation split by (columns: {have})",
                    path=getattr(rec, "source", None),
                    row=i,
                )
            key = str(meta[group_by])
        for _ in range(max(1, len(rec.texts))):
            groups.append(key)
            owner.append(i)
    garr = np.asarray(groups, dtype=object if group_by else np.int64)
    if len(set(groups)) < 2:
        raise GapkitError(
            f"cannot split {len(set(groups))} group(s) into training and validation"
            + (f" (column {group_by!r})" if group_by else "")
        )
    gss = GroupShuffleSplit(n_splits=1, test_size=float(val_fraction), random_state=int(seed))
    _, va_rows = next(gss.split(np.zeros(len(groups)), groups=garr))
    owner_arr = np.asarray(owner, dtype=np.int64)
    val_idx = np.unique(owner_arr[va_rows])
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    train_idx = np.flatnonzero(mask).astype(np.int64)
    if len(val_idx) < 2 or len(train_idx) < 2:
        raise GapkitError(
            f"the split left {len(train_idx)} training and {len(val_idx)} validation images; need at "
            "least 2 each (change --val-fraction)"
        )
    return train_idx, val_idx.astype(np.int64)


# --------------------------------------------------------------------------------------------
# what trains
# --------------------------------------------------------------------------------------------

#: names of block lists, most specific first
_BLOCK_LIST_NAMES = ("resblocks", "layer", "layers", "blocks", "h")
#: parameters outside the blocks that belong to the input stem (stay frozen with unlock_last)
_STEM_WORDS = ("embed", "conv1", "ln_pre", "pre_layrnorm", "pre_layernorm", "patch", "cls_token", "norm_pre")


def find_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list of a tower: (its qualified name, the ModuleList).

    Looks for ``nn.ModuleList`` children named ``resblocks`` (open_clip ViT and text
    transformer), ``layer`` (Hugging Face BERT/ViT ``encoder.layer``), ``layers``, ``blocks``
    (timm) or ``h`` (GPT-2 style), and takes the longest such list. GapkitError when none exists.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) == 0:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in _BLOCK_LIST_NAMES:
            continue
        if best is None or len(sub) > len(best[1]):
            best = (name, sub)
    if best is None:
        raise GapkitError(
            f"--unlock-last: no transformer block list ({', '.join(_BLOCK_LIST_NAMES)}) found in "
            f"{type(module).__name__}; train the whole tower or freeze it instead"
        )
    return best


def _unlock_last(tower: nn.Module, n: int) -> list[str]:
    """Freeze ``tower`` but its last ``n`` blocks and everything after the blocks."""
    name, blocks = find_blocks(tower)
    prefix = name + "." if name else ""
    keep_from = max(0, len(blocks) - n)
    unlocked: list[str] = []
    for pname, p in tower.named_parameters():
        if pname.startswith(prefix):
            idx = int(pname[len(prefix):].split(".", 1)[0])
            train = idx >= keep_from
        else:
            # outside the blocks: the stem (embeddings, patch conv, pre-norm) stays frozen; final
            # norms, pooling and projections (ln_post, proj, ln_final, text_projection, layernorm,
            # pooler, head, attn_pool) train
            leaf_path = pname.lower()
            train = not any(w in leaf_path for w in _STEM_WORDS)
        p.requires_grad_(train)
        if train:
            unlocked.append(pname)
    return unlocked


def set_trainable(
    image_tower: nn.Module,
    text_tower: nn.Module,
    *,
    freeze: str | None = None,
    unlock_last: int | None = None,
) -> dict[str, Any]:
    """Set ``requires_grad`` on the towers' parameters; returns counts of trainable parameters.

    * default: everything trains;
    * ``freeze="image"`` / ``"text"``: that tower is frozen entirely;
    * ``unlock_last=N``: in each trained tower only the last N transformer blocks
      (:func:`find_blocks`) and the parameters after the blocks (final norms, pooling, projections)
      train; the stem (patch/token/position embeddings, pre-norm) and earlier blocks are frozen.
    """
    if freeze not in (None, "none", *FREEZE_CHOICES):
        raise GapkitError(f"freeze must be image or text, not {freeze!r}")
    if unlock_last is not None and int(unlock_last) < 1:
        raise GapkitError(f"--unlock-last must be >= 1, not {unlock_last}")
    out: dict[str, Any] = {}
    towers = {"image": image_tower, "text": text_tower}
    shared = {id(p) for p in image_tower.parameters()} & {id(p) for p in text_tower.parameters()}
    if shared:
        raise GapkitError("the image and text towers share parameters; end-to-end training needs separate towers")
    for which, tower in towers.items():
        if freeze == which:
            for p in tower.parameters():
                p.requires_grad_(False)
        elif unlock_last is not None:
            _unlock_last(tower, int(unlock_last))
        else:
            for p in tower.parameters():
                p.requires_grad_(True)
        total = sum(p.numel() for p in tower.parameters())
        train = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        out[which] = {"parameters": total, "trainable": train}
    return out


class _Towers(nn.Module):
    """Image tower, text tower and heads as one module (what DDP wraps and the checkpoint holds)."""

    def __init__(self, enc: Any, heads: nn.Module) -> None:
        super().__init__()
        self.image_tower = enc.image_tower
        self.text_tower = enc.text_tower
        self.heads = heads
        object.__setattr__(self, "_enc", enc)  # not a submodule

    def forward(self, pixels: Tensor, tokens: Any) -> tuple[Tensor, Tensor]:
        enc = self._enc
        img_grad = any(p.requires_grad for p in self.image_tower.parameters())
        txt_grad = any(p.requires_grad for p in self.text_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and img_grad):
            x = enc.encode_image(pixels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and txt_grad):
            y = enc.encode_text(tokens)
        return self.heads.project_images(x), self.heads.project_texts(y)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class _ImageData(torch.utils.data.Dataset):
    """Preprocessed pixels of dataset images (by dataset index), for a DataLoader."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(self.dataset.load_image(int(i)))


def _collate(items: list[Tensor]) -> Tensor:
    return torch.stack(items)


class _Pixels:
    """Pixels of a fixed list of images: cached in memory when small, else read by a DataLoader."""

    def __init__(self, dataset: Any, transform: Any, workers: int) -> None:
        self.source = _ImageData(dataset, transform)
        self.workers = int(workers)
        self.cache: dict[int, Tensor] = {}

    def fill_cache(self, indices: Sequence[int], reporter: Reporter, what: str) -> bool:
        """Preprocess ``indices`` into memory if they fit in PIXEL_CACHE_BYTES; True when cached."""
        todo = [int(i) for i in indices if int(i) not in self.cache]
        if not todo:
            return True
        first = self.source[todo[0]]
        if first.numel() * first.element_size() * (len(todo) + len(self.cache)) > PIXEL_CACHE_BYTES:
            return False
        self.cache[todo[0]] = first
        rest = todo[1:]
        chunks = [rest[s : s + 64] for s in range(0, len(rest), 64)]
        with reporter.task(f"preparing {what} images", total=len(todo), unit="images") as task:
            task.advance(1)
            for c, px in zip(chunks, self.batches(chunks)):
                for j, p in zip(c, px):
                    self.cache[j] = p.clone()
                task.advance(len(c))
        return True

    def batches(self, chunks: Sequence[Sequence[int]]) -> Iterator[Tensor]:
        """Pixels for each list of indices in ``chunks``, in order."""
        if all(int(i) in self.cache for c in chunks for i in c):
            for c in chunks:
                yield torch.stack([self.cache[int(i)] for i in c])
            return
        if self.workers > 0 and len(chunks) > 1:
            loader = torch.utils.data.DataLoader(
                self.source, batch_sampler=[list(map(int, c)) for c in chunks],
                num_workers=self.workers, collate_fn=_collate,
            )
            yield from loader
        else:
            for c in chunks:
                yield _collate([self.source[int(i)] for i in c])


# --------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise GapkitError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise GapkitError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# embedding the validation / training pairs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Embedded:
    images: np.ndarray
    texts: np.ndarray
    image_row: np.ndarray
    image_meta: list[dict[str, Any]]
    text_meta: list[dict[str, Any]]


def _pairs_of(dataset: Any, image_idx: Sequence[int]) -> tuple[list[str], np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """Captions of the images ``image_idx`` (all of them), their local image rows and metadata."""
    texts: list[str] = []
    rows: list[int] = []
    image_meta: list[dict[str, Any]] = []
    text_meta: list[dict[str, Any]] = []
    for r, i in enumerate(image_idx):
        rec = dataset.records[int(i)]
        image_meta.append({"id": rec.image_id, "path": str(rec.source), **dict(rec.meta or {})})
        tmeta = list(getattr(rec, "text_meta", None) or [{} for _ in rec.texts])
        for k, t in enumerate(rec.texts):
            texts.append(t)
            rows.append(r)
            extra = tmeta[k] if k < len(tmeta) else {}
            text_meta.append({"text": t, **{kk: vv for kk, vv in dict(extra).items() if kk != "text"}})
    return texts, np.asarray(rows, dtype=np.int64), image_meta, text_meta


@torch.no_grad()
def _embed(
    model: "_Towers",
    pixels: _Pixels,
    dataset: Any,
    image_idx: Sequence[int],
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    reporter: Reporter,
    what: str,
) -> _Embedded:
    """Embed images ``image_idx`` and all their captions through towers and heads (eval mode)."""
    enc = model._enc
    modes = [m.training for m in (model.image_tower, model.text_tower, model.heads)]
    model.eval()
    texts, rows, image_meta, text_meta = _pairs_of(dataset, image_idx)
    ims: list[np.ndarray] = []
    txs: list[np.ndarray] = []
    chunks = [list(image_idx[s : s + batch_size]) for s in range(0, len(image_idx), batch_size)]
    try:
        with reporter.task(f"embedding {what}", total=len(image_idx) + len(texts), unit="items") as task:
            for c, px in zip(chunks, pixels.batches(chunks)):
                with _autocast(precision, device):
                    x = model.heads.project_images(enc.encode_image(px))
                ims.append(x.float().cpu().numpy())
                task.advance(len(c))
            for s in range(0, len(texts), batch_size):
                part = texts[s : s + batch_size]
                with _autocast(precision, device):
                    y = model.heads.project_texts(enc.encode_text(enc.tokenize(part)))
                txs.append(y.float().cpu().numpy())
                task.advance(len(part))
    finally:
        for m, mode in zip((model.image_tower, model.text_tower, model.heads), modes):
            m.train(mode)
    return _Embedded(np.concatenate(ims), np.concatenate(txs), rows, image_meta, text_meta)


def _param_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# optimisation
# --------------------------------------------------------------------------------------------


def _param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not on biases, norms, scales), as open_clip."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in modules:
        for _, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _lr_factor(total_steps: int) -> Any:
    """Linear warm-up over the first 5 % of the steps (at least one), then cosine decay to 0."""
    warm = max(1, int(round(0.05 * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        span = max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / span)))

    return factor


def _epoch_batches(
    dataset: Any, train_idx: np.ndarray, epoch: int, seed: int, batch: int
) -> list[tuple[np.ndarray, list[str]]]:
    """The global batches of one epoch: (dataset image indices, one caption each).

    Every training image once, in an order and with a caption drawn by a generator seeded by
    (seed, epoch), so that a resumed run repeats exactly what an uninterrupted one does.
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(len(train_idx), generator=gen).numpy()
    pick = torch.rand(len(train_idx), generator=gen).numpy()
    out = []
    for b in range(len(train_idx) // batch):
        sel = train_idx[order[b * batch : (b + 1) * batch]]
        caps = []
        for i, u in zip(sel, pick[order[b * batch : (b + 1) * batch]]):
            texts = dataset.records[int(i)].texts
            caps.append(texts[min(int(u * len(texts)), len(texts) - 1)] if texts else "")
        out.append((sel, caps))
    return out


def _backward(loss: Tensor, scaler: Any) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def _train_step(
    net: nn.Module,
    loss_fn: nn.Module,
    micro: list[tuple[Tensor, Any]],
    *,
    progress: float,
    world: int,
    precision: str,
    device: torch.device,
    scaler: Any,
) -> tuple[float, dict[str, float]]:
    """Gradients of the loss of one global batch (this rank's micro-batches), accumulated.

    One micro-batch: forward and backward. Several: features of all micro-batches without
    gradients first, then each micro-batch again with gradients, its features put in place of
    the cached ones and the loss taken on the whole batch (open_clip's ``accum_freq``), so the
    summed gradients are those of the full-batch loss. The loss is scaled by the world size
    (DDP averages over ranks while each rank's gradient is its part of the global one); the
    gradient of the loss's own parameters (τ), complete on every rank and in every pass, is
    divided back.
    """
    no_sync = getattr(net, "no_sync", None)
    if len(micro) == 1:
        px, tok = micro[0]
        with _autocast(precision, device):
            x, y = net(px, tok)
        total, parts = loss_fn(x.float(), y.float(), progress)
        _backward(total * world, scaler)
    else:
        with torch.no_grad():
            cached = []
            for px, tok in micro:
                with _autocast(precision, device):
                    x, y = net(px, tok)
                cached.append((x.float(), y.float()))
        for j, (px, tok) in enumerate(micro):
            ctx = no_sync() if (no_sync is not None and j < len(micro) - 1) else contextlib.nullcontext()
            with ctx:
                with _autocast(precision, device):
                    x, y = net(px, tok)
                xs = [c[0] for c in cached]
                ys = [c[1] for c in cached]
                xs[j], ys[j] = x.float(), y.float()
                total, parts = loss_fn(torch.cat(xs), torch.cat(ys), progress)
                _backward(total * world, scaler)
    div = float(world * len(micro))
    if div != 1.0:
        for p in loss_fn.parameters():
            if p.grad is not None:
                p.grad.div_(div)
    return float(total.detach()), parts


# --------------------------------------------------------------------------------------------
# run folder
# --------------------------------------------------------------------------------------------


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Create RUN; True when resuming from its checkpoint."""
    from .finetune import CHECKPOINT_FILE

    if out.exists() and not out.is_dir():
        raise GapkitError("exists and is not a folder", path=out)
    if resume and (out / CHECKPOINT_FILE).is_file():
        return True
    if out.exists() and any(out.iterdir()):
        if resume and not overwrite:
            raise GapkitError(f"--resume given but there is no {CHECKPOINT_FILE} here", path=out)
        if not overwrite:
            raise GapkitError(
                "run folder is not empty: pass --resume to continue it or --overwrite to replace it", path=out
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """Settings that must match to resume (epochs may grow; device, workers, precision may change)."""
    skip = ("epochs", "patience", "device", "extra", "workers", "precision", "grad_accum")
    return {k: v for k, v in d.items() if k not in skip}




def _save_encoders(enc: Any, out: Path, spec: dict[str, Any]) -> None:
    """RUN/encoders.safetensors (keys image_tower.*, text_tower.*) and RUN/encoders.json."""
    from safetensors.torch import save

    state: dict[str, Tensor] = {}
    storages: set[int] = set()
    for k, v in enc.state_dict().items():
        t = v.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses tensors that share memory (tied weights): store a copy
            t = t.clone()
        storages.add(ptr)
        state[k] = t.contiguous()
    atomic_write_bytes(out / ENCODERS_WEIGHTS, save(state, metadata={"format": "gapkit-encoders"}))
    atomic_write_bytes(out / ENCODERS_CONFIG, (json.dumps(spec, indent=2, default=str) + "\n").encode())


def _write_embedded(path: Path, emb: _Embedded, info: dict[str, Any]) -> None:
    from .store import write_set

    write_set(path, emb.images, emb.texts, image_row=emb.image_row, image_meta=emb.image_meta,
              text_meta=emb.text_meta, info=info, overwrite=True)


def _read_embedded(path: Path) -> _Embedded:
    from .store import open_set

    s = open_set(path)
    return _Embedded(np.array(s.images, dtype=np.float32), np.array(s.texts, dtype=np.float32),
                     np.array(s.image_row), s.image_meta, s.text_meta)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


def finetune_end_to_end(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: Any,
    *,
    model: str | None = None,
    image_model: str | None = None,
    text_model: str | None = None,
    image_pooling: str = "auto",
    text_pooling: str = "auto",
    tokenizer: str | None = None,
    dataset_options: dict[str, Any] | None = None,
    unlock_last: int | None = None,
    freeze: str | None = None,
    grad_accum: int = 1,
    precision: str = "auto",
    workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Fine-tune the encoders and heads end to end on the paired dataset ``data``; write RUN ``out``.

    ``config`` is a :class:`gapkit.finetune.TrainConfig` (loss, epochs, global batch size, lr,
    weight decay, heads, temperature, validation split, seed, device, early stopping). The
    towers come from ``model`` (a dual encoder) or ``image_model`` + ``text_model`` (see
    :func:`gapkit.encoders.load_encoders`). ``freeze`` ("image" or "text") keeps one tower fixed;
    ``unlock_last=N`` trains only the last N blocks of each trained tower (plus its final norm
    and projection). ``grad_accum`` splits each batch into that many micro-batches (same loss,
    less memory); ``precision`` is auto (bf16 on a GPU that has it, fp16 + GradScaler on other
    GPUs, fp32 on CPU), fp32, bf16 or fp16. ``workers`` DataLoader processes read images when
    the preprocessed images do not fit in memory. Under torchrun each process takes a slice of
    every batch and the loss sees the gathered global batch.

    Returns a summary: paths, trainable parameter counts, best epoch, and the validation
    metrics before (initial encoders and heads) and after (best epoch by
    ``config.early_stop``). See the module docstring for the run folder.
    """
    config.validate()
    if freeze in ("none", ""):
        freeze = None
    if freeze not in (None, *FREEZE_CHOICES):
        raise GapkitError(f"--freeze must be image or text, not {freeze!r}")
    if unlock_last is not None and int(unlock_last) < 1:
        raise GapkitError(f"--unlock-last must be >= 1, not {unlock_last}")
    if int(grad_accum) < 1:
        raise GapkitError(f"--grad-accum must be >= 1, not {grad_accum}")
    if int(workers) < 0:
        raise GapkitError(f"--workers must be >= 0, not {workers}")
    if precision not in PRECISIONS:
        raise GapkitError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    image_pooling = image_pooling or "auto"
    text_pooling = text_pooling or "auto"
    dist_info = _setup_dist(None if config.device in (None, "", "auto") else config.device)
    try:
        return _run(
            data, Path(out), config, dist_info,
            model=model, image_model=image_model, text_model=text_model, image_pooling=image_pooling,
            text_pooling=text_pooling, tokenizer=tokenizer, dataset_options=dict(dataset_options or {}),
            unlock_last=None if unlock_last is None else int(unlock_last), freeze=freeze,
            grad_accum=int(grad_accum), precision=precision, workers=int(workers), resume=resume,
            overwrite=overwrite, reporter=ensure(reporter) if dist_info.main else Reporter(),
        )
    finally:
        dist_info.close()


def _run(
    data: str | os.PathLike[str],
    out: Path,
    config: Any,
    dist_info: _Dist,
    *,
    model: str | None,
    image_model: str | None,
    text_model: str | None,
    image_pooling: str,
    text_pooling: str,
    tokenizer: str | None,
    dataset_options: dict[str, Any],
    unlock_last: int | None,
    freeze: str | None,
    grad_accum: int,
    precision: str,
    workers: int,
    resume: bool,
    overwrite: bool,
    reporter: Reporter,
) -> dict[str, Any]:
    from .datasets import open_dataset
    from .encoders import load_encoders
    from .finetune import (
        CHECKPOINT_FILE,
        RESULT_FILE,
        RUN_FILE,
        EarlyStopping,
        append_metrics,
        load_checkpoint,
        read_metrics,
        save_checkpoint,
        truncate_metrics,
        validation_metrics,
        write_run_json,
    )
    from .heads import build_heads, save_heads

    world, main = dist_info.world, dist_info.main
    device = _pick_device(None if config.device in (None, "", "auto") else config.device, dist_info)
    prec = _resolve_precision(precision, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    # ---- data and split
    options = dict(dataset_options)
    val_data = options.pop("val", None)
    split_name = options.pop("split", None)
    if split_name:
        data = _split_folder(data, split_name)
        if val_data:
            val_data = _split_folder(val_data, split_name) if (Path(val_data) / split_name).is_dir() else val_data
    ds = open_dataset(data, **options)
    if val_data:
        vds = open_dataset(val_data, **{k: v for k, v in options.items() if k != "limit"})
        train_idx, val_idx = np.arange(len(ds)), np.arange(len(ds), len(ds) + len(vds))
        ds = _Joined(ds, vds)
    else:
        train_idx, val_idx = split_by_image(ds.records, config.val_fraction, group_by=config.group_by,
                                            seed=config.seed)
    has_val = len(val_idx) > 0
    batch = min(int(config.batch_size), len(train_idx))
    batch -= batch % world
    if batch < 2 or batch < world:
        raise GapkitError(
            f"{len(train_idx)} training images are too few for a batch on {world} process(es)", path=str(data)
        )
    steps_per_epoch = len(train_idx) // batch
    total_steps = steps_per_epoch * int(config.epochs)
    local_batch = batch // world
    accum = min(grad_accum, local_batch)

    # ---- run folder
    resuming = False
    if main:
        resuming = _prepare_run_dir(out, resume, overwrite)
    if world > 1:
        flag = [resuming]
        torch.distributed.broadcast_object_list(flag, src=0)
        resuming = bool(flag[0])
    settings = {
        "config": config.to_dict(),
        "model": model, "image_model": image_model, "text_model": text_model,
        "image_pooling": image_pooling, "text_pooling": text_pooling, "tokenizer": tokenizer,
        "data": str(data), "dataset_options": dataset_options,
        "unlock_last": unlock_last, "freeze": freeze,
    }
    if resuming and (out / RUN_FILE).is_file():
        old = json.loads((out / RUN_FILE).read_text())
        old_s = {k: old.get(k) for k in settings if k != "config"}
        old_s["config"] = _comparable(old.get("config", {}))
        new_s = dict(settings, config=_comparable(settings["config"]))
        diff = sorted(k for k in new_s if k != "config" and old_s.get(k) != new_s[k])
        diff += sorted(k for k in set(old_s["config"]) | set(new_s["config"])
                       if old_s["config"].get(k) != new_s["config"].get(k))
        if diff:
            raise GapkitError(f"cannot resume: settings differ from the checkpoint's run (in: {', '.join(diff)})",
                              path=out)

    # ---- model
    torch.manual_seed(int(config.seed))
    enc = load_encoders(model, image_model=image_model, text_model=text_model, image_pooling=image_pooling,
                        text_pooling=text_pooling, device=str(device), tokenizer=tokenizer, reporter=reporter)
    trainable = set_trainable(enc.image_tower, enc.text_tower, freeze=freeze, unlock_last=unlock_last)
    heads = build_heads(enc.image_dim, enc.text_dim, config.dim, kind=config.head, init=config.head_init,
                        seed=config.seed, hidden=config.hidden).to(device)
    net = _Towers(enc, heads).to(device)
    loss_fn = config.make_loss(gather=True).to(device)
    val_loss_fn = config.make_loss(gather=False).to(device)
    opt = torch.optim.AdamW(_param_groups([net, loss_fn], config.weight_decay), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(total_steps))
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None
    stopper = EarlyStopping(config.early_stop, config.patience)
    if main:
        write_run_json(out, config, mode="end-to-end", **{k: v for k, v in settings.items() if k != "config"},
                       device=str(device), precision=prec, world_size=world, grad_accum=accum,
                       batch_size=batch, steps_per_epoch=steps_per_epoch, n_train_images=int(len(train_idx)),
                       n_val_images=int(len(val_idx)), trainable=trainable, encoders=enc.spec())
        split = {"train": [ds.records[int(i)].image_id for i in train_idx],
                 "val": [ds.records[int(i)].image_id for i in val_idx],
                 "val_fraction": config.val_fraction, "group_by": config.group_by, "seed": config.seed}
        atomic_write_bytes(out / SPLIT_FILE, (json.dumps(split) + "\n").encode())

    pixels = _Pixels(ds, enc.image_transform, workers)
    cached = pixels.fill_cache(list(map(int, train_idx)) + list(map(int, val_idx)), reporter, "training and validation")
    if not cached:
        reporter.note(f"images are read and preprocessed each epoch ({workers} DataLoader workers)")
    eval_batch = max(batch, 64)

    def evaluate(progress: float) -> tuple[_Embedded, dict[str, Any]]:
        emb = _embed(net, pixels, ds, list(map(int, val_idx)), batch_size=eval_batch, precision=prec,
                     device=device, reporter=reporter, what="validation pairs")
        val_loss_fn.load_state_dict(loss_fn.state_dict())
        row: dict[str, Any] = {}
        vl = _val_losses(val_loss_fn, emb, batch, progress)
        if vl:
            row["val_loss"] = vl.pop("loss")
            row.update({f"val_{k}": v for k, v in vl.items()})
        row.update({f"val_{k}": v for k, v in validation_metrics(emb.images, emb.texts, emb.image_row).items()})
        return emb, row

    data_info = {"dataset": ds.describe(), "encoders": enc.spec(), "run": str(out)}
    start_epoch, step, t_offset, stopped = 1, 0, 0.0, False
    if resuming and _finished(out, config):
        reporter.note(f"{out} is a finished run of {config.epochs} epochs; nothing to do")
        dist_info.barrier()
        return json.loads((out / RESULT_FILE).read_text()) if main else {}
    if resuming:
        state, extra = load_checkpoint(out / CHECKPOINT_FILE, modules={"model": net, "loss": loss_fn}, optimizer=opt)
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if device.type == "cuda" and "cuda_rng" in extra:
            torch.cuda.set_rng_state(extra["cuda_rng"].to(torch.uint8))
        stopper.load_state_dict(state.get("early_stopping", {}))
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        t_offset = float(state.get("time_s", 0.0))
        stopped = bool(state.get("stopped"))
        if main:
            truncate_metrics(out, int(state["epoch"]))
            reporter.note(f"resuming {out} after epoch {state['epoch']}")
    elif main:
        # epoch 0: the initial encoders and heads on the validation pairs -> RUN/val_before
        if has_val:
            emb0, row0 = evaluate(0.0)
            _write_embedded(out / "val_before", emb0, dict(data_info, stage="before training", split="val"))
            stopper.update(0, row0)
        else:
            row0 = {}
        append_metrics(out, {"epoch": 0, "step": 0, "time_s": 0.0, "lr": opt.param_groups[0]["lr"],
                             "temperature": loss_fn.temperature, **row0})
    dist_info.barrier()

    # ---- train
    ddp: nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    learn_tau = bool(getattr(loss_fn, "learn_temperature", False))
    towers_train = {"image": freeze != "image", "text": freeze != "text"}
    t0 = time.perf_counter()
    first = start_epoch if not stopped else int(config.epochs) + 1
    todo = max(0, int(config.epochs) - first + 1)
    with reporter.task("fine-tuning end to end", total=todo * steps_per_epoch * batch, unit="pairs") as task:
        for epoch in range(first, int(config.epochs) + 1):
            net.train()
            net.image_tower.train(towers_train["image"])
            net.text_tower.train(towers_train["text"])
            plan = _epoch_batches(ds, train_idx, epoch, config.seed, batch)
            chunks: list[list[int]] = []
            texts: list[list[str]] = []
            for sel, caps in plan:
                lo, hi = dist_info.rank * local_batch, (dist_info.rank + 1) * local_batch
                for part in np.array_split(np.arange(lo, hi), accum):
                    chunks.append([int(sel[k]) for k in part])
                    texts.append([caps[k] for k in part])
            px_iter = pixels.batches(chunks)
            sums: dict[str, float] = {}
            for b in range(len(plan)):
                micro = []
                for j in range(accum):
                    px = next(px_iter)
                    micro.append((px, enc.tokenize(texts[b * accum + j])))
                opt.zero_grad(set_to_none=True)
                total, parts = _train_step(ddp, loss_fn, micro, progress=step / max(total_steps, 1), world=world,
                                           precision=prec, device=device, scaler=scaler)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                if learn_tau:
                    loss_fn.clamp_()
                step += 1
                sums["loss"] = sums.get("loss", 0.0) + total
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                task.advance(batch)
            n_steps = max(1, len(plan))
            task.set_description(f"fine-tuning end to end: epoch {epoch}/{config.epochs} loss {sums['loss'] / n_steps:.4f}")
            row = {"epoch": epoch, "step": step, "time_s": round(t_offset + time.perf_counter() - t0, 3),
                   "lr": opt.param_groups[0]["lr"], "temperature": loss_fn.temperature,
                   "train_loss": sums["loss"] / n_steps}
            row.update({f"train_{k}": v / n_steps for k, v in sums.items() if k != "loss"})
            decision = [False, False]
            if main:
                best = True
                if has_val:
                    _, vrow = evaluate(step / max(total_steps, 1))
                    row.update(vrow)
                    best = stopper.update(epoch, row)
                    stopped = stopper.stop
                if best:
                    save_checkpoint(out / BEST_FILE, modules={"model": net, "loss": loss_fn},
                                    state={"epoch": epoch})
                append_metrics(out, row)
                extra_t = {"cuda_rng": torch.cuda.get_rng_state()} if device.type == "cuda" else {}
                save_checkpoint(
                    out / CHECKPOINT_FILE, modules={"model": net, "loss": loss_fn}, optimizer=opt,
                    tensors=extra_t,
                    state={"epoch": epoch, "step": step, "time_s": row["time_s"], "stopped": stopped,
                           "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                           "early_stopping": stopper.state_dict()},
                )
                reporter.note(_epoch_line(row))
                decision = [stopped, best]
            if world > 1:
                torch.distributed.broadcast_object_list(decision, src=0)
                stopped = bool(decision[0])
            if stopped:
                reporter.note(
                    f"early stop after epoch {epoch}: {config.early_stop} did not improve for "
                    f"{config.patience} epochs (best at epoch {stopper.best_epoch})"
                )
                break

    # ---- finish (rank 0): best weights, encoders + heads, embedding sets, result
    summary: dict[str, Any] = {}
    if main:
        best_epoch = int(config.epochs)
        if (out / BEST_FILE).is_file():
            bstate, _ = load_checkpoint(out / BEST_FILE, modules={"model": net, "loss": loss_fn})
            best_epoch = int(bstate.get("epoch", best_epoch))
        spec = {"model": model, "image_model": image_model, "text_model": text_model,
                "image_pooling": image_pooling, "text_pooling": text_pooling, "tokenizer": tokenizer,
                "format": "gapkit-encoders", "epoch": best_epoch, "freeze": freeze, "unlock_last": unlock_last}
        _save_encoders(enc, out, spec)
        save_heads(heads, out, extra={"loss": loss_fn.name, "temperature": loss_fn.temperature, "epoch": best_epoch,
                                      "trained_on": str(data), "mode": "end-to-end", "encoders": ENCODERS_CONFIG})
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        paths: dict[str, str] = {"run": str(out), "encoders": str(out / ENCODERS_WEIGHTS),
                                 "heads": str(out / "heads.safetensors")}
        if has_val:
            emb1, row1 = evaluate(1.0)
            _write_embedded(out / "val", emb1, dict(data_info, stage="after training", split="val", epoch=best_epoch))
            emb0 = _read_embedded(out / "val_before")
            before = validation_metrics(emb0.images, emb0.texts, emb0.image_row)
            after = validation_metrics(emb1.images, emb1.texts, emb1.image_row)
            paths["val_before"], paths["val"] = str(out / "val_before"), str(out / "val")
        n_train_texts = sum(len(ds.records[int(i)].texts) for i in train_idx)
        if n_train_texts <= TRAIN_SET_MAX_TEXTS:
            emb_tr = _embed(net, pixels, ds, list(map(int, train_idx)), batch_size=eval_batch, precision=prec,
                            device=device, reporter=reporter, what="training pairs")
            _write_embedded(out / "train", emb_tr, dict(data_info, stage="after training", split="train",
                                                        epoch=best_epoch))
            paths["train"] = str(out / "train")
        history = read_metrics(out)
        summary = {
            "mode": "end-to-end",
            "run_dir": str(out),
            "paths": paths,
            "before_label": "initial encoders and heads",
            "before": before,
            "after": after,
            "best_epoch": best_epoch,
            "epochs_run": max([int(r.get("epoch", 0)) for r in history] or [0]),
            "stopped_early": stopped,
            "trainable": trainable,
            "batch_size": batch,
            "grad_accum": accum,
            "world_size": world,
            "precision": prec,
            "device": str(device),
            "n_train_images": int(len(train_idx)),
            "n_val_images": int(len(val_idx)),
        }
        atomic_write_bytes(out / RESULT_FILE, (json.dumps(summary, indent=2, default=float) + "\n").encode())
    dist_info.barrier()
    return summary


BEST_FILE = "best.safetensors"


def _finished(out: Path, config: Any) -> bool:
    """True when RUN holds a complete run of at least ``config.epochs`` epochs (or one stopped early)."""
    from safetensors import safe_open

    from .finetune import CHECKPOINT_FILE, RESULT_FILE

    if not all((out / f).is_file() for f in (RESULT_FILE, ENCODERS_WEIGHTS, "heads.json", CHECKPOINT_FILE)):
        return False
    try:
        with safe_open(str(out / CHECKPOINT_FILE), framework="pt") as fh:
            state = json.loads((fh.metadata() or {}).get("gapkit", "{}")).get("state", {})
    except Exception:
        return False
    return bool(state.get("stopped")) or int(state.get("epoch", 0)) >= int(config.epochs)


def _split_folder(data: str | os.PathLike[str], split: str) -> str:
    """DATA/SPLIT (e.g. medpix/train): the folder of one split of a dataset."""
    p = Path(data) / split
    if not p.exists():
        have = sorted(c.name for c in Path(data).iterdir() if c.is_dir()) if Path(data).is_dir() else []
        raise GapkitError(f"no split {split!r} here (folders: {', '.join(have) or 'none'})", path=data)
    return str(p)


class _Joined:
    """Two paired datasets as one (training images first, then the validation dataset's)."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b
        self.records = list(a.records) + list(b.records)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int) -> Any:
        return self.a.load_image(i) if i < len(self.a) else self.b.load_image(i - len(self.a))

    def describe(self) -> dict[str, Any]:
        return {"train": self.a.describe(), "val": self.b.describe()}


def _epoch_line(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    for k in ("val_loss", "val_gap", "val_cos_true_pairs", "val_i2t_R@1", "val_t2i_R@1"):
        if k in row:
            parts.append(f"{k} {row[k]:.4f}")
    return ", ".join(parts)


def _val_losses(loss_fn: nn.Module, emb: _Embedded, batch: int, progress: float) -> dict[str, float]:
    """The objective on fixed validation batches (first caption of each image), averaged."""
    _, first = np.unique(emb.image_row, return_index=True)
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        dev = _param_device(loss_fn)
        for s in range(0, len(first), batch):
            idx = first[s : s + batch]
            if len(idx) < 2:
                continue
            x = torch.from_numpy(emb.images[emb.image_row[idx]]).to(dev)
            y = torch.from_numpy(emb.texts[idx]).to(dev)
            total, parts = loss_fn(x, y, progress)
            w = len(idx)
            sums["loss"] = sums.get("loss", 0.0) + float(total) * w
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * w
            n += w
    return {k: v / n for k, v in sums.items()} if n else {}
