"""What the dashboard shows about rounds: unit states, workers, failures, ETA, search scores.

Input is only what `node.rounds.records` verified (signed proposals, claims, results, scores)
and round specs fetched by hash; these functions are pure so they can be tested on their own.
"""

from __future__ import annotations

import math
from typing import Any

from node.rounds.records import UnitView, peer_of
from protocol.records import RoundProposal


def unit_state(view: UnitView) -> str:
    """done (results agree), conflict (results differ), claimed (live claim), or open."""
    hashes = set(view.results.values())
    if len(hashes) > 1:
        return "conflict"
    if hashes:
        return "done"
    return "claimed" if view.claims else "open"


def round_summary(
    proposal: RoundProposal,
    proposer: str,
    views: dict[int, UnitView],
    mode: str | None,
    result_expert: str | None,
    now_ms: float,
) -> dict[str, Any]:
    """One round as plain data (the `rounds[]` entry of the snapshot)."""
    states = [unit_state(views[u]) for u in sorted(views)]
    counts = {s: states.count(s) for s in ("open", "claimed", "done", "conflict")}
    workers = sorted({peer_of(o) for v in views.values() for o in (*v.claims, *v.results)})
    verified = sum(1 for v in views.values() if len(v.results) >= 2 and unit_state(v) == "done")
    n = max(1, proposal.n_units)
    return {
        "round_id": proposal.round_id.hex(),
        "kind": proposal.kind,
        "mode": mode,
        "method": proposal.method,
        "proposer": proposer,
        "inputs": [e.hex() for e in proposal.inputs],
        "domains": list(proposal.domains),
        "n_units": proposal.n_units,
        "deadline_ms": proposal.deadline_ms,
        "units": counts,
        "unit_states": states,
        "unit_workers": [unit_workers(views[u]) for u in sorted(views)],
        "progress": counts["done"] / n,
        "workers": workers,
        "failures": counts["conflict"],
        "verified_units": verified,
        "eta_s": eta_seconds(views, counts, len(workers)),
        "result_expert": result_expert,
        "status": _status(counts, n, result_expert, proposal.deadline_ms, now_ms),
    }


def unit_workers(view: UnitView) -> list[dict[str, Any]]:
    """Who worked on one unit: each peer with a result (its hash prefix and time) or a claim."""
    out = [
        {"peer": peer_of(o), "result": h.hex()[:12], "ms": view.result_ms.get(o)}
        for o, h in sorted(view.results.items())
    ]
    out += [
        {"peer": peer_of(o), "result": None, "ms": None}
        for o in sorted(view.claims)
        if o not in view.results
    ]
    return out


def eta_seconds(views: dict[int, UnitView], counts: dict[str, int], workers: int) -> float | None:
    """Remaining units x mean unit time / workers (None before the first result or when done)."""
    times = [ms for v in views.values() for ms in v.result_ms.values()]
    left = counts["open"] + counts["claimed"] + counts["conflict"]
    if not times or left == 0:
        return None
    return round(left * (sum(times) / len(times)) / 1000.0 / max(1, workers), 1)


def _status(
    counts: dict[str, int], n: int, result: str | None, deadline_ms: int, now_ms: float
) -> str:
    if result is not None:
        return "finished"
    if counts["done"] == n:
        return "assembling"
    return "expired" if deadline_ms < now_ms else "running"


def with_scores(summary: dict[str, Any], means: list[float | None]) -> dict[str, Any]:
    """A search generation: a unit is a candidate, done once some peer scored it."""
    states = ["done" if m is not None else "open" for m in means]
    done = states.count("done")
    n = max(1, len(states))
    return {
        **summary,
        "unit_states": states,
        "unit_workers": [[] for _ in states],  # scorers are not shown per candidate
        "units": {"open": len(states) - done, "claimed": 0, "done": done, "conflict": 0},
        "progress": done / n,
        "status": "finished" if done == len(states) else summary["status"],
    }


def candidate_means(scores: list[list[float]]) -> list[float | None]:
    """Mean score per candidate (None for a candidate nobody scored yet)."""
    return [sum(s) / len(s) if s else None for s in scores]


def search_progress(generations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group search-generation rounds by proposer; each gets its best score per generation.

    Each input: {round_id, proposer, deadline_ms, means: [float|None per candidate]}.
    Scores are bits per byte: lower is better.
    """
    by_proposer: dict[str, list[dict[str, Any]]] = {}
    for g in sorted(generations, key=lambda g: (g["deadline_ms"], g["round_id"])):
        scored = [m for m in g["means"] if m is not None and math.isfinite(m)]
        by_proposer.setdefault(g["proposer"], []).append(
            {
                "round_id": g["round_id"],
                "candidates": len(g["means"]),
                "scored": len(scored),
                "best": min(scored) if scored else None,
            }
        )
    out = []
    for proposer, gens in by_proposer.items():
        bests = [g["best"] for g in gens if g["best"] is not None]
        out.append(
            {
                "proposer": proposer,
                "generations": gens,
                "best": min(bests) if bests else None,
            }
        )
    return out
