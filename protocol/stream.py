"""Chunked object streams, independent of the transport: frames to send, and a checking decoder.

Frame 1 is a header (object hash, meta, size, chunk size, every chunk hash); the receiver checks
that the header hashes to the object hash it expects (from a signed manifest) before accepting
any data. Each chunk frame carries its index and hash and is checked and written into a
preallocated buffer as it arrives. For byte-stream transports, `length_prefixed` / FrameSplitter
add and remove a 4-byte big-endian length in front of each frame.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Sequence

from protocol import codec
from protocol.content import (
    HASH_BYTES,
    MAX_CHUNK_SIZE,
    MAX_OBJECT_BYTES,
    check_chunk_size,
    check_object_meta,
    chunk_hash,
    chunk_hashes,
    num_chunks,
    object_meta,
    object_root,
)
from protocol.errors import HashMismatchError, ProtocolError, SizeError, StreamError
from protocol.version import PROTOCOL_VERSION, check_version

HEADER, CHUNK = 0x01, 0x02
_CHUNK_PREFIX = struct.Struct(">BI")  # frame type, chunk index
CHUNK_OVERHEAD = _CHUNK_PREFIX.size + HASH_BYTES  # 37 bytes before the chunk data
MAX_HEADER_BYTES = 16 << 20
MAX_FRAME_BYTES = max(MAX_HEADER_BYTES, MAX_CHUNK_SIZE + CHUNK_OVERHEAD) + 1
_HEADER_FIELDS = {"v", "hash", "meta", "nbytes", "chunk_size", "chunks", "start"}


@dataclasses.dataclass(frozen=True)
class StreamHeader:
    object_hash: bytes
    meta: list[object]  # ["blob"] or ["tensor", dtype, shape]
    nbytes: int
    chunk_size: int
    chunks: tuple[bytes, ...]  # hash of every chunk, in order
    start: int = 0  # index of the first chunk this stream carries (resume)

    def to_frame(self) -> bytes:
        body = {
            "v": PROTOCOL_VERSION,
            "hash": self.object_hash,
            "meta": self.meta,
            "nbytes": self.nbytes,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
            "start": self.start,
        }
        return bytes([HEADER]) + codec.encode(body, max_bytes=MAX_HEADER_BYTES)

    @classmethod
    def from_frame(cls, frame: bytes) -> StreamHeader:
        if not frame or frame[0] != HEADER:
            raise StreamError("the first frame of a stream must be a header")
        value = codec.decode(bytes(frame[1:]), max_bytes=MAX_HEADER_BYTES)
        if not isinstance(value, dict) or set(value) != _HEADER_FIELDS:
            raise StreamError(
                f"stream header must have exactly the fields {sorted(_HEADER_FIELDS)}"
            )
        check_version(value["v"])
        meta, nbytes, chunk_size = (
            value["meta"],
            value["nbytes"],
            check_chunk_size(value["chunk_size"]),
        )
        size = check_object_meta(meta)
        if (
            type(nbytes) is not int
            or not 0 <= nbytes <= MAX_OBJECT_BYTES
            or size not in (None, nbytes)
        ):
            raise StreamError(f"stream size {nbytes!r} is invalid for meta {meta!r}")
        chunks, start, object_hash = value["chunks"], value["start"], value["hash"]
        if not isinstance(chunks, list) or len(chunks) != num_chunks(nbytes, chunk_size):
            raise StreamError("stream header must list one hash per chunk")
        if any(not isinstance(h, bytes) or len(h) != HASH_BYTES for h in [object_hash, *chunks]):
            raise StreamError(f"stream hashes must be {HASH_BYTES} bytes")
        if type(start) is not int or not 0 <= start <= len(chunks):
            raise StreamError(f"stream start {start!r} out of range")
        return cls(object_hash, meta, nbytes, chunk_size, tuple(chunks), start)


def make_header(
    data: bytes | bytearray | memoryview,
    chunk_size: int,
    dtype: str | None = None,
    shape: Sequence[int] | None = None,
) -> StreamHeader:
    """Hash `data` (a tensor's raw bytes if dtype/shape are given, else a blob) into a header."""
    check_chunk_size(chunk_size)
    meta, nbytes = object_meta(dtype, shape), memoryview(data).nbytes
    hashes = chunk_hashes(data, chunk_size)
    if check_object_meta(meta) not in (None, nbytes):
        raise StreamError(f"{nbytes} bytes do not fit {meta!r}")
    return StreamHeader(
        object_root(meta, nbytes, chunk_size, hashes), meta, nbytes, chunk_size, tuple(hashes)
    )


def chunk_frame(index: int, data: bytes | memoryview, digest: bytes | None = None) -> bytes:
    return _CHUNK_PREFIX.pack(CHUNK, index) + (digest or chunk_hash(data)) + bytes(data)


def encode_stream(
    data: bytes | bytearray | memoryview, header: StreamHeader, start: int = 0
) -> Iterator[bytes]:
    """Frames for `data`: the header (with `start`), then chunks start..n-1."""
    header = dataclasses.replace(header, start=start)
    yield header.to_frame()
    view, size = memoryview(data).cast("B"), header.chunk_size
    for index in range(start, len(header.chunks)):
        yield chunk_frame(index, view[index * size : (index + 1) * size], header.chunks[index])


class StreamDecoder:
    """Receives the frames of one object whose hash is known; checks everything incrementally."""

    def __init__(
        self,
        expected_hash: bytes,
        *,
        expected_meta: list[object] | None = None,
        out: bytearray | memoryview | None = None,
        resume_from: int = 0,
        max_bytes: int = MAX_OBJECT_BYTES,
    ) -> None:
        self.expected_hash, self.expected_meta = expected_hash, expected_meta
        self.out, self.max_bytes = out, max_bytes
        self.next_index = resume_from
        self.header: StreamHeader | None = None
        self._view: memoryview | None = None

    @property
    def done(self) -> bool:
        return self.header is not None and self.next_index == len(self.header.chunks)

    def feed(self, frame: bytes | bytearray | memoryview) -> None:
        """Take one frame; raise a StreamError subclass on anything unexpected."""
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise StreamError("a frame must be bytes")
        if self.header is None:
            self._accept_header(StreamHeader.from_frame(bytes(frame)))
        elif self.done:
            raise StreamError("extra frame after the last chunk")
        else:
            self._accept_chunk(memoryview(frame).cast("B"))

    def _accept_header(self, header: StreamHeader) -> None:
        if header.object_hash != self.expected_hash:
            raise HashMismatchError("stream is for another object than the one requested")
        if self.expected_meta is not None and header.meta != self.expected_meta:
            raise HashMismatchError(f"stream meta {header.meta!r} != {self.expected_meta!r}")
        if header.nbytes > self.max_bytes:
            raise SizeError(f"object of {header.nbytes} bytes is larger than {self.max_bytes}")
        root = object_root(header.meta, header.nbytes, header.chunk_size, header.chunks)
        if root != self.expected_hash:
            raise HashMismatchError("stream header does not hash to the expected object hash")
        if header.start != self.next_index:
            raise StreamError(f"stream starts at chunk {header.start}, expected {self.next_index}")
        if self.out is None:
            self.out = bytearray(header.nbytes)
        self._view = memoryview(self.out).cast("B")
        if self._view.nbytes != header.nbytes:
            raise StreamError(f"output buffer is {self._view.nbytes} bytes, object {header.nbytes}")
        self.header = header

    def _accept_chunk(self, frame: memoryview) -> None:
        assert self.header is not None and self._view is not None
        if len(frame) < CHUNK_OVERHEAD or frame[0] != CHUNK:
            raise StreamError("malformed chunk frame")
        _, index = _CHUNK_PREFIX.unpack_from(frame)
        if index != self.next_index:
            raise StreamError(f"chunk {index} arrived, expected chunk {self.next_index}")
        digest, data = bytes(frame[_CHUNK_PREFIX.size : CHUNK_OVERHEAD]), frame[CHUNK_OVERHEAD:]
        begin = index * self.header.chunk_size
        end = min(begin + self.header.chunk_size, self.header.nbytes)
        if len(data) != end - begin:
            raise StreamError(f"chunk {index} has {len(data)} bytes, expected {end - begin}")
        if digest != self.header.chunks[index] or chunk_hash(data) != digest:
            raise HashMismatchError(f"chunk {index} does not match its hash in the header")
        self._view[begin:end] = data
        self.next_index += 1

    def finish(self) -> memoryview:
        """The verified object; raises StreamError if the stream ended early."""
        if self.header is None or self._view is None:
            raise StreamError("stream ended before its header")
        if not self.done:
            raise StreamError(
                f"stream truncated at chunk {self.next_index}/{len(self.header.chunks)}"
            )
        return self._view


def decode_stream(frames: Iterator[bytes] | Sequence[bytes], expected_hash: bytes) -> bytes:
    """Convenience: decode a whole stream held in memory."""
    decoder = StreamDecoder(expected_hash)
    for frame in frames:
        decoder.feed(frame)
    return bytes(decoder.finish())


def length_prefixed(frame: bytes) -> bytes:
    return struct.pack(">I", len(frame)) + frame


class FrameSplitter:
    """Splits a byte stream of length-prefixed frames back into frames."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame, self._buffer = max_frame, bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 4:
            (size,) = struct.unpack_from(">I", self._buffer)
            if size > self.max_frame:
                raise SizeError(f"frame of {size} bytes is larger than {self.max_frame}")
            if len(self._buffer) < 4 + size:
                break
            frames.append(bytes(self._buffer[4 : 4 + size]))
            del self._buffer[: 4 + size]
        return frames

    def close(self) -> None:
        if self._buffer:
            raise StreamError(f"byte stream ended inside a frame ({len(self._buffer)} bytes left)")


__all__ = [
    "CHUNK_OVERHEAD",
    "FrameSplitter",
    "ProtocolError",
    "StreamDecoder",
    "StreamHeader",
    "chunk_frame",
    "decode_stream",
    "encode_stream",
    "length_prefixed",
    "make_header",
]
