"""`gapkit plot`: Figure 2 (umap), cosine histograms (hist), the shift experiment (shift) and
training curves (training). Thin: parses options and calls :mod:`gapkit.plot`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..console import RichReporter, handle_errors

plot_app = typer.Typer(
    name="plot",
    help="Draw the figures: umap (Figure 2), hist, shift, training. PNG, PDF or SVG by extension.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

OUTPUT = typer.Option(..., "-o", "--output", help="Figure file: .png, .pdf or .svg.")
DPI = typer.Option(300, "--dpi", min=20, max=2400, help="Resolution of PNGs (and of rasterised points in PDF/SVG).")
SIZE = typer.Option(
    None, "--size", help="Figure size: 'single' (3.5 in wide), 'double' (7.16 in) or 'W,H' in inches. Default: fits the panels."
)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or notes.")


def _split(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",")]


def _load(paths: List[Path]):  # type: ignore[no-untyped-def]
    from ..store import load_embeddings

    return [load_embeddings(p) for p in paths]


@plot_app.command("umap")
@handle_errors
def umap_cmd(
    sets: List[Path] = typer.Argument(..., help="Embedding sets (folders, (2,N,D) .npy, .npz, ...), one panel each."),
    output: Path = OUTPUT,
    titles: Optional[str] = typer.Option(None, "--titles", help='Panel titles, comma-separated: "init,CLIP,CLIP+ATP+CU".'),
    color_by: Optional[str] = typer.Option(
        None, "--color-by", help="Metadata column to colour by; 'modality' for two colours. Default: label if every set has it."
    ),
    method: str = typer.Option("umap", "--method", help="umap (cosine metric, seeded) or pca (fast, exact)."),
    pair_lines: int = typer.Option(0, "--pair-lines", min=0, help="Draw thin lines between K random true pairs per panel."),
    max_points: Optional[int] = typer.Option(
        None, "--max-points", min=1, help="At most N pairs per set, sampled stratified by the colour column (seeded)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of UMAP, sampling and pair lines."),
    n_neighbors: int = typer.Option(15, "--n-neighbors", min=2, help="UMAP n_neighbors."),
    min_dist: float = typer.Option(0.1, "--min-dist", min=0.0, help="UMAP min_dist."),
    cols: Optional[int] = typer.Option(None, "--cols", min=1, help="Panels per row (default: up to 4)."),
    no_gap: bool = typer.Option(False, "--no-gap", help="Do not print each set's gap in its panel title."),
    refit: bool = typer.Option(False, "--refit", help="Ignore cached coordinates and fit again."),
    dpi: int = DPI,
    size: Optional[str] = SIZE,
    quiet: bool = QUIET,
) -> None:
    """Figure 2: each set's images (triangles) and texts (diamonds) mapped to 2-D together."""
    from ..plot import plot_umap

    reporter = RichReporter(quiet=quiet)
    embs = _load(sets)
    res = plot_umap(
        embs,
        output,
        titles=_split(titles),
        color_by=color_by,
        method=method.lower(),
        pair_lines=pair_lines,
        max_points=max_points,
        seed=seed,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        dpi=dpi,
        size=size,
        show_gap=not no_gap,
        refit=refit,
        ncols=cols,
        reporter=reporter,
    )
    typer.echo(str(res.path))


@plot_app.command("hist")
@handle_errors
def hist_cmd(
    sets: List[Path] = typer.Argument(..., help="Embedding sets, one panel each."),
    output: Path = OUTPUT,
    titles: Optional[str] = typer.Option(None, "--titles", help="Panel titles, comma-separated."),
    n_random: int = typer.Option(100_000, "--random-pairs", min=1, help="Random (non-)pairs drawn per set."),
    bins: int = typer.Option(60, "--bins", min=2, help="Histogram bins (shared by all panels)."),
    seed: int = typer.Option(0, "--seed"),
    dpi: int = DPI,
    size: Optional[str] = SIZE,
    quiet: bool = QUIET,
) -> None:
    """True-pair cosines against random-pair cosines, per set, means marked."""
    from ..plot import plot_hist

    res = plot_hist(
        _load(sets), output, titles=_split(titles), n_random=n_random, bins=bins, seed=seed, dpi=dpi, size=size,
        reporter=RichReporter(quiet=quiet),
    )
    typer.echo(str(res.path))


@plot_app.command("shift")
@handle_errors
def shift_cmd(
    set_: Path = typer.Argument(..., metavar="SET", help="One embedding set."),
    output: Path = OUTPUT,
    lambda_min: float = typer.Option(-0.5, "--lambda-min", help="Smallest shift λ (negative widens the gap)."),
    lambda_max: float = typer.Option(1.5, "--lambda-max", help="Largest shift λ (1 makes the centroids meet)."),
    steps: int = typer.Option(41, "--steps", min=2, help="Number of λ values (λ = 0 is always added)."),
    temperature: float = typer.Option(0.01, "--temperature", help="τ of the clip loss (CLIP's learned τ is 0.01)."),
    batch_size: int = typer.Option(1024, "--batch-size", min=2, help="Pairs per clip-loss batch (loss averaged over batches)."),
    title: Optional[str] = typer.Option(None, "--title"),
    seed: int = typer.Option(0, "--seed", help="Seed of the batch split."),
    as_json: bool = typer.Option(False, "--json", help="Also print the numbers as JSON on stdout."),
    dpi: int = DPI,
    size: Optional[str] = SIZE,
    quiet: bool = QUIET,
) -> None:
    """The embedding-shift experiment (Liang et al. 2022): gap, cos_true_pairs, clip loss, R@1 against λ."""
    from ..plot import lambda_grid, plot_shift

    emb = _load([set_])[0]
    res = plot_shift(
        emb, output, lambdas=lambda_grid(lambda_min, lambda_max, steps), temperature=temperature,
        batch_size=batch_size, seed=seed, title=title, dpi=dpi, size=size, reporter=RichReporter(quiet=quiet),
    )
    if as_json:
        typer.echo(json.dumps(res.data))
    else:
        typer.echo(str(res.path))


@plot_app.command("training")
@handle_errors
def training_cmd(
    runs: List[Path] = typer.Argument(..., metavar="RUN...", help="Finetune run folders (with metrics.jsonl)."),
    output: Path = OUTPUT,
    labels: Optional[str] = typer.Option(None, "--labels", help="Run names in the legend, comma-separated."),
    dpi: int = DPI,
    size: Optional[str] = SIZE,
    quiet: bool = QUIET,
) -> None:
    """Training curves of finetune runs, side by side: loss terms, val gap, cos true pairs, R@10."""
    from ..plot import plot_training

    res = plot_training(runs, output, labels=_split(labels), dpi=dpi, size=size, reporter=RichReporter(quiet=quiet))
    typer.echo(str(res.path))


def register(app: typer.Typer) -> None:
    """Add the `plot` command group to `app`."""
    app.add_typer(plot_app, name="plot")
