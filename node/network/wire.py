"""The blob transfer stream (a raw libp2p stream per provider, many requests on it).

Request: a 4-byte big-endian length and a msgpack map, `{op, hash, start}`. Reply: a
length-prefixed msgpack map `{ok, error, length}`, then for op "record" `length` raw bytes (a
manifest; the receiver checks its record hash), for op "object" the frames of a
`protocol.stream` chunked stream from chunk `start` (header with every chunk hash, then chunks),
each with a 4-byte length prefix. Peer bytes are untrusted: sizes capped, fields type-checked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import msgpack

from protocol.stream import MAX_FRAME_BYTES

PROTOCOL_NAME = "/unode/blob/1"
MAX_CONTROL = 4096  # request and reply maps are tiny
OPS = ("record", "object")


class WireError(Exception):
    """A peer sent a malformed frame (bad length, bad msgpack, wrong field types)."""


class StreamEnded(EOFError):
    """The stream closed before the reply was complete (the peer went away or gave up)."""


@dataclass(frozen=True)
class BlobRequest:
    """Ask for a record (by record hash) or an object's chunks from `start` (by object hash)."""

    op: str
    digest: bytes
    start: int = 0


@dataclass(frozen=True)
class BlobReply:
    ok: bool
    error: str = ""
    length: int = 0  # raw bytes that follow an ok "record" reply


def pack(obj: dict[str, object]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The next length-prefixed frame, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise StreamEnded("stream ended inside a frame length") from err
    size = int.from_bytes(head, "big")
    if size > limit:
        raise WireError(f"frame of {size} bytes exceeds {limit}")
    return await reader.readexactly(size)


async def read_map(reader: asyncio.StreamReader) -> dict[str, object] | None:
    frame = await read_frame(reader, MAX_CONTROL)
    if frame is None:
        return None
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_CONTROL)
    except (ValueError, msgpack.UnpackException) as err:
        raise WireError(f"undecodable control frame: {err}") from err
    if not isinstance(obj, dict):
        raise WireError("control frame is not a map")
    return obj


async def read_stream_frame(reader: asyncio.StreamReader) -> bytes:
    frame = await read_frame(reader, MAX_FRAME_BYTES)
    if frame is None:
        raise StreamEnded("stream ended before the object did")
    return frame


def _nonneg(obj: dict[str, object], key: str) -> int:
    val = obj.get(key, 0)
    if not isinstance(val, int) or isinstance(val, bool) or val < 0:
        raise WireError(f"field {key!r} must be a non-negative integer, got {val!r}")
    return val


def encode_request(req: BlobRequest) -> bytes:
    return pack({"op": req.op, "hash": req.digest, "start": req.start})


def decode_request(obj: dict[str, object]) -> BlobRequest:
    op, digest = obj.get("op"), obj.get("hash")
    if op not in OPS or not isinstance(digest, bytes) or len(digest) != 32:
        raise WireError("request must be {op: record|object, hash: 32 bytes, start: int}")
    return BlobRequest(str(op), digest, _nonneg(obj, "start"))


def encode_reply(reply: BlobReply) -> bytes:
    return pack({"ok": reply.ok, "error": reply.error, "length": reply.length})


def decode_reply(obj: dict[str, object]) -> BlobReply:
    ok, error = obj.get("ok"), obj.get("error", "")
    if not isinstance(ok, bool) or not isinstance(error, str):
        raise WireError("reply must be {ok: bool, error: str, length: int}")
    return BlobReply(ok, error[:200], _nonneg(obj, "length"))
