"""Record schemas about experts and data: ExpertCard, TensorManifest, SummaryManifest, PeerRecord,
ProviderRecord. Round records live in protocol.round_records and are re-exported here.

Manifests travel over P2P streams (content-addressed by `hash()`); the DHT holds cards and hashes.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from protocol import codec
from protocol.content import check_chunk_size, check_tensor_meta
from protocol.errors import SchemaError
from protocol.round_records import ROUND_RECORDS, RoundProposal, Score, UnitResult, WorkClaim
from protocol.schema import (
    HASH,
    TAG,
    Bytes,
    Float,
    Int,
    ListOf,
    MapOf,
    Nested,
    Opt,
    Record,
    Str,
    Struct,
    spec,
)

__all__ = [
    "RECORD_TYPES",
    "ExpertCard",
    "FileEntry",
    "PeerRecord",
    "ProviderRecord",
    "Record",
    "RoundProposal",
    "Score",
    "ShardEntry",
    "SummaryManifest",
    "TensorEntry",
    "TensorManifest",
    "UnitResult",
    "WorkClaim",
]

_TENSOR_NAME = Str(256, r"[A-Za-z0-9_.:/\-\[\]]+")
_FILE_NAME = Str(128, r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_PEER_ID = Str(64, r"[1-9A-HJ-NP-Za-km-z]+")
_CHUNK = Int(1 << 10, 1 << 24)
_BIG = Int(0, 1 << 50)


def _sorted_unique(names: list[str], what: str) -> None:
    if any(a >= b for a, b in itertools.pairwise(names)):
        raise SchemaError(f"{what} must be sorted by name and unique")


@dataclasses.dataclass(frozen=True)
class TensorEntry(Struct):
    name: str = spec(_TENSOR_NAME)
    dtype: str = spec(Str(16, r"[A-Z0-9_]+"))
    shape: tuple[int, ...] = spec(ListOf(Int(0, (1 << 40) - 1), 8))
    nbytes: int = spec(_BIG)
    hash: bytes = spec(HASH)

    def check_invariants(self) -> None:
        if check_tensor_meta(self.dtype, list(self.shape)) != self.nbytes:
            raise SchemaError(f"tensor {self.name}: nbytes {self.nbytes} != dtype x shape")


@dataclasses.dataclass(frozen=True)
class FileEntry(Struct):
    """A non-tensor file of the model directory (config.json, tokenizer.json, ...)."""

    name: str = spec(_FILE_NAME)
    nbytes: int = spec(Int(0, 1 << 32))
    hash: bytes = spec(HASH)


@dataclasses.dataclass(frozen=True)
class TensorManifest(Record):
    """Every tensor of an expert (sorted by name) and its side files. expert id = hash()."""

    TYPE = "tensor_manifest"
    MAX_BYTES = 16 << 20
    chunk_size: int = spec(_CHUNK)
    tensors: tuple[TensorEntry, ...] = spec(ListOf(Nested(TensorEntry), 100_000))
    files: tuple[FileEntry, ...] = spec(ListOf(Nested(FileEntry), 64))

    def check_invariants(self) -> None:
        check_chunk_size(self.chunk_size)
        _sorted_unique([t.name for t in self.tensors], "tensors")
        _sorted_unique([f.name for f in self.files], "files")

    def tensor(self, name: str) -> TensorEntry:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + sum(f.nbytes for f in self.files)


@dataclasses.dataclass(frozen=True)
class ExpertCard(Record):
    """What the network knows about an expert; `expert_id` is its TensorManifest's hash()."""

    TYPE = "expert_card"
    MAX_BYTES = 4096
    expert_id: bytes = spec(HASH)
    owner: bytes = spec(Bytes(32))
    name: str = spec(Str(64, r"[^\x00-\x1f\x7f]+"))
    architecture: str = spec(Str(64, r"[A-Za-z0-9_]+"))
    config_hash: bytes = spec(HASH)
    base_fingerprint: bytes = spec(HASH)  # equal for experts fine-tuned from one base model
    tokenizer_hash: bytes = spec(HASH)
    domains: tuple[str, ...] = spec(ListOf(TAG, 16, sorted_unique=True))
    license: str = spec(Str(64, r"[A-Za-z0-9.+\-]+"))
    eval_scores: dict[str, float] = spec(MapOf(Str(64, r"[a-z0-9_.:/\-]+"), Float(), 32))  # noqa: RUF009
    n_params: int = spec(_BIG)
    nbytes: int = spec(_BIG)
    # hash of the record that produced this expert (a RoundProposal's round id), None for a root
    lineage: bytes | None = spec(Opt(HASH))


@dataclasses.dataclass(frozen=True)
class ShardEntry(Struct):
    index: int = spec(Int(0, 1 << 20))
    nbytes: int = spec(Int(0, 1 << 40))
    hash: bytes = spec(HASH)
    n_sequences: int = spec(Int(0, 1 << 32))


@dataclasses.dataclass(frozen=True)
class SummaryManifest(Record):
    """Per-token top-k distributions of one model over one corpus, in content-addressed shards."""

    TYPE = "summary_manifest"
    MAX_BYTES = 1 << 20
    model_id: bytes = spec(HASH)
    corpus_hash: bytes = spec(HASH)
    tokenizer_hash: bytes = spec(HASH)
    top_k: int = spec(Int(1, 1024))
    temperature: float = spec(Float(1e-6, 1e3))
    format: str = spec(Str(64, r"[a-z0-9_.\-]+"))
    chunk_size: int = spec(_CHUNK)
    shards: tuple[ShardEntry, ...] = spec(ListOf(Nested(ShardEntry), 100_000))

    def check_invariants(self) -> None:
        check_chunk_size(self.chunk_size)
        if [s.index for s in self.shards] != list(range(len(self.shards))):
            raise SchemaError("summary shards must be numbered 0..n-1 in order")


@dataclasses.dataclass(frozen=True)
class PeerRecord(Record):
    """A live node: its libp2p peer id (= the signer's key), addresses and served experts."""

    TYPE = "peer"
    MAX_BYTES = 4096
    peer_id: str = spec(_PEER_ID)
    maddrs: tuple[str, ...] = spec(ListOf(Str(256, r"/[\x21-\x7e]+"), 8))
    experts: tuple[bytes, ...] = spec(ListOf(HASH, 64, sorted_unique=True))
    agent: str = spec(Str(64))


@dataclasses.dataclass(frozen=True)
class ProviderRecord(Record):
    """'I serve this object': who to ask for a content-addressed manifest, tensor or shard."""

    TYPE = "provider"
    MAX_BYTES = 1024
    OBJECT_KINDS = ("tensor_manifest", "summary_manifest", "tensor", "blob")
    object_hash: bytes = spec(HASH)
    object_kind: str = spec(Str(32, choices=OBJECT_KINDS))
    peer_id: str = spec(_PEER_ID)


_ALL: tuple[type[Record], ...] = (
    ExpertCard,
    TensorManifest,
    SummaryManifest,
    PeerRecord,
    ProviderRecord,
    *ROUND_RECORDS,
)
RECORD_TYPES: dict[str, type[Record]] = {cls.TYPE: cls for cls in _ALL}


def any_record_from_bytes(data: bytes) -> Any:
    """Decode a record of any known type (dispatch on its type tag)."""
    value = codec.decode(data, max_bytes=TensorManifest.MAX_BYTES)
    tag = value.get("t") if isinstance(value, dict) else None
    if not isinstance(tag, str) or tag not in RECORD_TYPES:
        raise SchemaError(f"unknown record type {tag!r}")
    return RECORD_TYPES[tag].from_bytes(data)
