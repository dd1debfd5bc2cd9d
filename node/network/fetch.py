"""`unode fetch`: rebuild an expert directory from the network, verified, resumable, fail-over.

Work happens in OUT_DIR.partial/ (the manifest, a progress journal, and the files being rebuilt
at their final size); every chunk is checked against the signed manifest before it is written;
a provider that dies is retried then dropped, one that alters bytes is dropped at once and
logged with its peer id. Only a complete, verified tree is renamed to OUT_DIR.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import UserError
from node.network.client import BlobStream, FileTarget, LocalWriteError, ProviderError
from node.network.discovery import Provider
from node.network.plan import Journal, Piece, header_pieces, tensor_pieces
from node.network.pool import FetchError, ProviderPool, fetch_manifest_record
from protocol.content import chunk_hash, num_chunks, object_root, record_hash
from protocol.errors import ProtocolError
from protocol.records import TensorManifest
from protocol.stream import StreamHeader

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class FetchReport:
    expert_id: bytes
    out_dir: Path
    total_bytes: int
    fetched_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            "OUT_DIR", str(out_dir), "give a new (or empty) directory", problem="not empty"
        )


async def fetch_expert(
    p2p: Any,
    providers: list[Provider],
    expert_id: bytes,
    out_dir: Path,
    workers: int = 4,
    progress: Progress | None = None,
) -> FetchReport:
    """Fetch `expert_id` into `out_dir` from `providers` (see discovery.find_providers)."""
    check_out_dir(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    (partial / "tree").mkdir(parents=True, exist_ok=True)
    pool = ProviderPool(p2p, providers)
    start = time.monotonic()
    manifest = await _manifest(pool, expert_id, partial)
    report = FetchReport(expert_id, out_dir, manifest.total_bytes)
    journal = Journal(partial / "journal")
    try:
        files = _Files(partial / "tree")
        run = _Run(pool, journal, files, report, progress, workers, manifest.chunk_size)
        heads = header_pieces(manifest)
        await run.pieces(heads)
        shards = {
            p.file: files.read(p.file, p.nbytes) for p in heads if p.file.endswith(".safetensors")
        }
        try:
            tensors, sizes = tensor_pieces(manifest, shards)
        except ProtocolError as err:  # a signed manifest whose layout is broken: its owner's fault
            raise FetchError(
                f"the expert's manifest describes an impossible layout: {err}"
            ) from err
        for name, size in sizes.items():
            files.resize(name, size)
        await run.pieces(tensors)
        files.close(sync=True)
    finally:
        journal.close()
    report.seconds, report.dropped = time.monotonic() - start, dict(pool.dropped)
    if out_dir.exists():
        out_dir.rmdir()
    (partial / "tree").rename(out_dir)
    shutil.rmtree(partial)
    return report


async def _manifest(pool: ProviderPool, expert_id: bytes, partial: Path) -> TensorManifest:
    """The signed-hash-checked manifest: from the partial dir if a previous run saved it."""
    saved = partial / "manifest"
    if saved.is_file() and record_hash(saved.read_bytes()) == expert_id:
        return TensorManifest.from_bytes(saved.read_bytes())
    while True:
        data = await fetch_manifest_record(pool, expert_id, TensorManifest.MAX_BYTES)
        try:
            manifest = TensorManifest.from_bytes(data)
        except ProtocolError as err:  # hashes right yet does not decode: its owner signed garbage
            raise FetchError(f"the expert's manifest does not decode: {err}") from err
        saved.write_bytes(data)
        return manifest


class _Files:
    """The output files, opened once, written in place at known offsets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o644)
        fd: int = self.fds[name]
        return fd

    def resize(self, name: str, size: int) -> None:
        os.ftruncate(self.fd(name), size)

    def read(self, name: str, size: int, offset: int = 0) -> bytes:
        return os.pread(self.fd(name), size, offset)

    def close(self, sync: bool = False) -> None:
        for fd in self.fds.values():
            if sync:
                os.fsync(fd)
            os.close(fd)
        self.fds.clear()


