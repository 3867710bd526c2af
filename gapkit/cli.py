"""The ``gapkit`` command line: a Typer app whose commands live in ``gapkit/commands/``.

Each command module defines ``register(app)``; the commands parse options and call the library.
"""

from __future__ import annotations

import typer

from . import __version__
from .commands import embed, finetune, measure, plot

app = typer.Typer(
    name="gapkit",
    help="Measure, close and plot the modality gap between image and text embeddings.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gapkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Measure, close and plot the modality gap between image and text embeddings."""


for _module in (embed, measure, finetune, plot):
    _module.register(app)


def main() -> None:
    """Entry point of the ``gapkit`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
