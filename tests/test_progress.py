"""Progress off a terminal: plain lines with count, rate and ETA, at most every `every` seconds, and at the end."""

from __future__ import annotations

import io

from rich.console import Console

from bayesrm.progress import Ticker, plain_line, progress_bar


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_plain_line_counts_rate_and_eta() -> None:
    assert plain_line("fit", 12, 48, 6.0, 12, "loss 0.5") == "fit: 12/48 (25%), 2.00/s, eta 18s, loss 0.5"
    assert plain_line("fit", 1, 4, 10.0, 1) == "fit: 1/4 (25%), 10.0 s each, eta 30s"
    assert plain_line("fit", 48, 48, 75.0, 48) == "fit: 48/48 (100%), 1.6 s each, done in 1m15s"
    assert plain_line("fit", 0, 48, 0.0, 0) == "fit: 0/48 (0%), starting"
    # resumed at 40 of 100: the rate counts only the 10 items done by this process
    assert plain_line("fit", 50, 100, 20.0, 10) == "fit: 50/100 (50%), 2.0 s each, eta 1m40s"


def test_not_a_terminal_prints_plain_lines_not_a_bar() -> None:
    """Before: rich drew nothing when stderr was a file, so long jobs looked hung in logs and CI."""
    console, buf = _console()
    with progress_bar("scoring", 5, console, every=0.0) as advance:
        for _ in range(5):
            advance(1)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "scoring: 0/5 (0%), starting"
    assert [ln.split(",")[0] for ln in lines[1:]] == [f"scoring: {k}/5 ({20 * k}%)" for k in (1, 2, 3, 4, 5)]
    assert "eta" in lines[1] and "done in" in lines[-1]


def test_lines_are_rate_limited_and_info_is_carried() -> None:
    console, buf = _console()
    with Ticker("train (steps)", 100, console, completed=40, every=3600.0) as t:
        for _ in range(60):
            t.advance(1, info="loss 0.7")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2  # the start line and the final one: none in between within the hour
    assert lines[0].startswith("train (steps): 40/100") and lines[1].startswith("train (steps): 100/100")
    assert lines[1].endswith("loss 0.7")


def test_disabled_ticker_prints_nothing() -> None:
    console, buf = _console()
    with Ticker("x", 3, console, enabled=False, every=0.0) as t:
        t.advance(3)
    assert buf.getvalue() == ""
