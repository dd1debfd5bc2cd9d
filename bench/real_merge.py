"""Homogeneous merging on a real model: SmolLM2-135M-Instruct domain experts made by short full
fine-tuning, merged with several methods, a small layer-wise grid (`--grid`) and a CMA-ES
layer-wise search (`--search`, `node.zoo.search.cma_search`), scored per domain.

Needs `make real` and an imported SmolLM2 (`unode import pkg:smollm2 DIR`). Long on 2 cores:
run it in the background. Steps whose output exists are skipped (re-run to resume).

    .venv/bin/python bench/real_merge.py --base bench/_work/real/smollm2 --work bench/_work/real/merge
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from node.merge.api import merge
from node.zoo.scores import Score, score_dir, score_model
from node.zoo.search import cma_search, layer_recipe, retention
from node.zoo.train import TrainConfig, train

DOMAINS = ("arithmetic2", "logic64", "python", "prose")  # session 1's generators (corpora.py)
EXPERTS = {"reasoning": {"arithmetic2": 0.5, "logic64": 0.5}, "python": {"python": 1.0}}


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


class LayerwiseTA:
    """Layer-wise task arithmetic of the experts over the base, written into one loaded model in
    place: what `layer_recipe` + `node.merge.api.merge` compute, without writing 538 MB per
    candidate (`max_diff` checks it against a merge on disk)."""

    def __init__(self, base: Path, experts: list[Path], n_layers: int) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
        self.params = dict(self.model.named_parameters())  # tied lm_head appears once
        self.base = {k: p.detach().clone() for k, p in self.params.items()}
        files = [load_file(str(e / "model.safetensors")) for e in experts]
        self.deltas = [{k: f[k] - self.base[k] for k in self.params} for f in files]
        self.n_layers = n_layers

    def group(self, name: str, n_groups: int) -> int:
        """`layer_recipe`'s group of a tensor: its layer's run, else the last (the default)."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return min(int(m[1]) * n_groups // self.n_layers, n_groups - 1) if m else n_groups - 1

    @torch.no_grad()
    def apply(self, weights: np.ndarray) -> None:
        for name, p in self.params.items():
            g = self.group(name, weights.shape[1])
            p.copy_(self.base[name])
            for delta, row in zip(self.deltas, weights, strict=True):
                p.add_(delta[name], alpha=float(row[g]))

    @torch.no_grad()
    def max_diff(self, weights: np.ndarray, merged: Path) -> float:
        from safetensors import safe_open

        self.apply(weights)
        with safe_open(str(merged / "model.safetensors"), "pt") as f:
            return max(float((f.get_tensor(k) - p).abs().max()) for k, p in self.params.items())

    def search_scores(self, weights: np.ndarray, n: int) -> dict[str, Score]:
        """Per-domain scores on the `search` half."""
        self.apply(weights)
        return score_model(self.model, self.tok, DOMAINS, n, "search", em=False)


