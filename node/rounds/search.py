"""`unode round search`: CMA-ES over per-layer-group and per-module merge weights (and densities).

Each generation is a search round whose spec lists the candidate recipes; peers score them on
their own held-out data (signed Score records, bits per byte: lower is better); the proposer
averages the scores, tells CMA-ES, and finally runs a merge round for the best recipe.

With `guard`, peers score each candidate on one fold of their held-out texts (the search
metric, which CMA-ES sees) and on the other fold (HELDBACK_METRIC, which it never sees). The
recipe kept is then the one, among the start and each generation's best, that is best on the
held-back fold (the start wins a tie), so a search that only fits its own texts returns the
start instead of an over-fitted recipe.

With `floor` (a share, e.g. .92), generation 0 also scores each searched expert alone (its
weight 1, the others' 0: the recipe's own method makes the expert itself). A (scorer, domain)
pair's reference is the best of those scores. A candidate whose bits per byte on a pair keep
less than `floor` of the reference (reference / candidate < floor) is penalised: its score is
its mean times 1 + FLOOR_PENALTY x the sum of those shortfalls. So a recipe that wins on average
by giving up one peer's domain loses. The held-back fold is penalised the same way.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import UserError
from node.eval.floor import FLOOR_PENALTY, shortfall
from node.network.config import NetworkConfig
from node.network.service import BlobServer
from node.network.session import Session
from node.rounds import records
from node.rounds.propose import (
    MergeRoundConfig,
    Say,
    build_spec,
    publish_round,
    start_server,
    wait_for_expert,
    with_identity_session,
)
from node.rounds.spec import RoundSpec, candidate_id
from protocol.records import RoundProposal
from protocol.round_records import HELDBACK_METRIC, SCORE_METRIC

MODULES = ("self_attn", "mlp")  # filters per module class; other tensors get one more value
DENSITY_METHODS = (
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)


@dataclass(frozen=True)
class SearchConfig:
    """What `unode round search` was told."""

    recipe: dict[str, Any]
    budget: int = 16  # candidates evaluated in total
    population: int = 4
    groups: int = 2  # layer groups
    sigma: float = 0.15
    scorers: int = 1  # distinct peers that must score each candidate
    score_timeout: float = 300.0
    seed: int = 0
    merge: MergeRoundConfig | None = None  # the final merge round (None: do not merge)
    guard: bool = False  # pick among generation bests on a held-back fold (module doc)
    floor: float = 0.0  # penalise giving up an expert's domain below this share (module doc)


@dataclass(frozen=True)
class Space:
    """Which recipe value each coordinate of the search vector sets."""

    models: tuple[int, ...]  # indexes in recipe["models"] that are searched (not the base)
    params: tuple[str, ...]  # "weight" and, for sparsifying methods, "density"
    groups: int
    n_layers: int

    @property
    def per_param(self) -> int:
        return self.groups * len(MODULES) + 1

    @property
    def dim(self) -> int:
        return len(self.models) * len(self.params) * self.per_param


def make_space(recipe: dict[str, Any], groups: int, n_layers: int) -> tuple[Space, list[float]]:
    models = recipe.get("models")
    if not isinstance(models, list) or not models:
        raise UserError("RECIPE", "models", "search needs a `models:` list recipe")
    base = recipe.get("base_model")
    idx = tuple(i for i, m in enumerate(models) if isinstance(m, dict) and m.get("model") != base)
    params = ("weight", "density") if recipe.get("merge_method") in DENSITY_METHODS else ("weight",)
    space = Space(idx, params, max(1, min(groups, n_layers)), n_layers)
    x0 = []
    for i in idx:
        given = (models[i].get("parameters") or {}) if isinstance(models[i], dict) else {}
        for p in params:
            start = given.get(p, 1.0 if p == "density" else 1.0 / max(1, len(idx)))
            if not isinstance(start, int | float):
                raise UserError(
                    f"models[{i}].parameters.{p}", start, "start the search from a number"
                )
            x0 += [float(start)] * space.per_param
    return space, x0


def candidate(recipe: dict[str, Any], space: Space, x: list[float]) -> dict[str, Any]:
    """The recipe for search vector `x` (densities clipped to (0, 1], weights to [-1, 2])."""
    out = copy.deepcopy(recipe)
    k = 0
    for i in space.models:
        params = out["models"][i].setdefault("parameters", {})
        for p in space.params:
            vals = x[k : k + space.per_param]
            k += space.per_param
            lo, hi = (0.05, 1.0) if p == "density" else (-1.0, 2.0)
            vals = [round(min(hi, max(lo, float(v))), 6) for v in vals]
            setting: list[dict[str, Any]] = []
            for m, mod in enumerate(MODULES):
                g = vals[m * space.groups : (m + 1) * space.groups]
                per_layer = [
                    g[layer * space.groups // space.n_layers] for layer in range(space.n_layers)
                ]
                setting.append({"filter": mod, "value": {"layers": per_layer}})
            setting.append({"value": vals[-1]})
            params[p] = setting
    return out


Pair = tuple[bytes, str]  # (scorer, domain)
Scored = dict[Pair, float]  # (scorer, domain) -> bits per byte


def comparable_pairs(scored: list[Scored], scorers: int, final: bool = False) -> set[Pair] | None:
    """The (scorer, domain) pairs every candidate is judged on: those that every candidate has,
    once `scorers` peers are among them (None before). With `final` (the deadline has passed)
    they are the pairs of the peer that scored the most candidates (a candidate missing one is
    then unscored). No candidate is judged on easier held-out data than another."""
    common = set.intersection(*(set(s) for s in scored)) if scored else set()
    if len({owner for owner, _ in common}) >= scorers and common:
        return common
    if not final:
        return None
    # Past the deadline: judge on the pairs of the peer that scored the most candidates.
    counts: dict[bytes, int] = {}
    for s in scored:
        for owner in {o for o, _ in s}:
            counts[owner] = counts.get(owner, 0) + 1
    if not counts:
        return set()
    best = max(counts, key=lambda o: (counts[o], o))
    have = [{k for k in s if k[0] == best} for s in scored]
    return set.intersection(*(h for h in have if h))


def judged(scored: list[Scored], pairs: set[Pair]) -> list[Scored]:
    """Each candidate's scores on `pairs`; {} for a candidate that lacks one (unscored)."""
    return [{k: s[k] for k in pairs} if pairs and pairs <= set(s) else {} for s in scored]


