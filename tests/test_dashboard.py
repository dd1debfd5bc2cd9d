"""`unode dashboard` against a real two-node network on loopback (`unode join` subprocesses).

The JSON snapshot is checked field by field against what the hosts announced, the metrics
endpoint of a node is scraped after a fetch, JSON log lines are parsed, and the live view runs
in a real terminal (tmux): it shows peers and experts, drills into an expert, and `q` quits.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from test_network import NETWORK, UNODE, NodeProc, ready, start_node

from node.network.manifest import load_expert

TIMEOUT = 120


class Tmux:
    """A private tmux server (its own socket) running one command in a 200x60 pane."""

    def __init__(self, socket: Path, command: str) -> None:
        self.socket = str(socket)  # in the test's tmp dir: nothing left in /tmp/tmux-UID
        self._tmux("new-session", "-d", "-s", "dash", "-x", "200", "-y", "60", command)

    def _tmux(self, *args: str) -> str:
        run = subprocess.run(
            ["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=20
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "dash", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "dash")

    def wait_for(self, *needles: str, absent: tuple[str, ...] = (), timeout: float = 90.0) -> str:
        """The screen once it shows every needle and none of `absent` (a capture can catch a
        redraw half-way: the new page on top, the rest of the old one below)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if all(n in text for n in needles) and not any(a in text for a in absent):
                return text
            time.sleep(0.5)
        raise AssertionError(f"screen never showed {needles}; last screen:\n{text}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=20)
        Path(self.socket).unlink(missing_ok=True)


@dataclass
class Net:
    a: NodeProc
    b: NodeProc
    experts: dict[str, tuple[str, str, Path]]  # expert id -> (host peer id, domain, dir)
    metrics_port: int
    tmp: Path
    term: Tmux | None  # the live dashboard, started early so it connects while tests run


def dashboard_command(maddr: str) -> str:
    """The live dashboard twice (quit with q, then with Ctrl+C), each followed by its exit code
    and the terminal's modes."""
    dash = f"{UNODE} dashboard --network {NETWORK} --initial-peers {maddr} --refresh 1"
    return (
        f"{dash}; echo DASHBOARD_EXIT=$?; stty -a; echo STTY_DONE; "
        f"{dash}; echo SECOND_EXIT=$?; stty -a; echo SECOND_DONE; sleep 60"
    )


def drain(node: NodeProc) -> list[str]:
    """Every line the node printed so far."""
    node.out.text()
    return node.seen


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, llama_family: Any) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("dash")
    base, ft0, ft1 = llama_family.base, llama_family.variants[0], llama_family.variants[1]
    nodes: list[NodeProc] = []
    term: Tmux | None = None
    try:
        a = start_node(tmp / "sa", "--expert", str(base), "--domain", "general",
                       "--expert", str(ft0), "--domain", "code", "--metrics-port", "0")  # fmt: skip
        nodes.append(a)
        port = int(a.wait_for("unode: metrics on").rsplit(":", 1)[1].split("/")[0])
        ready(a)
        b = start_node(tmp / "sb", "--initial-peers", a.maddr, "--expert", str(ft1),
                       "--domain", "math", "--log-format", "json", "-v")  # fmt: skip
        nodes.append(b)
        ready(b)
        cache = tmp / "cache"
        experts = {
            load_expert(d, cache).expert_id.hex(): (host.peer_id, dom, d)
            for d, dom, host in ((base, "general", a), (ft0, "code", a), (ft1, "math", b))
        }
        if shutil.which("tmux"):
            term = Tmux(tmp / "tmux.sock", dashboard_command(a.maddr))
        yield Net(a, b, experts, port, tmp, term)
    finally:
        if term is not None:
            term.kill()
        for n in nodes:
            n.terminate()
        for n in nodes:
            n.stop()


