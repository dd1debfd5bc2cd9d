"""Evidence that the zoo's experts merge and fuse well, measured (docs/zoo.md records a run).

(a) a layer-wise merge keeps >= 90% of each expert's in-domain score; (b) it beats every
expert on the two-skill task (arithlogic: a sum and a boolean expression in one prompt), and
in bits per byte on documents that need two text skills (prose and python in one document);
(c) CMA-ES-searched layer-wise coefficients beat the best uniform coefficient, both chosen on
the `search` half of the held-out split and compared on the `test` half (guarded: CMA-ES
runs on one fold of the search half and its pick is made on the other; `--no-guard` searches
it all; the objective loses 4x the shortfall of any expert's in-domain bits per byte kept
below `--floor`, .92 by default); (d) a heterogeneous target fused from the experts
(lambda*CLM + (1-lambda)*fusion) beats its own CLM-only training (lambda = 1: same steps,
data, seed) on per-domain bits per byte.

    .venv/bin/python bench/zoo_evidence.py [--zoo DIR] [--generations 6] [--popsize 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.eval import corpora
from node.eval.corpora import Example
from node.eval.floor import FLOOR_PENALTY, shortfall
from node.eval.metrics import nll_and_bytes
from node.merge.api import merge
from node.zoo import build, default_dir, load_manifest
from node.zoo.scores import (
    TASKS,
    Score,
    answer_hits,
    heldout,
    load,
    score_dir,
    two_skill_documents,
)
from node.zoo.search import cma_search, gain_kept, layer_recipe, retention

DOMAINS = ("arithmetic", "logic", "arithlogic", "python", "prose")
IN_DOMAIN = {"arith": ("arithmetic",), "code": ("logic", "python"), "prose": ("prose",)}
UNIFORM_GRID = (0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
PAIRED_POOL = 12_000  # test-half two-skill examples drawn; about 2,600 distinct among them


class Zoo:
    """Paths and cached test-half scores of one built zoo."""

    def __init__(self, root: Path, n: int, n_search: int, work: Path, n_paired: int = 0) -> None:
        self.root, self.n, self.n_search, self.work = root, n, n_search, work
        self.n_paired = n_paired  # distinct test-half two-skill prompts for (b)'s paired test
        self.made: dict[str, Path] = {}  # recipe (JSON) -> merged model
        self.scored: dict[tuple[Path, str, bool], dict[str, Score]] = {}
        self.experts = [root / name for name in IN_DOMAIN]
        self.n_layers = int(
            json.loads((root / "base" / "config.json").read_text())["num_hidden_layers"]
        )

    def merged(self, weights: np.ndarray) -> Path:
        """The merge for `weights`, made once (the guard and the test half ask again)."""
        recipe = layer_recipe(self.root / "base", self.experts, weights, self.n_layers)
        key = json.dumps(recipe, sort_keys=True)
        if key not in self.made:
            self.made[key] = self.work / f"m{len(self.made) + 1}"
            merge(recipe, self.made[key], progress=False)
        return self.made[key]

    @functools.cached_property
    def paired_prompts(self) -> list[Example]:
        """Distinct test-half two-skill prompts, in the generator's order: all of them (about
        2,600) unless `n_paired` caps it. The generator repeats prompts; a paired test counts
        each once. Drawn once: the merge, the base and every expert are scored on them."""
        seen: dict[str, Example] = {}
        for e in heldout("arithlogic", PAIRED_POOL, "test"):
            seen.setdefault(e.text, e)
        items = list(seen.values())
        return items[: self.n_paired] if self.n_paired > 0 else items

    def both_right(self, model_dir: Path) -> np.ndarray:
        """Per paired prompt, whether both halves of the answer are right (teacher-forced)."""
        model, tok = load(model_dir)
        with torch.no_grad():
            hits = answer_hits(model, tok, self.paired_prompts)
        return np.array([all(h) for h in hits])

    def n_of(self, half: str) -> int:
        """Task examples scored on `half` (a fold of the search half gets half of it)."""
        return {"search": self.n_search, "test": self.n}.get(half, self.n_search // 2)

    def score(self, weights: np.ndarray, half: str, em: bool) -> dict[str, Score]:
        """The merge for `weights` scored on `half`, once (a start the search keeps, or the
        uniform merge it returns, is asked for again)."""
        key = (self.merged(weights), half, em)
        if key not in self.scored:
            self.scored[key] = score_dir(key[0], DOMAINS, self.n_of(half), half, em)  # type: ignore[arg-type]
        return self.scored[key]

    def experts_on(self, half: str) -> dict[str, dict[str, Score]]:
        return {p.name: score_dir(p, DOMAINS, self.n_of(half), half, em=False)  # type: ignore[arg-type]
                for p in self.experts}  # fmt: skip


@dataclass(frozen=True)
class Objective:
    """The search objective: per domain, the share of the best expert's score kept (bits per
    byte for texts, answer accuracy for tasks, both halves right for the two-skill task),
    averaged over the domains, the two-skill term weighted by `two_skill_weight`; `task_bpb`
    (`--task-bpb`) adds the task domains' bits per byte kept as terms of their own.
    """

    best: dict[str, Score]
    two_skill_weight: float = 1.0
    task_bpb: Mapping[str, float] = field(default_factory=dict)  # domain -> best expert's
    # `--floor`: minus FLOOR_PENALTY x (floor - kept) for each expert's in-domain bits per byte
    # kept below `floor` (claim (a)'s measure, so the search respects its threshold)
    floor: float = 0.0
    in_domain_bpb: Mapping[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def of(cls, experts: dict[str, dict[str, Score]], args: argparse.Namespace) -> Objective:
        """The objective against these experts' scores (all on the same half)."""
        bpb = {d: min(sc[d].bits_per_byte for sc in experts.values())
               for d in TASKS if d != "arithlogic"} if args.task_bpb else {}  # fmt: skip
        own = {(e, d): experts[e][d].bits_per_byte for e, ds in IN_DOMAIN.items() for d in ds}
        return cls(best_expert(experts), args.two_skill_weight, bpb, args.floor, own)

    def shortfall(self, scores: dict[str, Score]) -> float:
        """Sum over experts' in-domain bits per byte of how far the share kept is below the
        floor (0 when every one is at or above it): the network search's rule, per expert."""
        mine = {(e, d): scores[d].bits_per_byte for e, d in self.in_domain_bpb}
        return shortfall(mine, self.in_domain_bpb, self.floor)

    @functools.cached_property
    def weights(self) -> dict[str, float]:
        """The weight of each term of the mean: a domain, or `domain:bpb` for `task_bpb`."""
        out = {d: self.two_skill_weight if d == "arithlogic" else 1.0 for d in self.best}
        return out | {f"{d}:bpb": 1.0 for d in self.task_bpb}

    def one_prompt(self, n: int) -> float:
        """How much one of `n` two-skill prompts moves the objective (the least any held-back
        item can move it): the guard's default margin."""
        parts = self.best["arithlogic"].parts
        assert parts is not None
        share = self.weights["arithlogic"] / sum(self.weights.values())
        return share / (n * max(parts[2], 1e-9))

    def __call__(self, scores: dict[str, Score]) -> float:
        kept = retention(scores, self.best, "skill")
        mine, ref = scores["arithlogic"].parts, self.best["arithlogic"].parts
        assert mine is not None and ref is not None
        kept["arithlogic"] = mine[2] / max(ref[2], 1e-9)
        for d, ref_bpb in self.task_bpb.items():
            kept[f"{d}:bpb"] = ref_bpb / scores[d].bits_per_byte
        w = self.weights
        mean = sum(w[d] * v for d, v in kept.items()) / sum(w.values())
        return mean - FLOOR_PENALTY * self.shortfall(scores)


