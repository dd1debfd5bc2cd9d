"""One fusion round on one node. Units are (source expert, corpus shard): a node hosting the
source summarizes that shard and serves the summaries; once every unit has a result, one node
hosting the target (elected: node/rounds/elect.py) fetches and checks them, trains the target
(FuseLLM loss, node/fusion) and announces the fused model as a new expert whose card names the
round.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from node.fusion.summary_check import SummaryContentError, SummaryMismatchError
from node.metrics import registry as metrics
from node.network.discovery import find_providers
from node.network.fetch import fetch_expert
from node.network.hosting import Hosting
from node.network.manifest import load_expert
from node.rounds import fuse_data, records
from node.rounds.elect import TrainerSlot
from node.rounds.inputs import fetch_record, providers_of
from node.rounds.spec import RoundSpec
from protocol.records import RoundProposal

MAX_SHARD_BYTES = 64 << 20
# fault injector for tests: "1" serves NaN summaries, "plausible" wrong ones that pass the
# content checks (rows shifted by one position: caught only by recomputation)
BAD_SUMMARIES_ENV = "UNODE_TEST_BAD_SUMMARIES"
log = logging.getLogger(__name__)


class FuseRun:
    """Drives one fusion round on one node; `step()` does at most one piece of work."""

    def __init__(self, node: Any, proposal: RoundProposal, spec: RoundSpec, root: Path) -> None:
        self.node, self.proposal, self.spec, self.root = node, proposal, spec, root
        self.rid, self.me = proposal.round_id, node.identity.public_key
        self.plan: dict[str, Any] = spec.recipe
        self.mine: dict[int, bytes] = {}
        self.done = False
        self.bad: set[bytes] = set()  # owners whose summaries failed the checks below
        self.checked: set[bytes] = set()  # unit results (digests) that passed the content checks
        self.verified: set[bytes] = set()  # ... and matched a recomputed sample
        self.conflicts: set[int] = set()  # units with differing results from honest owners
        # sources this node can summarize: hosted, or fetched by a trainer to verify them
        self.local = {e.expert_id.hex(): e.model_dir for e, _ in node.hosting.experts}
        root.mkdir(parents=True, exist_ok=True)
        (root / "spec").write_bytes(spec.to_bytes())
        for d in sorted((root / "units").glob("[0-9]*")):  # resume after a restart
            self.mine[int(d.name)] = self._serve(d)

    @property
    def finished(self) -> bool:
        sources = {s for s, _ in map(self._unit, range(len(self.spec.units)))}
        return self.done or not (self.plan["target"] in self.local or sources & set(self.local))

    def _unit(self, u: int) -> tuple[str, int]:
        source, shard = self.spec.units[u][0].rsplit(":", 1)
        return source, int(shard)

    def _serve(self, unit_dir: Path) -> bytes:
        unit = load_expert(unit_dir, self.root / "manifests")
        Hosting(self.node.network, 0.0, [(unit, None)]).register(self.node.server)  # type: ignore[list-item]
        return unit.expert_id

    async def step(self) -> None:
        n = len(self.spec.units)
        views = await records.round_view(self.node.dht, self.node.network, self.rid, n)
        for u in sorted(self.mine):
            if self.me not in views[u].results:
                await self._publish(u, 0)
        results = {u: self._result(u, v) for u, v in views.items()}
        self.conflicts = {u for u, v in views.items() if len(set(self._honest(v).values())) > 1}
        for u, r in list(results.items()):  # check others' summaries of sources we host
            ours = u in self.mine or self._unit(u)[0] not in self.local
            if r and not ours and not self._passed(u, r[0]) and not await self._checked_unit(u, *r):
                results[u] = self._result(u, views[u])  # without the rejected owners
        todo = [u for u in range(n) if results[u] is None and self._unit(u)[0] in self.local]
        random.Random(self.me).shuffle(todo)
        for u in todo:
            holder = views[u].holder(self.bad)
            if holder in (None, self.me):
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
                    if view.holder(self.bad) not in (None, self.me):
                        continue  # another host claimed it first: no duplicate work
                await self._summarize(u)
                return
        if self.plan["target"] in self.local and all(r is not None for r in results.values()):
            await self._train({u: r for u, r in results.items() if r is not None})

    def _result(self, u: int, view: records.UnitView) -> tuple[bytes, list[bytes]] | None:
        if u in self.mine:
            return self.mine[u], [self.me]
        honest = self._honest(view)
        if not honest:
            return None
        _, digest = min(honest.items())  # checked before use: _checked_unit
        return digest, [o for o, d in honest.items() if d == digest]

    def _honest(self, view: records.UnitView) -> dict[bytes, bytes]:
        return {o: d for o, d in view.results.items() if o not in self.bad}

    def _seed(self, u: int) -> bytes:
        return bytes(self.rid + self.me + u.to_bytes(4, "big"))

    def _to_verify(self, u: int, digest: bytes) -> bool:
        """Whether a peer's result is recomputed in part: a seeded sample of `verify_rate` of
        the units (as in merge rounds), and every unit whose honest owners disagree."""
        if self.mine.get(u) == digest or digest in self.verified:
            return False
        return u in self.conflicts or random.Random(self._seed(u)).random() < self.spec.verify_rate

    def _passed(self, u: int, digest: bytes) -> bool:
        return digest in self.checked and not self._to_verify(u, digest)

    async def _shard(self, k: int) -> Path:
        path = self.root / "shards" / f"{k:05d}.jsonl"
        if not path.is_file():
            digest = bytes.fromhex(self.plan["shards"][k])
            peers = [records.peer_of(self.proposal_owner)]
            data = await fetch_record(
                self.node.p2p,
                await providers_of(self.node.dht, self.node.network, peers),
                digest,
                MAX_SHARD_BYTES,
            )
            if data is None:
                raise RuntimeError(f"corpus shard {k} is not available")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.node.server.add_record(bytes.fromhex(self.plan["shards"][k]), path.read_bytes())
        return path

    @property
    def proposal_owner(self) -> bytes:
        return bytes(self.node.proposers[self.rid])

    def _settings(self) -> Any:
        from node.fusion.summaries import SummarySettings

        opts = self.plan["summary"]
        return SummarySettings(top_k=int(opts["top_k"]), max_len=int(opts["max_len"]))

    async def _summarize(self, u: int) -> None:
        from node.fusion.summaries import summarize

        source, k = self._unit(u)
        shard = await self._shard(k)
        start = time.monotonic()
        raw = self.root / "raw" / str(u)
        await asyncio.to_thread(summarize, self.local[source], shard, raw, self._settings(), False)
        fuse_data.pack(raw, self.root / "units" / str(u))
        fault = os.environ.get(BAD_SUMMARIES_ENV, "")
        if fault in ("1", "plausible"):
            bad = fuse_data.poison if fault == "1" else fuse_data.mislead
            bad(self.root / "units" / str(u))
        self.mine[u] = self._serve(self.root / "units" / str(u))
        await self._publish(u, int((time.monotonic() - start) * 1000))
        metrics.UNITS_DONE.labels("fusion").inc()
        self.node.say(
            f"unode: round {self.rid.hex()[:12]}: summarized shard {k} with {source[:12]}"
        )

    async def _publish(self, u: int, ms: int) -> None:
        await records.result(
            self.node.dht, self.node.identity, self.node.network, self.rid, u, self.mine[u], ms
        )

    async def _checked_unit(self, u: int, digest: bytes, owners: list[bytes]) -> Path | None:
        """The unit's summaries, fetched, content-checked and, if `_to_verify`, compared with a
        recomputed sample; None (owners rejected for this round, their copy deleted) if they
        cannot be what `unode summarize` writes with the source."""
        d = await self._fetch_unit(u, digest, owners)
        try:
            if digest not in self.checked:
                await asyncio.to_thread(fuse_data.check_packed, d)
                self.checked.add(digest)
            if self._to_verify(u, digest):
                await self._verify(u, d)
                self.verified.add(digest)
        except SummaryContentError as err:
            if self.mine.get(u) == digest:
                raise  # our own summaries: a bug here, not a bad peer
            self.bad.update(owners)
            self.checked.discard(digest)
            shutil.rmtree(d, ignore_errors=True)
            who = ", ".join(records.peer_of(o)[:16] for o in owners)
            log.warning("round %s: rejected summaries of unit %d from %s: %s", self.rid.hex()[:12],
                        u, ", ".join(map(records.peer_of, owners)), err)  # fmt: skip
            why = (
                "a recomputed sample differs"
                if isinstance(err, SummaryMismatchError)
                else "bad content"
            )
            self.node.say(
                f"unode: round {self.rid.hex()[:12]}: rejected unit {u} from {who} ({why})"
            )
            return None
        return d

    async def _verify(self, u: int, d: Path) -> None:
        """Recompute one seeded batch of unit `u`'s sequences (summary_verify.py)."""
        from node.fusion.summary_verify import verify_sample

        source, k = self._unit(u)
        model, shard = await self._source(source), await self._shard(k)
        start = time.monotonic()
        batch = await asyncio.to_thread(
            verify_sample, d, model, shard, self._settings(), self._seed(u)
        )
        log.info("round %s: unit %d: sequences %d..%d match a recomputation (%.2f s)",
                 self.rid.hex()[:12], u, batch.start, batch.stop - 1, time.monotonic() - start)  # fmt: skip

    async def _source(self, source: str) -> Path:
        """A source model: hosted, or fetched (a trainer verifying units of a source it does not
        host; from then on it may also summarize that source's rejected shards)."""
        if source not in self.local:
            out, eid = self.root / "sources" / source, bytes.fromhex(source)
            if not out.is_dir():
                providers = await find_providers(self.node.dht, self.node.network, eid)
                await fetch_expert(self.node.p2p, providers, eid, out)
            self.local[source] = out
        return Path(self.local[source])

    async def _fetch_unit(self, u: int, digest: bytes, owners: list[bytes]) -> Path:
        if self.mine.get(u) == digest:
            return self.root / "units" / str(u)
        out = self.root / "fetched" / digest.hex()
        if not out.is_dir():
            providers = await providers_of(
                self.node.dht, self.node.network, [records.peer_of(o) for o in owners]
            )
            await fetch_expert(self.node.p2p, providers, digest, out)
        return out

    async def _train(self, results: dict[int, tuple[bytes, list[bytes]]]) -> None:
        target = bytes.fromhex(self.plan["target"])
        slot = TrainerSlot(self.node, self.rid, len(self.spec.units), self.spec.claim_ttl, target)
        state, who = await slot.elect()
        if state == "done":
            self.done = True
            trainer = records.peer_of(who) if who else "?"
            self.node.say(f"unode: round {self.rid.hex()[:12]}: fused by {trainer}")
        if state != "mine":
            return
        start = time.monotonic()
        async with slot.held():
            eid = await self._fuse(results)
        if eid is not None:
            await slot.finish(eid, int((time.monotonic() - start) * 1000))
            self.done = True
            self.node.say(f"UNODE_ROUND_DONE round={self.rid.hex()} expert={eid.hex()}")

    async def _fuse(self, results: dict[int, tuple[bytes, list[bytes]]]) -> bytes | None:
        """Fetch and check every unit, train, host the fused expert; its id (None: a unit was
        rejected and is being redone)."""
        from node.fusion.train import FuseConfig, fuse

        corpus = self.root / "corpus.jsonl"
        corpus.write_bytes(
            b"".join([(await self._shard(k)).read_bytes() for k in range(len(self.plan["shards"]))])
        )
        sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
        if sha != self.plan["corpus_sha256"]:
            raise RuntimeError("the corpus shards do not add up to the proposed corpus")
        summaries = []
        for source in self.plan["sources"]:
            units = sorted((k, u) for u in results for s, k in [self._unit(u)] if s == source)
            packed = [await self._checked_unit(u, *results[u]) for _, u in units]
            if any(p is None for p in packed):
                return None  # a rejected unit is summarized again; train once all are good
            combined = self.root / "summaries" / source
            await asyncio.to_thread(fuse_data.combine, [p for p in packed if p], combined, sha)
            summaries.append(combined)
        t = self.plan["train"]
        out = self.root / "expert" / self.spec.name
        cfg = FuseConfig(
            target=self.local[self.plan["target"]],
            summaries=summaries,
            corpus=corpus,
            out=out,
            fusion=t["fusion"],
            lam=float(t["lam"]),
            lr=float(t["lr"]),
            max_steps=int(t["max_steps"]),
            batch_size=int(t["batch_size"]),
            warmup=0,
            max_len=int(t["max_len"]),
            eval_seqs=0,
            progress=False,
            extra_lineage={"round_id": self.rid.hex()},
        )
        await asyncio.to_thread(fuse, cfg)
        fuse_data.portable_output(out, self.root)
        return bytes(await self.node.host_expert(out, self.spec.domain, self.rid))

    def close(self) -> None:
        return None
