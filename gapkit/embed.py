"""The ``gapkit embed`` pipeline: a paired dataset + encoders -> an embedding set on disk.

- Images are decoded and preprocessed by DataLoader worker processes while the model runs;
  captions are tokenized in batches in the main process.
- The work is cut into shards of ``shard_size`` images, planned independently of the number of
  processes. Each finished shard is written through :class:`gapkit.store.ShardWriter` (a file
  that exists only when complete), so after ``kill -9`` the same call resumes, recomputes no
  finished shard, and ends with the same set as an uninterrupted run. A finished set is left
  alone unless ``overwrite``.
- Several processes (``torchrun``, or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``): rank ``r``
  computes the shards ``k`` with ``k % world == r``; rank 0 merges them after a barrier, so the
  set has the same rows, in the same order, as a one-process run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .encoders import Encoders, load_encoders, load_encoders_from_run, pick_device
from .errors import GapkitError
from .progress import Reporter, ensure
from .store import ShardWriter, is_finished

ON_ERROR = ("fail", "skip")
PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """This process's place among the ranks (from torchrun's or SLURM's variables)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    source: str = "single"


def dist_info() -> DistInfo:
    """Rank and world size from ``RANK``/``WORLD_SIZE`` (torchrun), else ``SLURM_PROCID``/``SLURM_NTASKS``."""
    env = os.environ
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])), "torchrun")
        if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
            return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    except ValueError as err:
        raise GapkitError(f"bad rank variables in the environment ({err})") from err
    return DistInfo()


class _Group:
    """torch.distributed, initialised only when there are several processes (gloo on CPU, nccl on CUDA)."""

    def __init__(self, info: DistInfo, device: torch.device) -> None:
        self.info = info
        self.owned = False
        if info.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            if info.source == "slurm":
                os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
                os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
                os.environ.setdefault("RANK", str(info.rank))
                os.environ.setdefault("WORLD_SIZE", str(info.world))
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world)
            self.owned = True

    def barrier(self) -> None:
        if self.info.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


# --------------------------------------------------------------------------------------------
# loading images in workers
# --------------------------------------------------------------------------------------------


