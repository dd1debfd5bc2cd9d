"""Input experts of a round as merge-engine `TensorSource`s: local when this node hosts them,
otherwise fetched tensor by tensor from their providers into a content-addressed cache.

Fetching is async (the node's event loop); the merge itself then reads from the cache in a
worker thread. Every object is checked against the expert's signed manifest on arrival.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from node.merge.io import DTYPES, LocalSafetensorsSource, TensorMeta, TensorSource, bytes_view
from node.network.client import BlobStream, FileTarget, ProviderError
from node.network.discovery import Provider
from node.network.fetch import _manifest
from node.network.manifest import HEADER_SUFFIX
from node.network.pool import FetchError, ProviderPool
from protocol.content import object_meta
from protocol.records import TensorManifest

CONCURRENT_FETCHES = 4
__all__ = ["CachedExpertSource", "FetchError", "fetch_object", "fetch_tensors", "open_remote"]


class CachedExpertSource:
    """A remote expert: its verified manifest, side files in `meta_dir`, tensors in `tensors/`."""

    def __init__(self, ref: str, root: Path, manifest: TensorManifest) -> None:
        self.ref, self.root, self.manifest = ref, root, manifest
        self.meta_dir = root / "meta"
        self._entries = {t.name: t for t in manifest.tensors}

    def names(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        e = self._entries[name]
        return TensorMeta(tuple(e.shape), DTYPES[e.dtype])

    def path(self, name: str) -> Path:
        return self.root / "tensors" / self._entries[name].hash.hex()

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        m = self.meta(name)
        raw = torch.empty(m.shape, dtype=m.dtype)
        if raw.numel():
            with self.path(name).open("rb") as f:
                f.readinto(bytes_view(raw))
        if out is None or out.dtype == raw.dtype:
            return raw if out is None else out.copy_(raw)
        return out.copy_(raw)

    def digest(self) -> str:
        return hashlib.sha256(self.manifest.hash()).hexdigest()


async def fetch_object(
    pool: ProviderPool, digest: bytes, meta: list[object], nbytes: int, path: Path
) -> None:
    """One verified object into `path` (written under a temporary name, then renamed)."""
    if path.is_file() and path.stat().st_size == nbytes:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(meta)}")
    while True:
        provider = pool.pick()  # raises FetchError when no provider is left
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            stream = await BlobStream.open(pool.p2p, await pool.connect(provider))
            try:
                await stream.get_object(
                    digest, meta, nbytes, 0, FileTarget(fd, 0), lambda i, n: None
                )
            finally:
                stream.close()
        except ProviderError as err:
            pool.failed(provider, err)
            continue
        finally:
            os.close(fd)
        pool.succeeded(provider, nbytes)
        os.replace(tmp, path)
        return


async def open_remote(
    p2p: Any, providers: list[Provider], ref: str, expert_id: bytes, root: Path
) -> tuple[CachedExpertSource, ProviderPool]:
    """The expert's manifest and side files (config, tokenizer); tensors come later."""
    pool = ProviderPool(p2p, providers)
    root.mkdir(parents=True, exist_ok=True)
    manifest = await _manifest(pool, expert_id, root)
    source = CachedExpertSource(ref, root, manifest)
    for f in manifest.files:
        if not f.name.endswith(HEADER_SUFFIX):
            await fetch_object(pool, f.hash, object_meta(), f.nbytes, source.meta_dir / f.name)
    return source, pool


async def fetch_tensors(source: CachedExpertSource, pool: ProviderPool, names: list[str]) -> int:
    """Fetch the named tensors not yet cached; returns how many bytes arrived."""
    todo = [n for n in dict.fromkeys(names) if n in source.names()]
    gate = asyncio.Semaphore(CONCURRENT_FETCHES)
    fetched = 0

    async def one(name: str) -> None:
        nonlocal fetched
        e = source._entries[name]
        path = source.path(name)
        if path.is_file() and path.stat().st_size == e.nbytes:
            return
        async with gate:
            await fetch_object(pool, e.hash, object_meta(e.dtype, e.shape), e.nbytes, path)
            fetched += e.nbytes

    await asyncio.gather(*(one(n) for n in todo))
    return fetched


def local_source(ref: str, model_dir: Path) -> TensorSource:
    return LocalSafetensorsSource(ref, model_dir, "model")
