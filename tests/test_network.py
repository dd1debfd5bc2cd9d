"""Multi-node tests: real `unode join` processes (hivemind DHT + p2pd) on loopback.

Two honest providers host one expert, a third alters every byte it serves; fetches must come
out bit-identical, detect the liar, and survive a provider killed mid-transfer. Every child is
killed in teardown, and the lifecycle tests check that no process outlives its node.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node import toymodels
from node.network.config import NetworkConfig
from node.network.discovery import Provider, find_providers, list_experts, live_peers
from node.network.fetch import FetchReport, Progress, fetch_expert
from node.network.lines import ChildLines, starts_with
from node.network.manifest import load_expert
from node.network.process import descendant_pids, kill_all, pid_alive
from node.network.session import Session
from protocol.validators import unode_validators

ROOT = Path(__file__).resolve().parents[1]
UNODE = str(ROOT / ".venv" / "bin" / "unode")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
NETWORK = "nettest"


@dataclass
class NodeProc:
    """A `unode join` child process and every line it printed."""

    proc: subprocess.Popen[str]
    out: ChildLines
    peer_id: str = ""
    maddr: str = ""
    family: list[int] = field(default_factory=list)  # pids below it once ready

    @property
    def seen(self) -> list[str]:
        return self.out.seen

    def wait_for(self, prefix: str, timeout: float = 150.0) -> str:
        line = self.out.next_match(starts_with(prefix), timeout)
        if line is None:
            raise AssertionError(f"no {prefix!r} line; node printed:\n" + self.out.tail(30))
        return line

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the node and anything it left behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        kill_all(self.family, signal.SIGKILL, wait=2.0)


def start_node(state: Path, *args: str, env: dict[str, str] | None = None) -> NodeProc:
    cmd = [
        UNODE,
        "join",
        "--network",
        NETWORK,
        "--host-maddr",
        LOOPBACK,
        "--state-dir",
        str(state),
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    node = NodeProc(proc, ChildLines(proc))
    return node


def ready(node: NodeProc) -> NodeProc:
    line = node.wait_for("UNODE_READY")
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    node.peer_id, node.maddr = fields["peer"], fields["maddr"]
    node.family = descendant_pids(node.proc.pid)
    return node


@dataclass
class Swarm:
    expert_dir: Path
    expert_id: bytes
    a: NodeProc
    b: NodeProc
    liar: NodeProc
    tmp: Path
    summary_dir: Path


def build_summary(tmp: Path, model: Path) -> Path:
    """A small distribution summary (node.fusion) of `model` over a toy corpus: 3 shards."""
    from node.fusion.corpus import write_toy_corpus
    from node.fusion.summaries import SummarySettings, summarize

    corpus = write_toy_corpus(tmp / "corpus.jsonl", n=12, seed=3)
    settings = SummarySettings(top_k=4, temperature=2.0, max_len=48, shard_size=4, batch_size=4)
    summarize(model, corpus, tmp / "summary", settings, progress=False)
    return tmp / "summary"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: object) -> Iterator[Swarm]:
    tmp = tmp_path_factory.mktemp("net")
    # ~14 MB, 39 tensors: enough chunks that a provider can die mid-transfer
    src = toymodels.build_model(tmp / "expert", tokenizer=bpe_tokenizer, hidden=256, seed=3)
    copies = [shutil.copytree(src, tmp / f"copy{i}") for i in range(3)]
    nodes: list[NodeProc] = []
    try:
        a = start_node(tmp / "sa", "--expert", str(copies[0]), "--domain", "code")
        nodes.append(a)
        summary = build_summary(tmp, src)  # while A starts
        ready(a)
        b = start_node(
            tmp / "sb", "--initial-peers", a.maddr, "--expert", str(copies[1]), "--domain", "code",
            "--summary", str(summary),
        )  # fmt: skip
        liar = start_node(
            tmp / "sc", "--initial-peers", a.maddr, "--expert", str(copies[2]), "--domain", "code",
            env={"UNODE_TEST_CORRUPT_SERVING": "1"},
        )  # fmt: skip
        nodes += [b, liar]
        ready(b), ready(liar)
        expert_id = load_expert(src, tmp / "cache").expert_id
        yield Swarm(src, expert_id, a, b, liar, tmp, summary)
    finally:
        for n in nodes:
            n.terminate()  # all at once: each takes a few seconds to withdraw and stop
        for n in nodes:
            n.stop()


@pytest.fixture(scope="module")
def cli_runs(swarm: Swarm) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """`unode experts` and `unode fetch` run as real commands, side by side (they take seconds
    each to start: running them together keeps the suite fast)."""
    common = ["--network", NETWORK, "--initial-peers", swarm.a.maddr]
    hex_id = swarm.expert_id.hex()
    cmds = {
        "experts": [UNODE, "experts", *common, "--json"],
        "fetch": [UNODE, "fetch", hex_id[:12], str(swarm.tmp / "fetched-cli"), *common],
        "peers": [UNODE, "peers", *common, "--json"],
    }
    runs = {
        k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, c in cmds.items()
    }
    try:
        yield runs
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def lifecycle_nodes(
    swarm: Swarm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, NodeProc]]:
    """Two more nodes, started together: one with the built-in default expert, one with its own."""
    tmp = tmp_path_factory.mktemp("life")
    other = toymodels.build_model(tmp / "other", vocab_size=128, hidden=32, layers=1, seed=9)
    nodes = {
        "default": start_node(tmp / "sd", "--initial-peers", swarm.a.maddr),
        "other": start_node(  # announcements live 30 s, re-signed every 10 s
            tmp / "se",
            "--ttl",
            "30",
            "--initial-peers",
            swarm.a.maddr,
            "--expert",
            str(other),
            "--domain",
            "prose",
        ),
    }
    try:
        for n in nodes.values():
            ready(n)
        yield nodes
    finally:
        for n in nodes.values():
            n.terminate()
        for n in nodes.values():
            n.stop()


@pytest.fixture(scope="module")
def client(swarm: Swarm) -> Iterator[Session]:
    """A client session in this process (its own DHT process and p2pd)."""
    net = NetworkConfig(network=NETWORK, initial_peers=(swarm.a.maddr,), host_maddrs=(LOOPBACK,))
    session = Session(net, persistent=False, validators=unode_validators(NETWORK))
    session.start()
    try:
        yield session
    finally:
        session.stop()


def assert_same_tree(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def test_experts_lists_the_hosted_expert_with_its_providers(
    swarm: Swarm, cli_runs: dict[str, subprocess.Popen[str]]
) -> None:
    code, out, err = finish(cli_runs["experts"])
    assert code == 0, err
    experts = json.loads(out)
    assert [e["expert_id"] for e in experts] == [swarm.expert_id.hex()]
    assert experts[0]["domains"] == ["code"]
    assert experts[0]["architecture"] == "LlamaForCausalLM"
    assert sorted(experts[0]["providers"]) == sorted(
        [swarm.a.peer_id, swarm.b.peer_id, swarm.liar.peer_id]
    )


def test_peers_lists_every_live_node_and_what_it_serves(
    swarm: Swarm, cli_runs: dict[str, subprocess.Popen[str]]
) -> None:
    code, out, err = finish(cli_runs["peers"])
    assert code == 0, err
    peers = {p["peer_id"]: p for p in json.loads(out)}
    assert set(peers) == {swarm.a.peer_id, swarm.b.peer_id, swarm.liar.peer_id}
    for node in (swarm.a, swarm.b, swarm.liar):
        assert peers[node.peer_id]["experts"] == [swarm.expert_id.hex()]
        assert node.maddr in peers[node.peer_id]["maddrs"]


def test_fetch_cli_rebuilds_a_bit_identical_directory(
    swarm: Swarm, cli_runs: dict[str, subprocess.Popen[str]]
) -> None:
    out_dir = swarm.tmp / "fetched-cli"
    code, out, err = finish(cli_runs["fetch"])
    assert code == 0, err
    assert "all chunks verified" in out
    assert_same_tree(out_dir, swarm.expert_dir)
    assert not out_dir.with_name(out_dir.name + ".partial").exists()
    # whoever the liar served was caught: the output is identical whatever the order
    if swarm.liar.peer_id in err:
        assert "lied" in err


def test_provider_that_alters_bytes_is_dropped_and_logged(
    swarm: Swarm, client: Session, caplog: pytest.LogCaptureFixture
) -> None:
    out_dir = swarm.tmp / "fetched-liar"

    async def run() -> FetchReport:
        providers = await find_providers(client.dht, NETWORK, swarm.expert_id)
        assert {p.peer_id for p in providers} == {
            swarm.a.peer_id,
            swarm.b.peer_id,
            swarm.liar.peer_id,
        }
        liar_first = sorted(providers, key=lambda p: p.peer_id != swarm.liar.peer_id)
        # the manifest comes from the first provider (the liar serves manifests intact)
        try:
            return await fetch_expert(
                await client.p2p(), liar_first, swarm.expert_id, out_dir, workers=3
            )
        finally:
            await client.close_p2p()

    with caplog.at_level(logging.WARNING, logger="node.network"):
        report = asyncio.run(run())
    assert_same_tree(out_dir, swarm.expert_dir)
    assert list(report.dropped) == [swarm.liar.peer_id]
    assert "lied" in report.dropped[swarm.liar.peer_id]
    logged = [r.getMessage() for r in caplog.records if swarm.liar.peer_id in r.getMessage()]
    assert any("fails verification" in m for m in logged), logged


def test_fetch_resumes_from_the_journal_after_an_interruption(
    swarm: Swarm, client: Session
) -> None:
    out_dir = swarm.tmp / "fetched-resume"
    honest = [Provider(swarm.a.peer_id, (swarm.a.maddr,))]

    class Interrupt(Exception):
        pass

    def stop_halfway(done: int, total: int) -> None:
        if done > total // 2:
            raise Interrupt

    async def run(progress: Progress | None) -> FetchReport:
        try:
            return await fetch_expert(
                await client.p2p(), honest, swarm.expert_id, out_dir, 2, progress
            )
        finally:
            await client.close_p2p()

    with pytest.raises(Interrupt):
        asyncio.run(run(stop_halfway))
    partial = out_dir.with_name(out_dir.name + ".partial")
    assert (partial / "journal").stat().st_size > 0 and not out_dir.exists()
    # damage one byte the journal vouches for: resume must re-hash and re-fetch it
    shard = partial / "tree" / "model.safetensors"
    with shard.open("r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = asyncio.run(run(None))
    assert_same_tree(out_dir, swarm.expert_dir)
    total = report.total_bytes
    assert report.reused_bytes > total // 4
    assert report.fetched_bytes < total
    assert not partial.exists()


def test_withdrawn_expert_disappears_and_shutdown_leaves_no_process(
    client: Session, lifecycle_nodes: dict[str, NodeProc]
) -> None:
    """The built-in default expert; SIGINT withdraws it, stops DHT and p2pd, exits 0."""
    node = lifecycle_nodes["default"]
    assert any("built-in default expert" in line for line in node.seen)
    family = node.family
    p2pd = [p for p in family if "p2pd" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(p2pd) == 1  # below the node: its DHT process, and p2pd below that

    async def experts() -> set[str]:
        return {p for k in await list_experts(client.dht, NETWORK) for p in k.owners}

    assert node.peer_id in asyncio.run(experts())
    node.proc.send_signal(signal.SIGINT)
    assert node.proc.wait(20) == 0
    assert not [p for p in family if pid_alive(p)]
    assert node.peer_id not in asyncio.run(experts())


def test_announcements_are_refreshed_before_expiry_then_sigterm_stops_cleanly(
    client: Session, lifecycle_nodes: dict[str, NodeProc]
) -> None:
    node = lifecycle_nodes["other"]

    async def expiry() -> float:
        found = [
            v for v in await live_peers(client.dht, NETWORK) if v.record.peer_id == node.peer_id
        ]
        assert found and found[0].record.experts  # live, serving its expert
        return found[0].envelope.expiration

    first = asyncio.run(expiry())
    assert first - time.time() <= 31
    deadline = time.monotonic() + 40
    while asyncio.run(expiry()) == first:  # re-signed at ttl/3 with a later expiration
        assert time.monotonic() < deadline, "the PeerRecord was not refreshed"
        time.sleep(2)
    family = node.family
    assert len(family) >= 2
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(20) == 0
    node.wait_for("unode: stopped", timeout=5)
    assert not [p for p in family if pid_alive(p)]


def test_merge_reads_a_unode_expert_from_the_network_identical_to_local(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model: unode://<id>` in a recipe: tensors fetched as the merge needs them (the liar in
    the swarm is caught on the way), output byte-identical to merging the local copy."""
    from node.merge.api import merge
    from node.network import source as source_mod

    variant = toymodels.make_variant(swarm.expert_dir, tmp_path / "variant", seed=70)

    def recipe(expert: str) -> dict[str, object]:
        models = [(expert, 0.7), (str(variant), 0.3)]
        return {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in models],
        }

    ref = f"unode://{swarm.expert_id.hex()}"
    # as `unode merge` does: the merge engine opens unode:// models itself, from the environment
    monkeypatch.setenv("UNODE_INITIAL_PEERS", swarm.a.maddr)
    monkeypatch.setenv("UNODE_NETWORK", NETWORK)
    monkeypatch.setenv("UNODE_STATE_DIR", str(tmp_path / "state"))
    merge(recipe(ref), tmp_path / "net", progress=False)
    gc.collect()
    assert not source_mod._SHARED  # the merge closed its sources: the session is gone
    merge(recipe(str(swarm.expert_dir)), tmp_path / "local", progress=False)
    out_files = sorted(p.name for p in (tmp_path / "local").glob("*.safetensors"))
    assert out_files and out_files == sorted(
        p.name for p in (tmp_path / "net").glob("*.safetensors")
    )
    for name in out_files:
        assert (tmp_path / "net" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    cached = tmp_path / "state" / "merge-cache" / swarm.expert_id.hex()
    assert (cached / "config.json").read_bytes() == (swarm.expert_dir / "config.json").read_bytes()


def test_summary_shards_are_served_and_fetched_verified(swarm: Swarm, client: Session) -> None:
    from node.fusion.summary_store import SummaryReader
    from node.network.summaries import fetch_summary, find_summary_providers, load_summary

    hosted = load_summary(swarm.summary_dir)

    async def run() -> tuple[object, list[Path]]:
        providers = await find_summary_providers(client.dht, NETWORK, hosted.manifest_hash)
        assert [p.peer_id for p in providers] == [swarm.b.peer_id]
        try:
            return await fetch_summary(
                await client.p2p(), providers, hosted.manifest_hash, swarm.tmp / "summ-out"
            )
        finally:
            await client.close_p2p()

    manifest, paths = asyncio.run(run())
    assert manifest == hosted.manifest
    shards = [
        swarm.summary_dir / e["file"] for e in SummaryReader(swarm.summary_dir).manifest["shards"]
    ]
    assert len(paths) == len(shards) >= 2
    assert [p.read_bytes() for p in paths] == [s.read_bytes() for s in shards]


def test_fetch_fails_over_when_a_provider_is_killed_mid_transfer(
    swarm: Swarm, client: Session
) -> None:
    out_dir = swarm.tmp / "fetched-failover"
    victim = swarm.b
    honest = [
        Provider(swarm.a.peer_id, (swarm.a.maddr,)),
        Provider(victim.peer_id, (victim.maddr,)),
    ]
    killed: list[int] = []

    def kill_victim(done: int, total: int) -> None:
        if not killed and done >= 2 << 20:
            os.kill(victim.proc.pid, signal.SIGKILL)  # no chance to clean up
            killed.append(done)

    async def run() -> FetchReport:
        try:
            return await fetch_expert(
                await client.p2p(), honest, swarm.expert_id, out_dir, 4, kill_victim
            )
        finally:
            await client.close_p2p()

    report = asyncio.run(run())
    assert killed and killed[0] < report.total_bytes // 2
    assert_same_tree(out_dir, swarm.expert_dir)
    assert victim.peer_id in report.dropped
    # its DHT process and p2pd die with it (parent-death signal): no orphans
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in victim.family):
        time.sleep(0.1)
    assert not [p for p in victim.family if pid_alive(p)]