def best_expert(expert_scores: dict[str, dict[str, Score]]) -> dict[str, Score]:
    """Per domain, the best single expert's score (the reference a merge must keep)."""

    def key(s: Score) -> float:
        if s.parts is not None:
            return s.parts[2]
        if s.domain in TASKS and s.answer_accuracy is not None:
            return s.answer_accuracy
        return -s.bits_per_byte

    return {d: max((sc[d] for sc in expert_scores.values()), key=key) for d in DOMAINS}


def fmt_row(name: str, sc: dict[str, Score]) -> str:
    cells = []
    for d in DOMAINS:
        s = sc[d]
        task = (
            f" / {s.answer_accuracy:.3f} / {s.exact_match:.3f}"
            if s.answer_accuracy is not None
            else ""
        )
        parts = " / {:.3f} / {:.3f}".format(*s.parts[:2]) if s.parts else ""
        cells.append(f"{s.bits_per_byte:.3f}{task}{parts}")
    return f"| {name} | " + " | ".join(cells) + " |"


def _per_expert(test: dict[str, dict[str, Score]], merged: str, metric: str) -> dict[str, Any]:
    return {
        e: {d: round(retention(test[merged], test[e], metric)[d], 3) for d in ds}
        for e, ds in IN_DOMAIN.items()
    }


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p of b vs c discordant pairs (binomial, p = 1/2)."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n) if n else 1.0


