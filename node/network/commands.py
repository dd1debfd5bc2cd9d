"""The one-shot network commands (`fetch`, `peers`, `experts`): a short client session each.

They join under a throwaway identity as DHT clients (they store nothing and serve nothing), do
their work and leave; each returns plain data for the CLI to print.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from node.errors import UserError
from node.network import discovery
from node.network.config import NetworkConfig
from node.network.fetch import FetchReport, Progress, check_out_dir, fetch_expert
from node.network.process import descendant_pids, kill_new_descendants
from node.network.session import Session, run_async
from protocol.validators import unode_validators

T = TypeVar("T")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")


def with_session(net: NetworkConfig, work: Callable[[Session], Awaitable[T]]) -> T:
    """Join as a client, run `work`, always leave (DHT and p2pd stopped)."""
    if not net.initial_peers:
        raise UserError(
            "--initial-peers",
            "(none)",
            "pass the multiaddr a running `unode join` printed, or set UNODE_INITIAL_PEERS",
            problem="no peer to ask",
        )
    before = descendant_pids(os.getpid())
    session = Session(net, persistent=False, validators=unode_validators(net.network))
    session.start()
    try:
        return run_async(_run_closing(session, work))
    finally:
        session.stop()
        kill_new_descendants(before)  # its DHT, p2pd and hivemind's torch_shm_manager


async def _run_closing(session: Session, work: Callable[[Session], Awaitable[T]]) -> T:
    try:
        return await work(session)
    finally:
        await session.close_p2p()


async def resolve_expert_id(session: Session, network: str, text: str) -> bytes:
    """A full 64-hex expert id, or a unique prefix (8+ hex digits) of a live expert's id."""
    text = text.lower()
    if not _HEX.match(text):
        raise UserError("EXPERT_ID", text, "give the hex id `unode experts` prints (8+ digits)")
    if len(text) == 64:
        return bytes.fromhex(text)
    matches = [
        k.card.expert_id
        for k in await discovery.list_experts(session.dht, network)
        if k.card.expert_id.hex().startswith(text)
    ]
    if len(matches) != 1:
        problem = "no live expert has this id" if not matches else "ambiguous prefix"
        raise UserError(
            "EXPERT_ID", text, "run `unode experts` and copy a longer id", problem=problem
        )
    return matches[0]


def run_fetch(
    net: NetworkConfig,
    expert: str,
    out_dir: Path,
    workers: int = 4,
    progress: Progress | None = None,
) -> FetchReport:
    check_out_dir(out_dir)

    async def work(session: Session) -> FetchReport:
        eid = await resolve_expert_id(session, net.network, expert)
        providers = await discovery.find_providers(session.dht, net.network, eid)
        if not providers:
            raise UserError(
                "EXPERT_ID",
                eid.hex(),
                "run `unode experts` to see what is served now",
                problem="no live provider serves it",
            )
        return await fetch_expert(await session.p2p(), providers, eid, out_dir, workers, progress)

    return with_session(net, work)


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    maddrs: tuple[str, ...]
    experts: tuple[str, ...]
    agent: str
    expires: float


def run_peers(net: NetworkConfig) -> list[PeerInfo]:
    async def work(session: Session) -> list[PeerInfo]:
        found = await discovery.live_peers(session.dht, net.network)
        return [
            PeerInfo(
                v.record.peer_id,
                v.record.maddrs,
                tuple(e.hex() for e in v.record.experts),
                v.record.agent,
                v.envelope.expiration,
            )
            for v in found
        ]

    return with_session(net, work)


def run_experts(net: NetworkConfig, domain: str | None = None) -> list[dict[str, Any]]:
    async def work(session: Session) -> list[dict[str, Any]]:
        return [
            expert_json(k) for k in await discovery.list_experts(session.dht, net.network, domain)
        ]

    return with_session(net, work)


def expert_json(k: discovery.KnownExpert) -> dict[str, Any]:
    c = k.card
    return {
        "expert_id": c.expert_id.hex(),
        "name": c.name,
        "architecture": c.architecture,
        "domains": list(c.domains),
        "n_params": c.n_params,
        "nbytes": c.nbytes,
        "base_fingerprint": c.base_fingerprint.hex(),
        "tokenizer_hash": c.tokenizer_hash.hex(),
        "license": c.license,
        "lineage": c.lineage.hex() if c.lineage else None,
        "providers": list(k.owners),
    }
