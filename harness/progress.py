"""Progress of a long command: the step, items done of total, elapsed time and an estimate of what is left.

On a terminal it is a rich progress bar on stderr; otherwise (a CI log, a pipe) one plain
line per item, flushed at once, so a log shows progress while the command runs.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


class Progress:
    """``with Progress("conformance reference", total=38) as p: p.advance("outputs.mixed_model pass")``.

    ``expected_s`` (seconds for the whole step, when known beforehand) drives the estimate
    until the first items are done; after that the pace so far does.
    """

    def __init__(self, step: str, total: int, *, expected_s: float | None = None, stream: TextIO | None = None):
        self.step, self.total, self.expected_s = step, max(total, 0), expected_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.stream.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Bar(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[last]}"),
                console=None, transient=False,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self.step, total=self.total or None, last="")
        else:
            self._line(f"{self.step}: {self.total} to do" + (f", about {_clock(self.expected_s)}" if self.expected_s else ""))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._line(f"{self.step}: {self.done} of {self.total} done in {_clock(self.elapsed)}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float | None:
        """Seconds still to go: the expected duration's rest and the pace so far, the pace weighing more as items finish.

        (The first items carry start-up costs, so the pace alone overestimates early on.)
        """
        pace = self.elapsed / self.done * max(self.total - self.done, 0) if self.done else None
        if not self.expected_s:
            return pace
        rest = max(self.expected_s - self.elapsed, 0.0)
        if pace is None:
            return rest
        f = self.done / self.total if self.total else 1.0
        return (1 - f) * rest + f * pace

    def advance(self, text: str = "", amount: int = 1) -> None:
        """One more item done; ``text`` says which (and how it went)."""
        self.done += amount
        if self._bar is not None:
            self._bar.update(self._task, advance=amount, last=text[:60])
            return
        left = self.remaining()
        eta = f", about {_clock(left)} left" if left is not None else ""
        self._line(f"[{self.done}/{self.total}] {self.step}: {text} ({_clock(self.elapsed)} elapsed{eta})")

    def _line(self, text: str) -> None:
        print(f"zcbench: {text}", file=self.stream, flush=True)
