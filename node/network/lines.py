"""The lines a child process prints, read by a background thread: wait for the first line that
matches, within a timeout, without blocking on a child that has died (tests, benches, demo)."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable


class ChildLines:
    """Every line `proc` prints on stdout, in order; `on_line` sees each as it arrives."""

    def __init__(
        self, proc: subprocess.Popen[str], on_line: Callable[[str], None] | None = None
    ) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._on_line = on_line
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._on_line is not None:
                self._on_line(line)
            self._queue.put(line)

    def next_match(self, match: Callable[[str], bool], timeout: float) -> str | None:
        """The first unread line for which `match` is true, or None once `timeout` seconds
        pass or the child exits with nothing left to read. Lines read are kept in `seen`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._queue.empty():
                    return None
                continue
            self.seen.append(line)
            if match(line):
                return line
        return None

    def text(self) -> str:
        """Everything printed so far (reads what is waiting)."""
        while not self._queue.empty():
            self.seen.append(self._queue.get())
        return "".join(self.seen)

    def tail(self, n: int) -> str:
        return "".join(self.seen[-n:])


def starts_with(prefix: str) -> Callable[[str], bool]:
    return lambda line: line.startswith(prefix)


def contains(needle: str) -> Callable[[str], bool]:
    return lambda line: needle in line
