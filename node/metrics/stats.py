"""`/unode/stats/1`: a node's self-reported uptime and traffic, one small map per stream.

Server side: a `unode join` registers `serve_stats` on its P2P. Client side (the dashboard):
`ask_stats` opens a stream to a peer (libp2p authenticates the peer id), reads one capped
msgpack map and type-checks every field; anything malformed is `None`, never an exception.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from node.metrics import logs, registry
from node.network import wire

log = logging.getLogger(__name__)
PROTOCOL_NAME = "/unode/stats/1"
MAX_STATS_BYTES = 1024
STATS_TIMEOUT = 5.0


@dataclass(frozen=True)
class NodeStats:
    """What a node says about itself (self-reported: the dashboard labels it so)."""

    uptime_s: float
    bytes_served: int
    served_bps: float
    bytes_fetched: int
    fetched_bps: float
    units_done: int
    units_failed: int


def local_stats() -> NodeStats:
    r = registry
    return NodeStats(
        uptime_s=round(time.time() - r.STARTED, 3),
        bytes_served=int(r.value(r.BYTES_SERVED)),
        served_bps=round(r.SERVED_RATE.rate(), 1),
        bytes_fetched=int(r.value(r.BYTES_FETCHED)),
        fetched_bps=round(r.FETCHED_RATE.rate(), 1),
        units_done=int(r.value(r.UNITS_DONE)),
        units_failed=int(r.value(r.UNITS_FAILED)),
    )


async def serve_stats(p2p: Any, peer_id: str) -> None:
    """Answer every stats stream with this process's numbers (and name our logs' node)."""
    logs.set_node_id(peer_id)

    async def handle(_info: Any, _reader: Any, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(wire.pack(asdict(local_stats())))
            await writer.drain()
        except (ConnectionError, OSError) as err:
            log.debug("stats stream ended early: %r", err)
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(PROTOCOL_NAME, handle)
    log.info("serving node stats on %s", PROTOCOL_NAME)


def parse_stats(frame: bytes) -> NodeStats | None:
    """Peer bytes to NodeStats; None if undecodable, incomplete or out of range."""
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=0)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(obj, dict):
        return None
    out: dict[str, Any] = {}
    for name, kind in NodeStats.__annotations__.items():
        v = obj.get(name)
        ok_int = isinstance(v, int) and not isinstance(v, bool)
        ok = ok_int if kind == "int" else (ok_int or isinstance(v, float))
        if not ok or not math.isfinite(float(v)) or float(v) < 0:  # type: ignore[arg-type]
            return None
        out[name] = v
    return NodeStats(**out)


async def ask_stats(p2p: Any, peer_id: str) -> NodeStats | None:
    """One peer's stats, or None (unreachable, slow, or sent garbage)."""
    from hivemind.p2p import PeerID

    try:
        pid = PeerID.from_base58(peer_id)
        _, reader, writer = await asyncio.wait_for(
            p2p.call_binary_stream_handler(pid, PROTOCOL_NAME), STATS_TIMEOUT
        )
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader, MAX_STATS_BYTES), STATS_TIMEOUT)
        finally:
            writer.close()
    except Exception as err:  # p2pd reports any failure (no route, refused) as a bare Exception
        log.info("no stats from %s: %r", peer_id, err)
        return None
    stats = parse_stats(frame) if frame is not None else None
    if stats is None:
        log.warning("peer %s sent malformed stats, ignored", peer_id)
    return stats
