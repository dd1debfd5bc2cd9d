"""Well-formed sample records of every type and the DHT key each belongs at (tests, bench, docs)."""

from __future__ import annotations

import dataclasses
import hashlib

from protocol.content import blob_hash, tensor_hash
from protocol.identity import Identity
from protocol.keys import dht_key
from protocol.records import (
    ExpertCard,
    FileEntry,
    PeerRecord,
    ProviderRecord,
    ShardEntry,
    SummaryManifest,
    TensorEntry,
    TensorManifest,
)
from protocol.round_records import RoundProposal, Score, UnitResult, WorkClaim
from protocol.schema import Record

CHUNK = 1024


def fake_hash(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


@dataclasses.dataclass(frozen=True)
class Placement:
    """A record and where it is stored: DHT key name and subkey item."""

    key: str
    item: str
    record: Record


def sample_manifest() -> TensorManifest:
    weights = bytes(range(256)) * 24  # 6144 bytes: 6 chunks of 1 KiB
    tensors = (
        TensorEntry(
            "lm_head.weight", "F32", (16, 96), 6144, tensor_hash("F32", [16, 96], weights, CHUNK)
        ),
        TensorEntry(
            "model.norm.weight", "BF16", (3,), 6, tensor_hash("BF16", [3], b"\x00" * 6, CHUNK)
        ),
    )
    files = (FileEntry("config.json", 2, blob_hash(b"{}", CHUNK)),)
    return TensorManifest(CHUNK, tensors, files)


def sample_card(identity: Identity, domains: tuple[str, ...] = ("code", "math")) -> ExpertCard:
    return ExpertCard(
        expert_id=sample_manifest().hash(),
        owner=identity.public_key,
        name="tiny-llama-code",
        architecture="LlamaForCausalLM",
        config_hash=fake_hash("config"),
        base_fingerprint=fake_hash("base"),
        tokenizer_hash=fake_hash("tokenizer"),
        domains=domains,
        license="Apache-2.0",
        eval_scores={"code/bpb": 1.25, "math/digit_acc": 0.5},
        n_params=1_000_000,
        nbytes=4_000_000,
        lineage=None,
    )


def sample_summary() -> SummaryManifest:
    shards = tuple(ShardEntry(i, 4096, fake_hash(f"shard{i}"), 8) for i in range(3))
    return SummaryManifest(
        fake_hash("model"),
        fake_hash("corpus"),
        fake_hash("tok"),
        10,
        1.0,
        "topk-f16-v1",
        CHUNK,
        shards,
    )


def sample_proposal() -> RoundProposal:
    inputs = (fake_hash("a"), fake_hash("b"))
    return RoundProposal(
        "merge",
        inputs,
        fake_hash("base"),
        "ties",
        fake_hash("recipe"),
        7,
        12,
        1_900_000_000_000,
        ("code",),
    )


def sample_placements(identity: Identity, network: str = "test") -> list[Placement]:
    """One valid (key, item, record) per DHT key kind, owned by `identity`."""
    card, proposal = sample_card(identity), sample_proposal()
    rid = proposal.round_id
    obj = fake_hash("object")
    return [
        Placement(
            dht_key(network, "peers"),
            "",
            PeerRecord(
                identity.peer_id, ("/ip4/127.0.0.1/tcp/4001",), (card.expert_id,), "unode/0.1"
            ),
        ),
        Placement(dht_key(network, "expert", card.expert_id), "", card),
        Placement(dht_key(network, "family", card.base_fingerprint), card.expert_id.hex(), card),
        Placement(
            dht_key(network, "provider", obj), "", ProviderRecord(obj, "tensor", identity.peer_id)
        ),
        Placement(dht_key(network, "rounds"), rid.hex(), proposal),
        Placement(dht_key(network, "claim", rid, 3), "", WorkClaim(rid, 3)),
        Placement(
            dht_key(network, "result", rid, 3), "", UnitResult(rid, 3, fake_hash("out"), 1234)
        ),
        Placement(
            dht_key(network, "score", rid, fake_hash("cand")),
            "code",
            Score(rid, fake_hash("cand"), "code", "bits_per_byte", 1.5, 4096, fake_hash("eval")),
        ),
    ]
