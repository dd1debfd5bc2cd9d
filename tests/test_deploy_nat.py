"""NAT: UNODE_AUTO_RELAY=1 starts the node's p2pd with libp2p AutoRelay (a reservation on a relay
peer, by default the bootstrap peers); unset, it stays off (hivemind's default)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.network.config import network_config
from node.network.process import descendant_pids
from node.network.session import Session


def p2pd_args() -> list[str]:
    for pid in descendant_pids(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"p2pd"):
            return [a.decode() for a in argv if a]
    raise AssertionError("no p2pd below this process")


@pytest.mark.parametrize(("env", "flag"), [("1", "-autoRelay=1"), ("", "-autoRelay=0")])
def test_auto_relay_variable_reaches_p2pd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str, flag: str
) -> None:
    monkeypatch.setenv("UNODE_AUTO_RELAY", env)
    monkeypatch.delenv("UNODE_ALLOWLIST", raising=False)
    net = network_config("nattest", None, ["/ip4/127.0.0.1/tcp/0"], state_dir=tmp_path)
    session = Session(net, persistent=True)
    try:
        session.start()
        assert flag in p2pd_args()
    finally:
        session.stop()
