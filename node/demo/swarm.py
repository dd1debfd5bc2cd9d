"""The demo's local network: `unode join` children on loopback and `unode round` proposers,
every one tracked with its descendants (DHT process, p2pd) and stopped in `close()`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from node.demo.experts import Expert, Say
from node.errors import UserError
from node.network.lines import ChildLines, contains
from node.network.process import descendant_pids, kill_all

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def unode_cmd() -> list[str]:
    script = Path(sys.executable).with_name("unode")
    if script.is_file():
        return [str(script)]
    return [sys.executable, str(Path(__file__).resolve().parents[2] / "cli.py")]


@dataclass
class DemoNode:
    """A `unode join` child and the lines it printed."""

    name: str
    proc: subprocess.Popen[str]
    state: Path
    out: ChildLines
    maddr: str = ""

    def text(self) -> str:
        return self.out.text()

    def wait_for(self, needle: str, timeout: float) -> str:
        line = self.out.next_match(contains(needle), timeout)
        if line is None:
            tail = self.out.tail(15)
            raise RuntimeError(
                f"node {self.name}: no {needle!r} (exit {self.proc.poll()}):\n{tail}"
            )
        return line

    def round_expert(self, rid: str) -> Path | None:
        if f"UNODE_ROUND_DONE round={rid}" not in self.text():
            return None
        found = [p for p in (self.state / "rounds" / rid / "expert").iterdir() if p.is_dir()]
        return found[0] if len(found) == 1 else None


class Swarm:
    """Starts nodes and round proposers in `root`; `close()` stops all of them (idempotent)."""

    def __init__(self, root: Path, network: str, say: Say, env: dict[str, str]) -> None:
        self.root, self.network, self.say = root, network, say
        self.env = {**os.environ, "UNODE_ROUND_POLL": "0.5", **env}
        self.nodes: list[DemoNode] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.family: set[int] = set()
        self.logs: list[TextIO] = []

    def _spawn(
        self, args: list[str], env: dict[str, str], out: Any = None
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*unode_cmd(), *args],
            stdout=out or subprocess.PIPE,
            stderr=subprocess.STDOUT if out is None else subprocess.PIPE,
            text=True,
            env={**self.env, **env},
            start_new_session=True,  # Ctrl+C reaches the demo only; it stops the children
        )
        self.procs.append(proc)
        return proc

    def start_node(self, name: str, experts: list[Expert], env: dict[str, str]) -> DemoNode:
        args = ["join", "--network", self.network, "--host-maddr", LOOPBACK]
        args += ["--state-dir", str(self.root / name)]
        if self.nodes:
            args += ["--initial-peers", self.nodes[0].maddr]
        for e in experts:
            args += ["--expert", str(e.path), "--domain", e.domain]
        log = (self.root / f"{name}.log").open("a")
        self.logs.append(log)

        def on_line(line: str) -> None:
            if line.startswith("unode: round"):  # the node's own round progress
                self.say(f"  {name}: {line[7:].rstrip()}")
            if not log.closed:
                log.write(line)
                log.flush()

        proc = self._spawn(args, env)
        node = DemoNode(name, proc, self.root / name, ChildLines(proc, on_line))
        self.nodes.append(node)
        line = node.wait_for("UNODE_READY", timeout=120)
        node.maddr = dict(p.split("=", 1) for p in line.split()[1:])["maddr"]
        self.family.update(descendant_pids(node.proc.pid))
        return node

    def run_json(self, args: list[str], timeout: float) -> dict[str, Any]:
        """Run `unode ARGS --json` against this network; its stderr lines go to `say`."""
        net = ["--network", self.network, "--initial-peers", self.nodes[0].maddr, "--json"]
        out_path = self.root / f"{args[0]}-{args[1]}-{len(self.procs)}.json"
        with out_path.open("w") as out:
            proc = self._spawn([*args, *net], {}, out)
        err: list[str] = []

        def pump_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err.append(line)
                if line.startswith("unode:"):
                    self.say(f"  {args[0]} {args[1]}: {line.rstrip()}")

        t = threading.Thread(target=pump_err, daemon=True)
        t.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self._stop(proc)
            raise RuntimeError(
                f"unode {' '.join(args[:2])} timed out after {timeout:.0f}s"
            ) from exc
        t.join(5)
        if proc.returncode != 0:
            raise RuntimeError(f"unode {' '.join(args[:2])} failed:\n{''.join(err[-15:])}")
        stdout = out_path.read_text()
        return dict(json.loads(stdout[stdout.index("{") :]))

    def wait_expert(self, rid: str, timeout: float = 60.0) -> Path:
        """The directory of round `rid`'s expert on the first node that assembled it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                found = node.round_expert(rid)
                if found is not None:
                    return found
            time.sleep(0.2)
        raise RuntimeError(f"no node assembled round {rid[:12]} within {timeout:.0f}s")

    def _stop(self, proc: subprocess.Popen[str]) -> None:
        below = descendant_pids(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        kill_all(below, signal.SIGTERM, wait=2.0)

    def close(self) -> None:
        for p in self.procs:
            self.family.update(descendant_pids(p.pid))
        for p in reversed(self.procs):
            self._stop(p)
        kill_all(self.family, signal.SIGKILL, wait=2.0)
        self.procs.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()


def check_home(home: Path) -> Path:
    if home.exists() and not home.is_dir():
        raise UserError("--home", str(home), "give a directory (it is created if missing)")
    return home
