"""The drill-down pages: one expert (card, hosts, lineage, family) or one round (every unit,
its workers, verification, search scores)."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from node.dashboard.render import (
    UNIT_GLYPH,
    ViewState,
    footer,
    human_bytes,
    human_seconds,
    sparkline,
)


def _kv(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False, expand=True)
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    return t


def expert_detail(snap: dict[str, Any], expert_id: str, state: ViewState) -> RenderableType:
    e = next((x for x in snap["experts"] if x["expert_id"] == expert_id), None)
    if e is None:
        return Group(Text(f"expert {expert_id} is no longer served"), footer(state))
    family = next(f for f in snap["families"] if expert_id in f["experts"])
    made_by = next((r for r in snap["rounds"] if r["round_id"] == e["lineage"]), None)
    rows = [
        ("expert id", e["expert_id"]),
        ("name", e["name"]),
        ("architecture", e["architecture"]),
        ("domains", ", ".join(e["domains"])),
        ("parameters", f"{e['n_params']:,}"),
        ("size", human_bytes(e["nbytes"])),
        ("tokenizer", e["tokenizer_hash"]),
        ("license", e["license"]),
        ("base fingerprint", e["base_fingerprint"]),
        ("family members", str(len(family["experts"]))),
        (
            "eval scores",
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(e["eval_scores"].items())) or "-",
        ),
        ("lineage", _lineage(e["lineage"], made_by)),
    ]
    rows += [("hosted by", p) for p in e["providers"]]
    return Group(
        Text("Expert", style="bold"), _kv("Card (signed by each host)", rows), footer(state)
    )


def _lineage(lineage: str | None, made_by: dict[str, Any] | None) -> str:
    if lineage is None:
        return "root (not made by a round)"
    if made_by is None:
        return f"round {lineage} (its proposal has expired)"
    inputs = ", ".join(i[:12] for i in made_by["inputs"])
    return f"{made_by['mode'] or made_by['kind']} round {lineage} ({made_by['method']} of {inputs})"


def _worker(w: dict[str, Any]) -> str:
    """`…last8 hash ms`, or `…last8 claimed` (peer ids share their first characters)."""
    tail = f"…{w['peer'][-8:]}"
    if w["result"] is None:
        return f"{tail} claimed"
    return f"{tail} {w['result'][:8]}" + (f" {w['ms']}" if w["ms"] is not None else "")


def round_detail(snap: dict[str, Any], round_id: str, state: ViewState) -> RenderableType:
    r = next((x for x in snap["rounds"] if x["round_id"] == round_id), None)
    if r is None:
        return Group(Text(f"round {round_id} is no longer in the DHT"), footer(state))
    rows = [
        ("round id", r["round_id"]),
        ("kind / mode", f"{r['kind']} / {r['mode'] or '? (spec not fetched)'}"),
        ("method", r["method"]),
        ("proposer", r["proposer"]),
        ("inputs", ", ".join(i[:16] for i in r["inputs"])),
        ("status", r["status"]),
        ("progress", f"{r['units']['done']}/{r['n_units']} units, ETA {human_seconds(r['eta_s'])}"),
        ("failures", f"{r['failures']} units with conflicting results"),
        ("verified", f"{r['verified_units']} units with 2+ agreeing results"),
        ("result expert", r["result_expert"] or "-"),
    ]
    rows += [("worker", w) for w in r["workers"]]
    units = Table(title="Units", title_justify="left")
    units.add_column("unit")
    units.add_column("state")
    units.add_column("workers (result, ms)")
    who = r.get("unit_workers") or [[] for _ in r["unit_states"]]
    for i, (s, ws) in enumerate(list(zip(r["unit_states"], who, strict=False))[:64]):
        units.add_row(str(i), f"{UNIT_GLYPH[s]} {s}", ", ".join(map(_worker, ws)) or "-")
    parts: list[RenderableType] = [
        Text("Round", style="bold"),
        _kv("Proposal (signed)", rows),
        units,
    ]
    gens = [g for s in snap["search"] for g in s["generations"] if g["round_id"] == round_id]
    if gens:
        g = gens[0]
        parts.append(
            Text(
                f"search generation: {g['scored']}/{g['candidates']} candidates scored, best {g['best']}"
            )
        )
        allg = next(s for s in snap["search"] if g in s["generations"])["generations"]
        parts.append(Text("best per generation: " + sparkline([x["best"] for x in allg])))
    parts.append(footer(state))
    return Group(*parts)
