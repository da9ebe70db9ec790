"""Status lines for long jobs made of parts (cross-validation folds, ensemble members, baselines):
no silent minutes.

A :class:`Status` prints one line when a part starts and, from a background thread, at least
every ``every`` seconds while it runs, each with the part, the time elapsed and the time left
estimated from the parts done::

    with Status("materials cross-validation", total=6) as st:
        for k in range(3):
            with st.part(f"fold {k + 1}/3: ensemble"):
                ...

    materials cross-validation: part 2/6, fold 1/3: scratch baseline; 1 min 40 s elapsed, about 3 min 20 s left
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TextIO


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Status:
    """One job's status line (see the module docstring). ``enabled=False`` prints nothing."""

    def __init__(self, what: str, total: int, *, every: float = 10.0, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.what, self.total, self.every, self.enabled = what, max(int(total), 1), every, enabled
        self.stream = stream
        self.finished = 0
        self.label = ""
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self) -> str:
        """The status now: part, elapsed and (after the first part) the time left."""
        elapsed = time.monotonic() - self._t0
        part = min(self.finished + 1, self.total)
        text = f"{self.what}: part {part}/{self.total}" + (f", {self.label}" if self.label else "")
        text += f"; {_duration(elapsed)} elapsed"
        if self.finished:
            text += f", about {_duration(elapsed / self.finished * (self.total - self.finished))} left"
        return text

    def _emit(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                print(text, file=self.stream or sys.stderr, flush=True)

    def start(self, label: str) -> None:
        """A part begins: say so."""
        self.label = label
        self._emit(self.line())

    def done(self) -> None:
        """The current part is finished."""
        self.finished += 1

    @contextlib.contextmanager
    def part(self, label: str) -> Iterator[None]:
        """``start(label)`` on entry, ``done()`` when the block finishes without an error."""
        self.start(label)
        yield
        self.done()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._emit(self.line())

    def __enter__(self) -> Status:
        self._t0 = time.monotonic()
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, name=f"status: {self.what}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if et is None:
            self._emit(f"{self.what}: done, {self.total} part(s) in {_duration(time.monotonic() - self._t0)}")
