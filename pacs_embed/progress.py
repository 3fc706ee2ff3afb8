"""Progress of a long command (an export of 100k rows, a reference import) on the terminal.

Only when the stream (stderr) is a terminal: in a pipe, a log file or a container's captured
output nothing is written, so scripts and logs see the commands' results only. One line,
redrawn in place at most every ``interval`` seconds, ended by :meth:`Progress.close`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO


class Progress:
    """``label: done/total (pct%)`` on ``stream`` (default stderr), if it is a terminal."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream)
        self.label = label
        self.total = total
        self.done = 0
        self._interval = interval
        self._clock = clock
        self._drawn_at: float | None = None
        self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, done: int, total: int | None = None, label: str | None = None) -> None:
        """Now ``done`` of ``total`` (kept when None), under ``label`` (kept when None)."""
        if total is not None:
            self.total = total
        relabelled = label is not None and label != self.label
        if label is not None:
            self.label = label
        self.done = done
        if not self.enabled:
            return
        now = self._clock()
        finished = self.total is not None and done >= self.total
        due = self._drawn_at is None or now - self._drawn_at >= self._interval
        if due or finished or relabelled:
            self._draw()
            self._drawn_at = now

    def advance(self, step: int = 1) -> None:
        self.update(self.done + step)

    def close(self) -> None:
        """Draw the last state and end the line (nothing when not a terminal)."""
        if not self.enabled or self._drawn_at is None:
            return
        self._draw()
        self.stream.write("\n")
        self.stream.flush()
        self._drawn_at = None

    def line(self) -> str:
        if self.total:
            share = min(100.0, 100.0 * self.done / self.total)
            return f"{self.label}: {self.done}/{self.total} ({share:.0f}%)"
        if self.total == 0:
            return f"{self.label}: 0/0"
        return f"{self.label}: {self.done}"

    def _draw(self) -> None:
        text = self.line()
        pad = max(0, self._width - len(text))  # blank what a longer previous line left
        self._width = len(text)
        self.stream.write(f"\r{text}{' ' * pad}")
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
