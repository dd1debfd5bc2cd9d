"""The blob server: serves manifests, tensors and summary shards by hash over P2P streams.

Object bytes come straight from the files on disk (pread, one chunk at a time), framed as a
`protocol.stream` chunked stream; never through the DHT. Limits per peer (concurrent streams)
and per request keep one peer from starving the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.metrics import registry as metrics
from node.network import wire
from node.network.ratelimit import TokenBucket
from protocol.content import DEFAULT_CHUNK_SIZE
from protocol.stream import CHUNK, CHUNK_OVERHEAD, StreamHeader, length_prefixed

log = logging.getLogger(__name__)
CORRUPT_ENV = "UNODE_TEST_CORRUPT_SERVING"  # fault injector for tests: alter every served chunk


_PREFIX = struct.Struct(">IBI")  # frame length, then protocol.stream's chunk prefix


def frame_prefix(index: int, size: int, digest: bytes) -> bytes:
    """`length_prefixed(chunk_frame(index, data, digest))` minus the data: written separately,
    the chunk is never copied into a new frame (two 1 MiB copies saved per chunk)."""
    return _PREFIX.pack(CHUNK_OVERHEAD + size, CHUNK, index) + digest


@dataclass(frozen=True)
class ServedObject:
    """A content-addressed object's bytes (a range of a file) and its stream header."""

    path: Path
    offset: int
    header: StreamHeader


@dataclass
class ServiceLimits:
    """Per-peer and overall caps (defaults fit a home node serving a handful of peers)."""

    streams_per_peer: int = 8
    streams_total: int = 64
    upload_bytes_per_s: float | None = None  # all streams together (`unode join --max-upload`)


@dataclass
class BlobServer:
    """Answers `wire.BlobRequest`s for the records and objects registered with it."""

    limits: ServiceLimits = field(default_factory=ServiceLimits)
    records: dict[bytes, bytes] = field(default_factory=dict)
    objects: dict[bytes, ServedObject] = field(default_factory=dict)
    corrupt: bool = field(default_factory=lambda: os.environ.get(CORRUPT_ENV, "") == "1")
    served_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _streams: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _bucket: TokenBucket | None = None

    def _upload_cap(self) -> TokenBucket | None:
        rate = self.limits.upload_bytes_per_s
        if rate and self._bucket is None:  # made on first use, inside the serving event loop
            self._bucket = TokenBucket(rate, burst=max(rate, 2 * DEFAULT_CHUNK_SIZE))
        return self._bucket

    def add_record(self, digest: bytes, data: bytes) -> None:
        self.records[digest] = data

    def add_object(self, path: Path, offset: int, header: StreamHeader) -> None:
        self.objects[header.object_hash] = ServedObject(path, offset, header)

    async def start(self, p2p: Any) -> None:
        """Register the stream handler on a (replicated) hivemind P2P instance."""
        await p2p.add_binary_stream_handler(wire.PROTOCOL_NAME, self.handle)
        if self.corrupt:
            log.warning(
                "%s=1: this node ALTERS the bytes it serves (test fault injector)", CORRUPT_ENV
            )

    async def handle(
        self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One stream from one peer: answer its requests until it closes the stream."""
        peer = str(info.peer_id)
        if (
            self._streams[peer] >= self.limits.streams_per_peer
            or sum(self._streams.values()) >= self.limits.streams_total
        ):
            await self._send(
                writer, wire.encode_reply(wire.BlobReply(False, "busy: too many streams"))
            )
            writer.close()
            return
        self._streams[peer] += 1
        try:
            while (frame := await wire.read_map(reader)) is not None:
                await self._serve_one(peer, wire.decode_request(frame), writer)
        except wire.WireError as err:
            log.warning("bad request from %s: %s", peer, err)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as err:
            log.debug("stream from %s ended: %r", peer, err)
        finally:
            self._streams[peer] -= 1
            writer.close()

    async def _serve_one(
        self, peer: str, req: wire.BlobRequest, writer: asyncio.StreamWriter
    ) -> None:
        if req.op == "record":
            data = self.records.get(req.digest)
            if data is None:
                await self._send(writer, wire.encode_reply(wire.BlobReply(False, "unknown record")))
                return
            if (cap := self._upload_cap()) is not None:
                await cap.consume(len(data))
            await self._send(
                writer, wire.encode_reply(wire.BlobReply(True, length=len(data))) + data
            )
            self.served_bytes[peer] += len(data)
            metrics.served(len(data))
            return
        obj = self.objects.get(req.digest)
        if obj is None or req.start > len(obj.header.chunks):
            await self._send(
                writer, wire.encode_reply(wire.BlobReply(False, "unknown object or start"))
            )
            return
        await self._send(writer, wire.encode_reply(wire.BlobReply(True)))
        await self._stream_object(peer, obj, req.start, writer)

    async def _stream_object(
        self, peer: str, obj: ServedObject, start: int, writer: asyncio.StreamWriter
    ) -> None:
        header = obj.header
        writer.write(length_prefixed(dataclasses.replace(header, start=start).to_frame()))
        fd = os.open(obj.path, os.O_RDONLY)
        try:
            for index in range(start, len(header.chunks)):
                begin = index * header.chunk_size
                size = min(header.chunk_size, header.nbytes - begin)
                data = os.pread(fd, size, obj.offset + begin)
                if len(data) != size:
                    raise OSError(f"{obj.path} is shorter than its manifest says")
                if (cap := self._upload_cap()) is not None:
                    await cap.consume(size)
                writer.write(frame_prefix(index, size, header.chunks[index]))
                writer.write(self._maybe_corrupt(data))
                self.served_bytes[peer] += size
                metrics.served(size)
                await writer.drain()
        finally:
            os.close(fd)
        await writer.drain()

    def _maybe_corrupt(self, chunk: bytes) -> bytes:
        if not self.corrupt or not chunk:
            return chunk
        flipped = bytearray(chunk)
        flipped[len(flipped) // 2] ^= 0xFF
        return bytes(flipped)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
