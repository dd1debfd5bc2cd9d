"""Distribution summaries over the network: a joined node serves its summary shards by hash,
other nodes fetch them verified against the SummaryManifest (whose record hash they asked for).

Served like tensors (chunked `protocol.stream` objects, never through the DHT); announced with a
ProviderRecord under `provider/<summary manifest hash>`; a provider counts while its PeerRecord
is live (not withdrawn).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.network.client import MemoryTarget
from node.network.dhtrecords import get_verified
from node.network.discovery import Provider, live_peers
from node.network.manifest import hash_range
from node.network.pool import ProviderPool, StreamCache, fetch_manifest_record, fetch_object
from node.network.service import BlobServer
from protocol.content import object_meta, object_root
from protocol.identity import Identity
from protocol.keys import dht_key
from protocol.records import ProviderRecord, SummaryManifest
from protocol.signing import SignedRecord, sign_record
from protocol.stream import StreamHeader


@dataclass(frozen=True)
class HostedSummary:
    """A summary directory's manifest record and its shard files, in shard order."""

    manifest: SummaryManifest
    shard_files: tuple[Path, ...]

    @property
    def manifest_hash(self) -> bytes:
        return self.manifest.hash()


def load_summary(summary_dir: Path, model_id: bytes | None = None) -> HostedSummary:
    """Describe a summary directory written by `node.fusion` (shards in its manifest order)."""
    from node.fusion.publish import summary_manifest
    from node.fusion.summary_store import SummaryReader

    record = summary_manifest(summary_dir, model_id)
    files = tuple(
        Path(summary_dir) / e["file"] for e in SummaryReader(summary_dir).manifest["shards"]
    )
    return HostedSummary(record, files)


def serve_summary(server: BlobServer, summary: HostedSummary) -> None:
    """Register the manifest (by record hash) and every shard (by blob hash) with the server."""
    m = summary.manifest
    server.add_record(summary.manifest_hash, m.to_bytes())
    for entry, path in zip(m.shards, summary.shard_files, strict=True):
        hashes = hash_range(path, 0, entry.nbytes, m.chunk_size)
        if object_root(object_meta(), entry.nbytes, m.chunk_size, hashes) != entry.hash:
            raise ValueError(f"{path} changed since its summary manifest was computed")
        server.add_object(
            path,
            0,
            StreamHeader(entry.hash, object_meta(), entry.nbytes, m.chunk_size, tuple(hashes)),
        )


def provider_record(
    identity: Identity, network: str, peer_id: str, summary: HostedSummary, expiration: float
) -> SignedRecord:
    h = summary.manifest_hash
    rec = ProviderRecord(h, "summary_manifest", peer_id)
    return sign_record(identity, dht_key(network, "provider", h), rec, expiration=expiration)


async def find_summary_providers(dht: Any, network: str, manifest_hash: bytes) -> list[Provider]:
    peers = {v.record.peer_id: v.record for v in await live_peers(dht, network)}
    named = await get_verified(dht, dht_key(network, "provider", manifest_hash), ProviderRecord)
    out = []
    for v in named:
        peer = peers.get(v.record.peer_id)
        if peer is not None and peer.maddrs and v.record.object_kind == "summary_manifest":
            out.append(Provider(peer.peer_id, peer.maddrs))
    return out


async def fetch_summary(
    p2p: Any, providers: list[Provider], manifest_hash: bytes, out_dir: Path
) -> tuple[SummaryManifest, list[Path]]:
    """The verified manifest and its shards as `out_dir/shard-<index>.bin` (one at a time in memory)."""
    pool = ProviderPool(p2p, providers)
    data = await fetch_manifest_record(pool, manifest_hash, SummaryManifest.MAX_BYTES)
    manifest = SummaryManifest.from_bytes(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache, paths = StreamCache(pool), []
    try:
        for entry in manifest.shards:
            buf = bytearray(entry.nbytes)
            await fetch_object(
                cache, entry.hash, object_meta(), entry.nbytes, MemoryTarget(memoryview(buf))
            )
            path = out_dir / f"shard-{entry.index:05d}.bin"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(buf)
            os.replace(tmp, path)
            paths.append(path)
    finally:
        cache.close()
    return manifest, paths
