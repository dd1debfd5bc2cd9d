"""Draw a snapshot with rich: the overview (peers, experts by family, rounds, search) and the
drill-down pages of one expert or one round. Pure functions of (snapshot, view state)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

BARS = "▁▂▃▄▅▆▇█"
UNIT_GLYPH = {"done": "█", "claimed": "▒", "conflict": "✗", "open": "·"}
KEYS = "e experts · r rounds · j/k or ↑/↓ move · Enter details · b back · q quit"


@dataclass
class ViewState:
    """What the user is looking at: which list has the cursor, and an open detail page."""

    focus: str = "experts"  # "experts" | "rounds"
    index: int = 0
    detail: tuple[str, str] | None = None  # ("expert" | "round", id)
    error: str = ""


def sparkline(values: list[float | None], lower_is_better: bool = True) -> str:
    """One bar per value, scaled between min and max (a gap for a missing value)."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
            continue
        frac = 0.0 if hi == lo else (v - lo) / (hi - lo)
        out.append(BARS[round(frac * (len(BARS) - 1))])
    return "".join(out)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def short(hex_or_peer: str, n: int = 12) -> str:
    return hex_or_peer[:n] if len(hex_or_peer) <= 16 else hex_or_peer[:n] + "…"


def header(snap: dict[str, Any], refresh: float) -> Text:
    when = time.strftime("%H:%M:%S", time.localtime(snap["taken_at"]))
    return Text.assemble(
        ("unode dashboard", "bold"),
        f"  network {snap['network']} · {len(snap['peers'])} peers · "
        f"{len(snap['experts'])} experts · {len(snap['rounds'])} rounds · "
        f"updated {when} (every {refresh:g}s) · every record signature-verified",
    )


def peers_table(snap: dict[str, Any]) -> Table:
    t = Table(title="Peers", title_justify="left", expand=True)
    for col in ("peer", "address", "uptime", "experts", "served/s", "served", "fetched"):
        t.add_column(col, no_wrap=True)
    for p in snap["peers"]:
        s = p["stats"]
        t.add_row(
            p["peer_id"],
            p["maddrs"][0] if p["maddrs"] else "-",
            human_seconds(s["uptime_s"]) if s else "?",
            str(len(p["experts"])),
            human_bytes(s["served_bps"]) + "/s" if s else "?",
            human_bytes(s["bytes_served"]) if s else "?",
            human_bytes(s["bytes_fetched"]) if s else "?",
        )
    return t


def experts_table(snap: dict[str, Any], state: ViewState) -> Table:
    t = Table(title="Experts by family", title_justify="left", expand=True)
    for col in (
        "family",
        "expert",
        "name",
        "arch",
        "domain",
        "params",
        "size",
        "tokenizer",
        "eval",
        "lineage",
        "hosts",
    ):
        t.add_column(col, no_wrap=True)  # fmt: skip
    for i, e in enumerate(ordered_experts(snap)):
        evals = " ".join(f"{k}={v:.3g}" for k, v in sorted(e["eval_scores"].items())) or "-"
        selected = state.focus == "experts" and state.index == i
        t.add_row(
            short(e["base_fingerprint"], 8),
            e["expert_id"][:16],
            e["name"],
            e["architecture"],
            ",".join(e["domains"]),
            f"{e['n_params'] / 1e6:.2f}M",
            human_bytes(e["nbytes"]),
            short(e["tokenizer_hash"], 8),
            evals,
            short(e["lineage"], 8) if e["lineage"] else "root",
            str(len(e["providers"])),
            style="reverse" if selected else None,
        )
    return t


def ordered_experts(snap: dict[str, Any]) -> list[dict[str, Any]]:
    """Experts in display order: by family, then domain, then id."""
    by_id = {e["expert_id"]: e for e in snap["experts"]}
    out = []
    for fam in snap["families"]:
        out += sorted(
            (by_id[i] for i in fam["experts"]), key=lambda e: (e["domains"], e["expert_id"])
        )
    return out


def rounds_table(snap: dict[str, Any], state: ViewState) -> Table:
    t = Table(title="Rounds", title_justify="left", expand=True)
    for col in (
        "round",
        "kind",
        "method",
        "units",
        "progress",
        "workers",
        "ETA",
        "failures",
        "verified",
        "status",
    ):
        t.add_column(col, no_wrap=True)  # fmt: skip
    for i, r in enumerate(snap["rounds"]):
        bar = "".join(UNIT_GLYPH[s] for s in r["unit_states"][:40])
        t.add_row(
            r["round_id"][:12],
            r["mode"] or r["kind"],
            r["method"],
            bar,
            f"{r['units']['done']}/{r['n_units']} ({r['progress']:.0%})",
            str(len(r["workers"])),
            human_seconds(r["eta_s"]),
            str(r["failures"]),
            str(r["verified_units"]),
            r["status"],
            style="reverse" if state.focus == "rounds" and state.index == i else None,
        )
    return t


def search_panel(snap: dict[str, Any]) -> RenderableType:
    lines = []
    for s in snap["search"]:
        bests = [g["best"] for g in s["generations"]]
        best = f"{s['best']:.4f}" if s["best"] is not None else "-"
        lines.append(
            f"{short(s['proposer'], 14)}  {len(bests)} generations  best/gen {sparkline(bests)}  "
            f"best {best} bits/byte (lower is better)"
        )
    return Panel(
        "\n".join(lines) or "no search rounds", title="Search progress", title_align="left"
    )


def overview(snap: dict[str, Any], state: ViewState, refresh: float) -> RenderableType:
    parts: list[RenderableType] = [
        header(snap, refresh),
        peers_table(snap),
        experts_table(snap, state),
    ]
    parts += [rounds_table(snap, state), search_panel(snap), footer(state)]
    return Group(*parts)


def footer(state: ViewState) -> Text:
    return Text(KEYS + (f"   ! {state.error}" if state.error else ""), style="dim")
