"""One connection to the network: the DHT process, its p2pd, and a P2P replica in this process.

`join` runs a long-lived server session under the node's persistent identity; one-shot commands
(fetch, peers, experts) run a short client session under a throwaway identity, so they can run
next to a `join` that uses the same state directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P

from node.errors import UserError
from node.network.allowlist import allowlist_validators, check_own_key
from node.network.config import NetworkConfig
from node.network.process import NodeDHT
from protocol.errors import IdentityError
from protocol.identity import KEY_FILE_NAME, Identity, load_or_create_identity

log = logging.getLogger(__name__)
T = TypeVar("T")
ENV_AUTO_RELAY = "UNODE_AUTO_RELAY"  # 1: libp2p AutoRelay (reachable behind NAT via relays)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop (hivemind's dependency): its stream I/O is markedly cheaper."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - hivemind depends on uvloop
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class Session:
    """Start with `start()`, then `await p2p()`; always `stop()` (it never raises)."""

    def __init__(
        self,
        net: NetworkConfig,
        *,
        persistent: bool,
        validators: list[RecordValidatorBase] | None = None,
    ) -> None:
        self.net, self.persistent = net, persistent
        self.validators = (validators or []) + allowlist_validators(net.allowlist)
        self.identity: Identity | None = None
        self.dht: NodeDHT | None = None
        self._p2p: Any = None
        self._p2p_loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.persistent:
            self.identity = _load_identity(self.net.state_dir)
            check_own_key(self.net.allowlist, self.identity.public_key)
            kwargs["identity_path"] = str(self.net.state_dir / KEY_FILE_NAME)
            # hivemind's "identity already taken?" probe parses only RSA keys (ours is Ed25519)
            kwargs["check_if_identity_free"] = False
        if self.net.announce_maddrs:
            kwargs["announce_maddrs"] = list(self.net.announce_maddrs)
        if self.persistent and os.environ.get(ENV_AUTO_RELAY, "").lower() in ("1", "true", "yes"):
            kwargs["use_auto_relay"] = True  # behind NAT: keep a reservation on a relay peer
        try:
            self.dht = NodeDHT(
                initial_peers=list(self.net.initial_peers),
                host_maddrs=list(self.net.host_maddrs),
                record_validators=self.validators,
                client_mode=not self.persistent,
                start=True,
                startup_timeout=30,
                **kwargs,
            )
        except Exception as err:  # hivemind raises bare Exceptions for bad peers / ports
            self.stop()
            raise UserError(
                "--initial-peers",
                " ".join(self.net.initial_peers) or "(none)",
                "check that a node is running there and reachable, and that --host-maddr is free",
                problem=f"could not join the network ({str(err)[:160]})",
            ) from None

    async def p2p(self) -> Any:
        """hivemind's P2P in this process, sharing the DHT's p2pd (one daemon per node).

        One replica per event loop: its sockets belong to the loop that opened them.
        """
        assert self.dht is not None, "start() first"
        loop = asyncio.get_running_loop()
        if self._p2p is None or self._p2p_loop is not loop:
            maddr = await self.dht.run_coroutine(_daemon_maddr, return_future=True)
            self._p2p, self._p2p_loop = await P2P.replicate(maddr), loop
        return self._p2p

    async def close_p2p(self) -> None:
        if self._p2p is not None:
            await self._p2p.shutdown()
            self._p2p = None

    def visible_maddrs(self) -> list[str]:
        assert self.dht is not None, "start() first"
        return [str(m) for m in self.dht.get_visible_maddrs()]

    @property
    def peer_id(self) -> str:
        assert self.dht is not None, "start() first"
        return str(self.dht.peer_id)

    def stop(self) -> None:
        if self.dht is not None:
            self.dht.stop()
            self.dht = None


async def _daemon_maddr(_dht: Any, node: Any) -> Any:
    """Runs inside the DHT process: where its p2pd listens for local clients."""
    return node.p2p.daemon_listen_maddr


def _load_identity(state_dir: Path) -> Identity:
    try:
        identity, created = load_or_create_identity(state_dir / KEY_FILE_NAME)
    except IdentityError as err:
        raise UserError("--state-dir", err.path, err.fix, problem=err.problem) from None
    if created:
        log.info("created a new node identity in %s", state_dir / KEY_FILE_NAME)
    return identity
