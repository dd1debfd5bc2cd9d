"""The demo's three rounds, each proposed through the CLI (`unode round ...`) to the swarm,
and the local `unode merge` that the merge round's expert must equal bit for bit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from node.demo.experts import DemoModels
from node.demo.swarm import Swarm


@dataclass(frozen=True)
class RoundResult:
    name: str
    round_id: str
    expert_id: str
    expert_dir: Path
    seconds: float
    info: dict[str, Any]


def expert_ids(models: DemoModels, cache: Path) -> dict[str, str]:
    from node.network.manifest import load_expert

    every = [models.base, *models.experts, models.target]
    return {e.name: load_expert(e.path, cache).expert_id.hex() for e in every}


def uniform_recipe(models: DemoModels, ref: dict[str, str]) -> dict[str, Any]:
    """Task arithmetic, one weight for every expert; `ref` maps a model name to its reference."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": ref[models.base.name],
        "models": [
            {"model": ref[e.name], "parameters": {"weight": models.merge_weight}}
            for e in models.experts
        ],
        "dtype": "float32",
    }


def _write(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def merge_round(swarm: Swarm, models: DemoModels, ids: dict[str, str]) -> RoundResult:
    recipe = uniform_recipe(models, {k: f"unode://{v}" for k, v in ids.items()})
    path = _write(swarm.root / "merge-round.yml", recipe)
    t0 = time.perf_counter()
    out = swarm.run_json(["round", "merge", str(path), "--wait", "--timeout", "600"], 660)
    expert = swarm.wait_expert(out["round_id"])
    return RoundResult("merge", out["round_id"], out["expert_id"], expert,
                       time.perf_counter() - t0, out)  # fmt: skip


def local_merge(models: DemoModels, out: Path) -> Path:
    from node.merge.api import merge

    ref = {e.name: str(e.path) for e in (models.base, *models.experts)}
    merge(uniform_recipe(models, ref), out, progress=False)
    return out


def tensor_bytes(model_dir: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118  (safe_open is not iterable)
                out[k] = st.get_tensor(k).numpy().tobytes()
    return out


DEMO_FLOOR = 0.92  # the evidence bench's default (docs/rounds.md, "The floor")


def search_round(
    swarm: Swarm, models: DemoModels, ids: dict[str, str], budget: int, population: int
) -> RoundResult:
    recipe = uniform_recipe(models, {k: f"unode://{v}" for k, v in ids.items()})
    path = _write(swarm.root / "search-start.yml", recipe)
    best = swarm.root / "search-best.yml"
    args = ["round", "search", str(path), "--budget", str(budget), "--population"]
    args += [str(population), "--groups", "2", "--sigma", "0.2", "--out", str(best)]
    args += ["--scorers", "2"]  # both expert hosts: every candidate scored on the same domains
    args += ["--guard"]  # keep the start unless a generation's best is better on held-back texts
    args += ["--floor", str(DEMO_FLOOR)]  # and no expert's domain below this share of its own
    t0 = time.perf_counter()
    out = swarm.run_json(args, 1800)
    expert = swarm.wait_expert(out["round_id"])
    out["best_recipe"] = yaml.safe_load(best.read_text())
    return RoundResult("search", out["round_id"], out["expert_id"], expert,
                       time.perf_counter() - t0, out)  # fmt: skip


def fusion_corpus(models: DemoModels, out: Path) -> Path:
    """Quick: the toy instruction corpus; zoo: training texts of every evaluation domain as
    plain-text records (an instruction template would teach the target another format)."""
    from node.eval import corpora
    from node.fusion.corpus import write_toy_corpus

    path = out.with_suffix(".jsonl")
    if models.kind == "quick":
        return write_toy_corpus(path, n=12, max_chars=120)
    records = []  # plain-text records: the texts in the format the evaluation reads them
    for d in models.domains:
        records += [{"text": e.text} for e in corpora.load(d, 24, "train")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def fusion_round(swarm: Swarm, models: DemoModels, ids: dict[str, str]) -> RoundResult:
    corpus = fusion_corpus(models, swarm.root / "fusion-corpus")
    steps, lr = ("2", "1e-4") if models.kind == "quick" else ("40", "3e-4")
    args = ["round", "fuse", "--target", ids[models.target.name]]
    for e in models.experts:
        args += ["--sources", ids[e.name]]
    args += ["--corpus", str(corpus), "--shards", "2", "--max-steps", steps, "--lr", lr]
    args += ["--lam", "0.9", "--wait", "--timeout", "1200"]
    t0 = time.perf_counter()
    out = swarm.run_json(args, 1260)
    expert = swarm.wait_expert(out["round_id"])
    return RoundResult("fusion", out["round_id"], out["expert_id"], expert,
                       time.perf_counter() - t0, out)  # fmt: skip
