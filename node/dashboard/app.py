"""Run `unode dashboard`: a one-shot snapshot (`--once`, optionally JSON) or the live view.

The live view joins as a DHT client (serves nothing), redraws every `refresh` seconds, reads
keys in cbreak mode from the terminal, and always restores the terminal (q, Ctrl+C, errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import termios
import tty
from collections import deque
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from node.dashboard.details import expert_detail, round_detail
from node.dashboard.render import ViewState, ordered_experts, overview
from node.dashboard.snapshot import Collector
from node.errors import UserError
from node.network.commands import with_session
from node.network.config import NetworkConfig
from node.network.session import Session

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each restores the terminal


def take_snapshot(net: NetworkConfig) -> dict[str, Any]:
    """One verified snapshot (`--once`)."""

    async def work(session: Session) -> dict[str, Any]:
        return await Collector(session.dht, await session.p2p(), net.network).snapshot()

    return with_session(net, work)


def print_once(net: NetworkConfig, as_json: bool, refresh: float) -> None:
    snap = take_snapshot(net)
    if as_json:
        print(json.dumps(snap, indent=2, sort_keys=True))
    else:
        Console().print(overview(snap, ViewState(), refresh))


def run_live(net: NetworkConfig, refresh: float) -> int:
    """The live view until `q` (exit 0), Ctrl+C (exit 130) or SIGTERM (143)."""
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise UserError(
            "--once", "(not given)", "run it in a terminal, or pass --once [--json] for scripts",
            problem="the live dashboard needs a terminal on stdin and stdout",
        )  # fmt: skip
    return with_session(net, lambda session: _Live(session, net, refresh).run())


def _screen_console() -> Console:
    """A console sized by the terminal itself: stale COLUMNS/LINES (a shell's snapshot) would
    pin the layout to the size the terminal had when the shell started."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return Console(_environ=env)


class _RecentLogs(logging.Handler):
    """Keeps the last log lines for the footer (stderr would scribble over the screen)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=2)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}"[:160])


class _Live:
    def __init__(self, session: Session, net: NetworkConfig, refresh: float) -> None:
        self.session, self.net, self.refresh = session, net, refresh
        self.state = ViewState()
        self.snap: dict[str, Any] | None = None
        self.keys: asyncio.Queue[str] = asyncio.Queue()
        self.logs = _RecentLogs()
        self.live: Live | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        interrupted = asyncio.Event()
        got: list[int] = []
        root, handlers = logging.getLogger(), logging.getLogger().handlers[:]
        root.handlers = [self.logs]
        tty.setcbreak(fd)
        loop.add_reader(fd, lambda: self.keys.put_nowait(os.read(fd, 64).decode(errors="ignore")))

        def on_signal(sig: int) -> None:
            got.append(sig)
            interrupted.set()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, int(sig))
        refresher: asyncio.Task[None] | None = None
        try:
            with Live(console=_screen_console(), screen=True, auto_refresh=False) as self.live:
                self.draw(Text("unode dashboard: connecting to the network…"))
                collector = Collector(self.session.dht, await self.session.p2p(), self.net.network)
                refresher = asyncio.create_task(self._refresh(collector))
                quit_key = asyncio.create_task(self._keys())
                stop = asyncio.create_task(interrupted.wait())
                await asyncio.wait({quit_key, stop}, return_when=asyncio.FIRST_COMPLETED)
                for t in (quit_key, stop):
                    t.cancel()
        finally:
            if refresher is not None:
                refresher.cancel()
            loop.remove_reader(fd)
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            root.handlers = handlers
        return 128 + got[0] if got else 0  # 130 after Ctrl+C, 143 after SIGTERM

    async def _refresh(self, collector: Collector) -> None:
        while True:
            try:
                self.snap = await collector.snapshot()
                self.state.error = ""
            except Exception as err:  # the network may hiccup; keep showing the last snapshot
                self.state.error = f"refresh failed: {err!r}"[:160]
            self.redraw()
            await asyncio.sleep(self.refresh)

    async def _keys(self) -> None:
        """Handle keys until `q`."""
        while True:
            chunk = await self.keys.get()
            i = 0
            while i < len(chunk):
                key = chunk[i : i + 3] if chunk.startswith("\x1b[", i) else chunk[i]
                i += len(key)
                if key == "q":
                    return
                self.on_key(key)
            self.redraw()

    def on_key(self, key: str) -> None:
        st = self.state
        if key in ("e", "r"):
            st.focus, st.index, st.detail = ("experts" if key == "e" else "rounds"), 0, None
        elif key in ("j", "\x1b[B"):
            st.index = min(st.index + 1, max(0, self._count() - 1))
        elif key in ("k", "\x1b[A"):
            st.index = max(st.index - 1, 0)
        elif key in ("\r", "\n") and self.snap is not None:
            st.detail = self._selected()
        elif key in ("b", "\x1b", "\x7f"):
            st.detail = None

    def _count(self) -> int:
        if self.snap is None:
            return 0
        return len(self.snap["experts" if self.state.focus == "experts" else "rounds"])

    def _selected(self) -> tuple[str, str] | None:
        assert self.snap is not None
        if self.state.focus == "experts":
            items = [e["expert_id"] for e in ordered_experts(self.snap)]
            kind = "expert"
        else:
            items, kind = [r["round_id"] for r in self.snap["rounds"]], "round"
        return (kind, items[self.state.index]) if self.state.index < len(items) else None

    def redraw(self) -> None:
        if self.snap is None:
            return
        st = self.state
        if self.logs.lines and not st.error:
            st.error = self.logs.lines[-1]
        if st.detail is not None and st.detail[0] == "expert":
            self.draw(expert_detail(self.snap, st.detail[1], st))
        elif st.detail is not None:
            self.draw(round_detail(self.snap, st.detail[1], st))
        else:
            self.draw(overview(self.snap, st, self.refresh))

    def draw(self, what: RenderableType) -> None:
        assert self.live is not None
        self.live.update(what, refresh=True)