def mean_of(s: Scored) -> float:
    return sum(s.values()) / len(s) if s else math.inf


def comparable_means(scored: list[Scored], scorers: int, final: bool = False) -> list[float] | None:
    """Mean score per candidate over `comparable_pairs` (inf for a candidate not scored on
    them); None while fewer than `scorers` peers have scored every candidate."""
    pairs = comparable_pairs(scored, scorers, final)
    return None if pairs is None else [mean_of(s) for s in judged(scored, pairs)]


def floored(s: Scored, refs: Scored, floor: float) -> float:
    """The search score: the mean, raised by FLOOR_PENALTY x the shortfall below `floor`."""
    return mean_of(s) * (1.0 + FLOOR_PENALTY * shortfall(s, refs, floor))


def references(scored: list[Scored]) -> Scored:
    """Per pair, the best (lowest) score of the experts scored alone."""
    refs: Scored = {}
    for s in scored:
        for k, v in s.items():
            refs[k] = min(v, refs.get(k, math.inf))
    return refs


async def collect(
    session: Session,
    network: str,
    rid: bytes,
    cands: list[dict[str, Any]],
    scorers: int,
    timeout: float,
    metrics: tuple[str, ...] = (SCORE_METRIC,),
) -> dict[str, list[Scored]]:
    """Per metric, each candidate's scores on the comparable pairs once `scorers` peers scored
    each (see `comparable_pairs`; {} for a candidate not scored in time, and for every candidate
    on a metric after the first that no scorer publishes). A scorer publishes one record per
    domain and metric, so the answer is taken only when two reads a second apart agree:
    otherwise a read between a scorer's records would judge the generation on part of its
    domains."""
    deadline = time.monotonic() + timeout
    last: dict[str, list[Scored]] | None = None
    while True:
        got = await asyncio.gather(
            *(records.scores(session.dht, network, rid, candidate_id(c)) for c in cands)
        )
        scored = {
            m: [
                {
                    (v.envelope.owner, v.record.domain): v.record.value
                    for v in f
                    if v.record.metric == m
                }
                for f in got
            ]
            for m in metrics
        }
        late = time.monotonic() > deadline
        pairs = {m: comparable_pairs(scored[m], scorers, final=late) for m in metrics}
        # A metric that no scorer publishes (nodes from before the guard) is not waited for.
        absent = {m for m in metrics[1:] if not any(scored[m])}
        ready = pairs[metrics[0]] is not None and all(
            pairs[m] is not None or m in absent for m in metrics[1:]
        )
        if ready and (late or scored == last):
            return {m: judged(scored[m], pairs[m] or set()) for m in metrics}
        last = scored if ready else None
        await asyncio.sleep(1.0)


