"""`gapkit finetune`: close the gap by training projection heads (default) or the encoders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ..console import handle_errors

_DATASET_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".tar", ".txt"}

#: columns of the before/after table
TABLE_METRICS = ("gap", "cos_true_pairs", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


def _table(rows: list[tuple[str, dict[str, float]]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("")
    for m in TABLE_METRICS:
        table.add_column(m, justify="right")
    for label, metrics in rows:
        table.add_row(label, *(f"{metrics[m]:.3f}" if m in metrics else "-" for m in TABLE_METRICS))
    return table


def _is_dataset(path: Path) -> bool:
    """A paired dataset rather than embeddings: a folder that is no embedding set, or a manifest."""
    if path.is_dir():
        return not ((path / "info.json").exists() or (path / ".shards").is_dir() or (path / "img_emb").is_dir())
    return path.suffix.lower() in _DATASET_SUFFIXES


def register(app: typer.Typer) -> None:
    """Add the `finetune` command to `app`."""

    @app.command("finetune")
    @handle_errors
    def finetune(
        data: Optional[str] = typer.Argument(
            None, help="Embedding set, (2, N, D) .npy, .npz/.safetensors/.pt pair file, or (end-to-end) a paired dataset."
        ),
        out: Path = typer.Option(..., "-o", "--out", help="Run folder (heads, projected sets, metrics.jsonl)."),
        images: Optional[str] = typer.Option(None, "--images", help="Image embeddings file (with --texts)."),
        texts: Optional[str] = typer.Option(None, "--texts", help="Text embeddings file (with --images)."),
        val: Optional[str] = typer.Option(None, "--val", help="Validation embedding set (instead of --val-fraction)."),
        val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of images (or groups) held out."),
        group_by: Optional[str] = typer.Option(None, "--group-by", help="Split by this metadata column (e.g. case)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split, the init and the shuffling."),
        loss: str = typer.Option("clip+atp+cu", "--loss", help="clip, clip+atp+cu, clip+atp, clip+cu, clip+align+unif (Fahim)."),
        atp_weight: float = typer.Option(1.0, "--atp-weight", help="λ_atp."),
        cu_weight: float = typer.Option(1.0, "--cu-weight", help="λ_cu."),
        schedule: bool = typer.Option(False, "--schedule/--no-schedule", help="α (ATP): 1→2 after 50 %; β (CU): 1→0 from 20 % to 70 %."),
        temperature: float = typer.Option(0.07, "--temperature", help="τ (initial τ when learnable)."),
        learn_temperature: bool = typer.Option(True, "--learn-temperature/--fixed-temperature", help="Learn τ as open_clip (clamped at 1/100)."),
        epochs: int = typer.Option(20, "--epochs"),
        batch_size: int = typer.Option(256, "--batch-size"),
        lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate (heads mode)."),
        weight_decay: float = typer.Option(0.0, "--weight-decay"),
        dim: Optional[int] = typer.Option(None, "--dim", help="Shared dimension (default: the image width)."),
        head: str = typer.Option("linear", "--head", help="linear or mlp."),
        init: str = typer.Option("identity", "--init", help="identity (start from the input geometry) or random."),
        patience: int = typer.Option(5, "--patience", help="Stop after this many epochs without improvement (0: never)."),
        early_stop: str = typer.Option("val_loss", "--early-stop", help="Metric picking the best epoch (val_loss, val_gap, val_rsum, val_i2t_R@10, ...)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
        compare: bool = typer.Option(False, "--compare", help="Train clip (learnable τ), clip (fixed τ), clip+atp+cu and Fahim's loss; one table."),
        resume: bool = typer.Option(False, "--resume", help="Continue from RUN's last checkpoint."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty run folder."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar or notes."),
        # ---- end-to-end mode
        model: Optional[str] = typer.Option(None, "--model", help="End to end: an open_clip / HF CLIP model spec."),
        image_model: Optional[str] = typer.Option(None, "--image-model", help="End to end: separate image encoder."),
        text_model: Optional[str] = typer.Option(None, "--text-model", help="End to end: separate text encoder."),
        image_pooling: Optional[str] = typer.Option(None, "--image-pooling"),
        text_pooling: Optional[str] = typer.Option(None, "--text-pooling"),
        unlock_last: Optional[int] = typer.Option(None, "--unlock-last", help="End to end: train only the last N blocks."),
        freeze: Optional[str] = typer.Option(None, "--freeze", help="End to end: image or text tower frozen."),
        grad_accum: int = typer.Option(1, "--grad-accum"),
        precision: str = typer.Option("auto", "--precision", help="End to end: auto, fp32, bf16, fp16."),
        workers: int = typer.Option(0, "--workers"),
        split: Optional[str] = typer.Option(None, "--split", help="End to end: dataset split."),
        image_column: Optional[str] = typer.Option(None, "--image-column", help="End to end: the dataset's image column."),
        text_column: Optional[str] = typer.Option(None, "--text-column", help="End to end: the dataset's caption column."),
        label_column: Optional[str] = typer.Option(None, "--label-column", help="End to end: copy this column into the label."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="End to end: tokenizer of a separate text tower."),
        limit: Optional[int] = typer.Option(None, "--limit", help="End to end: use at most N pairs."),
    ) -> None:
        """Close the modality gap: train heads on embeddings (default) or the encoders end to end.

        Heads mode writes RUN/heads.safetensors + heads.json, RUN/train and RUN/val (projected
        embedding sets), RUN/metrics.jsonl and a before/after table of the validation pairs.
        """
        import sys

        from rich.console import Console

        from ..console import RichReporter, stderr

        # a wide console: the table has 9 columns and must not be cut when stdout is a pipe
        stdout = Console(file=sys.stdout, width=max(Console(file=sys.stdout).width, 130))
        from ..errors import GapkitError
        from ..finetune import TrainConfig, compare_variants, train_heads
        from ..store import load_embeddings

        config = TrainConfig(
            loss=loss, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, dim=dim,
            head=head, head_init=init, atp_weight=atp_weight, cu_weight=cu_weight, schedule=schedule,
            temperature=temperature, learn_temperature=learn_temperature, val_fraction=val_fraction,
            group_by=group_by, seed=seed, device=device, patience=patience, early_stop=early_stop,
        )
        config.validate()
        reporter = RichReporter(quiet=quiet)

        e2e = bool(model or image_model or text_model)
        emb = None
        if not e2e:
            if data is None and (images is None or texts is None):
                raise GapkitError("give DATA, or --images and --texts")
            try:
                emb = load_embeddings(data, images=images, texts=texts)
            except GapkitError:
                if data is not None and Path(data).exists() and _is_dataset(Path(data)):
                    e2e = True
                else:
                    raise
        if e2e:
            if data is None:
                raise GapkitError("end-to-end mode needs a paired dataset as DATA")
            if compare:
                raise GapkitError("--compare works in heads mode (on embeddings) only")
            try:
                from ..endtoend import finetune_end_to_end  # type: ignore[import-not-found]
            except ImportError:
                raise GapkitError(
                    "end-to-end fine-tuning (a dataset, or --model/--image-model/--text-model) is not built yet; "
                    "embed the dataset with `gapkit embed` and fine-tune heads on the embeddings"
                )
            options = {"split": split, "image_column": image_column, "text_column": text_column,
                       "label_column": label_column, "limit": limit, "val": val}
            result = finetune_end_to_end(
                data, out, config, model=model, image_model=image_model, text_model=text_model,
                image_pooling=image_pooling, text_pooling=text_pooling,
                dataset_options={k: v for k, v in options.items() if v is not None},
                tokenizer=tokenizer, unlock_last=unlock_last, freeze=freeze, grad_accum=grad_accum,
                precision=precision, workers=workers, resume=resume, overwrite=overwrite, reporter=reporter,
            )
            doc = result.to_dict() if hasattr(result, "to_dict") else dict(result or {})
            if json_out:
                stdout.print_json(json.dumps(doc, default=str))
            elif doc.get("after"):
                title = f"validation pairs (end to end): {config.loss}, best epoch {doc.get('best_epoch')}"
                stdout.print(_table([(doc.get("before_label", "before"), doc.get("before", {})),
                                     (f"after ({config.loss})", doc["after"])], title))
            return

        assert emb is not None
        val_set = load_embeddings(val) if val else None
        if compare:
            rows = compare_variants(emb, out, config, val=val_set, resume=resume, overwrite=overwrite, reporter=reporter)
            if json_out:
                stdout.print_json(json.dumps([{"variant": l, **m} for l, m in rows]))
            else:
                stdout.print(_table(rows, f"validation pairs ({out})"))
            if not quiet:
                stderr.print(f"runs written to {out}/<variant>/", highlight=False, markup=False)
            return
        res = train_heads(emb, out, config, val=val_set, resume=resume, overwrite=overwrite, reporter=reporter)
        if json_out:
            stdout.print_json(json.dumps(res.to_dict()))
            return
        if res.after:
            title = f"validation pairs: {config.loss}, best epoch {res.best_epoch} of {res.epochs_run}"
            stdout.print(_table([(res.before_label, res.before), (f"after ({config.loss})", res.after)], title))
        if not quiet:
            stderr.print(f"heads and projected sets written to {out}", highlight=False, markup=False)
