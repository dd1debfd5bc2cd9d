"""The providers of one fetch: who is still trusted, who failed, who lied, and load spreading.

A provider that sends bytes not matching the signed hashes is dropped at once and logged with
its peer id; one that fails (gone, stalled, refused) gets a few strikes before it is dropped.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from node.metrics import registry as metrics
from node.network.client import BlobStream, ProviderError, ProviderLied, Target
from node.network.discovery import Provider

log = logging.getLogger(__name__)
MAX_STRIKES = 3


class FetchError(Exception):
    """The network could not deliver (no provider left, or none honest, or the disk failed)."""


class ProviderPool:
    def __init__(self, p2p: Any, providers: list[Provider]) -> None:
        self.p2p = p2p
        self.alive: dict[str, Provider] = {p.peer_id: p for p in providers}
        self.dropped: dict[str, str] = {}
        self.strikes: dict[str, int] = defaultdict(int)
        self.served: dict[str, int] = defaultdict(int)
        self._turn = 0
        self._connected: set[str] = set()

    def pick(self) -> Provider:
        """The next provider in turn (spreads pieces over all live providers)."""
        if not self.alive:
            reasons = "; ".join(f"{p}: {r}" for p, r in self.dropped.items()) or "none was found"
            raise FetchError(f"no provider left ({reasons})")
        live = sorted(self.alive)
        self._turn += 1
        return self.alive[live[self._turn % len(live)]]

    async def connect(self, provider: Provider) -> PeerID:
        """The provider's PeerID, after dialing its announced addresses once (best effort:
        p2pd can also find a route through peers it already knows)."""
        peer_id = PeerID.from_base58(provider.peer_id)
        if provider.peer_id not in self._connected and provider.maddrs:
            self._connected.add(provider.peer_id)
            try:  # hivemind's P2P has no public dial; its own code uses the client like this
                await self.p2p._client.connect(peer_id, [Multiaddr(m) for m in provider.maddrs])
            except Exception as err:
                log.debug("dialing %s at its announced addresses failed: %s", provider.peer_id, err)
        return peer_id

    def failed(self, provider: Provider, err: ProviderError) -> None:
        pid = provider.peer_id
        if pid not in self.alive:
            return
        if isinstance(err, ProviderLied):
            log.warning("provider %s sent data that fails verification, dropped: %s", pid, err)
            self._drop(pid, f"lied: {err}")
            return
        self.strikes[pid] += 1
        log.warning("provider %s failed (%d/%d): %s", pid, self.strikes[pid], MAX_STRIKES, err)
        if self.strikes[pid] >= MAX_STRIKES:
            self._drop(pid, f"failed {MAX_STRIKES} times: {err}")

    def succeeded(self, provider: Provider, nbytes: int) -> None:
        self.strikes[provider.peer_id] = 0
        self.served[provider.peer_id] += nbytes
        metrics.fetched(nbytes)

    def _drop(self, pid: str, reason: str) -> None:
        self.alive.pop(pid, None)
        self.dropped[pid] = reason
        metrics.provider_dropped(lied=reason.startswith("lied"))


class StreamCache:
    """Idle streams per provider: a request takes one (or opens one) and gives it back after."""

    def __init__(self, pool: ProviderPool) -> None:
        self.pool = pool
        self._idle: dict[str, list[BlobStream]] = defaultdict(list)

    async def take(self, provider: Provider) -> BlobStream:
        idle = self._idle[provider.peer_id]
        if idle:
            return idle.pop()
        return await BlobStream.open(self.pool.p2p, await self.pool.connect(provider))

    def give(self, provider: Provider, stream: BlobStream) -> None:
        self._idle[provider.peer_id].append(stream)

    def close(self) -> None:
        for streams in self._idle.values():
            for s in streams:
                s.close()
        self._idle.clear()


async def fetch_object(
    cache: StreamCache, digest: bytes, meta: list[object], nbytes: int, target: Target
) -> None:
    """One object into `target`, failing over between providers; resumes at the first chunk
    not yet verified, so a provider dying mid-object costs only the chunk in flight."""
    verified = 0

    def advance(next_chunk: int, _: int) -> None:
        nonlocal verified
        verified = next_chunk

    while True:
        provider = cache.pool.pick()  # FetchError when none is left
        try:
            stream = await cache.take(provider)
            try:
                await stream.get_object(digest, meta, nbytes, verified, target, advance)
            except BaseException:
                stream.close()
                raise
        except ProviderError as err:
            cache.pool.failed(provider, err)
            continue
        cache.give(provider, stream)
        cache.pool.succeeded(provider, nbytes)
        return


async def fetch_manifest_record(pool: ProviderPool, digest: bytes, max_bytes: int) -> bytes:
    """A manifest's bytes (checked against `digest`, its record hash) from the first provider
    that delivers; liars and dead providers are dropped on the way."""
    while True:
        provider = pool.pick()
        try:
            stream = await BlobStream.open(pool.p2p, await pool.connect(provider))
            try:
                return await stream.get_record(digest, max_bytes)
            finally:
                stream.close()
        except ProviderError as err:
            pool.failed(provider, err)
