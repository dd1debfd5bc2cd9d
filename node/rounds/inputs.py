"""Round inputs for one node: the spec (fetched by hash) and every input expert as a source.

The spec comes from the proposer or any peer that already holds it (claimants serve it too);
experts this node hosts are read locally, the others through `sources.CachedExpertSource`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from node.network.client import BlobStream, ProviderError
from node.network.discovery import Provider, find_providers, live_peers
from node.network.pool import ProviderPool
from node.rounds import sources as src_mod
from node.rounds.spec import MAX_SPEC_BYTES, RoundSpec, expert_id_of, expert_refs
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)


async def providers_of(dht: Any, network: str, peer_ids: list[str]) -> list[Provider]:
    """Providers for the given peers, with the addresses from their PeerRecords."""
    addrs = {v.record.peer_id: v.record.maddrs for v in await live_peers(dht, network)}
    return [Provider(p, addrs.get(p, ())) for p in dict.fromkeys(peer_ids)]


async def fetch_record(
    p2p: Any, providers: list[Provider], digest: bytes, max_bytes: int
) -> bytes | None:
    """Bytes whose record hash is `digest` (a spec, a corpus shard) from the first provider."""
    pool = ProviderPool(p2p, providers)
    for provider in providers:
        try:
            stream = await BlobStream.open(p2p, await pool.connect(provider))
            try:
                return await stream.get_record(digest, max_bytes)
            finally:
                stream.close()
        except ProviderError as err:
            log.info(
                "record %s not available from %s: %s", digest.hex()[:12], provider.peer_id, err
            )
    return None


async def fetch_spec(p2p: Any, providers: list[Provider], digest: bytes) -> RoundSpec | None:
    """The round spec whose record hash is `digest`, from the first provider that has it."""
    data = await fetch_record(p2p, providers, digest, MAX_SPEC_BYTES)
    try:
        return RoundSpec.from_bytes(data) if data is not None else None
    except ProtocolError as err:
        log.warning("a round spec that does not decode: %s", err)
        return None


class RoundInputs:
    """Every input expert of a recipe as a TensorSource, plus how to fetch their tensors."""

    def __init__(self, local: dict[bytes, Path], cache: Path) -> None:
        self.local, self.cache = local, cache
        self.sources: dict[str, Any] = {}
        self.pools: dict[str, ProviderPool] = {}

    async def open(self, dht: Any, p2p: Any, network: str, recipe: dict[str, Any]) -> None:
        for ref in expert_refs(recipe):
            if ref in self.sources:
                continue
            eid = expert_id_of(ref)
            if eid in self.local:
                self.sources[ref] = src_mod.local_source(ref, self.local[eid])
                continue
            providers = await find_providers(dht, network, eid)
            if not providers:
                raise src_mod.FetchError(f"no live provider serves input expert {eid.hex()}")
            source, pool = await src_mod.open_remote(
                p2p, providers, ref, eid, self.cache / eid.hex()
            )
            self.sources[ref], self.pools[ref] = source, pool

    async def fetch(self, reads: dict[str, list[str]]) -> int:
        """Make the tensors `reads` names (model ref -> tensor names) available locally."""
        got = 0
        for ref, names in reads.items():
            source = self.sources[ref]
            if isinstance(source, src_mod.CachedExpertSource):
                got += await src_mod.fetch_tensors(source, self.pools[ref], names)
        return got

    def close(self) -> None:
        for s in self.sources.values():
            close = getattr(s, "close", None)
            if close is not None:
                close()
