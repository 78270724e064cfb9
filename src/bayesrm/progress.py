"""Progress of long jobs: a rich bar on a terminal, plain periodic lines (count, rate, ETA) in logs and CI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_EVERY_S = 10.0  # seconds between plain progress lines when output is not a terminal


def _duration(seconds: float) -> str:
    s = max(round(seconds), 0)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def plain_line(description: str, done: int, total: int, elapsed: float, done_here: int, info: str = "") -> str:
    """`desc: 12/48 (25%), 0.80/s, eta 45s, info`: rate and ETA from the `done_here` items of this process."""
    rate = done_here / elapsed if elapsed > 0 else 0.0
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    if rate > 0:
        speed = f"{rate:.2f}/s" if rate >= 1 else f"{1 / rate:.1f} s each"
        eta = f", eta {_duration((total - done) / rate)}" if total > done else f", done in {_duration(elapsed)}"
    else:
        speed, eta = "starting", ""
    return f"{description}: {done}/{total}{pct}, {speed}{eta}" + (f", {info}" if info else "")


class Ticker:
    """Counts work done; on a terminal a rich bar, otherwise a plain line every `every` seconds and at the end."""

    def __init__(self, description: str, total: int, console: Console | None = None, completed: int = 0,
                 every: float = PLAIN_EVERY_S, enabled: bool = True) -> None:
        self.description, self.total, self.done, self.every = description, total, completed, every
        self.console = console or Console(stderr=True)
        self.enabled, self.plain = enabled, not self.console.is_terminal
        self.info, self.start0, self.t0, self.last = "", completed, 0.0, 0.0
        self.bar: Progress | None = None

    def __enter__(self) -> Ticker:
        self.t0 = self.last = time.perf_counter()
        if not self.enabled:
            return self
        if self.plain:
            self.console.print(plain_line(self.description, self.done, self.total, 0.0, 0), markup=False,
                               highlight=False)
        else:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=self.total, completed=self.done, info="")
        return self

    def update(self, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        """Set the count (or add `advance`) and the trailing info text (loss, gold, …)."""
        self.done = (self.done if completed is None else completed) + advance
        self.info = self.info if info is None else info
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=self.info)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self._line(now)

    def advance(self, k: int = 1, info: str | None = None) -> None:
        self.update(advance=k, info=info)

    def _line(self, now: float) -> None:
        self.console.print(plain_line(self.description, self.done, self.total, now - self.t0, self.done - self.start0,
                                      self.info), markup=False, highlight=False)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and exc[0] is None:
            self._line(time.perf_counter())


@contextmanager
def progress_bar(description: str, total: int, console: Console | None = None,
                 every: float = PLAIN_EVERY_S) -> Iterator[Callable[[int], None]]:
    """Yield `advance(k)`: a bar with done/total, elapsed and remaining time, or plain lines when not a terminal."""
    with Ticker(description, total, console, every=every) as t:
        yield t.advance
