"""Every attack on unode DHT records, against a real 3-peer hivemind DHT on loopback (plus an
attacker peer that runs no validators), and the Ed25519 identity as the libp2p peer id."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import hivemind
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue

from protocol import codec
from protocol.identity import Identity, save_identity
from protocol.keys import dht_key, dht_subkey
from protocol.records import PeerRecord
from protocol.samples import fake_hash, sample_card
from protocol.signing import SignedRecord, open_dht_dictionary, sign_record
from protocol.validators import UnodeRecordValidator, dht_key_id, unode_validators

NET = "test"
ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@dataclasses.dataclass
class Swarm:
    honest: list[hivemind.DHT]
    attacker: hivemind.DHT  # runs no validators: it pushes whatever it wants to honest peers


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    key_dir = tmp_path_factory.mktemp("keys")
    save_identity(ALICE, key_dir / "alice.key")
    save_identity(BOB, key_dir / "bob.key")
    started: list[hivemind.DHT] = []
    try:
        first = hivemind.DHT(
            start=True,
            host_maddrs=LOOPBACK,
            record_validators=unode_validators(NET),
            identity_path=str(key_dir / "alice.key"),
        )
        started.append(first)
        peers = [str(a) for a in first.get_visible_maddrs()]
        # joining with a key file: hivemind's "identity taken?" probe parses only RSA key files
        bob = {"identity_path": str(key_dir / "bob.key"), "check_if_identity_free": False}
        for validators, kwargs in (
            (unode_validators(NET), bob),
            (unode_validators(NET), {}),
            ([], {}),
        ):
            started.append(
                hivemind.DHT(
                    start=True,
                    host_maddrs=LOOPBACK,
                    initial_peers=peers,
                    record_validators=validators,
                    **kwargs,
                )
            )
        yield Swarm(started[:3], started[3])
    finally:
        for dht in started:
            dht.shutdown()


async def _local_entries(dht: hivemind.DHT, node: Any, name: str) -> dict[Any, Any] | None:
    """What one peer holds in its own storage under `name` (runs inside the DHT process)."""
    entry = node.protocol.storage.get(DHTID.generate(source=name))
    if entry is None:
        return None
    if isinstance(entry.value, DictionaryDHTValue):
        return {sk: (v.value, v.expiration_time) for sk, v in entry.value.items()}
    return {"<plain value>": (entry.value, entry.expiration_time)}


def held_by_honest(swarm: Swarm, name: str) -> list[dict[Any, Any] | None]:
    return [dht.run_coroutine(functools.partial(_local_entries, name=name)) for dht in swarm.honest]


def read_all(swarm: Swarm, name: str) -> list[list[SignedRecord]]:
    """What each honest peer's application gets for `name` (DHT lookup, then re-verified)."""
    results = []
    for dht in swarm.honest:
        found = dht.get(name, latest=True)
        assert found is not None and isinstance(found.value, dict), f"nothing under {name}"
        accepted, rejected = open_dht_dictionary(name, found.value)
        assert rejected == []
        results.append([signed for signed, _ in accepted])
    return results


def publish(swarm: Swarm, signed: SignedRecord, via: int = 1) -> bool:
    return bool(swarm.honest[via].store(**signed.store_kwargs()))


def resign(signed: SignedRecord, identity: Identity = ALICE, **changes: Any) -> SignedRecord:
    unsigned = dataclasses.replace(signed, **changes)
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_message()))


def card_record(label: str, exp_in: float = 600.0, seq: int | None = None) -> SignedRecord:
    """ALICE's card for an expert of its own (one DHT key per label, so tests stay apart)."""
    card = dataclasses.replace(sample_card(ALICE), expert_id=fake_hash(label))
    name = dht_key(NET, "expert", card.expert_id)
    return sign_record(ALICE, name, card, expiration=time.time() + exp_in, seq=seq)


def test_dht_peer_id_is_the_identity(swarm: Swarm) -> None:
    assert swarm.honest[0].peer_id.to_base58() == ALICE.peer_id
    assert swarm.honest[1].peer_id.to_base58() == BOB.peer_id  # joined via initial_peers
    peer = PeerRecord(ALICE.peer_id, (), (), "unode-test")
    name = dht_key(NET, "peers")
    assert publish(swarm, sign_record(ALICE, name, peer, expiration=time.time() + 300), via=0)
    assert all(s[0].owner == ALICE.public_key for s in read_all(swarm, name))


def test_valid_record_reaches_every_peer(swarm: Swarm) -> None:
    signed = card_record("valid")
    assert publish(swarm, signed)
    assert all(got == [signed] for got in read_all(swarm, signed.key))
    assert all(
        held is not None and signed.subkey in held for held in held_by_honest(swarm, signed.key)
    )


def test_plain_value_cannot_wipe_a_dictionary(swarm: Swarm) -> None:
    signed = card_record("wipe")
    assert publish(swarm, signed)
    swarm.attacker.store(signed.key, b"wiped", expiration_time=time.time() + 3000)
    for held in held_by_honest(swarm, signed.key):
        assert held is not None and list(held) == [signed.subkey]
    assert all(got == [signed] for got in read_all(swarm, signed.key))