def cma_layerwise(base: Path, experts: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """CMA-ES (`node.zoo.search.cma_search`) over per-(expert, layer group) task-arithmetic
    weights, minimising a search-half loss (`--objective`: mean bits per byte, or minus the mean
    retention of the best expert's bits per byte per domain), from the best uniform weight."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ta = LayerwiseTA(base, experts, 30)  # SmolLM2-135M has 30 layers
    check = ta.max_diff(np.array([[1.0, 0.5], [0.5, 1.0]]), args.work / "layers_1.0_0.5")
    log(f"in-memory merge vs node.merge.api on disk (layers_1.0_0.5): max |diff| {check:.2e}")
    shape = (len(experts), args.groups)
    ref: dict[str, Score] = {}
    if args.objective == "retention":  # the zoo's objective; experts are one-hot weights
        for s in (ta.search_scores(np.eye(len(experts))[i][:, None] * np.ones(shape), args.n)
                  for i in range(len(experts))):  # fmt: skip
            ref = {d: min(v, ref.get(d, v), key=lambda x: x.bits_per_byte) for d, v in s.items()}
    evals: list[tuple[list[list[float]], float, float, float]] = []

    def loss(w: np.ndarray) -> float:
        t = time.perf_counter()
        s = ta.search_scores(w, args.n)
        bpb = float(np.mean([v.bits_per_byte for v in s.values()]))
        ret = float(np.mean(list(retention(s, ref).values()))) if ref else float("nan")
        evals.append((np.round(w, 4).tolist(), bpb, ret, time.perf_counter() - t))
        log(f"eval {len(evals)}: {np.round(w, 3).tolist()} -> bpb {bpb:.4f} retention {ret:.4f}")
        return -ret if ref else bpb

    uniform = {lam: loss(np.full(shape, lam)) for lam in args.uniform}
    lam = min(uniform, key=uniform.__getitem__)
    res = cma_search(lambda w: -loss(w), np.full(shape, lam), args.sigma, args.generations,
                     args.popsize, seed=0, bounds=tuple(args.bounds), log=log)  # fmt: skip
    return {"objective": args.objective, "check_max_diff": check, "uniform_search": uniform,
            "best_uniform": lam, "searched": np.round(res.best, 4).tolist(),
            "searched_search": -res.best_value, "history": [-h for h in res.history],
            "evaluations": evals, "seconds": time.perf_counter() - t0}  # fmt: skip


def run_search(base: Path, experts: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """The search, then its best point merged on disk by `node.merge.api` and scored on `test`."""
    path = args.work / f"search{args.tag}.json"
    found = json.loads(path.read_text()) if path.exists() else cma_layerwise(base, experts, args)
    path.write_text(json.dumps(found, indent=2))
    out = args.work / f"searched{args.tag}"
    w = np.array(found["searched"])
    found["merge_seconds"] = run_merge(layer_recipe(base, experts, w, 30), out) or found.get(
        "merge_seconds", 0.0
    )
    path.write_text(json.dumps(found, indent=2))
    rows = {f"layer-wise CMA-ES{args.tag}": out}
    lam = float(found["best_uniform"])
    if lam != 1.0:  # λ = 1 is the task_arithmetic row already
        uni = args.work / f"uniform_{lam:g}"
        run_merge(layer_recipe(base, experts, np.full(w.shape, lam), 30), uni)
        rows[f"uniform λ = {lam:g}"] = uni
    return rows


def table(rows: dict[str, dict[str, Any]]) -> None:
    head = " ".join(f"{d:>12}" for d in DOMAINS)
    print(f"{'model':<22} {head} {'mean bpb':>9}  answer acc (arith, logic)")
    for name, s in rows.items():
        bpbs = [s[d]["bits_per_byte"] for d in DOMAINS]
        cells = " ".join(f"{b:>12.4f}" for b in bpbs)
        acc = [s[d]["answer_accuracy"] for d in ("arithmetic2", "logic64")]
        print(f"{name:<22} {cells} {np.mean(bpbs):>9.4f}  {acc[0]:.3f}, {acc[1]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=Path("bench/_work/real/smollm2"))
    ap.add_argument("--work", type=Path, default=Path("bench/_work/real/merge"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tokens-per-batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=24, help="held-out tasks per domain (texts: n/4)")
    ap.add_argument("--grid", action="store_true", help="also run the layer-wise grid")
    ap.add_argument("--jobs", type=int, default=5, help="steps run side by side")
    ap.add_argument("--search", action="store_true", help="also run the CMA-ES layer-wise search")
    ap.add_argument("--groups", type=int, default=4, help="layer groups of the search")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--popsize", type=int, default=6)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--uniform", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the search")
    ap.add_argument("--bounds", type=float, nargs=2, default=[0.0, 1.5], help="weight range")
    ap.add_argument("--tag", default="", help="suffix of the search's output names")
    ap.add_argument("--objective", choices=["bpb", "retention"], default="bpb")
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
    if args.search:
        models.update(run_search(args.base, experts, args))
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