async def score_generation(
    session: Session,
    net: NetworkConfig,
    server: BlobServer,
    first: RoundProposal,
    cands: list[dict[str, Any]],
    cfg: SearchConfig,
) -> dict[str, list[Scored]]:
    """Propose one generation as a search round and collect its scores per metric."""
    ids = tuple((candidate_id(c).hex(),) for c in cands)
    spec = RoundSpec(
        "search", cfg.recipe, ids, candidates=tuple(cands), name="search", guard=cfg.guard
    )
    deadline = int((time.time() + cfg.score_timeout) * 1000)
    proposal = RoundProposal(
        "merge",
        first.inputs,
        first.base,
        first.method,
        spec.hash(),
        first.seed,
        len(cands),
        deadline,
        first.domains,
    )
    await publish_round(session, net, server, spec, proposal)
    metrics = (SCORE_METRIC, HELDBACK_METRIC) if cfg.guard else (SCORE_METRIC,)
    return await collect(
        session, net.network, proposal.round_id, cands, cfg.scorers, cfg.score_timeout, metrics
    )


def guarded_pick(heldback: list[float]) -> int | None:
    """Index of the finalist (the start, then each generation's best) with the lowest
    held-back score, the earliest on a tie; None when no finalist has one."""
    finite = [(v, i) for i, v in enumerate(heldback) if math.isfinite(v)]
    return min(finite)[1] if finite else None


async def merge_best(
    session: Session,
    net: NetworkConfig,
    server: BlobServer,
    cfg: SearchConfig,
    best: dict[str, Any],
    tmp: Path,
    say: Say,
) -> tuple[str, str]:
    """A merge round for the best recipe; (round id, merged expert id)."""
    assert cfg.merge is not None
    mcfg = dataclasses.replace(cfg.merge, recipe=best)
    spec, proposal = await build_spec(session, net, mcfg, tmp / "experts")
    await publish_round(session, net, server, spec, proposal)
    rid = proposal.round_id
    say(f"unode: merging the best recipe in round {rid.hex()}")
    return rid.hex(), await wait_for_expert(session, net.network, rid, cfg.score_timeout, say)


def reference_candidates(recipe: dict[str, Any], space: Space) -> list[dict[str, Any]]:
    """Each searched expert alone: its weight 1 (and density 1), every other weight 0."""
    out = []
    for j in range(len(space.models)):
        x: list[float] = []
        for i in range(len(space.models)):
            for p in space.params:
                x += [1.0 if p == "density" else float(i == j)] * space.per_param
        out.append(candidate(recipe, space, x))
    return out


