"""Merge rounds on loopback: real `unode join` nodes (hivemind DHT + p2pd) compute a round.

Three nodes each host one input expert; a round's merged expert must be bit-identical to
`unode merge` on local copies; a worker killed mid-round and a worker publishing altered units
must not stop the round. Every child process is killed in teardown.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from node.merge.api import merge
from node.network.lines import ChildLines, contains
from node.network.manifest import load_expert
from node.network.process import descendant_pids, kill_all
from node.rounds.spec import candidate_id

ROOT = Path(__file__).resolve().parents[1]
UNODE = str(ROOT / ".venv" / "bin" / "unode")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
FAST = {"UNODE_ROUND_POLL": "0.3"}
SCORER = {"UNODE_EVAL_DOMAINS": "prose", "UNODE_EVAL_N": "6"}  # held-out data of nodes 0 and 1


@dataclass
class Node:
    """A `unode join` child and every line it printed."""

    proc: subprocess.Popen[str]
    state: Path
    out: ChildLines
    maddr: str = ""
    family: list[int] = field(default_factory=list)

    def wait_for(self, prefix: str, timeout: float = 90.0) -> str:
        line = self.out.next_match(contains(prefix), timeout)
        if line is None:
            raise AssertionError(f"no {prefix!r}; node printed:\n" + self.out.tail(40))
        return line

    def text(self) -> str:
        return self.out.text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        kill_all(self.family, signal.SIGKILL, wait=2.0)


def start(state: Path, network: str, *args: str, env: dict[str, str] | None = None) -> Node:
    cmd = [
        UNODE,
        "join",
        "--network",
        network,
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
        env={**os.environ, **FAST, **(env or {})},
        start_new_session=True,
    )
    node = Node(proc, state, ChildLines(proc))
    line = node.wait_for("UNODE_READY")
    node.maddr = dict(p.split("=", 1) for p in line.split()[1:])["maddr"]
    node.family = descendant_pids(proc.pid)
    return node


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UNODE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **FAST}
    )


def expert_id(model_dir: Path, cache: Path) -> str:
    return load_expert(model_dir, cache).expert_id.hex()


def recipe(base: str, a: str, b: str) -> dict[str, Any]:
    """DARE-TIES: randomized per tensor, so the round's seeding is exercised."""
    return {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": b, "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
        ],
        "dtype": "float32",
        "seed": 1234,
    }


def tensors(model_dir: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                out[k] = st.get_tensor(k).numpy().tobytes()
    return out


@dataclass
class Swarm:
    tmp: Path
    network: str
    dirs: list[Path]
    ids: list[str]
    nodes: list[Node]

    def recipe_file(self, name: str) -> Path:
        path = self.tmp / f"{name}.yml"
        data = recipe(*(f"unode://{i}" for i in self.ids))
        path.write_text(yaml.safe_dump(data))
        return path

    def local_merge(self, out: Path) -> Path:
        merge(recipe(*(str(d) for d in self.dirs)), out, progress=False)
        return out


def make_swarm(
    tmp: Path, family: Any, network: str, envs: list[dict[str, str]] | None = None
) -> Swarm:
    dirs = [
        shutil.copytree(p, tmp / f"in{i}")
        for i, p in enumerate([family.base, *family.variants[:2]])
    ]
    ids = [expert_id(d, tmp / "idcache") for d in dirs]
    nodes: list[Node] = []
    envs = envs or [SCORER, SCORER, {}]
    try:
        nodes.append(
            start(tmp / "s0", network, "--expert", str(dirs[0]), "--domain", "general", env=envs[0])
        )
        with ThreadPoolExecutor(2) as pool:  # the others join at once
            more = [
                pool.submit(
                    start,
                    tmp / f"s{i}",
                    network,
                    "--initial-peers",
                    nodes[0].maddr,
                    "--expert",
                    str(dirs[i]),
                    "--domain",
                    "general",
                    env=envs[i],
                )
                for i in (1, 2)
            ]
            for f in more:
                nodes.append(f.result())
    except BaseException:
        for n in nodes:
            n.stop(signal.SIGKILL)
        raise
    return Swarm(tmp, network, dirs, ids, nodes)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, llama_family: Any) -> Iterator[Swarm]:
    s = make_swarm(tmp_path_factory.mktemp("rounds"), llama_family, "rounds-test")
    yield s
    for n in s.nodes:
        n.stop(signal.SIGKILL)


