"""Layer-wise merge coefficients: task-arithmetic recipes with one weight per (expert, layer
group), scored by retention of every expert's skills, and a CMA-ES search over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.zoo.scores import TASKS, Score

Objective = Callable[[np.ndarray], float]


def layer_recipe(
    base: Path, experts: Sequence[Path], weights: np.ndarray, n_layers: int
) -> dict[str, Any]:
    """Task arithmetic with a per-layer table per expert.

    `weights` is (experts, groups): groups split the layers into equal consecutive runs; the
    last column also weights embeddings, final norm and lm_head (the table's `default`).
    """
    n_groups = weights.shape[1]
    group_of = [min(i * n_groups // n_layers, n_groups - 1) for i in range(n_layers)]
    models = []
    for path, row in zip(experts, weights, strict=True):
        table = {
            "layers": [round(float(row[g]), 6) for g in group_of],
            "default": round(float(row[-1]), 6),
        }
        models.append({"model": str(path), "parameters": {"weight": table}})
    return {"merge_method": "task_arithmetic", "base_model": str(base), "models": models,
            "dtype": "float32"}  # fmt: skip


def retention(
    scores: Mapping[str, Score], reference: Mapping[str, Score], metric: str = "bpb"
) -> dict[str, float]:
    """Per domain, the share of the reference's score kept (1.0 = as good as the reference).

    `bpb`: reference bits per byte over ours (steady; the search objective). `skill`: answer
    accuracy for tasks, bits per byte for texts.
    """
    out = {}
    for domain, ref in reference.items():
        mine = scores[domain]
        if metric == "skill" and domain in TASKS:
            assert ref.answer_accuracy is not None and mine.answer_accuracy is not None
            out[domain] = mine.answer_accuracy / max(ref.answer_accuracy, 1e-9)
        else:
            out[domain] = ref.bits_per_byte / mine.bits_per_byte
    return out


def gain_kept(merged: Score, expert: Score, base: Score) -> float:
    """Share of the expert's bits-per-byte gain over the base that the merge keeps."""
    return (base.bits_per_byte - merged.bits_per_byte) / (base.bits_per_byte - expert.bits_per_byte)


@dataclass(frozen=True)
class SearchResult:
    best: np.ndarray
    best_value: float  # the search objective's value at `best`
    history: list[float]  # best value after each generation
    evaluations: int
    # with a held-back objective: its value for the start and each generation's best, and the
    # index of the one returned (0: the start point)
    holdout: list[float] | None = None
    picked: int = -1


def cma_search(
    objective: Objective,
    x0: np.ndarray,
    sigma: float,
    generations: int,
    popsize: int,
    seed: int,
    bounds: tuple[float, float] = (0.0, 1.5),
    log: Callable[[str], None] | None = None,
    holdout: Objective | None = None,
    margin: float = 0.0,
) -> SearchResult:
    """Maximise `objective` with CMA-ES (the `cma` package), seeded, bounded, fixed budget.

    With `holdout` (the same measure on data the search never sees), the start point and each
    generation's best are scored on it too and the best of those by `holdout` is returned
    (the start on a tie): a search that only chased the noise of its own data gives back its
    start instead of an over-fit point. With `margin`, a generation's best must beat the start
    on `holdout` by more than `margin` to be returned (differences smaller than one held-back
    item can move the measure are noise).
    """
    import cma

    opts = {"seed": seed + 1, "popsize": popsize, "bounds": list(bounds), "verbose": -9}
    es = cma.CMAEvolutionStrategy(list(x0.ravel()), sigma, opts)
    # the start and each generation's best: (point, objective value)
    candidates, history, n = [(x0.ravel().copy(), objective(x0))], [], 1
    for gen in range(generations):
        xs = es.ask()
        values = [objective(np.asarray(x).reshape(x0.shape)) for x in xs]
        n += len(xs)
        es.tell(xs, [-v for v in values])  # cma minimises
        i = int(np.argmax(values))
        candidates.append((np.asarray(xs[i]).copy(), values[i]))
        history.append(max(v for _, v in candidates))
        if log:
            log(f"generation {gen + 1}/{generations}: best {history[-1]:.4f}")
    # the earliest of the best: by the search's own objective, or by the held-back one
    held = [holdout(x.reshape(x0.shape)) for x, _ in candidates] if holdout else None
    judge = held or [v for _, v in candidates]
    ahead = [k for k in range(1, len(judge)) if judge[k] > judge[0] + (margin if held else 0.0)]
    pick = max(ahead, key=lambda k: (judge[k], -k)) if ahead else 0
    if log and held:
        which = "the start" if pick == 0 else f"generation {pick}'s best"
        log(f"held-back objective: start {held[0]:.4f}; picked {which} ({held[pick]:.4f})")
    x, value = candidates[pick]
    return SearchResult(x.reshape(x0.shape), value, history, n, held, pick if held else -1)
