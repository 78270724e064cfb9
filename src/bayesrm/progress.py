"""Progress bars for long jobs (rich), as a callback that long-running functions accept."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int, console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(k)`; the bar shows done/total, elapsed and remaining time."""
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn())
    with Progress(*cols, console=console or Console(stderr=True)) as prog:
        task = prog.add_task(description, total=total)
        yield lambda k: prog.advance(task, k)
