"""User-facing errors.

Library code raises :class:`GapkitError` for anything a user can fix (bad input, missing file,
wrong shape). The CLI prints its one-line message to stderr and exits with status 2, without a
traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class GapkitError(Exception):
    """An error caused by the user's input, with the file and row it concerns.

    ``str(err)`` is one line: ``"<path>: row <row>: <message>"`` (path and row when known).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        row: int | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.row = row
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.row is not None:
            parts.append(f"row {self.row}")
        parts.append(self.message)
        return ": ".join(parts)
