"""Progress reporting without printing.

Library functions that run long loops take a ``reporter: Reporter | None`` argument. The default
reports nothing. The CLI passes a rich-backed reporter (``gapkit.console.RichReporter``) that
draws progress bars and prints notes on stderr. Library code never prints.

Usage inside the library::

    reporter = reporter or Reporter()
    with reporter.task("embedding", total=n_pairs, unit="pairs") as task:
        for batch in loader:
            ...
            task.advance(len(batch))
    reporter.note("skipped 3 pairs (see info.json)")
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class Task:
    """A handle on one progress bar. The base class does nothing."""

    def advance(self, n: float = 1) -> None:
        """Move the bar forward by ``n`` units."""

    def set_total(self, total: float | None) -> None:
        """Change the expected total (``None``: unknown)."""

    def set_description(self, description: str) -> None:
        """Change the text shown beside the bar."""


class Reporter:
    """Receives progress and notes from library code. The base class is silent."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "it") -> Iterator[Task]:
        """A progress bar for one long loop, closed when the ``with`` block ends."""
        yield Task()

    def note(self, message: str) -> None:
        """An informative message for the user (the CLI prints it on stderr)."""


def ensure(reporter: Reporter | None) -> Reporter:
    """``reporter`` or a silent one."""
    return reporter if reporter is not None else Reporter()
