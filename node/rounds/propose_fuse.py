"""`unode round fuse`: split a corpus into shards, propose a fusion round (target, sources),
serve the shards, and (with --wait) follow it until the fused expert is announced.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.network.commands import resolve_expert_id
from node.network.config import NetworkConfig
from node.network.session import Session
from node.rounds.fuse_data import split_corpus
from node.rounds.propose import (
    Say,
    publish_round,
    start_server,
    wait_for_expert,
    wait_for_pickup,
    with_identity_session,
)
from node.rounds.spec import RoundSpec
from protocol.content import record_hash
from protocol.records import RoundProposal


@dataclass(frozen=True)
class FuseRoundConfig:
    """What `unode round fuse` was told (training defaults suit a small demo run)."""

    target: str
    sources: tuple[str, ...]
    corpus: Path
    shards: int = 2
    train: dict[str, Any] = field(
        default_factory=lambda: {
            "fusion": "min_ce",
            "lam": 0.9,
            "lr": 1e-4,
            "max_steps": 20,
            "batch_size": 4,
            "max_len": 256,
        }
    )
    summary: dict[str, Any] = field(default_factory=lambda: {"top_k": 10, "max_len": 256})
    claim_ttl: float = 300.0
    verify_rate: float = 0.25  # share of others' units each host of their source recomputes in part
    deadline: float = 6 * 3600.0
    name: str = "fused"
    domain: str = "general"


def run_fuse_round(
    net: NetworkConfig, cfg: FuseRoundConfig, wait: bool, timeout: float, say: Say
) -> dict[str, Any]:
    shards = split_corpus(cfg.corpus, cfg.shards)

    async def work(session: Session, tmp: Path) -> dict[str, Any]:
        target = await resolve_expert_id(session, net.network, cfg.target)
        sources = [await resolve_expert_id(session, net.network, s) for s in cfg.sources]
        plan = {
            "target": target.hex(),
            "sources": [s.hex() for s in sources],
            "shards": [record_hash(s).hex() for s in shards],
            "corpus_sha256": hashlib.sha256(b"".join(shards)).hexdigest(),
            "train": cfg.train,
            "summary": cfg.summary,
        }
        units = tuple((f"{s.hex()}:{k}",) for s in sources for k in range(len(shards)))
        spec = RoundSpec("fuse", plan, units, cfg.claim_ttl, cfg.verify_rate, cfg.name, cfg.domain)
        proposal = RoundProposal(
            "fusion",
            (target, *sources),
            target,
            str(cfg.train["fusion"]),
            spec.hash(),
            0,
            len(units),
            int((time.time() + cfg.deadline) * 1000),
            (cfg.domain,),
        )
        server = await start_server(session, net.network)
        for s in shards:
            server.add_record(record_hash(s), s)
        await publish_round(session, net, server, spec, proposal)
        rid = proposal.round_id
        say(
            f"unode: proposed fusion round {rid.hex()} ({len(sources)} sources x {len(shards)} shards)"
        )
        out: dict[str, Any] = {"round_id": rid.hex(), "units": len(units), "expert_id": None}
        if wait:
            out["expert_id"] = await wait_for_expert(session, net.network, rid, timeout, say)
        else:
            out["picked_up"] = await wait_for_pickup(session, net.network, proposal, timeout)
        return out

    return with_identity_session(net, work)
