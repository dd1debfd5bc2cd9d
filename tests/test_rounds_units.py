"""Round proposers without a full swarm: search candidates are compared on the same held-out
data, and a proposer signs with its own key where the network is allowlisted."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import hivemind
import pytest

from node.errors import UserError
from node.network.config import network_config
from node.rounds.propose import with_identity_session
from node.rounds.search import comparable_means
from protocol.identity import Identity, save_identity

UNODE = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "unode")

X, Y, Z = b"x" * 32, b"y" * 32, b"z" * 32


def test_waits_until_every_candidate_has_the_same_scorer() -> None:
    # A was scored only by X (prose), B only by Y (python): not comparable yet.
    a = {(X, "prose"): 2.5}
    b = {(Y, "python"): 1.1}
    assert comparable_means([a, b], scorers=1) is None
    # Once X has scored B too, both are judged on X's prose, not on Y's easier python.
    b[(X, "prose")] = 2.4
    assert comparable_means([a, b], scorers=1) == [2.5, 2.4]


def test_uses_every_common_pair_and_counts_distinct_scorers() -> None:
    a = {(X, "prose"): 2.0, (X, "logic"): 0.4, (Y, "python"): 1.0}
    b = {(X, "prose"): 3.0, (X, "logic"): 0.6, (Y, "python"): 2.0, (Z, "arithmetic"): 9.0}
    means = comparable_means([a, b], scorers=2)
    assert means is not None
    assert math.isclose(means[0], (2.0 + 0.4 + 1.0) / 3)
    assert math.isclose(means[1], (3.0 + 0.6 + 2.0) / 3)  # Z scored only b: left out
    assert comparable_means([a, b], scorers=3) is None  # only X and Y scored both


def test_deadline_judges_on_the_busiest_scorer_and_fails_the_rest() -> None:
    a = {(X, "prose"): 2.0}
    b = {(X, "prose"): 1.5}
    c = {(Y, "python"): 0.1}  # never scored by X: cannot be compared with a and b
    d: dict[tuple[bytes, str], float] = {}
    assert comparable_means([a, b, c, d], scorers=1) is None
    means = comparable_means([a, b, c, d], scorers=1, final=True)
    assert means == [2.0, 1.5, math.inf, math.inf]
    assert comparable_means([d, d], scorers=1, final=True) == [math.inf, math.inf]


# --- the proposer's key (allowlisted networks) ---------------------------------------------

ALICE = Identity.from_seed(b"A" * 32)
BOB = Identity.from_seed(b"B" * 32)
CAROL = Identity.from_seed(b"C" * 32)


def _private_net(tmp: Path, members: list[Identity], key: Path | None, peers: list[str]) -> Any:
    allow = tmp / "allowlist"
    allow.write_text("".join(f"{m.peer_id}\n" for m in members))
    net = network_config("private", peers, state_dir=tmp / "unused", allowlist=allow)
    return dataclasses.replace(net, key_file=key)


def test_proposer_signs_with_its_key_on_a_private_network(tmp_path: Path) -> None:
    save_identity(ALICE, tmp_path / "alice.key")
    bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        peers = [str(a) for a in bootstrap.get_visible_maddrs()]
        net = _private_net(tmp_path, [ALICE, BOB], tmp_path / "alice.key", peers)

        async def who(session: Any, tmp: Path) -> str:
            return str(session.peer_id)

        assert with_identity_session(net, who) == ALICE.peer_id
        # Without the key the proposer is a stranger: refused before it announces anything.
        with pytest.raises(UserError) as err:
            with_identity_session(dataclasses.replace(net, key_file=None), who)
        assert err.value.field == "--allowlist" and err.value.value != ALICE.peer_id
    finally:
        bootstrap.shutdown()


def test_bad_proposer_key_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "key"
    bad.write_bytes(b"not a key")
    bad.chmod(0o600)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: unode://{'ab' * 32}\n")
    done = subprocess.run(
        [UNODE, "round", "merge", str(recipe), "--key", str(bad)],
        env={
            "PATH": "/usr/bin:/bin",
            "UNODE_INITIAL_PEERS": f"/ip4/127.0.0.1/tcp/1/p2p/{ALICE.peer_id}",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--key" in lines[0] and str(bad) in lines[0], lines


# --- the fusion trainer's slot -------------------------------------------------------------


def test_a_strangers_result_on_the_training_slot_is_ignored() -> None:
    """Only hosts of the target count on the training slot: a signed result from a peer that
    does not announce the target must not stop the hosts from training."""
    from types import SimpleNamespace

    from node.network import dhtrecords
    from node.rounds import records
    from node.rounds.elect import TrainerSlot
    from protocol.keys import dht_key
    from protocol.records import PeerRecord
    from protocol.signing import sign_record
    from protocol.validators import unode_validators

    net, rid, target = "elect", b"\x01" * 32, b"\x02" * 32
    dht = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=unode_validators(net)
    )
    try:
        host = SimpleNamespace(dht=dht, identity=ALICE, network=net)

        carol = SimpleNamespace(dht=dht, identity=CAROL, network=net)

        async def run() -> list[tuple[str, bytes | None]]:
            # ALICE announces the target; BOB hosts nothing and publishes a "result" anyway
            alice = PeerRecord(ALICE.peer_id, ("/ip4/127.0.0.1/tcp/1",), (target,), "t")
            peers = sign_record(ALICE, dht_key(net, "peers"), alice, expiration=time.time() + 300)
            await dhtrecords.put(dht, peers)
            await records.result(dht, BOB, net, rid, 3, b"\x09" * 32, 1)
            seen = [await TrainerSlot(host, rid, 3, 30.0, target).elect()]
            await TrainerSlot(host, rid, 3, 30.0, target).finish(b"\x07" * 32, 5)
            seen.append(await TrainerSlot(carol, rid, 3, 30.0, target).elect())
            return seen

        mine, carols = asyncio.run(run())
        assert mine == ("mine", ALICE.public_key)  # claimed and won despite BOB's result
        assert carols == ("done", ALICE.public_key)  # a host's result ends it for the others
    finally:
        dht.shutdown()


def test_guard_picks_the_lowest_held_back_score_and_the_start_on_a_tie() -> None:
    from node.rounds.search import guarded_pick

    assert guarded_pick([1.20, 1.10, 1.15]) == 1
    assert guarded_pick([1.10, 1.10, 1.30]) == 0  # the start wins a tie
    assert guarded_pick([math.inf, 1.40, 1.30]) == 2  # an unscored finalist never wins
    assert guarded_pick([math.inf, math.inf]) is None  # no held-back scores: no pick


def test_floor_raises_the_score_of_a_candidate_that_gives_up_a_domain() -> None:
    from node.rounds.search import FLOOR_PENALTY, floored, references, shortfall

    # Two experts alone, each best on one peer's domain; the references are those bests.
    alone_x = {(X, "prose"): 2.0, (Y, "logic"): 0.9}
    alone_y = {(X, "prose"): 2.6, (Y, "logic"): 0.5}
    refs = references([alone_x, alone_y])
    assert refs == {(X, "prose"): 2.0, (Y, "logic"): 0.5}
    # A merge that keeps both (2.0/2.1 = .952 and .5/.52 = .962 of the best): no penalty.
    keeps = {(X, "prose"): 2.1, (Y, "logic"): 0.52}
    assert shortfall(keeps, refs, 0.92) == 0.0
    assert floored(keeps, refs, 0.92) == (2.1 + 0.52) / 2
    # One with a better mean that gives up logic (.5/.7 = .714 kept): penalised.
    gives_up = {(X, "prose"): 1.8, (Y, "logic"): 0.7}
    assert (1.8 + 0.7) / 2 < (2.1 + 0.52) / 2
    assert math.isclose(shortfall(gives_up, refs, 0.92), 0.92 - 0.5 / 0.7)
    expect = (1.8 + 0.7) / 2 * (1 + FLOOR_PENALTY * (0.92 - 0.5 / 0.7))
    assert math.isclose(floored(gives_up, refs, 0.92), expect)
    assert floored(gives_up, refs, 0.92) > floored(keeps, refs, 0.92)
    # A pair without a reference is not penalised; an unscored candidate stays unscored.
    assert shortfall({(Z, "python"): 9.0}, refs, 0.92) == 0.0
    assert floored({}, refs, 0.92) == math.inf


def test_floor_references_are_each_expert_alone() -> None:
    from node.rounds.search import make_space, reference_candidates

    base, a, b = "unode://" + "0" * 64, "unode://" + "a" * 64, "unode://" + "b" * 64
    recipe = {"merge_method": "ties", "base_model": base,
              "models": [{"model": base}, {"model": a}, {"model": b}]}  # fmt: skip
    space, _ = make_space(recipe, groups=2, n_layers=4)
    refs = reference_candidates(recipe, space)
    assert len(refs) == 2
    for j, ref in enumerate(refs):
        for i, m in enumerate(ref["models"][1:]):
            for p, want in (("weight", float(i == j)), ("density", 1.0)):
                values = [v["value"] for v in m["parameters"][p]]
                flat = [x for v in values for x in (v["layers"] if isinstance(v, dict) else [v])]
                assert flat and all(x == want for x in flat), (j, i, p, values)
    assert "parameters" not in ref["models"][0]  # the base is not searched


def test_guarded_spec_round_trips_and_unguarded_bytes_do_not_change() -> None:
    from node.rounds.spec import RoundSpec
    from protocol import codec
    from protocol.errors import ProtocolError

    plain = RoundSpec("search", {"merge_method": "linear"}, (("a",),), candidates=({"x": 1},))
    guarded = dataclasses.replace(plain, guard=True)
    assert "guard" not in codec.decode(plain.to_bytes(), max_bytes=1 << 20)
    assert RoundSpec.from_bytes(plain.to_bytes()) == plain
    assert RoundSpec.from_bytes(guarded.to_bytes()) == guarded
    assert guarded.hash() != plain.hash()
    bad = codec.decode(guarded.to_bytes(), max_bytes=1 << 20)
    bad["guard"] = 1
    with pytest.raises(ProtocolError, match="guard"):
        RoundSpec.from_bytes(codec.encode(bad, max_bytes=1 << 20))


def test_a_guarded_scorer_cuts_its_texts_into_two_disjoint_folds() -> None:
    from node.rounds.search_peer import eval_texts, folds
    from protocol.round_records import HELDBACK_METRIC, SCORE_METRIC

    texts = eval_texts("python", 32)
    assert folds(texts, False) == [(SCORE_METRIC, texts)]
    cut = dict(folds(texts, True))
    seen, held = cut[SCORE_METRIC], cut[HELDBACK_METRIC]
    assert seen and held and not set(seen) & set(held)
    assert sorted(seen + held) == sorted(texts)
    assert dict(folds(list(reversed(texts)), True))[HELDBACK_METRIC] == list(reversed(held))