async def search(
    session: Session, net: NetworkConfig, cfg: SearchConfig, tmp: Path, say: Say
) -> dict[str, Any]:
    import cma

    base_cfg = MergeRoundConfig(cfg.recipe, mode="search")
    spec0, proposal0 = await build_spec(session, net, base_cfg, tmp / "experts")
    n_layers = sum(1 for u in spec0.units)  # one unit per layer by default
    space, x0 = make_space(cfg.recipe, cfg.groups, n_layers)
    server = await start_server(session, net.network)
    es = cma.CMAEvolutionStrategy(
        x0, cfg.sigma, {"popsize": cfg.population, "seed": cfg.seed + 1, "verbose": -9}
    )
    history: list[dict[str, Any]] = []
    finalists: list[dict[str, Any]] = []  # the start, then each generation's best
    recipes: dict[str, dict[str, Any]] = {}  # candidate id -> recipe, for the finalists
    refs: dict[str, Scored] = {}  # per metric, the experts' best score per pair (`floor`)
    alone: list[dict[str, Any]] = []
    generation = 0
    while len(history) < cfg.budget:
        xs = es.ask()
        cands = [candidate(cfg.recipe, space, list(x)) for x in xs]
        extra: list[dict[str, Any]] = []
        if generation == 0:
            cands[0] = candidate(cfg.recipe, space, x0)  # score the starting point too
            extra = reference_candidates(cfg.recipe, space) if cfg.floor > 0 else []
        got = await score_generation(session, net, server, proposal0, extra + cands, cfg)
        if extra:  # the floor's references: each expert alone, scored with generation 0
            refs = {m: references(v[: len(extra)]) for m, v in got.items()}
            firsts = got[SCORE_METRIC][: len(extra)]
            for i, (c, mine) in enumerate(zip(extra, firsts, strict=True)):
                name = cfg.recipe["models"][space.models[i]].get("model")
                alone.append({"model": name, "candidate": candidate_id(c).hex(),
                              "score": mean_of(mine)})  # fmt: skip
            got = {m: v[len(extra) :] for m, v in got.items()}
            say("unode: floor references (each expert alone): "
                + ", ".join(f"{a['score']:.4f}" for a in alone))  # fmt: skip
        # Without a floor there are no references, and a floored score is the mean.
        scores = [floored(s, refs.get(SCORE_METRIC, {}), cfg.floor) for s in got[SCORE_METRIC]]
        held = (
            [floored(s, refs.get(HELDBACK_METRIC, {}), cfg.floor) for s in got[HELDBACK_METRIC]]
            if cfg.guard
            else None
        )
        es.tell(xs, [s if math.isfinite(s) else 1e9 for s in scores])
        for c, s, raw in zip(cands, scores, got[SCORE_METRIC], strict=True):
            row = {"generation": generation, "candidate": candidate_id(c).hex(), "score": s}
            if cfg.floor > 0:
                row |= {"mean": mean_of(raw),
                        "shortfall": shortfall(raw, refs.get(SCORE_METRIC, {}), cfg.floor)}  # fmt: skip
            history.append(row)
        picks = [0] if generation == 0 else []
        picks.append(min(range(len(cands)), key=lambda i: (scores[i], i)))
        for i in picks:
            cid = candidate_id(cands[i]).hex()
            recipes[cid] = cands[i]
            finalists.append(
                {
                    "generation": "start" if not finalists else generation,
                    "candidate": cid,
                    "score": scores[i],
                    "heldback": held[i] if held else None,
                }
            )
        line = f"unode: search generation {generation}: best {min(scores):.4f}"
        if cfg.guard:
            line += f", held back {finalists[-1]['heldback']:.4f}"
        say(f"{line} (start {finalists[0]['score']:.4f})")
        generation += 1
    # Unguarded: the best score (earliest on a tie), i.e. the best generation best.
    chosen = min(range(len(finalists)), key=lambda i: (finalists[i]["score"], i))
    if cfg.guard:
        picked = guarded_pick([f["heldback"] for f in finalists])
        if picked is None:
            say("unode: no peer scored a held-back fold; the guard falls back to the search score")
        else:
            chosen = picked
            f = finalists[chosen]
            which = "the start" if chosen == 0 else f"generation {f['generation']}'s best"
            say(
                f"unode: the guard keeps {which}: held back {f['heldback']:.4f} "
                f"(start {finalists[0]['heldback']:.4f})"
            )
    best = finalists[chosen]
    out: dict[str, Any] = {
        "start_score": finalists[0]["score"],
        "best_score": best["score"],
        "best_recipe": recipes[best["candidate"]],
        "evaluated": len(history),
        "history": history,
        "expert_id": None,
    }
    if cfg.guard:
        out["guard"] = {
            "metric": HELDBACK_METRIC,
            "picked": best["generation"],
            "start_heldback": finalists[0]["heldback"],
            "best_heldback": best["heldback"],
            "finalists": finalists,
        }
    if cfg.floor > 0:
        out["floor"] = {"floor": cfg.floor, "penalty": FLOOR_PENALTY, "references": alone}
    if cfg.merge is not None:
        rid, eid = await merge_best(session, net, server, cfg, out["best_recipe"], tmp, say)
        out.update(round_id=rid, expert_id=eid)
    return out


def run_search(net: NetworkConfig, cfg: SearchConfig, say: Say) -> dict[str, Any]:
    return with_identity_session(net, lambda session, tmp: search(session, net, cfg, tmp, say))
