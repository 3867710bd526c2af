"""Terminal side of the CLI: rich progress bars on stderr and error handling.

Only the CLI (``gapkit.cli`` and ``gapkit.commands``) imports this module.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .errors import GapkitError
from .progress import Reporter, Task

stderr = Console(stderr=True)
stdout = Console()

F = TypeVar("F", bound=Callable[..., Any])


class _RateColumn(ProgressColumn):
    """Shows the rate in the task's own unit, e.g. ``412.3 pairs/s``."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed and task.completed:
            speed = task.completed / task.elapsed  # a single update: the average rate
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.1f} {unit}/s", style="progress.data.speed")


class _RichTask(Task):
    def __init__(self, progress: Progress, task_id: Any) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._id, n)

    def set_total(self, total: float | None) -> None:
        self._progress.update(self._id, total=total)

    def set_description(self, description: str) -> None:
        self._progress.update(self._id, description=description)


class RichReporter(Reporter):
    """Progress bars (with a rate) and notes on stderr; silent bars when ``quiet``."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or stderr

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "it") -> Iterator[Task]:
        if self.quiet:
            yield Task()
            return
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        with progress:
            task_id = progress.add_task(description, total=total, unit=unit)
            yield _RichTask(progress, task_id)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    """Print one error line on stderr and exit with ``code``."""
    stderr.print(f"error: {message}", style="bold red", highlight=False, markup=False, soft_wrap=True)
    raise SystemExit(code)


def handle_errors(fn: F) -> F:
    """Decorator for CLI commands: a GapkitError becomes one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GapkitError as err:
            fail(str(err))
        except KeyboardInterrupt:
            stderr.print("interrupted; finished work is kept on disk", style="yellow")
            raise SystemExit(130)

    return wrapper  # type: ignore[return-value]


def write_output(text: str, output: str | None) -> None:
    """Write ``text`` to the file ``output``, or to stdout when it is None or '-'."""
    if output in (None, "-"):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return
    from pathlib import Path

    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n")
    except OSError as err:
        raise GapkitError(f"cannot write output: {err.strerror or err}", path=output) from err
