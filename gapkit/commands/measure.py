"""`gapkit measure` (not built yet)."""

from __future__ import annotations

import typer

from ..console import fail


def register(app: typer.Typer) -> None:
    """Add the `measure` command to `app`."""

    @app.command("measure", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _cmd(ctx: typer.Context) -> None:
        """(not built yet)"""
        fail("`gapkit measure` is not built yet", code=3)