def paired_two_skill(zoo: Zoo, merged: Path) -> dict[str, Any]:
    """Claim (b), paired: the merge against each single expert and the base on the same
    distinct two-skill prompts of the test half (both halves right), with an exact McNemar p
    against each; `expert` names the best of them on these prompts."""
    mine = zoo.both_right(merged)
    others = {p.name: zoo.both_right(p) for p in [zoo.root / "base", *zoo.experts]}
    out: dict[str, Any] = {"n": len(mine), "merge": round(float(mine.mean()), 4)}
    for name, theirs in others.items():
        b, c = int((mine & ~theirs).sum()), int((theirs & ~mine).sum())
        out[name] = {"share": round(float(theirs.mean()), 4), "only_merge": b,
                     "only_other": c, "exact_mcnemar_p": float(f"{exact_mcnemar(b, c):.3g}")}  # fmt: skip
    out["expert"] = max(IN_DOMAIN, key=lambda e: (out[e]["share"], e))
    return out


def documents_two_skill(zoo: Zoo, merges: dict[str, Path]) -> dict[str, Any]:
    """Claim (b) on texts: bits per byte of documents that need two text skills (a piece of a
    prose text and the start of a python text of the test half in one document, both orders;
    `two_skill_documents`: 300 documents at n = 300). Each merge against the base
    and each expert: bits per byte over all the documents, and how many documents it does
    better on than the best expert (by that), with an exact sign-test p."""
    docs = two_skill_documents(max(zoo.n // 4, 16), "test")
    per: dict[str, np.ndarray] = {}  # bits per byte of each document
    means: dict[str, float] = {}
    for name, path in [("base", zoo.root / "base"), *[(p.name, p) for p in zoo.experts],
                       *merges.items()]:  # fmt: skip
        nll, n_bytes = map(np.array, nll_and_bytes(*load(path), docs))
        per[name] = nll / math.log(2) / n_bytes
        means[name] = round(float(nll.sum() / math.log(2) / n_bytes.sum()), 4)
    best = min(IN_DOMAIN, key=lambda e: (means[e], e))
    out: dict[str, Any] = {"n": len(docs), "bpb": means, "expert": best}
    for name in merges:
        b = int((per[name] < per[best]).sum())
        c = int((per[best] < per[name]).sum())
        out[name] = {
            "better_than_expert": b,
            "worse": c,
            "sign_p": float(f"{exact_mcnemar(b, c):.3g}"),
        }
    return out


Start = tuple[str | None, float]  # (the expert left out, or None for all; lambda)


def start_points(names: list[str], groups: int, multi: bool) -> dict[Start, np.ndarray]:
    """Candidate starts of the search: every expert at each uniform lambda (`(None, lam)`)
    and, with `multi`, each set that leaves one expert out (`(name, lam)`: its weights 0, the
    others' lam). The search starts from the best of them on the search half; claim (c) still
    compares against the best uniform lambda alone."""
    left_out = [None, *names] if multi and len(names) > 2 else [None]
    out = {}
    for name in left_out:
        for lam in UNIFORM_GRID:
            out[(name, lam)] = np.array([[0.0 if e == name else lam] * groups for e in names])
    return out


def label(start: Start) -> str:
    return f"{'all' if start[0] is None else 'without ' + start[0]} lambda={start[1]}"


def merge_evidence(zoo: Zoo, args: argparse.Namespace) -> dict[str, Any]:
    groups = zoo.n_layers + 1
    test = {p.name: score_dir(p, DOMAINS, zoo.n, "test") for p in [zoo.root / "base", *zoo.experts]}
    for name, sc in test.items():
        print(fmt_row(name, sc), flush=True)
    on_search = Objective.of(zoo.experts_on("search"), args)
    names = [p.name for p in zoo.experts]
    starts = start_points(names, groups, args.multi_start)
    on_start = {k: on_search(zoo.score(w, "search", em=False)) for k, w in starts.items()}
    uniform = {lam: v for (out, lam), v in on_start.items() if out is None}
    lam = max(uniform, key=lambda k: uniform[k])
    print(f"uniform search-half objective: {uniform} -> best lambda {lam}", flush=True)
    start = max(on_start, key=lambda k: on_start[k])  # the first of the best: uniform on a tie
    print(f"search starts from {label(start)} ({on_start[start]:.4f})", flush=True)

    def on(objective: Objective, half: str) -> Callable[[np.ndarray], float]:
        return lambda w: objective(zoo.score(w, half, em=False))

    # the guard (default): CMA-ES on fold a of the search half; the start and each
    # generation's best are then scored on fold b, and the best there is kept if it beats the
    # start by more than the margin (default: what one of fold b's two-skill prompts is worth)
    if args.guard:
        fold_a, fold_b = (Objective.of(zoo.experts_on(h), args) for h in ("search:a", "search:b"))
        margin = args.guard_margin
        if margin is None:
            margin = fold_b.one_prompt(zoo.n_of("search:b"))
        print(f"guard margin {margin:.4f}", flush=True)
        fit, holdout = on(fold_a, "search:a"), on(fold_b, "search:b")
    else:
        fit, holdout, margin = on(on_search, "search"), None, 0.0
    res = cma_search(fit, starts[start], args.sigma, args.generations, args.popsize, args.seed,
                     (0.0, args.max_weight), log=lambda m: print(m, flush=True), holdout=holdout,
                     margin=margin)  # fmt: skip
    test["uniform"] = zoo.score(starts[(None, lam)], "test", em=True)
    searched = zoo.merged(res.best)
    test["searched"] = zoo.score(res.best, "test", em=True)
    if start[0] is not None:  # the start alone on the test half, to show its share
        test["start"] = zoo.score(starts[start], "test", em=True)
    compared = [k for k in ("uniform", "start", "searched") if k in test]
    for name in compared:
        print(fmt_row(name, test[name]), flush=True)
    on_test = Objective.of({k: test[k] for k in IN_DOMAIN}, args)
    claims = {
        "a_retention_bpb": _per_expert(test, "searched", "bpb"),
        "a_retention_skill": _per_expert(test, "searched", "skill"),
        "a_gain_kept_bpb": {
            e: {
                d: round(gain_kept(test["searched"][d], test[e][d], test["base"][d]), 3) for d in ds
            }
            for e, ds in IN_DOMAIN.items()
        },
        "b_two_skill_em_acc_arith_logic_both": {
            k: [
                round(v, 4)
                for v in (
                    sc["arithlogic"].exact_match or 0.0,
                    sc["arithlogic"].answer_accuracy or 0.0,
                    *(sc["arithlogic"].parts or ()),
                )
            ]
            for k, sc in test.items()
        },
        "b_paired": paired_two_skill(zoo, searched),
        "b_documents": documents_two_skill(
            zoo,
            {
                "uniform": zoo.merged(starts[(None, lam)]),
                "searched": searched,
                # the two experts the documents need, plain task arithmetic (nothing tuned)
                "code+prose": zoo.merged(
                    np.array([[float(p.name in ("code", "prose"))] * groups for p in zoo.experts])
                ),
            },
        ),
        "c_objective_test": {k: round(on_test(test[k]), 4) for k in compared},
        # the same without `--floor`'s penalty (equal to the above when it is off)
        "c_objective_test_no_floor": {
            k: round(dataclasses.replace(on_test, floor=0.0)(test[k]), 4) for k in compared
        },
        "c_objective_search": {
            "uniform": round(uniform[lam], 4),
            "searched" + (" (fold a)" if args.guard else ""): round(res.best_value, 4),
        },
        # fold b's objective for the start and each generation's best; `picked` indexes it
        "c_guard": {
            "fold_b": [round(v, 4) for v in res.holdout],
            "margin": round(margin, 4),
            "picked": res.picked,
        }
        if res.holdout is not None
        else None,
        "uniform_lambda": lam,
        # where the search started: the best of `start_points` on the search half
        "c_start": {"from": label(start), "search_objective": round(on_start[start], 4)},
        "searched_weights": np.round(res.best, 3).tolist(),
        "evaluations": res.evaluations + len(starts),
    }
    return {"scores": test, "claims": claims}


def fusion_corpus(path: Path, per_domain: int) -> Path:
    texts = []
    for d in DOMAINS:
        texts += [
            e.text.strip().replace("\n\n", "\n") for e in corpora.load(d, per_domain, "train")
        ]
    path.write_text("\n\n".join(texts) + "\n")
    return path


def fusion_evidence(zoo: Zoo, args: argparse.Namespace) -> dict[str, Any]:
    from node.fusion.summaries import SummarySettings, summarize
    from node.fusion.train import FuseConfig, fuse

    target = next(p for p in sorted(zoo.root.iterdir()) if (p / "zoo_card.json").is_file()
                  and json.loads((p / "zoo_card.json").read_text())["role"] == "hetero")  # fmt: skip
    corpus = fusion_corpus(zoo.work / "fusion.txt", args.fusion_texts)
    sums = [zoo.work / f"sum-{e.name}" for e in zoo.experts]
    for e, s in zip(zoo.experts, sums, strict=True):
        summarize(e, corpus, s, SummarySettings(top_k=10, max_len=192), progress=False)
    out: dict[str, Any] = {
        "target": target.name,
        "before": score_dir(target, DOMAINS, zoo.n, "test", em=False),
    }
    for lam in (1.0, *args.lams):
        cfg = FuseConfig(target=target, summaries=sums, corpus=corpus, out=zoo.work / f"fused-{lam}",
                         lam=lam, lr=args.fuse_lr, batch_size=8, max_steps=args.fuse_steps, warmup=5,
                         max_len=192, seed=args.seed, progress=False, save_every=10**6)  # fmt: skip
        t0 = time.perf_counter()
        done = fuse(cfg)
        assert done is not None
        out[f"lam={lam}"] = score_dir(done, DOMAINS, zoo.n, "test", em=False)
        print(f"fused lambda={lam} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def print_tables(m: dict[str, Any], f: dict[str, Any]) -> None:
    print(
        "\n| model | "
        + " | ".join(f"{d} (bpb{' acc EM' if d in TASKS else ''})" for d in DOMAINS)
        + " |"
    )
    print("|---" * (len(DOMAINS) + 1) + "|")
    for name, sc in m["scores"].items():
        print(fmt_row(name, sc))
    print("\nfusion target", f["target"], "(bits per byte, test half)")
    for name in [k for k in f if k not in ("target",)]:
        print(
            f"| {name} | " + " | ".join(f"{f[name][d].bits_per_byte:.4f}" for d in DOMAINS) + " |"
        )
    print()
    for key, value in m["claims"].items():
        print(f"{key}: {json.dumps(value)}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--n", type=int, default=200, help="task examples per half (texts: n/4)")
    ap.add_argument("--n-search", type=int, default=None,
                    help="task examples of the search half (default: --n)")  # fmt: skip
    ap.add_argument("--n-paired", type=int, default=0,
                    help="distinct test-half two-skill prompts in (b)'s paired test "
                    "(default 0: all of them, about 2,600)")  # fmt: skip
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--task-bpb", action="store_true",
                    help="add the arithmetic and logic bits per byte kept to the objective")  # fmt: skip
    ap.add_argument("--two-skill-weight", type=float, default=1.0, help="in the objective")
    ap.add_argument(
        "--floor",
        type=float,
        default=0.92,
        help="penalise every expert's in-domain bits per byte kept below this share "
        "(.92: claim (a)'s .9 with a margin for the other half); 0: off (sessions 4-6)",
    )
    ap.add_argument("--no-guard", dest="guard", action="store_false",
                    help="search on the whole search half and keep its best (no held-back "
                    "fold; session 5's runs)")  # fmt: skip
    ap.add_argument("--guard-margin", type=float, default=None,
                    help="how much a generation's best must beat the start on the held-back "
                    "fold to be kept (default: what one of its two-skill prompts moves the "
                    "objective, about .01; 0: any gain, sessions 6-10)")  # fmt: skip
    ap.add_argument("--multi-start", action="store_true",
                    help="start the search from the best of the uniform lambdas and the "
                    "leave-one-expert-out merges at each lambda (default: the best uniform "
                    "lambda; docs/zoo.md, session 11)")  # fmt: skip
    ap.add_argument("--max-weight", type=float, default=1.5, help="upper bound of a weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fuse-steps", type=int, default=120)
    ap.add_argument("--fuse-lr", type=float, default=1e-3)
    ap.add_argument("--fusion-texts", type=int, default=64, help="per domain")
    ap.add_argument("--lams", type=float, nargs="*", default=[0.9, 0.5])
    ap.add_argument("--skip", choices=["merge", "fusion"], default=None)
    args = ap.parse_args()
    if args.guard_margin is not None and args.guard_margin < 0:
        ap.error(f"--guard-margin {args.guard_margin}: a margin is at least 0 (0: any gain)")
    torch.set_num_threads(1)
    zoo_dir = args.zoo or default_dir()
    root = Path((load_manifest(zoo_dir) or build(zoo_dir))["root"])  # any complete zoo will do
    with tempfile.TemporaryDirectory(prefix="zoo-evidence-") as tmp:
        zoo = Zoo(root, args.n, args.n_search or args.n, Path(tmp), args.n_paired)
        m = merge_evidence(zoo, args) if args.skip != "merge" else {"scores": {}, "claims": {}}
        f = fusion_evidence(zoo, args) if args.skip != "fusion" else {"target": "-"}
    print_tables(m, f)


if __name__ == "__main__":
    main()