class _Run:
    """Fetches a set of pieces with a few concurrent workers, failing over between providers."""

    def __init__(
        self,
        pool: ProviderPool,
        journal: Journal,
        files: _Files,
        report: FetchReport,
        progress: Progress | None,
        workers: int,
        chunk_size: int,
    ) -> None:
        self.pool, self.journal, self.files, self.report = pool, journal, files, report
        self.progress, self.n_workers, self.chunk_size = progress, workers, chunk_size
        self._done = 0
        self.verified: dict[str, int] = {}  # chunks of a piece verified in this process

    async def pieces(self, pieces: list[Piece]) -> None:
        todo: asyncio.Queue[Piece] = asyncio.Queue()
        for piece in sorted(pieces, key=lambda p: -p.nbytes):
            if piece.file not in self.files.fds and not piece.file.endswith(".safetensors"):
                self.files.resize(piece.file, piece.nbytes)
            if self._resume(piece):
                continue
            todo.put_nowait(piece)
        tasks = [
            asyncio.create_task(self._worker(todo))
            for _ in range(min(self.n_workers, todo.qsize()))
        ]
        try:
            waiter = asyncio.create_task(todo.join())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter:
                    task.result()  # a worker only returns by raising FetchError
        finally:
            for task in [*tasks]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            waiter.cancel()

    def _resume(self, piece: Piece) -> bool:
        """True if the journal says the piece is complete and its bytes on disk verify."""
        n = num_chunks(piece.nbytes, self.chunk_size)
        if self.journal.progress.get(piece.key, 0) < n:
            return False
        size = self.chunk_size
        hashes = [
            chunk_hash(
                self.files.read(
                    piece.file, min(size, piece.nbytes - i * size), piece.offset + i * size
                )
            )
            for i in range(n)
        ]
        if object_root(piece.meta, piece.nbytes, size, hashes) != piece.digest:
            self.journal.progress[piece.key] = 0
            return False
        self.report.reused_bytes += piece.nbytes
        self._tick(piece.nbytes)
        return True

    async def _worker(self, todo: asyncio.Queue[Piece]) -> None:
        streams: dict[str, BlobStream] = {}
        try:
            while True:
                piece = await todo.get()
                try:
                    await self._one(piece, streams)
                except ProviderError:
                    todo.put_nowait(
                        piece
                    )  # the pool has counted the failure; another provider next
                finally:
                    todo.task_done()
        finally:
            for s in streams.values():
                s.close()

    async def _one(self, piece: Piece, streams: dict[str, BlobStream]) -> None:
        provider = self.pool.pick()  # raises FetchError when no provider is left
        start = self.verified.get(piece.key, 0)
        claimed = self.journal.progress.get(piece.key, 0) if start == 0 else start
        try:
            stream = streams.get(provider.peer_id)
            if stream is None:
                stream = streams[provider.peer_id] = await BlobStream.open(
                    self.pool.p2p, await self.pool.connect(provider)
                )
            target = FileTarget(self.files.fd(piece.file), piece.offset)
            await stream.get_object(
                piece.digest,
                piece.meta,
                piece.nbytes,
                claimed,
                target,
                on_chunk=lambda nxt, n: self._chunk(piece, nxt, n),
                on_header=lambda h: self._check_prefix(piece, h, claimed, start),
            )
        except _PrefixDamaged as bad:
            streams.pop(provider.peer_id).close()
            self.journal.record(piece, bad.first_bad)
            raise ProviderError("resume point moved back") from None
        except ProviderError as err:
            if (s := streams.pop(provider.peer_id, None)) is not None:
                s.close()
            self.pool.failed(provider, err)
            raise
        except LocalWriteError as err:
            raise FetchError(str(err)) from err
        self.pool.succeeded(provider, piece.nbytes)

    def _check_prefix(self, piece: Piece, header: StreamHeader, claimed: int, trusted: int) -> None:
        """Chunks before the resume point that only the journal vouches for: re-hash them."""
        size = header.chunk_size
        for i in range(trusted, claimed):
            data = self.files.read(
                piece.file, min(size, piece.nbytes - i * size), piece.offset + i * size
            )
            if chunk_hash(data) != header.chunks[i]:
                raise _PrefixDamaged(i)
        if claimed > trusted:
            self.verified[piece.key] = claimed
            self.report.reused_bytes += min(claimed * size, piece.nbytes)
            self._tick(min(claimed * size, piece.nbytes))

    def _chunk(self, piece: Piece, next_chunk: int, nbytes: int) -> None:
        self.verified[piece.key] = next_chunk
        self.journal.record(piece, next_chunk)
        self.report.fetched_bytes += nbytes
        self._tick(nbytes)

    def _tick(self, nbytes: int) -> None:
        self._done += nbytes
        if self.progress is not None:
            self.progress(self._done, self.report.total_bytes)


class _PrefixDamaged(Exception):
    def __init__(self, first_bad: int) -> None:
        self.first_bad = first_bad
