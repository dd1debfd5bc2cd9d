"""Per-tensor throughput of unode's merge methods vs mergekit 0.1.5's own method functions.

Runs both on the same fp32 tensors in one process, alternating, and prints M params/s and
ratios of wall and CPU time (unode / mergekit: below 1 is faster). Micro-benchmark of the
method functions only; bench/merge.py measures whole merges.

    .venv/bin/python bench/merge_methods.py [--rows 4096] [--cols 1024] [--repeat 3]

OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, unless set): on a shared, busy
machine spinning threads slow every multi-threaded torch op several times over. Both
sides run in this one process under the same setting.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from node.merge.methods import get_method
from node.merge.methods.base import MergeInputs, tensor_generator

MODELS = ("m0", "m1")
RECIPES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("linear", {}, {"weight": 0.5}),
    ("task_arithmetic", {}, {"weight": 0.5}),
    ("ties", {}, {"weight": 0.5, "density": 0.5}),
    ("dare_ties", {}, {"weight": 0.5, "density": 0.5}),
    ("dare_linear", {}, {"weight": 0.5, "density": 0.5}),
    ("breadcrumbs", {}, {"weight": 0.5, "density": 0.5, "gamma": 0.01}),
    ("breadcrumbs_ties", {}, {"weight": 0.5, "density": 0.5, "gamma": 0.01}),
    ("della", {}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
    ("della_linear", {}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
    ("sce", {"select_topk": 0.5}, {}),
    ("slerp", {"t": 0.4}, {}),
    ("nuslerp", {}, {"weight": 0.5}),
    ("multislerp", {}, {"weight": 0.5}),
    ("karcher", {}, {}),
    ("model_stock", {}, {}),
    ("ram", {}, {}),
    ("ramplus_tl", {}, {}),
    ("nearswap", {"t": 0.01}, {}),
    ("arcee_fusion", {}, {}),
]
TWO_INPUT = {"slerp", "nearswap", "arcee_fusion"}  # base + exactly one other model


def build_tensors(rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g)
    return {"base": base, **{m: base + 0.01 * torch.randn(rows, cols, generator=g) for m in MODELS}}


def runners(
    method: str, params: dict[str, Any], per_model: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    import mergekit.merge_methods as mk

    models = MODELS[:1] if method in TWO_INPUT else MODELS
    base_listed = method in {"linear", "karcher"}  # base is one more weighted input there
    keys = (*models, "base")
    model_params = {k: dict(per_model) for k in keys}
    inputs = MergeInputs(
        name="layer.weight",
        models=keys if base_listed else models,
        tensors=tensors,
        base=None if base_listed else "base",
        model_params=model_params,
        params=params,
        generator=tensor_generator(0, "layer.weight"),
    )
    ours = get_method(method)
    spec = mk.get(method).spec
    bound = dict(params)
    for p in spec.input_parameters:
        takers = [k for k in keys if p.scope.value == "input" or k != "base"]
        if p.name in per_model:
            bound[p.name] = {k: per_model[p.name] for k in takers}
    ref_base = None if base_listed else keys.index("base")
    return (
        lambda: ours.merge(inputs),
        lambda: mk.merge_tensors(
            [tensors[k] for k in keys], method, parameters=bound, ids=keys, base_index=ref_base
        ),
    )


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): CPU time is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tensors = build_tensors(args.rows, args.cols)
    params = args.rows * args.cols
    print(
        f"{params / 1e6:.1f} M params per tensor, 2 models + base, {torch.get_num_threads()}"
        f" threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(f"{'method':18} {'unode Mp/s':>10} {'mergekit':>9} {'wall ratio':>10} {'cpu ratio':>9}")
    for method, shared, per_model in RECIPES:
        if args.only and method not in args.only:
            continue
        ours, theirs = runners(method, shared, per_model, tensors)
        ours(), theirs()  # warm-up
        mine, reference = [], []
        for _ in range(args.repeat):  # alternate; best of N each
            mine.append(timed(ours))
            reference.append(timed(theirs))
        wall_a, wall_b = min(t[0] for t in mine), min(t[0] for t in reference)
        cpu_a, cpu_b = min(t[1] for t in mine), min(t[1] for t in reference)
        print(
            f"{method:18} {params / wall_a / 1e6:10.1f} {params / wall_b / 1e6:9.1f}"
            f" {wall_a / wall_b:10.2f} {cpu_a / cpu_b:9.2f}"
        )


if __name__ == "__main__":
    main()
