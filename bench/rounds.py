"""Merge-round wall time with 1, 2 and 3 workers on loopback against a local `unode merge`.

Uses bench/merge.py's ~170M-parameter bf16 Llama (base + two fine-tune-like variants, cached in
bench/_work). Workers are `unode join` nodes hosting the inputs (1 worker: one node hosts all
three; 2: two nodes; 3: one each); the proposer is `unode round merge --wait`. Each round's
merged expert is compared bit for bit with the local merge. Prints wall times and ratios.

    .venv/bin/python bench/rounds.py [--method ties] [--reps 1] [--workers 1,2,3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
UNODE = str(HERE.parent / ".venv" / "bin" / "unode")
WORK = HERE / "_work"
RUN = WORK / "rounds"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ENV = {**os.environ, "UNODE_ROUND_POLL": "0.5"}

from node.network.lines import ChildLines, starts_with  # noqa: E402  (after the sys.path fix)


def bench_merge() -> Any:
    spec = importlib.util.spec_from_file_location("bench_merge", HERE / "merge.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Node:
    def __init__(self, state: Path, network: str, args: list[str]) -> None:
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
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
            start_new_session=True,
        )
        self.out = ChildLines(self.proc)
        self.maddr = ""

    def wait_for(self, prefix: str, timeout: float = 600) -> str:
        line = self.out.next_match(starts_with(prefix), timeout)
        if line is None:
            raise RuntimeError(f"no {prefix}: " + self.out.tail(20))
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_nodes(n_workers: int, dirs: list[Path], network: str) -> list[Node]:
    hosting = {1: [[0, 1, 2]], 2: [[0, 1], [2]], 3: [[0], [1], [2]]}[n_workers]
    nodes: list[Node] = []
    for i, idx in enumerate(hosting):
        peers = ["--initial-peers", nodes[0].maddr] if nodes else []
        args = [*peers]
        for j in idx:
            args += ["--expert", str(dirs[j]), "--domain", "general"]
        node = Node(RUN / f"w{n_workers}-{i}", network, args)
        nodes.append(node)
        line = node.wait_for("UNODE_READY")
        node.maddr = dict(p.split("=", 1) for p in line.split()[1:])["maddr"]
    return nodes


def expert_ids(dirs: list[Path]) -> list[str]:
    from node.network.manifest import load_expert

    return [load_expert(d, RUN / "idcache").expert_id.hex() for d in dirs]


def tensor_bytes(model_dir: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    out: dict[str, bytes] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                out[k] = (
                    st.get_tensor(k)
                    .view(-1)
                    .view(dtype=__import__("torch").uint8)
                    .numpy()
                    .tobytes()
                )
    return out


def local_merge(recipe: dict[str, Any]) -> tuple[float, Path]:
    path, out = RUN / "local.yml", RUN / "local-out"
    path.write_text(yaml.safe_dump(recipe))
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([UNODE, "merge", str(path), str(out), "--quiet"], check=True, env=ENV)
    return time.perf_counter() - t, out


def round_merge(n: int, recipe: dict[str, Any], dirs: list[Path], rep: int) -> tuple[float, Path]:
    network = f"bench-{n}-{rep}-{os.getpid()}"
    nodes = start_nodes(n, dirs, network)
    try:
        path = RUN / f"round-{n}.yml"
        path.write_text(yaml.safe_dump(recipe))
        t = time.perf_counter()
        res = subprocess.run(
            [
                UNODE,
                "round",
                "merge",
                str(path),
                "--network",
                network,
                "--initial-peers",
                nodes[0].maddr,
                "--wait",
                "--json",
                "--timeout",
                "1800",
            ],
            capture_output=True,
            text=True,
            env=ENV,
            check=True,
        )
        wall = time.perf_counter() - t
        out = json.loads(res.stdout[res.stdout.index("{") :])
        rid = out["round_id"]
        found = [d for d in RUN.glob(f"w{n}-*/rounds/{rid}/expert/*") if d.is_dir()]
        return wall, found[0]
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="ties")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--workers", default="1,2,3")
    a = ap.parse_args()
    bm = bench_merge()
    dirs = bm.build_models(WORK)
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    ids = expert_ids(dirs)
    local_recipe = bm.recipe(a.method, dirs, "float32")
    net_recipe = bm.recipe(a.method, [Path(f"unode://{i}") for i in ids], "float32")
    net_recipe = json.loads(json.dumps(net_recipe).replace("unode:/", "unode://"))
    rows: dict[str, list[float]] = {}
    for rep in range(a.reps):
        t_local, out = local_merge(local_recipe)
        rows.setdefault("local unode merge", []).append(t_local)
        ref = tensor_bytes(out)
        for n in (int(x) for x in a.workers.split(",")):
            wall, expert = round_merge(n, net_recipe, dirs, rep)
            same = tensor_bytes(expert) == ref
            rows.setdefault(f"round, {n} worker(s)", []).append(wall)
            print(
                f"rep {rep}: {n} worker(s) {wall:.1f}s (local {t_local:.1f}s), bit-identical={same}",
                flush=True,
            )
            for p in RUN.glob(f"w{n}-*/rounds"):
                shutil.rmtree(p, ignore_errors=True)
    base = min(rows["local unode merge"])
    print(
        f"\nmethod {a.method}, ~170M params bf16, {a.reps} rep(s), best of reps; ratio = time / local merge"
    )
    for name, ts in rows.items():
        print(f"{name:24s} {min(ts):8.1f} s   x{min(ts) / base:5.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
