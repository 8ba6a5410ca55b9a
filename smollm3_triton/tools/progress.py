"""A progress bar on stderr for the long tools (perplexity, bench)."""
from __future__ import annotations

import sys
import time

BAR_WIDTH = 30


class Progress:
    """Redrawn in place on a terminal, one line per update elsewhere (a log, a pipe).

    unit: what is counted ("chunks", "cases"). enabled=False counts without printing.
    As a context manager it ends its line on exit."""

    def __init__(self, total: int, label: str, *, unit: str = "chunks", stream=None, enabled: bool = True):
        self.total, self.label, self.unit, self.done = total, label, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        filled = round(BAR_WIDTH * self.done / self.total) if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = (f"{self.label} [{bar}] {self.done}/{self.total} {self.unit}, {elapsed:.1f} s, "
                f"ETA {eta:.1f} s{', ' + note if note else ''}")
        self.stream.write("\r\x1b[K" + line if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
