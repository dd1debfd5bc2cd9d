"""The blob client: one reusable stream per provider; records into memory, objects to disk.

An object arrives as a `protocol.stream` chunked stream: its header must hash to the object hash
from the signed manifest, then every chunk must match its hash in that header before it is
written (at its final position in the output file). Memory stays at about one chunk.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from node.network import wire
from protocol.content import chunk_hash, object_root, record_hash
from protocol.errors import HashMismatchError, ProtocolError, StreamError
from protocol.stream import CHUNK, CHUNK_OVERHEAD, StreamHeader

STALL_TIMEOUT = 20.0  # seconds without progress before a provider counts as dead
PIPELINE = 3  # chunks per stream being hashed/written while the next one is read
_POOL: ThreadPoolExecutor | None = None


def _writers() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="unode-verify")
    return _POOL


_CHUNK_PREFIX = struct.Struct(">BI")


class ProviderError(Exception):
    """The provider could not serve (gone, stalled, refused, broke the framing): try another."""


class ProviderLied(ProviderError):
    """The provider sent bytes that do not match the signed hashes: drop it for good."""


class LocalWriteError(Exception):
    """Writing to the output failed (disk full, permissions): not the provider's fault."""


class Target(Protocol):
    """Where a verified object's bytes go; `write(offset, data)` puts bytes at `offset` of it."""

    def write(self, offset: int, data: memoryview) -> None: ...


@dataclass(frozen=True)
class FileTarget:
    """An object stored at byte `base` of an open file."""

    fd: int
    base: int

    def write(self, offset: int, data: memoryview) -> None:
        os.pwrite(self.fd, data, self.base + offset)


@dataclass(frozen=True)
class MemoryTarget:
    """An object read into a preallocated buffer (a tensor's bytes)."""

    view: memoryview

    def write(self, offset: int, data: memoryview) -> None:
        self.view[offset : offset + len(data)] = data


def check_header(
    header: StreamHeader, digest: bytes, meta: list[object], nbytes: int, start: int
) -> None:
    """The checks `protocol.stream.StreamDecoder` makes on a header, for a to-disk receiver."""
    if header.object_hash != digest or header.meta != meta or header.nbytes != nbytes:
        raise HashMismatchError("stream header is for another object than the one requested")
    if object_root(header.meta, header.nbytes, header.chunk_size, header.chunks) != digest:
        raise HashMismatchError("stream header does not hash to the expected object hash")
    if header.start != start:
        raise StreamError(f"stream starts at chunk {header.start}, expected {start}")


def write_chunk(header: StreamHeader, frame: bytes, index: int, target: Target) -> int:
    """Check one chunk frame against the header and write it in place; returns its size."""
    if len(frame) < CHUNK_OVERHEAD or frame[0] != CHUNK:
        raise StreamError("malformed chunk frame")
    _, got = _CHUNK_PREFIX.unpack_from(frame)
    if got != index:
        raise StreamError(f"chunk {got} arrived, expected chunk {index}")
    view = memoryview(frame)[CHUNK_OVERHEAD:]
    begin = index * header.chunk_size
    if len(view) != min(header.chunk_size, header.nbytes - begin):
        raise StreamError(f"chunk {index} has the wrong size ({len(view)} bytes)")
    if chunk_hash(view) != header.chunks[index]:
        raise HashMismatchError(f"chunk {index} does not match its hash in the signed header")
    try:
        target.write(begin, view)
    except OSError as err:
        raise LocalWriteError(f"cannot write the output: {err}") from err
    return len(view)


class BlobStream:
    """An open stream to one provider; requests on it are sequential."""

    def __init__(self, peer_id: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer_id, self._reader, self._writer = peer_id, reader, writer

    @classmethod
    async def open(cls, p2p: Any, peer_id: Any, timeout: float = STALL_TIMEOUT) -> BlobStream:
        try:
            _, reader, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(peer_id, wire.PROTOCOL_NAME), timeout
            )
        except Exception as err:  # p2pd reports any failure (no route, refused) as a bare Exception
            raise ProviderError(f"cannot open a stream to {peer_id}: {err}") from err
        return cls(peer_id, reader, writer)

    async def _ask(self, req: wire.BlobRequest) -> wire.BlobReply:
        self._writer.write(wire.encode_request(req))
        await self._writer.drain()
        frame = await asyncio.wait_for(wire.read_map(self._reader), STALL_TIMEOUT)
        if frame is None:
            raise ProviderError(f"{self.peer_id} closed the stream")
        reply = wire.decode_reply(frame)
        if not reply.ok:
            raise ProviderError(f"{self.peer_id} refused: {reply.error}")
        return reply

    async def get_record(self, digest: bytes, max_bytes: int) -> bytes:
        """A record (a manifest) whose record hash is `digest`, checked."""
        async with self._guard():
            reply = await self._ask(wire.BlobRequest("record", digest))
            if reply.length > max_bytes:
                raise ProviderError(f"{self.peer_id} offers a {reply.length}-byte record")
            data: bytes = await asyncio.wait_for(
                self._reader.readexactly(reply.length), STALL_TIMEOUT
            )
        if record_hash(data) != digest:
            raise ProviderLied(f"{self.peer_id} sent a record that does not match its hash")
        return data

    async def get_object(
        self,
        digest: bytes,
        meta: list[object],
        nbytes: int,
        start: int,
        target: Target,
        on_chunk: Callable[[int, int], None],
        on_header: Callable[[StreamHeader], None] | None = None,
    ) -> None:
        """Stream chunks start.. of an object into `target`.

        `on_header(header)` runs once the header is verified (it may check data already on
        disk against the chunk hashes); `on_chunk(next_index, nbytes)` after each written chunk.
        """
        async with self._guard():
            await self._ask(wire.BlobRequest("object", digest, start))
            header = StreamHeader.from_frame(await wire.read_stream_frame(self._reader))
            check_header(header, digest, meta, nbytes, start)
            if on_header is not None:
                on_header(header)
            # hash + write run in a thread while the next chunk is read (both release the GIL);
            # at most PIPELINE chunks per stream are in memory
            loop = asyncio.get_running_loop()
            pending: deque[tuple[int, asyncio.Future[int]]] = deque()
            try:
                for index in range(start, len(header.chunks)):
                    frame = await asyncio.wait_for(
                        wire.read_stream_frame(self._reader), STALL_TIMEOUT
                    )
                    job = loop.run_in_executor(
                        _writers(), write_chunk, header, frame, index, target
                    )
                    pending.append((index, job))
                    if len(pending) >= PIPELINE:
                        done, job = pending.popleft()
                        on_chunk(done + 1, await job)
                while pending:
                    done, job = pending.popleft()
                    on_chunk(done + 1, await job)
            finally:
                for _, job in pending:  # a failed chunk: let the others finish, then report
                    await asyncio.wait([job])

    def _guard(self) -> _Guard:
        return _Guard(self.peer_id)

    def close(self) -> None:
        self._writer.close()


class _Guard:
    """Maps transport and peer-data failures to ProviderError / ProviderLied."""

    def __init__(self, peer_id: Any) -> None:
        self.peer_id = peer_id

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None or isinstance(err, ProviderError):
            return False
        if isinstance(err, HashMismatchError):
            raise ProviderLied(f"{self.peer_id} sent altered data: {err}") from err
        if isinstance(err, (ProtocolError, wire.WireError)):
            raise ProviderLied(f"{self.peer_id} broke the protocol: {err}") from err
        if isinstance(err, (ConnectionError, OSError, EOFError, asyncio.TimeoutError)):
            raise ProviderError(f"{self.peer_id} failed: {err!r}") from err
        return False
