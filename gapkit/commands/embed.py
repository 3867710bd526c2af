"""`gapkit embed` (not built yet)."""

from __future__ import annotations

import typer

from ..console import fail


def register(app: typer.Typer) -> None:
    """Add the `embed` command to `app`."""

    @app.command("embed", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _cmd(ctx: typer.Context) -> None:
        """(not built yet)"""
        fail("`gapkit embed` is not built yet", code=3)
