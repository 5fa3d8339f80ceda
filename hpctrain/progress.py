"""One progress reporter for every long loop: prep, tokenizing, conversion, reshard, inference, training.

On a terminal it redraws one line (at most 5 times a second). When the output is not a terminal
(a Slurm batch log, a pipe) it prints a whole line every ``interval`` seconds - count, rate and
ETA - plus one at the end, so a batch log shows how far a job is while it runs. (tqdm with
``disable=None`` prints nothing at all there.) The interval is HPCTRAIN_PROGRESS_INTERVAL seconds
(default 30). Lines go to stderr, next to the log messages.
"""
from __future__ import annotations

import os
import sys
import time

DEFAULT_INTERVAL_S = 30.0
TTY_INTERVAL_S = 0.2


def interval_from_env() -> float:
    text = os.environ.get("HPCTRAIN_PROGRESS_INTERVAL", "")
    try:
        return max(float(text), 0.0) if text else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """``with Progress(total, "tokenize", "rows") as bar: ... bar.update(n)``.

    ``enabled=False`` makes every call a no-op (``--no_progress``). ``total`` may be None (unknown):
    the line then shows count and rate only. ``initial``: where the count starts (a resumed run).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
                 stream=None, interval: float | None = None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = TTY_INTERVAL_S if self.tty else (interval_from_env() if interval is None else interval)
        self.clock = clock
        self.count = self.initial = initial  # a resumed job starts counting at its checkpoint
        self.start = self._last = clock()
        self._closed = False

    def update(self, n: int = 1) -> None:
        if not self.enabled or self._closed:
            return
        self.count += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(self.line(now), final=False)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.start
        rate = (self.count - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [self._count_text()]
        parts.append(f"{rate:.2f} {self.unit}/s" if rate < 100 else f"{rate:.0f} {self.unit}/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"eta {format_duration((self.total - self.count) / rate)}")
        return " | ".join(parts)

    def _count_text(self) -> str:
        if not self.total:
            return f"{self.desc}: {self.count} {self.unit}"
        return f"{self.desc}: {self.count}/{self.total} {self.unit} ({100 * self.count / self.total:.0f}%)"

    def _emit(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, ok: bool = True) -> None:
        """The last line: "done", or "stopped" when the loop ended with an error."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._emit(self.line() + (" | done" if ok else " | stopped"), final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)