def test_unsigned_or_foreign_values_cannot_squat_a_subkey(swarm: Swarm) -> None:
    name = dht_key(NET, "expert", fake_hash("squat"))
    exp = time.time() + 300
    attempts: list[tuple[Any, Any]] = [
        (b"squatter", b"x"),  # no owner marker
        (dht_subkey(ALICE.public_key), b"not an envelope"),  # marker, no signature
        (dht_subkey(ALICE.public_key), 12345),  # not even bytes
        (dht_subkey(MALLORY.public_key) + b"/x", b"\x00" * 100),
    ]
    for subkey, value in attempts:
        swarm.attacker.store(name, value, expiration_time=exp, subkey=subkey)
    assert held_by_honest(swarm, name) == [None, None, None]
    assert all(dht.get(name, latest=True) is None for dht in swarm.honest)


def test_far_future_expiration_is_refused(swarm: Swarm) -> None:
    signed = card_record("far")
    far = resign(signed, expiration=time.time() + 365 * 86400)  # validly signed by the owner
    swarm.attacker.store(**far.store_kwargs())
    assert held_by_honest(swarm, far.key) == [None, None, None]
    assert not publish(swarm, far)  # honest peers refuse it from their own application too


def test_replayed_older_record_loses(swarm: Swarm) -> None:
    old = card_record("replay", exp_in=3000)  # signed first, with a longer expiration
    new = card_record("replay", exp_in=600)
    assert new.seq > old.seq and old.expiration > new.expiration
    assert publish(swarm, new)
    swarm.attacker.store(**old.store_kwargs())  # hivemind alone would keep the later expiration
    for held in held_by_honest(swarm, new.key):
        assert held is not None and codec.decode(held[new.subkey][0]) == new.to_bytes()
    assert all(got == [new] for got in read_all(swarm, new.key))


def test_record_signed_by_another_key_is_refused(swarm: Swarm) -> None:
    signed = card_record("mallory")
    forged = resign(signed, identity=MALLORY)  # ALICE's owner field, MALLORY's signature
    as_mallory = resign(signed, identity=MALLORY, owner=MALLORY.public_key)  # subkey still ALICE's
    swarm.attacker.store(**forged.store_kwargs())
    swarm.attacker.store(
        as_mallory.key, as_mallory.to_bytes(), as_mallory.expiration, subkey=signed.subkey
    )
    assert held_by_honest(swarm, signed.key) == [None, None, None]


def test_garbage_signature_is_refused(swarm: Swarm) -> None:
    signed = card_record("garbage")
    garbage = dataclasses.replace(signed, signature=os.urandom(64))
    swarm.attacker.store(**garbage.store_kwargs())
    assert held_by_honest(swarm, signed.key) == [None, None, None]


def test_wrong_protocol_version_or_network_is_refused(swarm: Swarm) -> None:
    signed = card_record("version")
    v2_key = resign(signed, key=signed.key.replace("/v1/", "/v2/"))
    other_net = resign(signed, key=signed.key.replace(f"/{NET}/", "/other/"))
    wire = codec.decode(signed.to_bytes())
    wire["v"] = 2
    v2_envelope = codec.encode(wire)
    swarm.attacker.store(**v2_key.store_kwargs())
    swarm.attacker.store(**other_net.store_kwargs())
    swarm.attacker.store(signed.key, v2_envelope, signed.expiration, subkey=signed.subkey)
    for name in (v2_key.key, other_net.key, signed.key):
        assert held_by_honest(swarm, name) == [None, None, None]


def test_validator_logs_and_returns_false_for_each_attack(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same checks called directly (as hivemind does), with the reason logged."""
    from hivemind.dht.validation import DHTRecord

    from protocol import validators

    monkeypatch.setattr(validators, "_REJECT_LOG", validators._LogBudget())  # earlier tests' use

    validator = UnodeRecordValidator(NET)
    signed = card_record("direct")
    older = card_record("direct", seq=signed.seq - 1)
    key_id, subkey = dht_key_id(signed.key), codec.encode(signed.subkey)
    good = DHTRecord(key_id, subkey, codec.encode(signed.to_bytes()), signed.expiration)
    assert validator.validate(good)
    bad = {
        "plain values": dataclasses.replace(good, subkey=codec.encode(None)),
        "expiration differs": dataclasses.replace(good, expiration_time=signed.expiration + 1),
        "another DHT key": dataclasses.replace(good, key=dht_key_id(signed.key + "0")),
        "older than": DHTRecord(key_id, subkey, codec.encode(older.to_bytes()), older.expiration),
    }
    caplog.set_level(logging.DEBUG, logger="protocol.validators")
    for reason, record in bad.items():
        caplog.clear()
        assert validator.validate(record) is False
        assert reason in caplog.text, caplog.text
        # An older version is what a stale replica looks like: dropped quietly (debug), while
        # every forged or mis-bound record is a warning.
        level = logging.DEBUG if reason == "older than" else logging.WARNING
        assert [r.levelno for r in caplog.records] == [level], caplog.records


def test_rejection_warnings_are_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of bad records gives at most `burst` warnings a period, then one that counts
    what was held back; every record is still rejected."""
    from hivemind.dht.validation import DHTRecord

    from protocol import validators

    clock = [1000.0]
    budget = validators._LogBudget(burst=3, period=60.0, clock=lambda: clock[0])
    monkeypatch.setattr(validators, "_REJECT_LOG", budget)
    validator = UnodeRecordValidator(NET)
    junk = DHTRecord(b"k" * 20, codec.encode(None), b"garbage", time.time() + 60)
    caplog.set_level(logging.WARNING, logger="protocol.validators")
    assert not any(validator.validate(junk) for _ in range(50))
    assert len(caplog.records) == 3
    clock[0] += 61
    caplog.clear()
    assert validator.validate(junk) is False
    assert len(caplog.records) == 1 and "(47 more rejections not logged)" in caplog.text