class _Images(Dataset):
    """Item ``i``: (i, preprocessed image tensor or None, error message or None)."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            img = self.dataset.load_image(i)
        except GapkitError as err:
            return i, None, str(err)
        try:
            return i, self.transform(img), None
        except Exception as err:  # a preprocessing failure is this image's problem
            return i, None, f"{self.dataset.where(i)}: cannot preprocess image ({err})"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    idx = [i for i, t, _ in items if t is not None]
    pixels = torch.stack([t for _, t, _ in items if t is not None]) if idx else None
    errors = {i: e for i, t, e in items if t is None}
    return idx, pixels, errors


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class EmbedResult:
    """What a run did: counts, shards computed here and reused, speed."""

    path: str
    n_images: int = 0
    n_texts: int = 0
    n_skipped: int = 0
    n_shards: int = 0
    computed_shards: list[int] = field(default_factory=list)
    reused_shards: int = 0
    pairs_computed: int = 0
    seconds: float = 0.0
    pairs_per_s: float = 0.0
    already_finished: bool = False
    rank: int = 0
    world: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_workers() -> int:
    n = os.cpu_count() or 1
    return max(1, min(8, n - 1))


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that is neither empty nor an embedding set (finished or not)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GapkitError("exists and is not a folder", path=out)
    ours = (out / "info.json").is_file() or (out / ".shards").is_dir()
    if not ours and any(out.iterdir()):
        raise GapkitError("folder is not empty and is not an embedding set; choose another -o", path=out)


def _resolve_encoders(
    encoders: Encoders | None, model: str | None, image_model: str | None, text_model: str | None,
    image_pooling: str, text_pooling: str, tokenizer: str | None, heads: str | None, device: torch.device,
    reporter: Reporter,
) -> Encoders:
    if encoders is not None:
        return encoders.to(device)
    given = model is not None or image_model is not None or text_model is not None
    if heads is not None and (Path(heads) / "encoders.json").is_file():
        if not given:
            return load_encoders_from_run(heads, device=str(device), reporter=reporter)
        reporter.note(f"{heads} has trained encoders (encoders.json); using the given model instead")
    if not given:
        raise GapkitError("need --model SPEC, or --image-model SPEC and --text-model SPEC (or --heads RUN with trained encoders)")
    return load_encoders(model, image_model=image_model, text_model=text_model, image_pooling=image_pooling,
                         text_pooling=text_pooling, tokenizer=tokenizer, device=str(device), reporter=reporter)


def embed(
    data: str | os.PathLike[str] | Any,
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    image_model: str | None = None,
    text_model: str | None = None,
    image_pooling: str = "auto",
    text_pooling: str = "auto",
    tokenizer: str | None = None,
    encoders: Encoders | None = None,
    heads: str | os.PathLike[str] | None = None,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    shard_size: int = 1024,
    limit: int | None = None,
    on_error: str = "fail",
    dtype: str = "float32",
    overwrite: bool = False,
    format: str | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    columns: Sequence[str] | str | None = None,
    image_template: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
    reporter: Reporter | None = None,
) -> EmbedResult:
    """Embed every image and caption of ``data`` (a dataset path or a PairedDataset) into the
    embedding set ``out``; see the module docstring for resuming and several processes.

    ``precision``: fp32, fp16 or bf16 autocast (default bf16 on CUDA, fp32 elsewhere).
    ``on_error``: ``fail`` stops at the first unreadable image or empty caption with a
    GapkitError naming the file; ``skip`` leaves the pair out and records (id, path, reason) in
    info.json's ``skipped``. Returns an :class:`EmbedResult`; only rank 0's counts cover the set.
    """
    reporter = ensure(reporter)
    if on_error not in ON_ERROR:
        raise GapkitError(f"--on-error must be fail or skip, not {on_error!r}")
    if batch_size < 1 or shard_size < 1:
        raise GapkitError("--batch-size and --shard-size must be at least 1")
    if dtype not in ("float32", "float16"):
        raise GapkitError(f"--dtype must be float32 or float16, not {dtype!r}")
    out = Path(out)
    info = dist_info()
    dev = pick_device(device if device else (f"cuda:{info.local_rank}" if info.world > 1 and torch.cuda.is_available() else None))
    if dev.type == "cuda" and dev.index is None and info.world > 1:
        dev = torch.device("cuda", info.local_rank)  # one GPU per process
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise GapkitError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if info.rank != 0:
        reporter = Reporter()
    result = EmbedResult(path=str(out), rank=info.rank, world=info.world)

    # a finished set is left alone (every rank sees the same answer: nobody has changed it yet)
    _prepare_out(out, overwrite)
    if is_finished(out) and not overwrite:
        reporter.note(f"{out} is already a finished embedding set; nothing to do (--overwrite to redo it)")
        result.already_finished = True
        try:
            meta = json.loads((out / "info.json").read_text())
            result.n_images, result.n_texts = int(meta.get("n_images", 0)), int(meta.get("n_texts", 0))
            result.n_skipped = len(meta.get("skipped", []))
        except (OSError, ValueError):
            pass
        return result

    group = _Group(info, dev)
    try:
        return _run(data, out, group, dev, precision, result, reporter, _opts(
            model=model, image_model=image_model, text_model=text_model, image_pooling=image_pooling,
            text_pooling=text_pooling, tokenizer=tokenizer, encoders=encoders, heads=heads,
            batch_size=batch_size, workers=workers, shard_size=shard_size, limit=limit, on_error=on_error,
            dtype=dtype, overwrite=overwrite, format=format, text_column=text_column,
            image_column=image_column, label_column=label_column, columns=columns,
            image_template=image_template, image_root=image_root))
    finally:
        group.close()


def _opts(**kw: Any) -> dict[str, Any]:
    return kw


def _run(data: Any, out: Path, group: _Group, dev: torch.device, precision: str, result: EmbedResult,
         reporter: Reporter, o: dict[str, Any]) -> EmbedResult:
    rank, world = group.info.rank, group.info.world
    if o["overwrite"]:
        group.barrier()
        if rank == 0 and out.exists() and ((out / "info.json").is_file() or (out / ".shards").is_dir()):
            shutil.rmtree(out)
        group.barrier()

    # the dataset
    if isinstance(data, (str, os.PathLike)):
        from .datasets import open_dataset

        ds = open_dataset(data, format=o["format"], text_column=o["text_column"], image_column=o["image_column"],
                          label_column=o["label_column"], limit=o["limit"], columns=o["columns"],
                          image_template=o["image_template"], image_root=o["image_root"], reporter=reporter)
    else:
        ds = data
        if o["limit"] is not None and len(ds) > o["limit"]:
            ds = ds.subset(range(int(o["limit"])))
    records = ds.records
    n = len(records)
    if n == 0:
        raise GapkitError("the dataset has no images", path=str(data) if isinstance(data, (str, os.PathLike)) else None)

    # under --on-error fail, stop before any work on what can be seen without decoding
    if o["on_error"] == "fail":
        for i, rec in enumerate(records):
            if not rec.texts:
                raise GapkitError(f"image {rec.image_id!r} has no caption (record {i}; --on-error skip leaves it out)",
                                  path=ds.where(i))
            for k, t in enumerate(rec.texts):
                if not str(t).strip():
                    raise GapkitError(
                        f"empty caption {k} of image {rec.image_id!r} (record {i}; --on-error skip leaves it out)",
                        path=ds.where(i))
        if hasattr(ds, "check_files"):
            bad = ds.check_files()
            if bad:
                i, reason = bad[0]
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise GapkitError(f"image {reason}: record {i}, id {records[i].image_id!r}{more}; "
                                  "--on-error skip leaves such pairs out", path=ds.where(i))

    enc = _resolve_encoders(o["encoders"], o["model"], o["image_model"], o["text_model"], o["image_pooling"],
                            o["text_pooling"], o["tokenizer"], None if o["heads"] is None else str(o["heads"]),
                            dev, reporter)
    head_mod = None
    if o["heads"] is not None:
        from .heads import load_heads

        head_mod = load_heads(o["heads"], device=dev)
        head_mod.eval()

    shard_size = int(o["shard_size"])
    n_shards = math.ceil(n / shard_size)
    enc_desc = dict(enc.info)
    plan = {
        "dataset": ds.describe() if hasattr(ds, "describe") else {"n_images": n},
        "encoders": enc_desc,
        "heads": None if o["heads"] is None else str(Path(o["heads"]).resolve()),
        "shard_size": shard_size,
        "on_error": o["on_error"],
        "precision": precision,
    }
    if rank == 0:
        writer = ShardWriter(out, plan, n_shards)
    group.barrier()
    if rank != 0:
        writer = ShardWriter(out, plan, n_shards)
    mine = [k for k in range(n_shards) if k % world == rank]
    todo = [k for k in mine if not writer.done(k)]
    result.n_shards = n_shards
    result.reused_shards = len(mine) - len(todo)
    if result.reused_shards:
        reporter.note(f"resuming: {result.reused_shards} of {len(mine)} shards already done, {len(todo)} to compute")

    t0 = time.perf_counter()
    if todo:
        _compute(ds, enc, head_mod, writer, todo, shard_size, dev, precision, reporter, result, o)
    result.seconds = time.perf_counter() - t0
    result.pairs_per_s = result.pairs_computed / result.seconds if result.seconds > 0 else 0.0

    group.barrier()
    if rank == 0:
        info = {
            "encoders": enc.spec(),
            "dataset": plan["dataset"],
            "heads": plan["heads"],
            "precision": precision,
            "embed": {"shard_size": shard_size, "batch_size": o["batch_size"], "world_size": world,
                      "on_error": o["on_error"], "limit": o["limit"], "device": str(dev)},
        }
        if head_mod is not None:
            info["heads_config"] = getattr(head_mod, "config", None)
        for stale in out.glob(".final.tmp-*"):  # a merge that a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)
        writer.finalize(info, dtype=o["dtype"])
        meta = json.loads((out / "info.json").read_text())
        result.n_images, result.n_texts = int(meta["n_images"]), int(meta["n_texts"])
        result.n_skipped = len(meta.get("skipped", []))
    group.barrier()
    return result


def _compute(ds: Any, enc: Encoders, head_mod: Any, writer: ShardWriter, todo: Sequence[int], shard_size: int,
             dev: torch.device, precision: str, reporter: Reporter, result: EmbedResult, o: dict[str, Any]) -> None:
    records = ds.records
    n = len(records)
    bs = int(o["batch_size"])
    batches: list[list[int]] = []
    last_batch_of: dict[int, int] = {}
    for k in todo:
        idx = list(range(k * shard_size, min((k + 1) * shard_size, n)))
        for s in range(0, len(idx), bs):
            batches.append(idx[s: s + bs])
        last_batch_of[len(batches) - 1] = k
    workers = _default_workers() if o["workers"] is None else int(o["workers"])
    if workers > 0:  # the tokenizers library warns (on stderr) when a process forks after using threads
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = dev.type == "cuda"
    loader = DataLoader(
        _Images(ds, enc.image_transform),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=cuda,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    skip = o["on_error"] == "skip"
    autocast = (
        torch.autocast(device_type=dev.type, dtype=_AUTOCAST[precision])
        if precision in _AUTOCAST else None
    )
    dims: list[int] = []
    acc: dict[str, list[Any]] = {"im": [], "tx": [], "row": [], "im_meta": [], "tx_meta": [], "skipped": []}
    n_pairs = sum(len(records[i].texts) for k in todo for i in range(k * shard_size, min((k + 1) * shard_size, n)))

    def out_dims() -> list[int]:
        if not dims:
            with torch.inference_mode():
                a = torch.zeros(1, enc.image_dim, device=dev)
                b = torch.zeros(1, enc.text_dim, device=dev)
                if head_mod is not None:
                    a, b = head_mod.project_images(a), head_mod.project_texts(b)
            dims.extend([int(a.shape[-1]), int(b.shape[-1])])
        return dims

    enc.image_tower.eval()
    enc.text_tower.eval()
    with reporter.task("embedding", total=n_pairs, unit="pairs") as task:
        for b, (idx, pixels, errors) in enumerate(loader):
            batch_idx = batches[b]
            n_batch_texts = sum(len(records[i].texts) for i in batch_idx)
            for i in sorted(errors):
                rec = records[i]
                if not skip:
                    raise GapkitError(errors[i])
                acc["skipped"].append({"id": rec.image_id, "path": ds.where(i), "reason": errors[i],
                                       "n_texts": len(rec.texts)})
            keep_im: list[int] = []  # positions in pixels
            texts: list[str] = []
            tmeta: list[dict[str, Any]] = []
            local_rows: list[int] = []
            for p, i in enumerate(idx):
                rec = records[i]
                good = [(k, t) for k, t in enumerate(rec.texts) if str(t).strip()]
                for k, t in enumerate(rec.texts):
                    if not str(t).strip():
                        if not skip:
                            raise GapkitError(f"empty caption {k} of image {rec.image_id!r} (record {i})", path=ds.where(i))
                        acc["skipped"].append({"id": rec.image_id, "path": ds.where(i), "reason": f"empty caption {k}",
                                               "n_texts": 1})
                if not good:  # every caption was skipped above, or there were none: no pair left
                    if not rec.texts:
                        if not skip:
                            raise GapkitError(f"image {rec.image_id!r} has no caption (record {i})", path=ds.where(i))
                        acc["skipped"].append({"id": rec.image_id, "path": ds.where(i), "reason": "no caption",
                                               "n_texts": 0})
                    continue
                row = len(acc["im_meta"])
                keep_im.append(p)
                acc_meta = {"id": rec.image_id, "path": rec.source}
                acc_meta.update(rec.meta)
                acc["im_meta"].append(acc_meta)
                for k, t in good:
                    texts.append(str(t))
                    m = {"text": str(t)}
                    m.update(rec.text_meta[k] if k < len(rec.text_meta) else {})
                    tmeta.append(m)
                    local_rows.append(row)
            if keep_im:
                assert pixels is not None
                px = pixels if len(keep_im) == len(idx) else pixels[keep_im]
                tokens = enc.tokenize(texts)
                with torch.inference_mode():
                    if autocast is not None:
                        with autocast:
                            im, tx = _forward(enc, head_mod, px, tokens, dev)
                    else:
                        im, tx = _forward(enc, head_mod, px, tokens, dev)
                a = im.float().cpu().numpy()
                t = tx.float().cpu().numpy()
                if not dims:
                    dims.extend([a.shape[1], t.shape[1]])
                acc["im"].append(a)
                acc["tx"].append(t)
                acc["tx_meta"].extend(tmeta)
                acc["row"].extend(local_rows)
                result.pairs_computed += len(texts)
            task.advance(n_batch_texts)
            if b in last_batch_of:
                k = last_batch_of[b]
                d_im, d_tx = out_dims()
                writer.write(
                    k,
                    np.concatenate(acc["im"]) if acc["im"] else np.zeros((0, d_im), np.float32),
                    np.concatenate(acc["tx"]) if acc["tx"] else np.zeros((0, d_tx), np.float32),
                    np.asarray(acc["row"], dtype=np.int64),
                    acc["im_meta"],
                    acc["tx_meta"],
                    acc["skipped"],
                )
                result.computed_shards.append(k)
                for v in acc.values():
                    v.clear()


def _forward(enc: Encoders, head_mod: Any, pixels: torch.Tensor, tokens: Any, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    im = enc.encode_image(pixels.to(dev, non_blocking=True))
    tx = enc.encode_text(tokens)
    if head_mod is not None:
        try:
            with torch.autocast(device_type=dev.type, enabled=False):  # heads in float32
                im = head_mod.project_images(im.float())
                tx = head_mod.project_texts(tx.float())
        except RuntimeError as err:
            raise GapkitError(
                f"the heads do not fit these encoders (image dim {im.shape[-1]}, text dim {tx.shape[-1]}): "
                f"{str(err).splitlines()[0]}") from err
    return im, tx