def propose(s: Swarm, *extra: str, background: bool = False) -> Any:
    args = [
        UNODE,
        "round",
        "merge",
        str(s.recipe_file("r")),
        "--network",
        s.network,
        "--initial-peers",
        s.nodes[0].maddr,
        "--wait",
        "--json",
        "--timeout",
        "150",
        *extra,
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **FAST}
    )
    if background:
        return proc
    return finish(s, proc)


def finish(s: Swarm, proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:] + "\n".join(n.text()[-2000:] for n in s.nodes)
    return dict(json.loads(stdout[stdout.index("{") :]))


def round_expert(node: Node, rid: str) -> Path:
    found = [p for p in (node.state / "rounds" / rid / "expert").iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def target_hosts(s: Swarm) -> list[Node]:
    """Live nodes hosting the base model (the fusion tests' target)."""
    live = [n for n in s.nodes if n.proc.poll() is None]
    return [n for n in live if str(s.dirs[0]) in [str(a) for a in list(n.proc.args)]]  # type: ignore[arg-type]


def done_nodes(s: Swarm, rid: str) -> list[Node]:
    return [n for n in s.nodes if f"UNODE_ROUND_DONE round={rid}" in n.text()]


@pytest.fixture(scope="module")
def local_merge(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return tensors(swarm.local_merge(tmp_path_factory.mktemp("local") / "out"))


def test_merge_round_bit_identical_to_local_merge(
    swarm: Swarm, local_merge: dict[str, bytes], tmp_path: Path
) -> None:
    out = propose(swarm, "--verify-rate", "0.5", "--claim-ttl", "30")
    rid, eid = out["round_id"], out["expert_id"]
    assert out["units"] == 4 and eid
    done = done_nodes(swarm, rid)
    assert done, "no node assembled the round"
    for n in done:
        merged = round_expert(n, rid)
        assert tensors(merged) == local_merge  # bit for bit, every tensor
        assert expert_id(merged, tmp_path / "ids") == eid
        lineage = json.loads((merged / "unode-lineage.json").read_text())
        assert lineage["round_id"] == rid and len(lineage["units"]) == 4
        assert lineage["inputs"] == swarm.ids
    workers = [n for n in swarm.nodes if f"round {rid[:12]}: unit " in n.text()]
    assert len(workers) >= 2  # the work was shared
    assert "rejected unit" not in "".join(n.text() for n in swarm.nodes)


def test_killed_worker_round_completes_and_restart_resumes(
    swarm: Swarm, local_merge: dict[str, bytes], tmp_path: Path
) -> None:
    state = swarm.tmp / "slow"
    copy = swarm.dirs[0]  # hosts a copy of the base: any node may host any expert
    slow = start(
        state,
        swarm.network,
        "--initial-peers",
        swarm.nodes[0].maddr,
        "--expert",
        str(copy),
        "--domain",
        "general",
        env={"UNODE_TEST_UNIT_DELAY": "120"},
    )
    swarm.nodes.append(slow)
    proc = propose(swarm, "--units", "8", "--claim-ttl", "4", "--verify-rate", "0", background=True)
    line = slow.wait_for("computed, waiting", timeout=60)
    slow.stop(signal.SIGKILL)  # dies holding a claim, its finished unit never published
    out = finish(swarm, proc)
    rid = out["round_id"]
    assert rid[:12] in line
    for n in done_nodes(swarm, rid):
        assert tensors(round_expert(n, rid)) == local_merge
    # the restarted worker resumes from its state dir: its computed unit is not lost
    again = start(
        state,
        swarm.network,
        "--initial-peers",
        swarm.nodes[0].maddr,
        "--expert",
        str(copy),
        "--domain",
        "general",
    )
    swarm.nodes.append(again)
    again.wait_for(f"round {rid[:12]}: resumed 1 units", timeout=30)
    done = again.wait_for(f"UNODE_ROUND_DONE round={rid}", timeout=60)
    assert done.strip().endswith(f"expert={out['expert_id']}")


def test_wrong_unit_detected_and_redone(swarm: Swarm, local_merge: dict[str, bytes]) -> None:
    liar = start(
        swarm.tmp / "liar",
        swarm.network,
        "--initial-peers",
        swarm.nodes[0].maddr,
        "--expert",
        str(swarm.dirs[1]),
        "--domain",
        "general",
        env={"UNODE_TEST_WRONG_UNITS": "1"},
    )
    swarm.nodes.append(liar)
    out = propose(swarm, "--units", "6", "--verify-rate", "1", "--claim-ttl", "30")
    rid = out["round_id"]
    liar_units = liar.text().count(f"round {rid[:12]}: unit ")
    assert liar_units >= 1, liar.text()[-2000:]
    honest = [n for n in done_nodes(swarm, rid) if n is not liar]
    assert honest
    texts = "".join(n.text() for n in swarm.nodes if n is not liar)
    assert "rejected unit" in texts and "worker 12D3" in texts
    for n in honest:
        assert tensors(round_expert(n, rid)) == local_merge
    assert out["expert_id"] == expert_id(round_expert(honest[0], rid), swarm.tmp / "ids")
    liar.stop()


def test_search_round_improves_on_its_starting_recipe(swarm: Swarm) -> None:
    start_recipe = recipe(*(f"unode://{i}" for i in swarm.ids))
    start_recipe["merge_method"] = "task_arithmetic"  # weights 1.0 each: a poor start
    for m in start_recipe["models"]:
        m["parameters"] = {"weight": 1.0}
    path = swarm.tmp / "search.yml"
    path.write_text(yaml.safe_dump(start_recipe))
    res = subprocess.run(
        [
            UNODE,
            "round",
            "search",
            str(path),
            "--network",
            swarm.network,
            "--initial-peers",
            swarm.nodes[0].maddr,
            "--budget",
            "6",
            "--population",
            "3",
            "--groups",
            "2",
            "--sigma",
            "0.3",
            "--json",
            "--out",
            str(swarm.tmp / "best.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **FAST},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{\n") :])
    assert out["evaluated"] == 6 and len(out["history"]) == 6
    assert out["best_score"] < out["start_score"]
    best = yaml.safe_load((swarm.tmp / "best.yml").read_text())
    attn = best["models"][0]["parameters"]["weight"][0]
    assert attn["filter"] == "self_attn" and len(attn["value"]["layers"]) == 4
    rid = out["round_id"]
    done = [n for n in swarm.nodes if f"UNODE_ROUND_DONE round={rid}" in n.text()]
    assert done and out["expert_id"]
    scored = [n for n in swarm.nodes if "scored candidate" in n.text()]
    assert len(scored) >= 1


def test_guarded_floored_search_keeps_the_finalist_best_on_held_back_texts(swarm: Swarm) -> None:
    start_recipe = recipe(*(f"unode://{i}" for i in swarm.ids))
    start_recipe["merge_method"] = "task_arithmetic"
    for m in start_recipe["models"]:
        m["parameters"] = {"weight": 1.0}
    path = swarm.tmp / "guarded.yml"
    path.write_text(yaml.safe_dump(start_recipe))
    args = ["round", "search", str(path), "--network", swarm.network, "--initial-peers"]
    args += [swarm.nodes[0].maddr, "--budget", "6", "--population", "3", "--sigma", "0.3"]
    args += ["--guard", "--floor", "1.0", "--no-merge", "--json"]
    args += ["--out", str(swarm.tmp / "guarded-best.yml")]
    res = subprocess.run(
        [UNODE, *args], capture_output=True, text=True, timeout=240, env={**os.environ, **FAST}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{\n") :])
    guard = out["guard"]
    finalists = guard["finalists"]
    # The start, then the best of each of the two generations (by the search score).
    assert [f["generation"] for f in finalists] == ["start", 0, 1]
    by_gen = {g: [h for h in out["history"] if h["generation"] == g] for g in (0, 1)}
    assert finalists[0]["candidate"] == by_gen[0][0]["candidate"]
    for g in (0, 1):
        best = min(by_gen[g], key=lambda h: h["score"])
        assert (finalists[g + 1]["candidate"], finalists[g + 1]["score"]) == (
            best["candidate"],
            best["score"],
        )
    held = [f["heldback"] for f in finalists]
    assert all(math.isfinite(h) and 0 < h < 20 for h in held)
    # The held-back fold is other texts: its scores are not the search scores.
    assert all(f["heldback"] != f["score"] for f in finalists)
    kept = min(range(3), key=lambda i: (held[i], i))
    assert guard["picked"] == finalists[kept]["generation"]
    assert guard["best_heldback"] == held[kept] and guard["start_heldback"] == held[0]
    assert out["best_score"] == finalists[kept]["score"]
    best_recipe = yaml.safe_load((swarm.tmp / "guarded-best.yml").read_text())
    assert candidate_id(best_recipe).hex() == finalists[kept]["candidate"]
    assert out["expert_id"] is None  # --no-merge
    scorers = [n for n in swarm.nodes if "prose.heldback_bpb=" in n.text()]
    assert scorers, "no node published a held-back score"
    # The floor: each expert alone was scored first, and every score is its mean raised by 4x
    # the share below the floor (1.0: any pair where the candidate is worse than the best).
    floor = out["floor"]
    assert floor["floor"] == 1.0 and len(floor["references"]) == len(start_recipe["models"])
    assert all(math.isfinite(r["score"]) and 0 < r["score"] < 20 for r in floor["references"])
    for h in out["history"]:
        assert h["shortfall"] >= 0
        assert math.isclose(h["score"], h["mean"] * (1 + 4 * h["shortfall"]))
    assert any(h["shortfall"] > 0 for h in out["history"])


def test_fusion_round_completes_and_its_expert_loads(swarm: Swarm) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from node.fusion.corpus import write_toy_corpus

    corpus = write_toy_corpus(swarm.tmp / "corpus.jsonl", n=12, max_chars=120)
    hosts = target_hosts(swarm)  # after the killed-worker test: node 0 and the restarted worker
    if len(hosts) < 2:  # run on its own: a second host of the target joins here
        extra = start(swarm.tmp / "target2", swarm.network, "--initial-peers", swarm.nodes[0].maddr,
                      "--expert", str(swarm.dirs[0]), "--domain", "general")  # fmt: skip
        swarm.nodes.append(extra)
        hosts = target_hosts(swarm)
    res = subprocess.run(
        [
            UNODE,
            "round",
            "fuse",
            "--target",
            swarm.ids[0],
            "--sources",
            swarm.ids[1],
            "--sources",
            swarm.ids[2],
            "--corpus",
            str(corpus),
            "--shards",
            "2",
            "--max-steps",
            "2",
            "--network",
            swarm.network,
            "--initial-peers",
            swarm.nodes[0].maddr,
            "--wait",
            "--json",
            "--timeout",
            "180",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **FAST},
    )
    texts = "\n".join(n.text()[-1500:] for n in swarm.nodes[:3])
    assert res.returncode == 0, res.stderr[-2000:] + texts
    out = json.loads(res.stdout[res.stdout.index("{\n") :])
    rid = out["round_id"]
    assert out["units"] == 4 and out["expert_id"]
    for source in swarm.nodes[1:3]:  # each source host summarized both shards of its expert
        assert source.text().count(f"round {rid[:12]}: summarized shard") == 2
    # two nodes host the target: one of them is elected and trains, the other sees its result
    assert len(hosts) == 2
    winners = done_nodes(swarm, rid)
    assert len(winners) == 1 and winners[0] in hosts
    other = next(n for n in hosts if n is not winners[0])
    deadline = time.monotonic() + 30
    while f"round {rid[:12]}: fused by 12D3" not in other.text() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert f"round {rid[:12]}: fused by 12D3" in other.text(), other.text()[-1500:]
    assert not (other.state / "rounds" / rid / "expert").exists()
    fused = round_expert(winners[0], rid)
    assert expert_id(fused, swarm.tmp / "ids") == out["expert_id"]
    model = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(swarm.dirs[0], dtype=torch.float32)
    trained = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, base.state_dict()["model.layers.0.mlp.up_proj.weight"])


def fuse_beside_liars(
    swarm: Swarm, faults: dict[str, str], extra: list[str], seed: int
) -> tuple[dict[str, Node], str, str]:
    """Start more hosts of source 2, each serving bad summaries (`UNODE_TEST_BAD_SUMMARIES` =
    `faults[tag]`), and run a fusion round of target 0 from source 2 to the end; the liars by
    tag, the round id and the nodes' last lines. The honest host of the source is paused until
    every liar has summarized a shard of this round: otherwise, on a loaded machine, the honest
    host may take every shard first."""
    from node.fusion.corpus import write_toy_corpus

    liars = {
        tag: start(swarm.tmp / f"liar-{tag}", swarm.network, "--initial-peers",
                   swarm.nodes[0].maddr, "--expert", str(swarm.dirs[2]), "--domain", "general",
                   env={"UNODE_TEST_BAD_SUMMARIES": fault, "UNODE_ROUND_POLL": "0.1"})
        for tag, fault in faults.items()
    }  # fmt: skip
    swarm.nodes.extend(liars.values())
    corpus = write_toy_corpus(swarm.tmp / f"corpus-{seed}.jsonl", n=12, max_chars=120, seed=seed)
    args = ["round", "fuse", "--target", swarm.ids[0], "--sources", swarm.ids[2], *extra]
    args += ["--corpus", str(corpus), "--max-steps", "2", "--wait", "--json"]
    args += ["--network", swarm.network, "--initial-peers", swarm.nodes[0].maddr]

    def lied(liar: Node, rid: str = "") -> int:
        return liar.text().count(
            f"round {rid[:12]}: summarized shard" if rid else ": summarized shard"
        )

    before = {tag: lied(liar) for tag, liar in liars.items()}
    honest_pid = swarm.nodes[2].proc.pid
    os.kill(honest_pid, signal.SIGSTOP)
    try:
        proc = subprocess.Popen([UNODE, *args, "--name", f"fused-{seed}", "--timeout", "180"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **FAST})  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
            lied(liar) == before[tag] for tag, liar in liars.items()
        ):
            time.sleep(0.2)
    finally:
        os.kill(honest_pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=240)
    texts = "\n".join(n.text()[-1500:] for n in (swarm.nodes[0], swarm.nodes[2], *liars.values()))
    assert proc.returncode == 0, stderr[-2000:] + texts
    rid = json.loads(stdout[stdout.index("{\n") :])["round_id"]
    for liar in liars.values():
        assert lied(liar, rid) >= 1, liar.text()[-2000:]
    return liars, rid, texts


def test_fusion_round_refuses_impossible_and_plausible_summaries_and_redoes_them(
    swarm: Swarm,
) -> None:
    """Two more hosts of a source lie, each with valid hashes and signatures: one serves NaN
    summaries, the other rows shifted by one position (each position carries the previous
    one's distribution), which pass every content check. With --verify-rate 1 the honest host
    and the trainer refuse the first on content and the second by recomputing a sample; nobody
    refuses the honest host; honest nodes summarize the refused shards again; and the trainer's
    summaries equal `summarize` of each shard run here (without the content checks the round
    fails: checked by hand, see docs/rounds.md)."""
    import torch
    from safetensors.torch import load_file

    from node.fusion.summaries import SummarySettings, summarize
    from node.fusion.summary_store import SummaryReader

    liars, rid, texts = fuse_beside_liars(
        swarm, {"nan": "1", "plausible": "plausible"}, ["--shards", "3", "--verify-rate", "1"], 12
    )
    peer = {tag: liar.maddr.rsplit("/p2p/", 1)[1][:16] for tag, liar in liars.items()}
    others = [n for n in swarm.nodes if n not in liars.values()]
    assert any(f"from {peer['nan']} (bad content)" in n.text() for n in others), texts
    recomputed = f"from {peer['plausible']} (a recomputed sample differs)"
    assert any(recomputed in n.text() for n in others), texts
    honest_peer = swarm.nodes[2].maddr.rsplit("/p2p/", 1)[1][:16]
    rejected = f"round {rid[:12]}: rejected unit"
    assert not any(rejected in line and honest_peer in line
                   for n in swarm.nodes for line in n.text().splitlines()), texts  # fmt: skip
    # every shard was summarized honestly: by the honest host, or by the trainer that fetched
    # the source to verify it (the refused shards again, and any the liars left)
    assert sum(n.text().count(f"round {rid[:12]}: summarized shard") for n in others) >= 3
    fused = round_expert(done_nodes(swarm, rid)[0], rid)
    weights = load_file(str(next(fused.glob("*.safetensors"))))
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the trainer's summaries are the honest ones: equal to summarizing each shard here
    root = fused.parents[1]
    used = SummaryReader(root / "summaries" / swarm.ids[2])
    settings = SummarySettings(top_k=10, max_len=256)  # the round's (FuseRoundConfig.summary)
    units = (liars["plausible"].state / "rounds" / rid / "units").glob("[0-9]*")
    served = {json.loads((u / "manifest.json").read_text())["corpus_sha256"]: u for u in units}
    offset, lied = 0, 0
    for k, shard in enumerate(sorted((root / "shards").glob("*.jsonl"))):
        out = swarm.tmp / f"ref-{rid[:12]}-{k}"
        ref = SummaryReader(summarize(swarm.dirs[2], shard, out, settings, progress=False).parent)
        for i in range(ref.n_seqs):
            got, want = used.sequence(offset + i), ref.sequence(i)
            assert np.array_equal(got.topk_ids, want.topk_ids)
            assert np.array_equal(got.topk_logp, want.topk_logp)
        if ref.manifest["corpus_sha256"] in served:  # what the liar served is not the truth
            bad = SummaryReader(served[ref.manifest["corpus_sha256"]])
            lied += sum(
                not np.array_equal(bad.sequence(i).topk_logp, ref.sequence(i).topk_logp)
                for i in range(ref.n_seqs)
            )
        offset += ref.n_seqs
    assert lied > 0
    for liar in liars.values():
        liar.stop()
