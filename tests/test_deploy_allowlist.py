"""Private networks: the allowlist file, its validator on a real 2-peer hivemind DHT (loopback),
and the errors a node gives for a bad list or when it is not on its own list."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hivemind
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import DHTRecord

from node.errors import UserError
from node.network.allowlist import (
    AllowlistValidator,
    allowlist_from,
    allowlist_validators,
    read_allowlist,
)
from node.network.config import network_config
from node.network.session import Session
from protocol import codec
from protocol.identity import Identity, save_identity
from protocol.keys import dht_key
from protocol.records import PeerRecord
from protocol.signing import SignedRecord, open_dht_dictionary, sign_record
from protocol.validators import dht_key_id, unode_validators

NET = "private"
ALICE = Identity.from_seed(b"A" * 32)
BOB = Identity.from_seed(b"B" * 32)
MALLORY = Identity.from_seed(b"M" * 32)
UNODE = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "unode")


def write_list(path: Path, *ids: str) -> Path:
    path.write_text("# members of the consortium\n" + "".join(f"{i}  # node\n" for i in ids))
    return path


def peer_record(who: Identity) -> SignedRecord:
    rec = PeerRecord(who.peer_id, (), (), "unode-test")
    return sign_record(who, dht_key(NET, "peers"), rec, expiration=time.time() + 300)


def as_dht_record(signed: SignedRecord) -> DHTRecord:
    kw = signed.store_kwargs()
    return DHTRecord(
        dht_key_id(signed.key), codec.encode(kw["subkey"]), kw["value"], kw["expiration_time"]
    )


def test_allowlist_file_gives_the_members_keys(tmp_path: Path) -> None:
    path = write_list(tmp_path / "allow", ALICE.peer_id, BOB.peer_id, ALICE.peer_id)
    assert read_allowlist(path) == frozenset({ALICE.public_key, BOB.public_key})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("# nobody\n\n", "no peer id in it"),
        (f"{ALICE.peer_id}\nQmNotAnEd25519PeerId\n", "not an Ed25519 peer id"),
    ],
)
def test_bad_allowlist_names_the_file_and_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "allow"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_allowlist(path)
    assert err.value.field == "--allowlist" and problem in str(err.value)
    if "Qm" in text:
        assert f"{path}:2" in str(err.value.value)


def test_env_variable_is_used_when_no_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_list(tmp_path / "allow", BOB.peer_id)
    monkeypatch.setenv("UNODE_ALLOWLIST", str(path))
    assert allowlist_from(None) == frozenset({BOB.public_key})
    net = network_config("private", None)
    assert net.allowlist == frozenset({BOB.public_key})
    monkeypatch.setenv("UNODE_ALLOWLIST", "")
    assert network_config("private", None).allowlist is None  # an open network


def test_validator_accepts_members_and_rejects_outsiders_and_unowned() -> None:
    v = AllowlistValidator(frozenset({ALICE.public_key}))
    assert v.validate(as_dht_record(peer_record(ALICE)))
    assert not v.validate(as_dht_record(peer_record(MALLORY)))
    plain = DHTRecord(b"k" * 20, b"\xc0", b"value", time.time() + 60)  # no owner subkey
    assert not v.validate(plain)
    assert allowlist_validators(None) == []


def test_node_not_on_its_own_allowlist_is_refused(tmp_path: Path) -> None:
    save_identity(ALICE, tmp_path / "identity.key")
    net = network_config(
        "private", None, state_dir=tmp_path, allowlist=write_list(tmp_path / "l", BOB.peer_id)
    )
    session = Session(net, persistent=True)
    with pytest.raises(UserError) as err:
        session.start()
    assert err.value.value == ALICE.peer_id and "not on the allowlist" in str(err.value)
    assert session.dht is None


def test_cli_reports_a_bad_allowlist_variable_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "allow").write_text("nonsense\n")
    done = subprocess.run(
        [UNODE, "peers", "--initial-peers", f"/ip4/127.0.0.1/tcp/1/p2p/{ALICE.peer_id}"],
        env={"UNODE_ALLOWLIST": str(tmp_path / "allow"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "UNODE_ALLOWLIST" in done.stderr and "nonsense" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def two_peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[hivemind.DHT]]:
    """A private member (allowlist: ALICE, BOB) and an open node that stores anyone's records."""
    members = frozenset({ALICE.public_key, BOB.public_key})
    started: list[hivemind.DHT] = []
    try:
        private = hivemind.DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=unode_validators(NET) + allowlist_validators(members),
        )
        started.append(private)
        started.append(
            hivemind.DHT(
                start=True,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                initial_peers=[str(a) for a in private.get_visible_maddrs()],
                record_validators=unode_validators(NET),
            )
        )
        yield started
    finally:
        for dht in started:
            dht.shutdown()


def owners_seen(dht: hivemind.DHT, key: str) -> set[bytes]:
    found = dht.get(key, latest=True)
    if found is None or not isinstance(found.value, dict):
        return set()
    accepted, _rejected = open_dht_dictionary(key, found.value)
    return {signed.owner for signed, _ in accepted}


def test_private_member_stores_and_reads_only_allowlisted_records(
    two_peers: list[hivemind.DHT],
) -> None:
    private, open_node = two_peers
    alice, mallory = peer_record(ALICE), peer_record(MALLORY)
    assert open_node.store(**alice.store_kwargs())
    open_node.store(**mallory.store_kwargs())  # the open node keeps it; the member refuses it
    assert owners_seen(open_node, alice.key) == {ALICE.public_key, MALLORY.public_key}
    assert owners_seen(private, alice.key) == {ALICE.public_key}
    private.store(**peer_record(MALLORY).store_kwargs())  # not even from its own application
    held = private.run_coroutine(functools.partial(_local_subkeys, name=alice.key))
    assert held == {alice.subkey}  # its own storage: the member's record only


async def _local_subkeys(_dht: hivemind.DHT, node: Any, name: str) -> set[bytes]:
    """The subkeys one peer holds in its own storage under `name` (runs in the DHT process)."""
    entry = node.protocol.storage.get(DHTID.generate(source=name))
    if entry is None or not isinstance(entry.value, DictionaryDHTValue):
        return set()
    return {subkey for subkey, _ in entry.value.items()}
