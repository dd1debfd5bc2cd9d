"""Round records in the DHT: publish proposals, claims, results and scores; read a round's state.

Everything read is verified by `node.network.dhtrecords.get_verified` (signature, binding,
schema); the state below is what one node can prove from signed records.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import get_dht_time

from node.network import dhtrecords
from node.network.dhtrecords import Verified
from protocol.identity import Identity, peer_id_from_public_key
from protocol.keys import dht_key
from protocol.records import RoundProposal, Score, UnitResult, WorkClaim
from protocol.round_records import score_item
from protocol.signing import sign_record

ROUND_TTL = 6 * 3600.0  # proposals and results outlive any round we run


async def publish(
    dht: Any, identity: Identity, key: str, record: Any, ttl: float, item: str = ""
) -> bool:
    signed = sign_record(identity, key, record, expiration=get_dht_time() + ttl, item=item)
    return await dhtrecords.put(dht, signed)


async def propose(dht: Any, identity: Identity, network: str, proposal: RoundProposal) -> bytes:
    key = dht_key(network, "rounds")
    await publish(dht, identity, key, proposal, ROUND_TTL, item=proposal.round_id.hex())
    return proposal.round_id


async def proposals(dht: Any, network: str) -> list[Verified[RoundProposal]]:
    return await dhtrecords.get_verified(dht, dht_key(network, "rounds"), RoundProposal)


async def claim(
    dht: Any, identity: Identity, network: str, rid: bytes, unit: int, ttl: float
) -> None:
    await publish(dht, identity, dht_key(network, "claim", rid, unit), WorkClaim(rid, unit), ttl)


async def result(
    dht: Any, identity: Identity, network: str, rid: bytes, unit: int, digest: bytes, ms: int
) -> None:
    record = UnitResult(rid, unit, digest, ms)
    await publish(dht, identity, dht_key(network, "result", rid, unit), record, ROUND_TTL)


async def score(dht: Any, identity: Identity, network: str, record: Score) -> None:
    key = dht_key(network, "score", record.round_id, record.candidate)
    item = score_item(record.domain, record.metric)
    await publish(dht, identity, key, record, ROUND_TTL, item=item)


async def scores(dht: Any, network: str, rid: bytes, candidate: bytes) -> list[Verified[Score]]:
    return await dhtrecords.get_verified(dht, dht_key(network, "score", rid, candidate), Score)


@dataclass
class UnitView:
    """What the DHT says about one unit: live claims (owner -> seq) and results (owner -> hash)."""

    claims: dict[bytes, int] = field(default_factory=dict)
    results: dict[bytes, bytes] = field(default_factory=dict)
    result_ms: dict[bytes, int] = field(default_factory=dict)

    def holder(self, ignore: set[bytes]) -> bytes | None:
        """The claimant that wins: the earliest live claim of a worker not known to cheat."""
        live = [(seq, owner) for owner, seq in self.claims.items() if owner not in ignore]
        return min(live)[1] if live else None


async def unit_view(dht: Any, network: str, rid: bytes, unit: int) -> UnitView:
    view = UnitView()
    now = get_dht_time()
    claims, results = await asyncio.gather(
        dhtrecords.get_verified(dht, dht_key(network, "claim", rid, unit), WorkClaim),
        dhtrecords.get_verified(dht, dht_key(network, "result", rid, unit), UnitResult),
    )
    for v in claims:
        if v.envelope.expiration > now:
            view.claims[v.envelope.owner] = v.envelope.seq
    for r in results:
        view.results[r.envelope.owner] = r.record.result_hash
        view.result_ms[r.envelope.owner] = r.record.elapsed_ms
    return view


async def round_view(dht: Any, network: str, rid: bytes, n_units: int) -> dict[int, UnitView]:
    """Every unit's view, looked up concurrently."""
    views = await asyncio.gather(*(unit_view(dht, network, rid, u) for u in range(n_units)))
    return dict(enumerate(views))


def peer_of(owner: bytes) -> str:
    return peer_id_from_public_key(owner)
