"""What a joined node hosts: its experts' manifests and cards, announced and kept fresh.

Per expert: an ExpertCard under `expert/<id>` and `family/<base fingerprint>`, a ProviderRecord
under `provider/<id>`; per node: a PeerRecord under `peers` listing what it serves. Withdrawal
re-signs the PeerRecord with no experts (DHT entries cannot be deleted, only superseded), and
readers trust a card only while its owner's PeerRecord lists the expert.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import get_dht_time

from node.network import dhtrecords
from node.network.config import HostedExpert, JoinConfig
from node.network.manifest import LocalExpert, load_expert
from node.network.service import BlobServer
from node.network.summaries import HostedSummary, load_summary, provider_record, serve_summary
from protocol import codec
from protocol.content import DTYPE_SIZES, record_hash
from protocol.identity import Identity
from protocol.keys import dht_key
from protocol.records import ExpertCard, PeerRecord, ProviderRecord, TensorManifest
from protocol.signing import sign_record
from protocol.stream import StreamHeader
from protocol.validators import unode_validators

log = logging.getLogger(__name__)
AGENT = "unode/0.1.0"
_NO_FILE = record_hash(b"")  # hash used when an expert has no config/tokenizer file


def _file_hash(manifest: TensorManifest, name: str) -> bytes:
    return next((f.hash for f in manifest.files if f.name == name), _NO_FILE)


def base_fingerprint(architecture: str, manifest: TensorManifest) -> bytes:
    """Equal for experts with one architecture and one tensor layout (names, dtypes, shapes)."""
    layout = [[t.name, t.dtype, list(t.shape)] for t in manifest.tensors]
    return record_hash(codec.encode(["family", architecture, layout], max_bytes=64 << 20))


def tokenizer_hash(manifest: TensorManifest) -> bytes:
    tok = [
        [f.name, f.hash]
        for f in manifest.files
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
    ]
    return record_hash(codec.encode(["tokenizer", tok]))


def build_card(expert: LocalExpert, domains: list[str], owner: bytes) -> ExpertCard:
    """The ExpertCard of a local expert directory (reads config.json for the architecture)."""
    manifest = expert.manifest
    config: dict[str, Any] = {}
    cfg_path = expert.model_dir / "config.json"
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
    arch = str((config.get("architectures") or [config.get("model_type", "unknown")])[0])
    arch = re.sub(r"[^A-Za-z0-9_]", "_", arch)[:64] or "unknown"
    n_params = sum(t.nbytes // DTYPE_SIZES[t.dtype] for t in manifest.tensors)
    return ExpertCard(
        expert_id=expert.expert_id,
        owner=owner,
        name=(expert.model_dir.name or "expert")[:64],
        architecture=arch,
        config_hash=_file_hash(manifest, "config.json"),
        base_fingerprint=base_fingerprint(arch, manifest),
        tokenizer_hash=tokenizer_hash(manifest),
        domains=tuple(sorted(set(domains))),
        license=re.sub(r"[^A-Za-z0-9.+\-]", "-", str(config.get("license", "unknown")))[:64]
        or "unknown",
        eval_scores={},
        n_params=n_params,
        nbytes=manifest.total_bytes,
        lineage=None,
    )


@dataclass
class Hosting:
    """The experts of one node and their announcements."""

    network: str
    ttl: float
    experts: list[tuple[LocalExpert, HostedExpert]]
    _last_peer_exp: float = field(default=0.0)
    lineage: dict[bytes, bytes] = field(default_factory=dict)  # expert id -> round id (rounds)
    summaries: list[HostedSummary] = field(default_factory=list)

    def validators(self) -> list[Any]:
        return list(unode_validators(self.network))

    def refresh_interval(self) -> float:
        return self.ttl / 3

    def register(self, server: BlobServer) -> None:
        for expert, _ in self.experts:
            server.add_record(expert.expert_id, expert.manifest_bytes)
            chunk = expert.manifest.chunk_size
            for digest, loc in expert.objects.items():
                header = StreamHeader(digest, loc.meta, loc.nbytes, chunk, loc.chunk_hashes)
                server.add_object(loc.path, loc.offset, header)
        for summary in self.summaries:
            serve_summary(server, summary)

    def _signed(self, identity: Identity, peer_id: str, maddrs: list[str], exp: float) -> list[Any]:
        out = []
        for expert, hosted in self.experts:
            card = build_card(expert, [hosted.domain], identity.public_key)
            eid = expert.expert_id
            if eid in self.lineage:  # an expert made by a round names it
                card = dataclasses.replace(card, lineage=self.lineage[eid])
            out.append(
                sign_record(identity, dht_key(self.network, "expert", eid), card, expiration=exp)
            )
            fam = dht_key(self.network, "family", card.base_fingerprint)
            out.append(sign_record(identity, fam, card, expiration=exp, item=eid.hex()))
            prov = ProviderRecord(eid, "tensor_manifest", peer_id)
            out.append(
                sign_record(identity, dht_key(self.network, "provider", eid), prov, expiration=exp)
            )
        for summary in self.summaries:
            out.append(provider_record(identity, self.network, peer_id, summary, exp))
        ids = tuple(sorted({e.expert_id for e, _ in self.experts}))
        peer = PeerRecord(peer_id, tuple(m for m in maddrs if len(m) <= 256)[:8], ids, AGENT)
        out.append(sign_record(identity, dht_key(self.network, "peers"), peer, expiration=exp))
        return out

    async def announce(self, session: Any) -> None:
        """Sign and store every record with expiration now + ttl (called again at ttl/3)."""
        assert session.identity is not None
        exp = max(get_dht_time() + self.ttl, self._last_peer_exp + 1)
        records = self._signed(session.identity, session.peer_id, session.visible_maddrs(), exp)
        stored = [await dhtrecords.put(session.dht, r) for r in records]
        self._last_peer_exp = exp
        if not all(stored):
            log.info(
                "%d of %d records found no peer to hold them yet", stored.count(False), len(stored)
            )

    async def withdraw(self, session: Any) -> None:
        """Supersede our PeerRecord with one that serves nothing (expiring just after the last)."""
        if session.identity is None or self._last_peer_exp == 0.0:
            return
        exp = max(self._last_peer_exp + 1, math.ceil(get_dht_time()) + 1)
        peer = PeerRecord(session.peer_id, (), (), AGENT)
        key = dht_key(self.network, "peers")
        try:
            await dhtrecords.put(
                session.dht, sign_record(session.identity, key, peer, expiration=exp)
            )
        except Exception as err:  # the network may already be unreachable; records expire anyway
            log.warning("could not withdraw announcements: %s", err)


def prepare_hosting(cfg: JoinConfig, say: Callable[[str], None]) -> Hosting:
    """Load (or build) the experts and their manifests before touching the network."""
    hosted = list(cfg.experts) or [default_expert(cfg, say)]
    cache = cfg.net.state_dir / "manifests"
    experts = []
    for h in hosted:
        expert = load_expert(h.path, cache)
        say(
            f"unode: hosting expert {expert.expert_id.hex()} ({h.domain}, {h.path}, "
            f"{len(expert.manifest.tensors)} tensors, {expert.manifest.total_bytes / 1e6:.1f} MB)"
        )
        experts.append((expert, h))
    summaries = []
    for path in cfg.summaries:
        summary = load_summary(path)
        say(
            f"unode: serving summary {summary.manifest_hash.hex()} ({path}, {len(summary.shard_files)} shards)"
        )
        summaries.append(summary)
    return Hosting(cfg.net.network, cfg.ttl, experts, summaries=summaries)


def default_expert(cfg: JoinConfig, say: Callable[[str], None]) -> HostedExpert:
    """The built-in expert: a tiny Llama built offline into the state directory, once."""
    from node import toymodels

    target = cfg.net.state_dir / "default-expert"
    if not (target / "config.json").is_file():
        say(f"unode: building the built-in default expert in {target}")
        tmp = target.with_name(target.name + ".tmp")
        for stale in (tmp, target):
            shutil.rmtree(stale, ignore_errors=True)
        tok = toymodels.train_tokenizer(vocab_size=512)
        toymodels.build_model(tmp, tokenizer=tok, seed=0)
        tmp.replace(target)
    return HostedExpert(target, "general")
