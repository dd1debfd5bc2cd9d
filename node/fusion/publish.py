"""A local summary directory as the network's content-addressed `protocol.records.SummaryManifest`
(shard hashes are `protocol.content.blob_hash` of each shard file), and the check of fetched
shards against it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from node.fusion.summary_store import SummaryReader
from protocol.content import DEFAULT_CHUNK_SIZE, blob_hash
from protocol.records import ShardEntry, SummaryManifest


def summary_manifest(
    summary_dir: Path, model_id: bytes | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> SummaryManifest:
    """The protocol record of `summary_dir`. `model_id` is the source expert's id (its
    TensorManifest hash) when it is hosted on the network; by default the local weights hash."""
    reader = SummaryReader(summary_dir)
    m = reader.manifest
    per_shard = Counter(reader.shard_of(s) for s in range(reader.n_seqs))
    shards = []
    for index, entry in enumerate(m["shards"]):
        data = (Path(summary_dir) / entry["file"]).read_bytes()
        shards.append(
            ShardEntry(index, len(data), blob_hash(data, chunk_size), per_shard[entry["file"]])
        )
    record = SummaryManifest(
        model_id=model_id if model_id is not None else bytes.fromhex(m["model_sha256"]),
        corpus_hash=bytes.fromhex(m["corpus_sha256"]),
        tokenizer_hash=bytes.fromhex(m["tokenizer_sha256"]),
        top_k=int(m["settings"]["top_k"]),
        temperature=float(m["settings"]["temperature"]),
        format=m["format"],
        chunk_size=chunk_size,
        shards=tuple(shards),
    )
    record.to_bytes()  # validates every field
    return record


def shard_matches(record: SummaryManifest, index: int, data: bytes) -> bool:
    """Whether fetched shard bytes are the ones the manifest names."""
    if not 0 <= index < len(record.shards):
        return False
    entry = record.shards[index]
    return len(data) == entry.nbytes and blob_hash(data, record.chunk_size) == entry.hash
