"""Plain progress lines for runs nobody watches in a terminal (nohup, CI, a job runner).

tqdm draws its bar on stderr, and only when stderr is a terminal (``disable=None``), so a redirected run
printed nothing for minutes. :class:`ProgressLog` prints one line every N steps or S seconds exactly where
the bar is not drawn, to stderr as well (stdout keeps the results: ``plan --json`` and the summary), as kohya does:
``train (hollow): step 40/300, loss 0.1234 (mean 0.1301), 0.21 s/step, ETA 0:00:55``.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

LOG_SECONDS = 30.0  # at most this long between two lines, whatever N is
LOG_LINES = 20  # default N: about this many lines per run


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


class ProgressLog:
    """``update(done, loss)`` after each step; a line when ``every`` steps or ``seconds`` have passed since the
    last one, and at the end. ``stream``: stderr; on only when it is not a terminal (``enabled`` overrides it)."""

    def __init__(self, label: str, total: int, start: int = 0, *, every: int = 0, seconds: float = LOG_SECONDS,
                 unit: str = "step", stream=None, enabled: bool | None = None, clock=time.monotonic):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = not (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.enabled, self.label, self.total, self.start, self.unit = enabled, label, total, start, unit
        self.every = every if every > 0 else max(1, (total - start) // LOG_LINES)
        self.seconds, self.clock = seconds, clock
        self.t0 = self.last_time = clock()
        self.last_done = start
        self.losses: list[float] = []

    def update(self, done: int, loss: float | None = None, extra: str = "") -> str | None:
        """Record that ``done`` of ``total`` are finished; returns the line printed, if any."""
        if loss is not None:
            self.losses.append(loss)
        if not self.enabled:
            return None
        now = self.clock()
        due = done - self.last_done >= self.every or now - self.last_time >= self.seconds or done >= self.total
        if not due or done == self.last_done:
            return None
        self.last_done, self.last_time = done, now
        line = self.line(done, now, extra)
        print(line, file=self.stream, flush=True)
        return line

    def line(self, done: int, now: float, extra: str = "") -> str:
        per = (now - self.t0) / max(1, done - self.start)
        parts = [f"{self.label}: {self.unit} {done}/{self.total}"]
        if self.losses:
            window = self.losses[-max(10, self.every):]  # per-step loss is noisy (random timesteps)
            parts.append(f"loss {self.losses[-1]:.4f} (mean {sum(window) / len(window):.4f})")
        parts.append(f"{per:.3f} s/{self.unit}")
        parts.append(f"ETA {_duration(per * (self.total - done))}" if done < self.total
                     else f"done in {_duration(now - self.t0)}")
        return ", ".join(parts) + (f", {extra}" if extra else "")


class LoggedBar:
    """A tqdm bar that also feeds a :class:`ProgressLog` (stage 1 counts samples through ``update(n)``)."""

    def __init__(self, bar, log: ProgressLog):
        self.bar, self.log, self.n = bar, log, log.start

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.n += n
        self.log.update(self.n)

    def __getattr__(self, name):
        return getattr(self.bar, name)
