"""`unode round merge`: plan a recipe over network experts, publish the signed proposal, serve
the round spec, and (with --wait) follow the round until a node announces the merged expert.

The proposer runs under a fresh identity of its own (a temporary state directory), so it can
run next to a `unode join` on the same machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from node.errors import UserError
from node.network import dhtrecords
from node.network.config import NetworkConfig
from node.network.discovery import list_experts
from node.network.hosting import AGENT
from node.network.process import descendant_pids, kill_new_descendants
from node.network.service import BlobServer
from node.network.session import Session, run_async
from node.rounds import records
from node.rounds.compute import job_bytes, prepare
from node.rounds.inputs import RoundInputs
from node.rounds.spec import RoundSpec, expert_id_of, expert_refs, split_units
from protocol.errors import IdentityError
from protocol.identity import KEY_FILE_NAME, load_identity, save_identity
from protocol.keys import dht_key
from protocol.records import PeerRecord, RoundProposal
from protocol.signing import sign_record
from protocol.validators import unode_validators

T = TypeVar("T")
GRACE = 1.5  # seconds to let every assembler announce before picking the most-served expert
Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class MergeRoundConfig:
    """What `unode round merge` was told."""

    recipe: dict[str, Any]
    units: int = 0  # 0: one per layer of the output
    claim_ttl: float = 60.0
    verify_rate: float = 0.25
    deadline: float = 3600.0  # seconds from now
    name: str = "merged"
    domain: str = "general"
    mode: str = "merge"


def load_round_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe whose every model is `unode://<expert id>`."""
    if not path.is_file():
        raise UserError("RECIPE", str(path), "give the path of a YAML recipe file", "not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError("RECIPE", str(path), "fix the YAML syntax", "malformed YAML") from None
    if not isinstance(data, dict):
        raise UserError("RECIPE", str(path), "write a mapping with merge_method", "not a mapping")
    refs = expert_refs(data)
    for ref in refs:
        try:
            expert_id_of(ref)
        except Exception:
            raise UserError("RECIPE", ref, "name models as unode://<64-hex expert id>") from None
    if not refs:
        raise UserError(
            "RECIPE",
            str(path),
            "name models as unode://<64-hex expert id> (see `unode experts`)",
            "no network model in the recipe",
        )
    return data


KEY_ENV = "UNODE_ROUND_KEY"


def _copy_key(src: Path, dst: Path, tmp: Path) -> None:
    """The proposer's own key (checked: private, well-formed) as the session's identity."""
    try:
        identity = load_identity(src)
        save_identity(identity, dst)
    except (IdentityError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            "--key",
            str(src),
            "give a key file made by `unode keys init --state-dir DIR` (DIR/"
            f"{KEY_FILE_NAME}, mode 0600)",
            problem=str(err),
        ) from None


def with_identity_session(net: NetworkConfig, work: Callable[[Session, Path], Awaitable[T]]) -> T:
    """A full DHT node in a temporary state dir under a fresh identity, or under the key of
    `net.key_file` / $UNODE_ROUND_KEY (a proposer in an allowlisted network); always cleaned
    up. Do not use a running node's own key: two processes with one peer id confuse libp2p."""
    if not net.initial_peers:
        raise UserError(
            "--initial-peers",
            "(none)",
            "pass the multiaddr a running `unode join` printed, or set UNODE_INITIAL_PEERS",
            problem="no peer to ask",
        )
    before = descendant_pids(os.getpid())
    tmp = Path(tempfile.mkdtemp(prefix="unode-round-"))
    key_file = net.key_file or (Path(os.environ[KEY_ENV]) if os.environ.get(KEY_ENV) else None)
    if key_file is not None:
        _copy_key(key_file, tmp / KEY_FILE_NAME, tmp)
    session = Session(
        dataclasses.replace(net, state_dir=tmp),
        persistent=True,
        validators=unode_validators(net.network),
    )
    try:
        session.start()

        async def main() -> T:
            try:
                return await work(session, tmp)
            finally:
                await session.close_p2p()

        return run_async(main())
    finally:
        session.stop()
        kill_new_descendants(before)
        shutil.rmtree(tmp, ignore_errors=True)


async def announce_self(session: Session, network: str) -> None:
    """A PeerRecord with our addresses and no experts, so peers can fetch the spec from us."""
    assert session.identity is not None
    rec = PeerRecord(session.peer_id, tuple(session.visible_maddrs()[:8]), (), AGENT)
    key = dht_key(network, "peers")
    await dhtrecords.put(
        session.dht, sign_record(session.identity, key, rec, expiration=time.time() + 3600)
    )


async def build_spec(
    session: Session, net: NetworkConfig, cfg: MergeRoundConfig, cache: Path
) -> tuple[RoundSpec, RoundProposal]:
    inputs = RoundInputs({}, cache)
    try:
        await inputs.open(session.dht, await session.p2p(), net.network, cfg.recipe)
        prep = await asyncio.to_thread(prepare, cfg.recipe, inputs.sources)
    finally:
        inputs.close()
    jobs = prep.plan.jobs
    n_units = cfg.units or max(1, prep.plan.n_layers)
    units = split_units([j.name for j in jobs], [job_bytes(j) for j in jobs], n_units)
    spec = RoundSpec(
        cfg.mode, cfg.recipe, units, cfg.claim_ttl, cfg.verify_rate, cfg.name, cfg.domain
    )
    rec = prep.recipe
    refs = expert_refs(cfg.recipe)
    proposal = RoundProposal(
        kind="merge",
        inputs=tuple(expert_id_of(r) for r in refs),
        base=expert_id_of(rec.base_model) if rec.base_model else None,
        method=rec.merge_method,
        recipe_hash=spec.hash(),
        seed=rec.seed,
        n_units=len(units),
        deadline_ms=int((time.time() + cfg.deadline) * 1000),
        domains=(cfg.domain,),
    )
    return spec, proposal


async def start_server(session: Session, network: str) -> BlobServer:
    """Serve round specs from this proposer (announced in a PeerRecord)."""
    server = BlobServer()
    await server.start(await session.p2p())
    from node.metrics.stats import serve_stats  # uptime and traffic, for `unode dashboard`

    await serve_stats(await session.p2p(), session.peer_id)
    await announce_self(session, network)
    return server


async def publish_round(
    session: Session,
    net: NetworkConfig,
    server: BlobServer,
    spec: RoundSpec,
    proposal: RoundProposal,
) -> None:
    server.add_record(proposal.recipe_hash, spec.to_bytes())
    assert session.identity is not None
    await records.propose(session.dht, session.identity, net.network, proposal)


async def wait_for_expert(
    session: Session, network: str, rid: bytes, timeout: float, say: Say
) -> str:
    """The merged expert's id once announced (the one most nodes serve after a short grace)."""
    deadline = time.monotonic() + timeout
    first = None
    while time.monotonic() < deadline:
        found = [k for k in await list_experts(session.dht, network) if k.card.lineage == rid]
        if found:
            first = first or time.monotonic()
            if time.monotonic() - first >= GRACE:
                best = max(found, key=lambda k: len(k.owners))
                return best.card.expert_id.hex()
        await asyncio.sleep(1.0)
    raise UserError(
        "--wait",
        f"{timeout:.0f}s",
        "raise --timeout or add workers (`unode join`)",
        problem="the round did not finish in time",
    )


async def wait_for_pickup(
    session: Session, network: str, proposal: RoundProposal, timeout: float
) -> bool:
    """True once some worker claimed a unit (it then serves the spec to the others)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for u in range(proposal.n_units):
            view = await records.unit_view(session.dht, network, proposal.round_id, u)
            if view.claims or view.results:
                return True
        await asyncio.sleep(1.0)
    return False


def run_merge_round(
    net: NetworkConfig, cfg: MergeRoundConfig, wait: bool, timeout: float, say: Say
) -> dict[str, Any]:
    """Propose a merge round; with `wait`, return once the merged expert is announced."""

    async def work(session: Session, tmp: Path) -> dict[str, Any]:
        spec, proposal = await build_spec(session, net, cfg, tmp / "experts")
        server = await start_server(session, net.network)
        await publish_round(session, net, server, spec, proposal)
        rid = proposal.round_id
        say(
            f"unode: proposed round {rid.hex()} ({len(spec.units)} units, method {proposal.method})"
        )
        out: dict[str, Any] = {"round_id": rid.hex(), "units": len(spec.units), "expert_id": None}
        if wait:
            out["expert_id"] = await wait_for_expert(session, net.network, rid, timeout, say)
        else:
            out["picked_up"] = await wait_for_pickup(session, net.network, proposal, timeout)
        out["served_bytes"] = sum(server.served_bytes.values())
        return out

    return with_identity_session(net, work)
