"""One verified snapshot of a network, as plain JSON-ready data (schema in docs/dashboard.md).

Every record comes through `node.network.dhtrecords.get_verified` (signature, times, key
binding, schema); round specs are fetched by hash and checked against it. Peer stats come from
each peer over `/unode/stats/1` and are marked self-reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from node.dashboard import rounds as rv
from node.metrics.stats import ask_stats
from node.network import discovery
from node.network.commands import expert_json
from node.rounds import records
from node.rounds.inputs import fetch_spec, providers_of
from node.rounds.spec import RoundSpec, candidate_id
from protocol.records import RoundProposal
from protocol.round_records import SCORE_METRIC

SCHEMA = "unode.dashboard/1"


class Collector:
    """Takes snapshots through one client session; caches round specs (immutable, by hash)."""

    def __init__(self, dht: Any, p2p: Any, network: str) -> None:
        self.dht, self.p2p, self.network = dht, p2p, network
        self.specs: dict[bytes, RoundSpec] = {}

    async def snapshot(self) -> dict[str, Any]:
        peers = await discovery.live_peers(self.dht, self.network)
        live = [v for v in peers if v.record.experts or v.record.maddrs]  # withdrawn: empty
        live.sort(key=lambda v: (-len(v.record.experts), v.record.peer_id))  # hosts first
        experts = await discovery.list_experts(self.dht, self.network)
        stats = await asyncio.gather(*(ask_stats(self.p2p, v.record.peer_id) for v in live))
        by_lineage = {
            k.card.lineage.hex(): k.card.expert_id.hex() for k in experts if k.card.lineage
        }
        round_list, search = await self._rounds([v.record.peer_id for v in live], by_lineage)
        return {
            "schema": SCHEMA,
            "network": self.network,
            "taken_at": round(time.time(), 3),
            "peers": [
                {
                    "peer_id": v.record.peer_id,
                    "maddrs": list(v.record.maddrs),
                    "agent": v.record.agent,
                    "experts": [e.hex() for e in v.record.experts],
                    "expires_at": v.envelope.expiration,
                    "stats": dataclasses.asdict(s) if s is not None else None,
                }
                for v, s in zip(live, stats, strict=True)
            ],
            "experts": [
                {**expert_json(k), "eval_scores": dict(k.card.eval_scores)} for k in experts
            ],
            "families": _families(experts),
            "rounds": round_list,
            "search": search,
        }

    async def _rounds(
        self, peer_ids: list[str], by_lineage: dict[str, str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        now_ms = time.time() * 1000
        out, generations = [], []
        for v in await records.proposals(self.dht, self.network):
            p, proposer = v.record, records.peer_of(v.envelope.owner)
            spec = await self._spec(p, [proposer, *peer_ids])
            mode = spec.mode if spec is not None else None
            views = await records.round_view(self.dht, self.network, p.round_id, p.n_units)
            rid = p.round_id.hex()
            summary = rv.round_summary(p, proposer, views, mode, by_lineage.get(rid), now_ms)
            if mode == "search" and spec is not None:  # units are candidates, scored by peers
                generations.append(await self._generation(p, proposer, spec))
                summary = rv.with_scores(summary, generations[-1]["means"])
            out.append(summary)
        out.sort(key=lambda r: (-r["deadline_ms"], r["round_id"]))
        return out, rv.search_progress(generations)

    async def _spec(self, p: RoundProposal, peer_ids: list[str]) -> RoundSpec | None:
        if p.recipe_hash not in self.specs:
            providers = await providers_of(self.dht, self.network, peer_ids)
            spec = await fetch_spec(self.p2p, providers, p.recipe_hash)
            if spec is not None and spec.hash() == p.recipe_hash:
                self.specs[p.recipe_hash] = spec
        return self.specs.get(p.recipe_hash)

    async def _generation(self, p: RoundProposal, proposer: str, spec: RoundSpec) -> dict[str, Any]:
        found = await asyncio.gather(
            *(
                records.scores(self.dht, self.network, p.round_id, candidate_id(c))
                for c in spec.candidates
            )
        )
        means = rv.candidate_means(
            [[s.record.value for s in f if s.record.metric == SCORE_METRIC] for f in found]
        )
        return {
            "round_id": p.round_id.hex(),
            "proposer": proposer,
            "deadline_ms": p.deadline_ms,
            "means": means,
        }


def _families(experts: list[discovery.KnownExpert]) -> list[dict[str, Any]]:
    """Experts grouped by base fingerprint (same architecture and tensor layout: mergeable)."""
    fams: dict[str, dict[str, Any]] = {}
    for k in experts:
        fp = k.card.base_fingerprint.hex()
        fam = fams.setdefault(
            fp, {"base_fingerprint": fp, "architecture": k.card.architecture, "experts": []}
        )
        fam["experts"].append(k.card.expert_id.hex())
    return sorted(fams.values(), key=lambda f: (f["architecture"], f["base_fingerprint"]))
