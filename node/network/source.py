"""Merging straight from the network: a `TensorSource` for recipe models named `unode://<id>`.

Tensors are fetched one at a time as the merge asks for them (no full download first), each
chunk checked against the signed manifest, with fail-over between providers. Config and
tokenizer files (small) are fetched up front into a cache directory (`meta_dir`). The merge
engine calls `get()` from its own threads; the network work runs on one event-loop thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import weakref
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from node.errors import UserError
from node.merge.io import DTYPE_NAMES, DTYPES, TensorMeta, TensorSource, bytes_view
from node.network import discovery
from node.network.client import MemoryTarget
from node.network.config import NetworkConfig
from node.network.pool import (
    FetchError,
    ProviderPool,
    StreamCache,
    fetch_manifest_record,
    fetch_object,
)
from node.network.session import Session
from protocol.content import chunk_hashes, object_meta, object_root
from protocol.records import TensorManifest
from protocol.validators import unode_validators

SCHEME = "unode://"
T = TypeVar("T")
CALL_TIMEOUT = 600.0


def expert_id_of(ref: str, field: str = "model") -> bytes:
    text = ref[len(SCHEME) :].lower()
    try:
        eid = bytes.fromhex(text)
    except ValueError:
        eid = b""
    if len(eid) != 32:
        raise UserError(field, ref, "write unode://<64 hex digits> as `unode experts` prints it")
    return eid


class NetworkSources:
    """One client session (DHT + p2pd) serving every `unode://` model of a merge."""

    def __init__(self, net: NetworkConfig, cache_dir: Path) -> None:
        self.net, self.cache_dir = net, cache_dir
        self.session = Session(net, persistent=False, validators=unode_validators(net.network))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="unode-net", daemon=True
        )
        self.session.start()
        self._thread.start()
        self._users, self._closed = 0, False
        self._lock = threading.Lock()

    def release_soon(self, cache: StreamCache) -> None:
        """A source is done (closed or garbage-collected, from any thread): close its streams,
        and the shared session once its last source is done. Never blocks the loop thread."""
        if threading.current_thread() is self._thread:
            threading.Thread(target=self.release_soon, args=(cache,), daemon=True).start()
            return
        if not self._closed:
            self.call(_close_streams(cache))
        self.release()

    def release(self) -> None:
        """One source is done; the last one to finish closes the session if it is shared."""
        with self._lock:
            self._users -= 1
            last = self._users <= 0 and _SHARED.get(self.net) is self
        if last:
            _SHARED.pop(self.net, None)
            self.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    def open(self, ref: str, field: str = "model") -> NetworkTensorSource:
        """The source for `unode://<expert id>`: manifest and side files fetched and verified."""
        eid = expert_id_of(ref, field)
        providers = self.call(discovery.find_providers(self.session.dht, self.net.network, eid))
        if not providers:
            raise UserError(
                field,
                ref,
                "run `unode experts` to see what is served now",
                problem="no live provider",
            )
        pool = ProviderPool(self.call(self.session.p2p()), providers)
        manifest = self.call(_manifest(pool, eid))
        meta_dir = self.cache_dir / eid.hex()
        self.call(_side_files(StreamCache(pool), manifest, meta_dir))
        with self._lock:
            self._users += 1
        return NetworkTensorSource(ref, meta_dir, manifest, pool, self)

    def close(self) -> None:
        """Stop the session (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.call(self.session.close_p2p())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self.session.stop()


async def _manifest(pool: ProviderPool, eid: bytes) -> TensorManifest:
    return TensorManifest.from_bytes(
        await fetch_manifest_record(pool, eid, TensorManifest.MAX_BYTES)
    )


async def _side_files(cache: StreamCache, manifest: TensorManifest, meta_dir: Path) -> None:
    """config.json, tokenizer files...: verified into `meta_dir` (kept if already there)."""
    meta_dir.mkdir(parents=True, exist_ok=True)
    for f in manifest.files:
        if f.name.endswith(".header"):
            continue
        path = meta_dir / f.name
        size = manifest.chunk_size
        if (
            path.is_file()
            and object_root(["blob"], f.nbytes, size, chunk_hashes(path.read_bytes(), size))
            == f.hash
        ):
            continue
        buf = bytearray(f.nbytes)
        await fetch_object(cache, f.hash, object_meta(), f.nbytes, MemoryTarget(memoryview(buf)))
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(buf)
        tmp.replace(path)


class NetworkTensorSource:
    """`TensorSource` over the network; see the module docstring."""

    def __init__(
        self,
        ref: str,
        meta_dir: Path,
        manifest: TensorManifest,
        pool: ProviderPool,
        sources: NetworkSources,
    ) -> None:
        self.ref, self.meta_dir, self.manifest = ref, meta_dir, manifest
        self._entries = {t.name: t for t in manifest.tensors}
        self._cache, self._sources = StreamCache(pool), sources
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        # a merge that drops its sources without close() still ends the shared session
        self._release = weakref.finalize(self, sources.release_soon, self._cache)

    def names(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        t = self._entries[name]
        if t.dtype not in DTYPES:
            raise UserError(
                "model",
                self.ref,
                "merge experts stored in float or integer dtypes",
                problem=f"dtype {t.dtype}",
            )
        return TensorMeta(tuple(t.shape), DTYPES[t.dtype])

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Fetch one tensor (verified chunk by chunk) into `out` (converted if its dtype differs)."""
        t, m = self._entries[name], self.meta(name)
        buf = (
            out if out is not None and out.dtype == m.dtype else torch.empty(m.shape, dtype=m.dtype)
        )
        assert tuple(buf.shape) == m.shape and buf.is_contiguous()
        view = bytes_view(buf) if buf.numel() else memoryview(bytearray())
        coro = fetch_object(
            self._cache, t.hash, object_meta(t.dtype, t.shape), t.nbytes, MemoryTarget(view)
        )
        try:
            self._sources.call(coro)
        except FetchError as err:
            raise UserError(
                "model",
                self.ref,
                "re-run when a provider is back, or fetch it first",
                problem=str(err),
            ) from None
        with self._lock:
            self._hashes[name] = hashlib.sha256(view).hexdigest()
        if out is not None and out is not buf:
            out.copy_(buf)
            return out
        return buf

    def digest(self) -> str:
        """Same definition as the local source's: name, dtype, shape, sha256 of the bytes."""
        h = hashlib.sha256()
        for name in sorted(self._hashes):
            m = self.meta(name)
            h.update(
                f"{name}\0{DTYPE_NAMES[m.dtype]}\0{list(m.shape)}\0{self._hashes[name]}\n".encode()
            )
        return h.hexdigest()

    def close(self) -> None:
        self._release()  # once, whether closed or collected


async def _close_streams(cache: StreamCache) -> None:
    cache.close()


def open_network_sources(
    refs: Iterable[str], net: NetworkConfig, cache_dir: Path
) -> tuple[NetworkSources | None, dict[str, TensorSource]]:
    """Sources for every `unode://` reference among `refs` (pass them to `merge(sources=...)`);
    close the returned NetworkSources after the merge. (None, {}) when there is none."""
    wanted = [r for r in refs if r.startswith(SCHEME)]
    if not wanted:
        return None, {}
    for r in wanted:
        expert_id_of(r)
    sources = NetworkSources(net, cache_dir)
    try:
        return sources, {r: sources.open(r) for r in wanted}
    except BaseException:
        sources.close()
        raise


_SHARED: dict[NetworkConfig, NetworkSources] = {}


def open_network_source(ref: str, field: str = "model") -> NetworkTensorSource:
    """The source for one `unode://` recipe model, reaching the network the environment names
    (UNODE_INITIAL_PEERS, UNODE_NETWORK; tensors cached under the state directory). Sources of
    one merge share a session; closing the last one stops it. Used by `node.merge.api`."""
    from node.network.config import network_config

    expert_id_of(ref, field)  # a malformed reference fails before any network work
    net = network_config(None, None)
    if not net.initial_peers:
        raise UserError(
            field, ref, "set UNODE_INITIAL_PEERS to a running node's multiaddr (or fetch the "
            "expert with `unode fetch` and name its directory)", problem="no network to ask",
        )  # fmt: skip
    sources = _SHARED.get(net)
    if sources is None:
        sources = _SHARED[net] = NetworkSources(net, net.state_dir / "merge-cache")
    try:
        return sources.open(ref, field)
    except BaseException:
        if sources._users == 0:
            _SHARED.pop(net, None)
            sources.close()
        raise
