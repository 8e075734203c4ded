"""A stdlib progress bar for the long commands (``demo``, ``upload``, ``export``).

On a terminal it redraws one line in place; otherwise (a log file, CI, a pipe) it prints a plain
line at most every ``every_pct`` percent, so logs stay readable and short. Writes to stderr so
that a command's own output on stdout stays clean for scripts.
"""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """``with Progress(total, "training") as p: p.update(n, note="loss 0.31")``.

    Args:
        total: the count at completion (None: unknown, shows the count and rate only).
        label: what is counted, printed before the bar.
        unit: the unit of the count ("steps", "batches", "bytes").
        stream: where to draw (default stderr).
        every_pct: on a non-terminal, print a line each time this many percent more are done.
    """

    def __init__(self, total: int | None, label: str, *, unit: str = "steps", stream: IO[str] | None = None,
                 every_pct: float = 10.0) -> None:
        self.total = total if total and total > 0 else None
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every_pct
        self.n = 0
        self.note = ""
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._last_pct = -every_pct
        self._open = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int, note: str = "") -> None:
        """Set the count to ``n`` (absolute, not an increment) with an optional note."""
        self.n, self.note = n, note
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.1 or (self.total is not None and n >= self.total):
                self._last_draw = now
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
            return
        pct = 100.0 * n / self.total if self.total else None
        if pct is not None and pct - self._last_pct >= self.every:
            self._last_pct = pct
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        note = f"  {self.note}" if self.note else ""
        if self.total is None:
            return f"{self.label} {self.n} {self.unit} ({rate:.1f}/s){note}"
        frac = min(1.0, self.n / self.total)
        width = 24
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        left = (self.total - self.n) / rate if rate > 0 else 0.0
        return (f"{self.label} [{bar}] {self.n}/{self.total} {self.unit} {100 * frac:3.0f}%"
                f"  {elapsed:.0f}s<{left:.0f}s{note}")

    def close(self) -> None:
        """Finish the line (a terminal gets its final state and a newline)."""
        if not self._open:
            return
        self._open = False
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
        elif self.total is None or self._last_pct < 100.0 * self.n / self.total:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
