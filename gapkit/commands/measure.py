"""`gapkit measure`: every modality-gap statistic of one or several embedding sets, in one table."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, List, Optional

import typer

from ..console import RichReporter, handle_errors, stderr, write_output
from ..errors import GapkitError

_SUFFIX_FORMATS = {".json": "json", ".csv": "csv", ".md": "markdown", ".markdown": "markdown", ".tex": "latex"}


def _split(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _provenance(emb: Any, source: str) -> dict[str, Any]:
    info = emb.info or {}
    out: dict[str, Any] = {
        "input": source,
        "n_images": emb.n_images,
        "n_texts": emb.n_texts,
        "image_dim": int(emb.images.shape[1]),
        "text_dim": int(emb.texts.shape[1]),
        "dtype": str(emb.images.dtype),
    }
    for key in ("encoders", "encoder", "dataset", "source_format", "created", "gapkit_version", "format_version"):
        if key in info:
            out["set_" + key if key in ("created", "gapkit_version", "format_version") else key] = info[key]
    return out


def rich_table(results: list, names: list[str]) -> Any:
    """The terminal table: one row per metric, one column per set."""
    from rich.table import Table

    from ..report import format_value, metric_rows

    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for m in metric_rows(results):
        table.add_row(m, *(format_value(r, m) for r in results))
    return table


def register(app: typer.Typer) -> None:
    """Add the `measure` command to `app`."""

    @app.command("measure")
    @handle_errors
    def _cmd(
        sets: Optional[List[str]] = typer.Argument(
            None,
            help="Embedding sets: a gapkit set folder, a (2, N, D) .npy, an .npz/.safetensors/.pt "
            "with image and text arrays, or a clip-retrieval output folder.",
            show_default=False,
        ),
        images: Optional[Path] = typer.Option(
            None, "--images", help="Image embeddings file (.npy/.npz/.safetensors/.pt), with --texts."
        ),
        texts: Optional[Path] = typer.Option(None, "--texts", help="Text embeddings file, row i pairs with image row i."),
        names: Optional[str] = typer.Option(None, "--names", help="Column names, comma-separated, one per set."),
        metrics: Optional[str] = typer.Option(
            None,
            "--metrics",
            help="Comma-separated metrics or groups (default, all, retrieval, uniformity, labels). "
            "Default: the O(N*D) statistics and retrieval recall (+ vmeasure,nmi,ari with labels).",
        ),
        label: Optional[str] = typer.Option(None, "--label", help="Metadata column to use as labels."),
        labels: Optional[Path] = typer.Option(
            None, "--labels", help="Labels file: one per text row (.npy, JSON list, or one per line)."
        ),
        bootstrap: int = typer.Option(0, "--bootstrap", min=0, help="Resamples for 95 % percentile intervals (0: none)."),
        seed: int = typer.Option(0, "--seed", help="Seed of every random choice (bootstrap, subsamples, splits)."),
        fmt: Optional[str] = typer.Option(
            None,
            "--format",
            "-f",
            help="table, json, csv, markdown or latex (default: table, or from the -o suffix).",
        ),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the result to this file."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or notes."),
    ) -> None:
        """Measure the modality gap: gap, true-pair cosine and angle, RMG, retrieval, ... per set.

        Examples:

          gapkit measure my_set/

          gapkit measure init/ clip/ ours/ --names init,clip,ours --bootstrap 1000 -f latex -o table.tex

          gapkit measure --images img.npy --texts txt.npy --metrics gap,cos_true_pairs -f json
        """
        from ..metrics import measure_set
        from ..report import FORMATS, render
        from ..store import load_embeddings

        sources: list[tuple[str, dict[str, Any]]] = []
        if images is not None or texts is not None:
            if images is None or texts is None:
                raise GapkitError("--images and --texts go together")
            sources.append((f"{images}+{texts}", {"images": str(images), "texts": str(texts)}))
        for s in sets or []:
            sources.append((s, {"source": s}))
        if not sources:
            raise GapkitError("nothing to measure: give one or more embedding sets, or --images A --texts B")
        if label is not None and labels is not None:
            raise GapkitError("give --label COLUMN or --labels FILE, not both")
        col_names = _split(names)
        if col_names and len(col_names) != len(sources):
            raise GapkitError(f"--names has {len(col_names)} names for {len(sources)} sets")
        if fmt is None:
            fmt = _SUFFIX_FORMATS.get(Path(output).suffix.lower(), "table") if output not in (None, "-") else "table"
        if fmt not in FORMATS:
            raise GapkitError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        from ..metrics import resolve_metrics

        resolve_metrics(metrics, have_labels=label is not None or labels is not None)  # fail fast on names

        reporter = RichReporter(quiet=quiet)
        results = []
        inputs = []
        for i, (src, kw) in enumerate(sources):
            emb = load_embeddings(**kw, labels=str(labels) if labels is not None else None)
            lab = emb.labels(label) if (label is not None or labels is not None) else None
            name = col_names[i] if col_names else emb.name
            extra: dict[str, Any] = {"names": (kw["images"], kw["texts"])} if "images" in kw else {}
            res = measure_set(
                emb, labels=lab, metrics=metrics, bootstrap=bootstrap, seed=seed, reporter=reporter, name=name, **extra
            )
            results.append(res)
            prov = _provenance(emb, src)
            prov["name"] = name
            inputs.append(prov)
        col_names = [r.name for r in results]
        for r in results:
            for note in r.notes:
                reporter.note(f"{r.name}: {note}")
        if fmt == "table":
            table = rich_table(results, col_names)
            if output in (None, "-"):
                from ..console import stdout

                stdout.print(table)
            else:
                from rich.console import Console

                buf = io.StringIO()
                Console(file=buf, width=200, no_color=True).print(table)
                write_output(buf.getvalue(), output)
            return
        prov = {
            "metrics": list(results[0].values),
            "bootstrap": bootstrap,
            "seed": seed,
            "labels": label or (str(labels) if labels is not None else None),
            "inputs": inputs,
        }
        write_output(render(results, col_names, fmt, prov), output)
        if output not in (None, "-") and not quiet:
            stderr.print(f"wrote {output}", highlight=False, markup=False)
