"""`run_demo`: models → three nodes → merge, search and fusion rounds → table and PNG plot.
Progress goes to `say` (stderr in the CLI); every child process is stopped on the way out."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from node.demo import plot, steps, table
from node.demo.experts import (
    DemoModels,
    Expert,
    Say,
    card_domains,
    quick_models,
    unode_home,
    zoo_models,
)
from node.demo.swarm import Swarm, check_home


@dataclass(frozen=True)
class DemoConfig:
    home: Path | None = None  # default $UNODE_HOME or ~/.cache/unode
    quick: bool = False  # tiny untrained toy models instead of the zoo
    plot: Path | None = None  # default <home>/demo/demo.png


def stderr_say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the demo like Ctrl+C does: through the `finally` that stops children."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def start_nodes(swarm: Swarm, models: DemoModels, say: Say) -> None:
    """node0: base + fusion target; the experts spread over node1 and node2."""
    env = {"UNODE_EVAL_N": str(models.eval_n)}
    half = (len(models.experts) + 1) // 2
    plan = [
        ("node0", [models.base, models.target]),
        ("node1", list(models.experts[:half])),
        ("node2", list(models.experts[half:])),
    ]

    def start(name: str, hosted: list[Expert]) -> None:
        t0 = time.perf_counter()
        # a scorer judges search candidates on its own experts' domains, plus the two-skill
        # task where it hosts both halves' experts (the quick models have no such domains)
        own = [d for e in hosted for d in card_domains(e.path)]
        if models.kind == "zoo" and {"arithmetic", "logic"} <= set(own):
            own.append("arithlogic")
        swarm.start_node(name, hosted, {**env, "UNODE_EVAL_DOMAINS": ",".join(own)} if own else env)
        names = ", ".join(f"{e.name} ({e.domain})" for e in hosted)
        say(f"{name} up in {time.perf_counter() - t0:.1f}s hosting {names}")

    start(*plan[0])  # the others bootstrap from it, and join at once
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(start, *p) for p in plan[1:]]:
            f.result()


def run_demo(cfg: DemoConfig, say: Say = stderr_say) -> dict[str, Any]:
    home = check_home(cfg.home or unode_home())
    t_start = time.perf_counter()
    models = quick_models(home, say) if cfg.quick else zoo_models(home, say)
    work = home / "demo" / ("quick" if cfg.quick else "zoo")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    network = f"unode-demo-{os.getpid()}-{secrets.token_hex(3)}"
    swarm = Swarm(work, network, say, {})
    with sigterm_as_interrupt():
        try:
            say(f"starting 3 local nodes on 127.0.0.1 (network {network})")
            start_nodes(swarm, models, say)
            rounds = run_rounds(swarm, models, say)
        finally:
            say("stopping every node")
            swarm.close()
    rows = score_all(models, rounds, say)
    png = cfg.plot or home / "demo" / "demo.png"
    names = [e.name for e in models.experts]
    plot.write_demo_plot(png, rounds["search"].info["best_recipe"], rows, models.domains, names)
    say(f"plot written to {png}")
    return {
        "models": models.kind,
        "domains": list(models.domains),
        "rows": table.as_json(rows),
        "rounds": {k: _round_json(v) for k, v in rounds.items()},
        "merge_bit_identical": rounds["merge"].info["bit_identical"],
        "plot": str(png),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def run_rounds(swarm: Swarm, models: DemoModels, say: Say) -> dict[str, steps.RoundResult]:
    ids = steps.expert_ids(models, swarm.root / "idcache")
    say("merge round: task arithmetic of the experts, computed unit by unit by the nodes")
    merged = steps.merge_round(swarm, models, ids)
    local = steps.local_merge(models, swarm.root / "local-merge")
    same = steps.tensor_bytes(merged.expert_dir) == steps.tensor_bytes(local)
    merged.info["bit_identical"] = same
    say(f"merge round done in {merged.seconds:.1f}s; bit-identical to local merge: {same}")
    budget, pop = (3, 3) if models.kind == "quick" else (12, 4)
    say(f"search round: CMA-ES over layer-wise weights, {budget} candidates scored by peers")
    searched = steps.search_round(swarm, models, ids, budget, pop)
    s = searched.info
    picked = (s.get("guard") or {}).get("picked")
    kept = {None: "unguarded", "start": "the start, by held-back texts"}.get(
        picked, f"generation {picked}'s best, by held-back texts"
    )
    say(f"search round done in {searched.seconds:.1f}s: start {s['start_score']:.4f} "
        f"-> kept {s['best_score']:.4f} bits per byte ({kept})")  # fmt: skip
    say(f"fusion round: {models.target.name} learns from the experts' top-k distributions")
    fused = steps.fusion_round(swarm, models, ids)
    say(f"fusion round done in {fused.seconds:.1f}s")
    return {"merge": merged, "search": searched, "fusion": fused}


def score_all(
    models: DemoModels, rounds: dict[str, steps.RoundResult], say: Say
) -> list[table.Row]:
    todo = [(models.base.name, "base", models.base.path)]
    todo += [(e.name, "expert", e.path) for e in models.experts]
    todo += [("merge", "merge round", rounds["merge"].expert_dir)]
    todo += [("searched", "search round", rounds["search"].expert_dir)]
    todo += [(models.target.name, "fusion target", models.target.path)]
    todo += [("fused", "fusion round", rounds["fusion"].expert_dir)]
    rows = []
    for name, kind, path in todo:
        t0 = time.perf_counter()
        rows.append(table.score(name, kind, path, models))
        say(f"scored {name} in {time.perf_counter() - t0:.1f}s")
    return rows


def _round_json(r: steps.RoundResult) -> dict[str, Any]:
    keep = ("units", "start_score", "best_score", "evaluated", "bit_identical", "best_recipe",
            "floor")  # fmt: skip
    guard = r.info.get("guard")
    picked = {"guard_picked": guard["picked"]} if guard else {}
    return {
        "round_id": r.round_id,
        "expert_id": r.expert_id,
        "expert_dir": str(r.expert_dir),
        "seconds": round(r.seconds, 1),
        **{k: r.info[k] for k in keep if k in r.info},
        **picked,
    }
