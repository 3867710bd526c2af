"""`gapkit embed DATA -o OUT --model SPEC`: a paired dataset -> an embedding set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..console import RichReporter, handle_errors, stderr


def register(app: typer.Typer) -> None:
    """Add the `embed` command to `app`."""

    @app.command("embed")
    @handle_errors
    def embed_cmd(
        data: str = typer.Argument(..., help="Paired dataset: imagefolder, sidecar folder, manifest file or tar shards."),
        out: Path = typer.Option(..., "-o", "--out", help="Embedding set folder to write (resumed if unfinished)."),
        model: Optional[str] = typer.Option(
            None, "--model", "-m",
            help="Dual encoder: ViT-B-32:TAG, ViT-B-32:/ckpt.safetensors, ViT-B-32:random, hf-hub:ORG/NAME, "
            "local-dir:PATH, CONFIG.json[:random], or a transformers CLIP-like id/folder."),
        image_model: Optional[str] = typer.Option(None, "--image-model", help="Image tower spec (transformers vision model or open_clip spec)."),
        text_model: Optional[str] = typer.Option(None, "--text-model", help="Text tower spec (transformers text model or open_clip spec)."),
        image_pooling: str = typer.Option("auto", "--image-pooling", help="auto|pooler|cls|mean (transformers vision towers)."),
        text_pooling: str = typer.Option("auto", "--text-pooling", help="auto|cls|mean|pooler (transformers text towers)."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder/id when the text model's folder has none."),
        heads: Optional[Path] = typer.Option(None, "--heads", help="A `gapkit finetune` run: apply its heads (and its trained encoders)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: cuda, then mps, then cpu)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32|fp16|bf16 autocast (default bf16 on CUDA, fp32 elsewhere)."),
        batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass."),
        workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Image-decoding worker processes (default: CPUs - 1, at most 8; 0 = in the main process)."),
        shard_size: int = typer.Option(1024, "--shard-size", help="Images per shard (unit of resuming and of work per rank)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Embed only the first N images."),
        on_error: str = typer.Option("fail", "--on-error", help="fail: stop at a bad image or empty caption; skip: leave the pair out and record it."),
        dtype: str = typer.Option("float32", "--dtype", help="float32|float16 for the stored arrays."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo a finished (or unfinished) set from scratch."),
        format: Optional[str] = typer.Option(None, "--format", help="Force the dataset layout: imagefolder, sidecar, manifest, webdataset."),
        text_column: Optional[str] = typer.Option(None, "--text-column", help="Caption column (imagefolder, manifest)."),
        image_column: Optional[str] = typer.Option(None, "--image-column", help="Image path column (manifest)."),
        label_column: Optional[str] = typer.Option(None, "--label-column", help="Column copied as the label."),
        columns: Optional[str] = typer.Option(None, "--columns", help="Manifest without a header: comma-separated column names (ROCO: id,caption)."),
        image_template: Optional[str] = typer.Option(None, "--image-template", help="Manifest: image path from the image column's value, e.g. 'images/{}.jpg'."),
        image_root: Optional[Path] = typer.Option(None, "--image-root", help="Manifest: folder image paths are relative to (default: the manifest's folder)."),
        as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes."),
    ) -> None:
        """Embed every image and caption of DATA with an image and a text encoder into the embedding set OUT.

        Resumable: rerun the same command after a crash. Several processes:
        `torchrun --nproc_per_node N -m gapkit embed ...` (or srun under SLURM).
        """
        from ..embed import dist_info, embed

        rank = dist_info().rank
        reporter = RichReporter(quiet=quiet or rank != 0)
        result = embed(
            data, out, model=model, image_model=image_model, text_model=text_model, image_pooling=image_pooling,
            text_pooling=text_pooling, tokenizer=tokenizer, heads=heads, device=device, precision=precision,
            batch_size=batch_size, workers=workers, shard_size=shard_size, limit=limit, on_error=on_error,
            dtype=dtype, overwrite=overwrite, format=format, text_column=text_column, image_column=image_column,
            label_column=label_column, columns=columns, image_template=image_template, image_root=image_root,
            reporter=reporter,
        )
        if rank != 0:
            return
        if as_json:
            typer.echo(json.dumps(result.to_dict()))
        if not result.already_finished and not quiet:
            skipped = f", {result.n_skipped} skipped (see info.json)" if result.n_skipped else ""
            stderr.print(
                f"wrote {out}: {result.n_images} images, {result.n_texts} texts{skipped}; "
                f"computed {len(result.computed_shards)} of {result.n_shards} shards here "
                f"at {result.pairs_per_s:,.1f} pairs/s",
                highlight=False, markup=False, soft_wrap=True,
            )
