"""The DHT child process and its p2pd grandchild: start, stop, and never leave an orphan.

hivemind runs the DHT in a forked process which spawns the go `p2pd` daemon. This module puts
both in their own process group (a terminal Ctrl+C reaches only the node, which then withdraws
its records before stopping them) and makes the DHT process take p2pd down with it if the node
dies without shutting down (Linux parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hivemind

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc; empty if it has gone)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    out: list[int] = []
    todo = child_pids(pid)
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += child_pids(p)
    return out


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_all(pids: Iterable[int], sig: int = signal.SIGTERM, wait: float = 3.0) -> None:
    """Signal every pid, wait up to `wait` seconds, then SIGKILL those still alive."""
    pids = [p for p in pids if pid_alive(p)]
    for p in pids:
        _signal(p, sig)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if pid_alive(p):
            _signal(p, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _stop_children_and_exit(signum: int, frame: Any) -> None:
    """SIGTERM in the DHT process (parent died, or a hard stop): take p2pd down, then exit."""
    kill_all(child_pids(os.getpid()), wait=2.0)
    os._exit(0)


class NodeDHT(hivemind.DHT):  # type: ignore[misc]  # hivemind is untyped
    """hivemind's DHT whose process (and p2pd) live in their own process group and die with us."""

    def run(self) -> None:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, _stop_children_and_exit)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: a clean shutdown still stops p2pd
            pass
        if os.getppid() != self._parent_pid:  # the node died before prctl took effect
            _stop_children_and_exit(signal.SIGTERM, None)
        super().run()

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the DHT down (it stops p2pd); then make sure nothing below it survived."""
        below = descendant_pids(self.pid) if self.pid else []
        self.shutdown_timeout = timeout
        try:
            self.shutdown()
        except (OSError, ValueError) as err:  # the control pipe is already gone
            log.warning("DHT shutdown: %s", err)
        kill_all([*below, *([self.pid] if self.pid else [])], wait=2.0)
        if self.pid:
            self.join(1.0)


def kill_new_descendants(before: Iterable[int], wait: float = 2.0) -> None:
    """Stop the processes below this one that are not in `before`: what a one-shot session
    started (its DHT, p2pd, and hivemind's torch_shm_manager when it was started for it), but
    not what was already running when it began (a test runner's own shared-memory manager)."""
    old = set(before)
    kill_all([p for p in descendant_pids(os.getpid()) if p not in old], wait=wait)
