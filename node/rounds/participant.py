"""The rounds side of a running `unode join`: watch the DHT for proposals and take part.

Started by the node next to its blob server (`start_rounds`); disabled with UNODE_ROUNDS=off.
Every failure inside a round is logged and retried on the next poll: a bad round or a bad peer
never stops the node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.network.config import HostedExpert, JoinConfig
from node.network.discovery import list_experts
from node.network.hosting import Hosting
from node.network.manifest import load_expert
from node.network.service import BlobServer
from node.rounds import records
from node.rounds.inputs import fetch_spec, providers_of
from node.rounds.spec import RoundSpec
from protocol.records import RoundProposal

log = logging.getLogger(__name__)
ROUNDS_ENV = "UNODE_ROUNDS"  # "off" disables taking part in rounds
POLL_ENV = "UNODE_ROUND_POLL"
DEFAULT_POLL = 2.0


class RoundNode:
    """What a round needs from the running node (DHT, P2P, identity, blob server, hosting)."""

    def __init__(
        self,
        cfg: JoinConfig,
        session: Any,
        server: BlobServer,
        hosting: Hosting,
        say: Callable[[str], None],
    ) -> None:
        self.session, self.server, self.hosting, self.say = session, server, hosting, say
        self.network = cfg.net.network
        self.state_dir: Path = cfg.net.state_dir
        self.identity = session.identity
        self.dht = session.dht
        self.p2p: Any = None
        self.runs: dict[bytes, Any] = {}
        self.skipped: set[bytes] = set()
        self.proposers: dict[bytes, bytes] = {}
        self.poll = float(os.environ.get(POLL_ENV, DEFAULT_POLL))

    async def host_expert(self, model_dir: Path, domain: str, lineage: bytes) -> bytes:
        """Serve a new expert from now on and announce it (its card names the round)."""
        expert = load_expert(model_dir, self.state_dir / "manifests")
        eid = expert.expert_id
        if all(e.expert_id != eid for e, _ in self.hosting.experts):
            Hosting(self.network, 0.0, [(expert, None)]).register(self.server)  # type: ignore[list-item]
            self.hosting.experts.append((expert, HostedExpert(model_dir, domain)))
        self.hosting.lineage[eid] = lineage
        await self.hosting.announce(self.session)
        return eid

    async def run(self) -> None:
        self.p2p = await self.session.p2p()
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a round's failure must never stop the node
                log.warning("round work failed (will retry): %r", err, exc_info=True)
            await asyncio.sleep(self.poll)

    async def tick(self) -> None:
        now_ms = time.time() * 1000
        for v in await records.proposals(self.dht, self.network):
            p = v.record
            rid = p.round_id
            if rid in self.skipped or p.deadline_ms < now_ms:
                continue
            run = self.runs.get(rid)
            self.proposers[rid] = v.envelope.owner
            if run is None:
                run = await self._open(p, records.peer_of(v.envelope.owner))
                if run is None:
                    continue
            if not run.finished:
                await run.step()
                self.server.add_record(p.recipe_hash, run.spec.to_bytes())

    async def _open(self, p: RoundProposal, proposer: str) -> Any:
        rid = p.round_id
        root = self.state_dir / "rounds" / rid.hex()
        saved = root / "spec"
        if not saved.is_file() and await self._already_done(rid):
            self.skipped.add(rid)  # a late joiner has nothing to add to a finished round
            return None
        spec = None
        if saved.is_file():
            spec = RoundSpec.from_bytes(saved.read_bytes())
        else:
            peers = [proposer] + [records.peer_of(o) for o in await self._claimants(p)]
            providers = await providers_of(self.dht, self.network, peers)
            spec = await fetch_spec(self.p2p, providers, p.recipe_hash)
        if spec is None or spec.hash() != p.recipe_hash:
            return None
        if (p.kind == "fusion") != (spec.mode == "fuse"):
            self.skipped.add(rid)
            return None
        if spec.mode == "fuse":
            from node.rounds.fuse_run import FuseRun

            run: Any = FuseRun(self, p, spec, root)
        elif spec.mode == "search":
            from node.rounds.search_peer import ScoreRun

            run = ScoreRun(self, p, spec, root)
        else:
            from node.rounds.merge_run import MergeRun

            run = MergeRun(self, p, spec, root)
        self.runs[rid] = run
        self.say(
            f"unode: taking part in {spec.mode} round {rid.hex()[:12]} ({len(spec.units)} units)"
        )
        return run

    async def _already_done(self, rid: bytes) -> bool:
        return any(k.card.lineage == rid for k in await list_experts(self.dht, self.network))

    async def _claimants(self, p: RoundProposal) -> list[bytes]:
        owners: list[bytes] = []
        for view in (
            await records.round_view(self.dht, self.network, p.round_id, p.n_units)
        ).values():
            owners += [*view.claims, *view.results]
        return owners


def start_rounds(
    cfg: JoinConfig, session: Any, server: BlobServer, hosting: Hosting, say: Callable[[str], None]
) -> asyncio.Task[None] | None:
    """Take part in rounds in the background (None when UNODE_ROUNDS=off)."""
    if os.environ.get(ROUNDS_ENV, "on").lower() in ("off", "0", "no", "false"):
        return None
    return asyncio.create_task(RoundNode(cfg, session, server, hosting, say).run())