@pytest.fixture(scope="module")
def fetched(net: Net) -> Path:
    """One of A's experts fetched by a `unode fetch` client (only A serves it)."""
    out = net.tmp / "fetched"
    run = subprocess.run(
        [UNODE, "fetch", fetched_id(net), str(out), "--network", NETWORK, "--initial-peers", net.a.maddr],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return out


def snapshot(net: Net) -> dict[str, Any]:
    run = subprocess.run(
        [UNODE, "dashboard", "--once", "--json", "--network", NETWORK,
         "--initial-peers", net.a.maddr],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


def n_params(model_dir: Path) -> int:
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                numel = 1
                for d in st.get_slice(key).get_shape():
                    numel *= d
                total += numel
    return total


def test_once_json_snapshot_matches_what_the_hosts_announced(net: Net, fetched: Path) -> None:
    snap = snapshot(net)
    for _ in range(3):  # a stats call slower than its 5 s timeout (a loaded machine) gives None
        if all(p["stats"] is not None for p in snap["peers"]):
            break
        snap = snapshot(net)
    assert snap["schema"] == "unode.dashboard/1" and snap["network"] == NETWORK
    assert abs(snap["taken_at"] - time.time()) < 120
    peers = {p["peer_id"]: p for p in snap["peers"]}
    assert set(peers) == {net.a.peer_id, net.b.peer_id}
    for node in (net.a, net.b):
        p = peers[node.peer_id]
        hosted = sorted(e for e, (host, _, _) in net.experts.items() if host == node.peer_id)
        assert p["experts"] == hosted
        assert p["maddrs"] and all(m.endswith("/p2p/" + node.peer_id) for m in p["maddrs"])
        assert p["agent"].startswith("unode/") and p["expires_at"] > time.time()
        assert p["stats"]["uptime_s"] > 0 and p["stats"]["units_failed"] == 0
    # the fetch of one of A's experts: A served at least its bytes, B served nothing
    nbytes = next(e["nbytes"] for e in snap["experts"] if e["expert_id"] == fetched_id(net))
    assert peers[net.a.peer_id]["stats"]["bytes_served"] >= nbytes > 0
    assert peers[net.b.peer_id]["stats"]["bytes_served"] == 0
    assert {e["expert_id"] for e in snap["experts"]} == set(net.experts)
    for e in snap["experts"]:
        host, domain, model_dir = net.experts[e["expert_id"]]
        assert e["providers"] == [host] and e["domains"] == [domain]
        assert e["architecture"] == "LlamaForCausalLM" and e["lineage"] is None
        assert e["n_params"] == n_params(model_dir) and e["eval_scores"] == {}
        assert e["name"] == model_dir.name
    # one base and its fine-tunes: one family (same architecture and tensor layout)
    assert len(snap["families"]) == 1
    assert sorted(snap["families"][0]["experts"]) == sorted(net.experts)
    assert snap["rounds"] == [] and snap["search"] == []


def fetched_id(net: Net) -> str:
    return next(e for e, (host, _, _) in net.experts.items() if host == net.a.peer_id)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_endpoint_counts_what_a_node_served(net: Net, fetched: Path) -> None:
    m = scrape(net.metrics_port)
    model_bytes = sum(f.stat().st_size for f in fetched.iterdir() if f.is_file())
    assert m["unode_bytes_served_total"] >= model_bytes > 0
    assert m["unode_records_published_total"] >= 7  # 3 per expert and a PeerRecord
    assert m["unode_records_rejected_total"] == 0 and m["unode_chunks_rejected_total"] == 0
    assert m["unode_bytes_fetched_total"] == 0  # A fetched nothing
    assert m["unode_uptime_seconds"] > 0
    assert "unode_serve_throughput_bytes_per_second" in m


def test_json_logs_are_one_object_per_line(net: Net) -> None:
    lines = drain(net.b)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records, "no JSON log line"
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= set(r)
        assert datetime.fromisoformat(r["ts"]).tzinfo is not None
        assert r["level"] in ("debug", "info", "warning", "error", "critical")
    served = [r for r in records if r["msg"].startswith("serving node stats")]
    assert (
        served
        and served[0]["node"] == net.b.peer_id
        and served[0]["logger"] == "node.metrics.stats"
    )
    text_log = re.compile(r"^\d{4}-\d\d-\d\d .* (INFO|WARNING|ERROR) ")
    assert not [line for line in lines if text_log.match(line)]


@pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"
)
def test_live_dashboard_in_a_terminal_shows_peers_experts_and_drills_down(net: Net) -> None:
    term = net.term
    assert term is not None
    by_domain = sorted(net.experts, key=lambda e: net.experts[e][1])  # code, general, math
    screen = term.wait_for(
        net.a.peer_id, net.b.peer_id, *(e[:16] for e in by_domain), "Search progress"
    )
    assert "Experts by family" in screen and "Rounds" in screen, screen
    assert "LlamaForCausalLM" in screen and "math" in screen, screen
    # drill into the 3rd expert (family order, then domain): math, hosted by B
    term.keys("e", "j", "j", "Enter")
    detail = term.wait_for(
        "Card (signed by each host)", by_domain[2], "hosted by", absent=("Experts by family",)
    )
    hosts = [line for line in detail.splitlines() if "hosted by" in line]
    assert len(hosts) == 1 and net.b.peer_id in hosts[0], detail
    assert "root (not made by a round)" in detail and "math" in detail, detail
    term.keys("b")
    term.wait_for("Experts by family", net.a.peer_id, absent=("Card (signed by each host)",))
    term.keys("q")
    after = term.wait_for("DASHBOARD_EXIT=", "STTY_DONE", timeout=30)
    assert "DASHBOARD_EXIT=0" in after, after
    # the terminal is back in canonical mode with echo (cbreak mode undone)
    assert re.search(r"(?<![-\w])icanon\b", after) and re.search(r"(?<![-\w])echo\b", after), after
    # the second run: Ctrl+C stops it (exit 130) and restores the terminal just the same
    term.wait_for(net.a.peer_id, "Search progress", absent=("STTY_DONE",))
    term.keys("C-c")
    after = term.wait_for("SECOND_EXIT=", "SECOND_DONE", timeout=30)
    assert "SECOND_EXIT=130" in after, after
    modes = after[after.index("SECOND_EXIT=") :]
    assert re.search(r"(?<![-\w])icanon\b", modes) and re.search(r"(?<![-\w])echo\b", modes), after


@pytest.mark.slow
def test_snapshot_follows_a_real_merge_round_to_its_expert(net: Net) -> None:
    base = next(e for e, (_, dom, _) in net.experts.items() if dom == "general")
    others = [e for e, (_, dom, _) in net.experts.items() if dom != "general"]
    recipe = net.tmp / "round.yml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: unode://{base}\nmodels:\n"
        + "".join(f"  - model: unode://{e}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for e in others)
        + "seed: 7\n"
    )  # fmt: skip
    run = subprocess.run(
        [UNODE, "round", "merge", str(recipe), "--network", NETWORK, "--initial-peers",
         net.a.maddr, "--wait", "--timeout", "400", "--json"],
        capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    merged = json.loads(run.stdout[re.search(r"^\{$", run.stdout, re.M).start() :])  # type: ignore[union-attr]
    snap = snapshot(net)
    (r,) = snap["rounds"]
    assert r["round_id"] == merged["round_id"] and r["status"] == "finished"
    assert r["kind"] == "merge" and r["mode"] == "merge" and r["method"] == "ties"
    assert r["inputs"] == [base, *others] and r["result_expert"] == merged["expert_id"]
    assert r["unit_states"] == ["done"] * r["n_units"] and r["progress"] == 1.0
    assert r["failures"] == 0 and set(r["workers"]) <= {net.a.peer_id, net.b.peer_id}
    made = next(e for e in snap["experts"] if e["expert_id"] == merged["expert_id"])
    assert made["lineage"] == r["round_id"]
