"""Where every verified object of a manifest goes in the rebuilt directory, and the journal.

Safetensors shards are rebuilt from their `<shard>.header` entry (the exact header bytes) and
their tensors at the offsets that header gives; the header is untrusted until every tensor it
places matches the signed manifest and the tensors tile the data region exactly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from node.network.manifest import HEADER_SUFFIX
from protocol.content import object_meta
from protocol.errors import SchemaError
from protocol.records import TensorManifest


@dataclass(frozen=True)
class Piece:
    """One content-addressed object and where its bytes go."""

    digest: bytes
    meta: list[object]
    nbytes: int
    file: str
    offset: int

    @property
    def key(self) -> str:
        return f"{self.file}@{self.offset}"


def header_pieces(manifest: TensorManifest) -> list[Piece]:
    """The shard headers (fetched first: they say where each tensor goes) and plain files."""
    out = []
    for f in manifest.files:
        name = (
            f.name[: -len(HEADER_SUFFIX)]
            if f.name.endswith(".safetensors" + HEADER_SUFFIX)
            else f.name
        )
        out.append(Piece(f.hash, object_meta(), f.nbytes, name, 0))
    return out


def tensor_pieces(
    manifest: TensorManifest, headers: dict[str, bytes]
) -> tuple[list[Piece], dict[str, int]]:
    """Tensor placements from verified shard headers; and every shard's file size."""
    by_name = {t.name: t for t in manifest.tensors}
    pieces: list[Piece] = []
    sizes: dict[str, int] = {}
    for shard, raw in sorted(headers.items()):
        n, header = _parse_header(shard, raw)
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entry = by_name.pop(name, None)
            if entry is None or not isinstance(info, dict):
                raise SchemaError(f"{shard}: tensor {name!r} is not in the manifest (or twice)")
            lo, hi = _offsets(info)
            same = info.get("dtype") == entry.dtype and info.get("shape") == list(entry.shape)
            if not same or hi - lo != entry.nbytes:
                raise SchemaError(f"{shard}: tensor {name!r} disagrees with the manifest")
            spans.append((lo, hi))
            meta = object_meta(entry.dtype, entry.shape)
            pieces.append(Piece(entry.hash, meta, entry.nbytes, shard, 8 + n + lo))
        sizes[shard] = 8 + n + _check_tiling(shard, spans)
    if by_name:
        raise SchemaError(f"tensors no shard header places: {sorted(by_name)[:5]}")
    return pieces, sizes


def _parse_header(shard: str, raw: bytes) -> tuple[int, dict[str, object]]:
    """(n, header JSON) of a shard's `8-byte length + JSON` header entry."""
    if len(raw) < 8 or struct.unpack("<Q", raw[:8])[0] != len(raw) - 8:
        raise SchemaError(f"{shard}: header length field disagrees with the header entry")
    try:
        header = json.loads(raw[8:])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SchemaError(f"{shard}: header is not JSON") from err
    if not isinstance(header, dict):
        raise SchemaError(f"{shard}: header is not a JSON object")
    return len(raw) - 8, header


def _offsets(info: dict[str, object]) -> tuple[int, int]:
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(x) is int for x in offsets)
    ):
        raise SchemaError("data_offsets must be two integers")
    lo, hi = offsets
    if not 0 <= lo <= hi:
        raise SchemaError("data_offsets out of order")
    return lo, hi


def _check_tiling(shard: str, spans: list[tuple[int, int]]) -> int:
    """Tensors must cover the data region without gaps or overlaps (the safetensors rule)."""
    pos = 0
    for lo, hi in sorted(spans):
        if lo != pos:
            raise SchemaError(f"{shard}: tensors leave a gap or overlap at byte {pos}")
        pos = hi
    return pos


class Journal:
    """Append-only progress hints: `<piece key>\\t<next chunk>` lines. On resume every chunk the
    journal claims is re-hashed from disk, so a torn write or a stale line costs a re-fetch only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.progress: dict[str, int] = {}
        text = path.read_text(errors="replace") if path.is_file() else ""
        if text:
            for line in text.splitlines():
                key, _, num = line.rpartition("\t")
                if key and num.isdigit():
                    self.progress[key] = max(self.progress.get(key, 0), int(num))
        self._f = path.open("a")
        if text and not text.endswith("\n"):  # a line torn by a crash: end it
            self._f.write("\n")

    def record(self, piece: Piece, next_chunk: int) -> None:
        self.progress[piece.key] = next_chunk
        self._f.write(f"{piece.key}\t{next_chunk}\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
