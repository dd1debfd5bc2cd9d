"""One merge round as seen by one participant: the unit state machine, verification, assembly.

Per unit, from signed records: OPEN (no accepted result, no live claim) -> CLAIMED (earliest
live claim of an honest worker) -> DONE (results of honest workers agree). Conflicting results
make every node that sees them recompute the unit; whoever disagrees with the recomputation is
marked a cheater for the round, its claims and results are ignored and its units redone.
Computed units live in the state directory and are re-served after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from node.metrics import registry as metrics
from node.network.fetch import fetch_expert
from node.network.hosting import Hosting
from node.network.manifest import load_expert
from node.rounds import records
from node.rounds.compute import Prepared, assemble, compute_unit, prepare
from node.rounds.inputs import RoundInputs, providers_of
from node.rounds.spec import RoundSpec
from protocol.records import RoundProposal

log = logging.getLogger(__name__)
DELAY_ENV = "UNODE_TEST_UNIT_DELAY"  # fault injector for tests: hold each result back N seconds


class MergeRun:
    """Drives one round on one node; `step()` does at most one unit of work per call."""

    def __init__(self, node: Any, proposal: RoundProposal, spec: RoundSpec, root: Path) -> None:
        self.node, self.proposal, self.spec, self.root = node, proposal, spec, root
        self.rid = proposal.round_id
        self.me: bytes = node.identity.public_key
        self.mine: dict[int, bytes] = {}  # units this node computed -> result hash
        self.cheaters: set[bytes] = set()
        self.inputs: RoundInputs | None = None
        self.prep: Prepared | None = None
        self.expert_dir: Path | None = None
        self.unpublished: set[int] = set()  # resumed units whose result may not be in the DHT
        root.mkdir(parents=True, exist_ok=True)
        (root / "spec").write_bytes(spec.to_bytes())
        self._resume()

    @property
    def finished(self) -> bool:
        return self.expert_dir is not None

    def _resume(self) -> None:
        """Units computed before a restart: hash them again and serve them (nothing is lost)."""
        for d in sorted((self.root / "units").glob("[0-9]*")):
            if d.is_dir() and (d / "model.safetensors").is_file():
                self.mine[int(d.name)] = self._serve_unit(d)
                self.unpublished.add(int(d.name))
        if self.mine:
            self.node.say(f"unode: round {self.rid.hex()[:12]}: resumed {len(self.mine)} units")

    def _serve_unit(self, unit_dir: Path) -> bytes:
        unit = load_expert(unit_dir, self.root / "manifests")
        Hosting(self.node.network, 0.0, [(unit, None)]).register(self.node.server)  # type: ignore[list-item]
        return unit.expert_id

    async def step(self) -> None:
        for u in sorted(self.unpublished):
            await records.result(
                self.node.dht, self.node.identity, self.node.network, self.rid, u, self.mine[u], 0
            )
        self.unpublished.clear()
        views = await records.round_view(
            self.node.dht, self.node.network, self.rid, len(self.spec.units)
        )
        accepted, conflicts = self._judge(views)
        if len(accepted) == len(self.spec.units) and not self._to_verify(accepted):
            await self._assemble(accepted)
            return
        unit = conflicts[0] if conflicts else await self._pick_open(views, accepted)
        if unit is None:
            todo = self._to_verify(accepted)
            unit = todo[0] if todo else None
        if unit is not None:
            await self._compute(unit)

    def _judge(
        self, views: dict[int, records.UnitView]
    ) -> tuple[dict[int, tuple[bytes, list[bytes]]], list[int]]:
        """Accepted units (hash, honest workers) and units with conflicting results."""
        for u, view in views.items():
            if u in self.mine:
                for owner, digest in view.results.items():
                    if digest != self.mine[u] and owner not in self.cheaters:
                        self.cheaters.add(owner)
                        metrics.UNITS_FAILED.labels("merge").inc()
                        self.node.say(
                            f"unode: round {self.rid.hex()[:12]}: rejected unit {u} of worker "
                            f"{records.peer_of(owner)}: its result does not match the recomputation; "
                            "its results are discarded and redone"
                        )
        accepted: dict[int, tuple[bytes, list[bytes]]] = {}
        conflicts = []
        for u, view in views.items():
            honest = {o: h for o, h in view.results.items() if o not in self.cheaters}
            if u in self.mine:
                honest[self.me] = self.mine[u]
            hashes = set(honest.values())
            if len(hashes) == 1:
                digest = hashes.pop()
                accepted[u] = (digest, sorted(o for o, h in honest.items() if h == digest))
            elif len(hashes) > 1:
                conflicts.append(u)
        return accepted, conflicts

    def _to_verify(self, accepted: dict[int, tuple[bytes, list[bytes]]]) -> list[int]:
        """Other workers' units this node re-computes (a seeded sample of `verify_rate`)."""
        out = []
        for u in accepted:
            rng = random.Random(self.rid + self.me + u.to_bytes(4, "big"))
            if u not in self.mine and rng.random() < self.spec.verify_rate:
                out.append(u)
        return out

    async def _pick_open(
        self, views: dict[int, records.UnitView], accepted: dict[int, Any]
    ) -> int | None:
        order = [u for u in range(len(self.spec.units)) if u not in accepted]
        random.Random(self.me).shuffle(order)  # spread workers over the units
        for u in order:
            holder = views[u].holder(self.cheaters)
            if holder is not None and holder != self.me:
                continue
            if holder is None:
                await records.claim(
                    self.node.dht,
                    self.node.identity,
                    self.node.network,
                    self.rid,
                    u,
                    self.spec.claim_ttl,
                )
                view = await records.unit_view(self.node.dht, self.node.network, self.rid, u)
                if view.holder(self.cheaters) not in (None, self.me):
                    continue  # someone claimed first
            self.node.say(f"unode: round {self.rid.hex()[:12]}: claimed unit {u}")
            return u
        return None

    async def _inputs(self) -> Prepared:
        if self.prep is None:
            local = {e.expert_id: e.model_dir for e, _ in self.node.hosting.experts}
            self.inputs = RoundInputs(local, self.node.state_dir / "rounds" / "experts")
            await self.inputs.open(
                self.node.dht, self.node.p2p, self.node.network, self.spec.recipe
            )
            self.prep = await asyncio.to_thread(prepare, self.spec.recipe, self.inputs.sources)
        return self.prep

    async def _compute(self, unit: int) -> None:
        prep = await self._inputs()
        assert self.inputs is not None
        names = self.spec.units[unit]
        reads: dict[str, list[str]] = {}
        for job in prep.jobs(names):
            for ref, tensor in job.reads.items():
                reads.setdefault(ref, []).append(tensor)
        start = time.monotonic()
        await self.inputs.fetch(reads)
        out = self.root / "units" / str(unit)
        await asyncio.to_thread(compute_unit, prep, names, out)
        digest = self._serve_unit(out)
        self.mine[unit] = digest
        if (delay := float(os.environ.get(DELAY_ENV, "0"))) > 0:  # tests: be killable mid-round
            self.node.say(
                f"unode: round {self.rid.hex()[:12]}: unit {unit} computed, waiting {delay}s"
            )
            await asyncio.sleep(delay)
        ms = int((time.monotonic() - start) * 1000)
        metrics.UNITS_DONE.labels("merge").inc()
        await records.result(
            self.node.dht, self.node.identity, self.node.network, self.rid, unit, digest, ms
        )
        self.node.say(
            f"unode: round {self.rid.hex()[:12]}: unit {unit} done ({ms} ms) {digest.hex()[:12]}"
        )

    async def _unit_dir(self, unit: int, digest: bytes, owners: list[bytes]) -> Path:
        if self.mine.get(unit) == digest:
            return self.root / "units" / str(unit)
        out = self.root / "fetched" / digest.hex()
        if not out.is_dir():
            peers = [records.peer_of(o) for o in owners if o != self.me]
            providers = await providers_of(self.node.dht, self.node.network, peers)
            await fetch_expert(self.node.p2p, providers, digest, out)
        return out

    async def _assemble(self, accepted: dict[int, tuple[bytes, list[bytes]]]) -> None:
        prep = await self._inputs()
        dirs = [await self._unit_dir(u, *accepted[u]) for u in sorted(accepted)]
        out = self.root / "expert" / self.spec.name
        lineage = self.lineage(accepted)
        await asyncio.to_thread(assemble, prep, dirs, out, lineage)
        who = {str(u): [records.peer_of(o) for o in accepted[u][1]] for u in sorted(accepted)}
        (out / ".unode-round-workers.json").write_text(json.dumps(who, indent=2) + "\n")
        eid = await self.node.host_expert(out, self.spec.domain, self.rid)
        self.expert_dir = out
        self.node.say(f"UNODE_ROUND_DONE round={self.rid.hex()} expert={eid.hex()}")

    def lineage(self, accepted: dict[int, tuple[bytes, list[bytes]]]) -> dict[str, Any]:
        """The merged expert's lineage (deterministic: every assembler writes the same bytes)."""
        return {
            "format": "unode-round-lineage/1",
            "round_id": self.rid.hex(),
            "recipe": self.spec.recipe,
            "method": self.proposal.method,
            "seed": self.proposal.seed,
            "inputs": [i.hex() for i in self.proposal.inputs],
            "units": [
                {"unit": u, "tensors": len(self.spec.units[u]), "result_hash": accepted[u][0].hex()}
                for u in sorted(accepted)
            ],
        }

    def close(self) -> None:
        if self.inputs is not None:
            self.inputs.close()
