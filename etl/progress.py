"""The build's progress display, and every message printed while it is shown.

One overall bar in the parent process; workers never print. Whatever a task writes to its
standard error — Python warnings, and what C libraries print straight to file descriptor 2
(libjpeg's ``Corrupt JPEG data: …``) — is captured around the task (:func:`run_captured`)
and handed back with its result, for the parent to print as lines of their own above the bar
(:meth:`Progress.write`).

On a terminal the bar is a tqdm bar and messages go above it (``tqdm.write``). Where standard
error is not a terminal (a Slurm log, a pipe, a file) there is no carriage return at all: a
plain progress line at most every ``every_s`` seconds and one at the end, each its own line,
so that no message ever shares a line with the bar.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

PREFIX = "progress:"  # what a plain progress line starts with


class Progress:
    """The one progress display of a build. ``enabled=False`` shows no progress (messages are
    still printed, one per line)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, unit: str = "frame",
                 every_s: float = 30.0):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.unit, self.every_s = enabled, unit, every_s
        self.total = self.n = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit=unit, file=self.stream, smoothing=0.1,
                            dynamic_ncols=True)

    # ------------------------------------------------------------------ counts
    def add_total(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self._line()

    # ------------------------------------------------------------------ messages
    def write(self, msg: str) -> None:
        """``msg`` on lines of its own (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            self.stream.write(msg + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled:
            self._line()
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> None:
        self.last = time.monotonic()
        dt = self.last - self.t0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / dt:.1f} {self.unit}/s" if dt > 0 else ""
        self.write(f"{PREFIX} {self.n}/{self.total} {self.unit}s{pct}{rate}, "
                   f"{time.strftime('%H:%M:%S', time.gmtime(dt))} elapsed")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def warnings_to(write: Callable[[str], None]) -> Iterator[None]:
    """Python warnings shown while this is active are printed with ``write`` as one line
    (``warning: Category: message``) instead of straight to standard error."""

    def show(message, category, filename, lineno, file=None, line=None):
        write(f"warning: {category.__name__}: {' '.join(str(message).split())}")

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def run_captured(fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` (a dict-returning build task) with its standard error captured: Python
    warnings (one line each) and everything written to file descriptor 2 meanwhile (C
    libraries) come back as ``result["output"]``, a list of lines, in place of being printed.
    Runs in a worker process, or in the parent between two updates of its bar."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to capture (closed): warnings still come back
        with warnings.catch_warnings(record=True) as caught:
            res = fn(*args)
        res["output"] = [_warning_line(w) for w in caught]
        return res
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    res = fn(*args)
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
            tmp.seek(0)
            raw = tmp.read().decode("utf-8", errors="replace")
    finally:
        os.close(saved)
    lines = [_warning_line(w) for w in caught]
    lines += [x.rstrip() for x in raw.replace("\r", "\n").splitlines() if x.strip()]
    res["output"] = lines
    return res


def _warning_line(w: warnings.WarningMessage) -> str:
    return f"{w.category.__name__}: {' '.join(str(w.message).split())}"
