"""The dashboard's pure parts: unit states, round summaries (progress, workers, failures,
verification, ETA, status), search progress per generation, the sparkline, and rendering of a
snapshot into text (overview and drill-down pages)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from node.dashboard.details import expert_detail, round_detail
from node.dashboard.render import ViewState, human_bytes, human_seconds, overview, sparkline
from node.dashboard.rounds import round_summary, search_progress, unit_state, with_scores
from node.rounds.records import UnitView
from protocol.identity import Identity, peer_id_from_public_key
from protocol.records import RoundProposal

KEYS = [Identity.generate() for _ in range(3)]
OWNERS = [k.public_key for k in KEYS]
H1, H2 = b"\x01" * 32, b"\x02" * 32


def proposal(n_units: int = 4, deadline_ms: int = 2_000_000_000_000) -> RoundProposal:
    return RoundProposal("merge", (b"\xaa" * 32, b"\xbb" * 32), b"\xaa" * 32, "ties", b"\xcc" * 32,
                         7, n_units, deadline_ms, ("general",))  # fmt: skip


def test_unit_state_from_claims_and_results() -> None:
    assert unit_state(UnitView()) == "open"
    assert unit_state(UnitView(claims={OWNERS[0]: 5})) == "claimed"
    assert unit_state(UnitView(results={OWNERS[0]: H1, OWNERS[1]: H1})) == "done"
    assert unit_state(UnitView(results={OWNERS[0]: H1, OWNERS[1]: H2})) == "conflict"


def test_round_summary_counts_progress_workers_failures_and_eta() -> None:
    views = {
        0: UnitView(results={OWNERS[0]: H1, OWNERS[1]: H1}, result_ms={OWNERS[0]: 1000, OWNERS[1]: 3000}),
        1: UnitView(results={OWNERS[0]: H1, OWNERS[2]: H2}, result_ms={OWNERS[0]: 2000, OWNERS[2]: 2000}),
        2: UnitView(claims={OWNERS[1]: 9}),
        3: UnitView(),
    }  # fmt: skip
    r = round_summary(proposal(), "proposer", views, "merge", None, now_ms=0)
    assert r["unit_states"] == ["done", "conflict", "claimed", "open"]
    assert r["units"] == {"open": 1, "claimed": 1, "done": 1, "conflict": 1}
    assert r["progress"] == 0.25 and r["failures"] == 1 and r["verified_units"] == 1
    assert r["workers"] == sorted(peer_id_from_public_key(o) for o in OWNERS)
    # 3 units left x mean 2 s per unit / 3 workers
    assert r["eta_s"] == 2.0
    assert r["status"] == "running" and r["result_expert"] is None
    assert r["round_id"] == proposal().round_id.hex() and r["mode"] == "merge"
    peer = [peer_id_from_public_key(o) for o in OWNERS]
    conflict = sorted(r["unit_workers"][1], key=lambda w: w["peer"])
    assert conflict == sorted(
        [{"peer": peer[0], "result": H1.hex()[:12], "ms": 2000},
         {"peer": peer[2], "result": H2.hex()[:12], "ms": 2000}], key=lambda w: w["peer"],
    )  # fmt: skip
    assert r["unit_workers"][2] == [{"peer": peer[1], "result": None, "ms": None}]
    assert r["unit_workers"][3] == []


def test_round_status_finished_assembling_expired() -> None:
    done = {u: UnitView(results={OWNERS[0]: H1}) for u in range(2)}
    p = proposal(2, deadline_ms=1000)
    assert round_summary(p, "x", done, "merge", "ee" * 32, 5000)["status"] == "finished"
    assert round_summary(p, "x", done, "merge", None, 5000)["status"] == "assembling"
    assert round_summary(p, "x", done, "merge", None, 5000)["eta_s"] is None
    open_ = {u: UnitView() for u in range(2)}
    assert round_summary(p, "x", open_, None, None, 5000)["status"] == "expired"


def test_search_progress_best_per_generation_in_deadline_order() -> None:
    gens = [
        {"round_id": "b", "proposer": "P", "deadline_ms": 20, "means": [1.5, None, 1.2]},
        {"round_id": "a", "proposer": "P", "deadline_ms": 10, "means": [2.0, 1.8]},
        {"round_id": "c", "proposer": "Q", "deadline_ms": 5, "means": [None]},
    ]
    out = {s["proposer"]: s for s in search_progress(gens)}
    assert [g["round_id"] for g in out["P"]["generations"]] == ["a", "b"]
    assert [g["best"] for g in out["P"]["generations"]] == [1.8, 1.2]
    assert [g["scored"] for g in out["P"]["generations"]] == [2, 2]
    assert out["P"]["best"] == 1.2
    assert out["Q"]["best"] is None and out["Q"]["generations"][0]["candidates"] == 1


def test_sparkline_and_human_units() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0, None, 1.0]) == "▁ ▁"
    assert sparkline([]) == ""
    assert human_bytes(999) == "999 B" and human_bytes(1_500_000) == "1.5 MB"
    assert human_seconds(59) == "59s" and human_seconds(61) == "1m01s"
    assert human_seconds(7260) == "2h01m" and human_seconds(None) == "-"


def _snapshot() -> dict[str, Any]:
    eid, fp, rid = "e" * 64, "f" * 64, proposal().round_id.hex()
    views = {0: UnitView(results={OWNERS[0]: H1}, result_ms={OWNERS[0]: 500}), 1: UnitView()}
    r = round_summary(proposal(2), "12D3KooWproposer", views, "merge", None, 0)
    expert = {
        "expert_id": eid, "name": "coder", "architecture": "LlamaForCausalLM",
        "domains": ["code"], "n_params": 2_500_000, "nbytes": 10_000_000, "base_fingerprint": fp,
        "tokenizer_hash": "0" * 64, "license": "mit", "lineage": r["round_id"],
        "providers": ["12D3KooWhost"], "eval_scores": {"code.bpb": 1.234},
    }  # fmt: skip
    return {
        "schema": "unode.dashboard/1", "network": "main", "taken_at": 0.0,
        "peers": [{"peer_id": "12D3KooWhost", "maddrs": ["/ip4/1.2.3.4/tcp/1"], "agent": "unode/0.1.0",
                   "experts": [eid], "expires_at": 1.0,
                   "stats": {"uptime_s": 3700, "bytes_served": 2_000_000, "served_bps": 1500.0,
                             "bytes_fetched": 0, "fetched_bps": 0.0, "units_done": 1, "units_failed": 0}}],
        "experts": [expert],
        "families": [{"base_fingerprint": fp, "architecture": "LlamaForCausalLM", "experts": [eid]}],
        "rounds": [r],
        "search": [{"proposer": "P", "best": 1.1, "generations": [
            {"round_id": rid, "candidates": 2, "scored": 2, "best": 1.3},
            {"round_id": "x", "candidates": 2, "scored": 2, "best": 1.1}]}],
    }  # fmt: skip


def text_of(renderable: Any) -> str:
    console = Console(width=220, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_overview_and_details_render_the_snapshot() -> None:
    snap = _snapshot()
    screen = text_of(overview(snap, ViewState(), 2.0))
    for needle in ("12D3KooWhost", "1h01m", "1.5 kB/s", "eeeeeeeeeeeeeeee", "coder", "code.bpb=1.23",
                   "2.50M", "█·", "1/2 (50%)", "best/gen █▁", "q quit"):  # fmt: skip
        assert needle in screen, needle
    page = text_of(expert_detail(snap, "e" * 64, ViewState(detail=("expert", "e" * 64))))
    assert "e" * 64 in page and "12D3KooWhost" in page and "code.bpb=1.234" in page
    assert (
        f"merge round {snap['rounds'][0]['round_id']} (ties of aaaaaaaaaaaa, bbbbbbbbbbbb)" in page
    )
    rid = snap["rounds"][0]["round_id"]
    page = text_of(round_detail(snap, rid, ViewState(detail=("round", rid))))
    assert rid in page and "12D3KooWproposer" in page and "1/2 units" in page
    assert "█ done" in page and "· open" in page
    worker = peer_id_from_public_key(OWNERS[0])
    assert f"…{worker[-8:]} {H1.hex()[:8]} 500" in page  # who computed unit 0, its hash, ms
    gone = text_of(round_detail(snap, "9" * 64, ViewState()))
    assert "no longer in the DHT" in gone


def test_search_generation_counts_scored_candidates_as_done() -> None:
    views = {u: UnitView() for u in range(3)}
    base = round_summary(proposal(3), "P", views, "search", None, now_ms=0)
    r = with_scores(base, [1.25, None, 0.5])
    assert r["unit_states"] == ["done", "open", "done"] and r["progress"] == 2 / 3
    assert r["units"] == {"open": 1, "claimed": 0, "done": 2, "conflict": 0}
    assert r["status"] == "running"
    assert with_scores(base, [1.0, 1.0, 1.0])["status"] == "finished"
