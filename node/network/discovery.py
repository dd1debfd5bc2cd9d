"""What the DHT knows, verified: live peers, the experts they serve, who provides an expert.

A card counts only while its owner's latest PeerRecord lists the expert: a node that stopped
cleanly has superseded its PeerRecord with an empty one, so its cards stop counting at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.network.dhtrecords import Verified, get_verified
from protocol.identity import peer_id_from_public_key
from protocol.keys import dht_key
from protocol.records import ExpertCard, PeerRecord, ProviderRecord


@dataclass(frozen=True)
class Provider:
    """A live peer that announces an expert, and where to reach it."""

    peer_id: str
    maddrs: tuple[str, ...]


async def live_peers(dht: Any, network: str) -> list[Verified[PeerRecord]]:
    """Every verified PeerRecord (one per owner; the newest wins in the DHT)."""
    return await get_verified(dht, dht_key(network, "peers"), PeerRecord)


async def find_providers(dht: Any, network: str, expert_id: bytes) -> list[Provider]:
    """Live peers that serve `expert_id` (from the peers list and the provider records)."""
    peers = {v.record.peer_id: v.record for v in await live_peers(dht, network)}
    named = await get_verified(dht, dht_key(network, "provider", expert_id), ProviderRecord)
    out: dict[str, Provider] = {}
    for rec in peers.values():
        if expert_id in rec.experts:
            out[rec.peer_id] = Provider(rec.peer_id, rec.maddrs)
    for v in named:  # a provider record counts only if its peer has not withdrawn
        peer = peers.get(v.record.peer_id)
        if peer is not None and expert_id in peer.experts:
            out.setdefault(v.record.peer_id, Provider(peer.peer_id, peer.maddrs))
    return sorted(out.values(), key=lambda p: p.peer_id)


@dataclass(frozen=True)
class KnownExpert:
    """A verified card and the live peers that serve it."""

    card: ExpertCard
    owners: tuple[str, ...]  # peer ids whose signed card is here and who still serve it


async def list_experts(dht: Any, network: str, domain: str | None = None) -> list[KnownExpert]:
    """Every expert some live peer serves, with its verified card (optionally one domain)."""
    peers = {v.record.peer_id: v.record for v in await live_peers(dht, network)}
    ids = sorted({e for rec in peers.values() for e in rec.experts})
    out = []
    for eid in ids:
        cards = await get_verified(dht, dht_key(network, "expert", eid), ExpertCard)
        live = [
            c
            for c in cards
            if eid in getattr(peers.get(peer_id_from_public_key(c.record.owner)), "experts", ())
        ]
        if not live:
            continue
        card = live[0].record
        if domain is not None and domain not in card.domains:
            continue
        owners = tuple(sorted(peer_id_from_public_key(c.record.owner) for c in live))
        out.append(KnownExpert(card, owners))
    return out


async def get_card(dht: Any, network: str, expert_id: bytes) -> ExpertCard | None:
    """One verified card for `expert_id` (any owner's), or None."""
    cards = await get_verified(dht, dht_key(network, "expert", expert_id), ExpertCard)
    return cards[0].record if cards else None
