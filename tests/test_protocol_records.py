"""Codec, identity, content hashes, record schemas, keys and signed envelopes (no network)."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import time
from pathlib import Path

import msgpack
import pytest

from protocol import codec
from protocol.content import blob_hash, chunk_hashes, record_hash, tensor_hash
from protocol.errors import (
    BindingError,
    DecodeError,
    ExpirationError,
    IdentityError,
    SchemaError,
    SignatureError,
    SizeError,
    VersionError,
)
from protocol.identity import (
    Identity,
    load_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    save_identity,
    verify,
)
from protocol.keys import dht_key, dht_subkey, owner_marker, parse_dht_key, parse_subkey
from protocol.records import (
    RECORD_TYPES,
    ExpertCard,
    TensorEntry,
    TensorManifest,
    any_record_from_bytes,
)
from protocol.samples import (
    fake_hash,
    sample_card,
    sample_manifest,
    sample_placements,
    sample_summary,
)
from protocol.signing import SignedRecord, open_record, sign_record

ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)


# --- codec ------------------------------------------------------------------------------


def test_codec_round_trip_and_sorted_keys() -> None:
    value = {
        "b": [1, -2, 2**64 - 1, -(2**63)],
        "a": {"x": b"\x00\xff", "y": "é"},
        "c": 0.5,
        "d": None,
    }
    data = codec.encode(value)
    assert codec.decode(data) == value
    assert list(codec.decode(data)) == ["a", "b", "c", "d"]
    assert (
        codec.encode({"b": 1, "a": 2})
        == codec.encode({"a": 2, "b": 1})
        == b"\x82\xa1a\x02\xa1b\x01"
    )


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01\x02", "trailing byte"),
        (b"\x82\xa1b\x01\xa1a\x02", "unsorted map"),
        (b"\xcd\x00\x01", "uint16 for 1"),
        (b"\xca\x3f\x00\x00\x00", "float32"),
        (b"\xcb" + b"\x7f\xf8" + b"\x00" * 6, "NaN"),
        (b"\xd4\x01\x00", "ext type"),
        (b"\xd6\xff\x00\x00\x00\x00", "timestamp"),
        (b"\x82\xa1a\x01\xa1a\x02", "duplicate key"),
        (b"\x81\x01\x02", "int map key"),
        (b"\xa2\xff\xfe", "invalid utf-8"),
        (b"\xd9\x01a", "str8 for a 1-char str"),
        (b"\xc5\x00\x01x", "bin16 for 1 byte"),
        (b"", "empty"),
        (b"\xc1", "reserved byte"),
    ],
)
def test_codec_rejects_non_canonical(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError):
        codec.decode(data)


def test_codec_rejects_floats_that_are_not_finite_and_oversize() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(DecodeError):
            codec.encode({"x": bad})
    with pytest.raises(SizeError):
        codec.decode(codec.encode(b"x" * 100), max_bytes=50)
    deep: object = 0
    for _ in range(20):
        deep = [deep]
    with pytest.raises(DecodeError):
        codec.decode(msgpack.packb(deep))


# --- identity ----------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    msg = b"hello"
    sig = ALICE.sign(msg)
    assert verify(ALICE.public_key, msg, sig)
    assert not verify(MALLORY.public_key, msg, sig)
    assert not verify(ALICE.public_key, msg + b"!", sig)
    assert not verify(ALICE.public_key, msg, os.urandom(64))
    assert not verify(ALICE.public_key, msg, sig[:63])
    assert not verify(b"\x00" * 31, msg, sig)


def test_peer_id_round_trip() -> None:
    peer_id = peer_id_from_public_key(ALICE.public_key)
    assert peer_id.startswith("12D3KooW") and peer_id == ALICE.peer_id
    assert public_key_from_peer_id(peer_id) == ALICE.public_key
    with pytest.raises(SchemaError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # RSA-style
    with pytest.raises(SchemaError):
        public_key_from_peer_id("12D3KooW0OIl")


def test_key_file_mode_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.key"
    save_identity(ALICE, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes()[:4] == b"\x08\x01\x12\x40" and len(path.read_bytes()) == 68
    assert load_identity(path).public_key == ALICE.public_key
    with pytest.raises(IdentityError, match="already exists"):
        save_identity(MALLORY, path)
    assert load_identity(path).public_key == ALICE.public_key
    for mode in (0o644, 0o640, 0o604):
        path.chmod(mode)
        with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
            load_identity(path)
    path.chmod(0o600)
    path.write_bytes(b"\x08\x01\x12\x40" + b"x" * 64)
    with pytest.raises(IdentityError, match="malformed"):
        load_identity(path)
    with pytest.raises(IdentityError, match="unode keys init"):
        load_identity(tmp_path / "missing.key")


# --- content hashes ------------------------------------------------------------------------


def test_tensor_hash_commits_to_dtype_shape_bytes_and_chunking() -> None:
    data = bytes(range(256)) * 16  # 4096 bytes
    base = tensor_hash("F32", [32, 32], data, 1024)
    assert base == tensor_hash("F32", (32, 32), bytearray(data), 1024)
    variants = {
        tensor_hash("I32", [32, 32], data, 1024),
        tensor_hash("F32", [1024], data, 1024),
        tensor_hash("F32", [32, 32], data[:-1] + b"\x00", 1024),
        tensor_hash("F32", [32, 32], data, 2048),
        tensor_hash("F16", [64, 32], data, 1024),
        blob_hash(data, 1024),
    }
    assert base not in variants and len(variants) == 6
    assert len(chunk_hashes(data, 1024)) == 4 and len(chunk_hashes(b"", 1024)) == 0
    with pytest.raises(SchemaError):
        tensor_hash("F32", [32, 31], data, 1024)
    with pytest.raises(SchemaError):
        tensor_hash("F32", [32, 32], data, 1000)


# --- records -------------------------------------------------------------------------------


def test_every_record_round_trips_canonically() -> None:
    records = [p.record for p in sample_placements(ALICE)] + [sample_manifest(), sample_summary()]
    assert {type(r).TYPE for r in records} == set(RECORD_TYPES)
    for record in records:
        data = record.to_bytes()
        assert type(record).from_bytes(data) == record
        assert any_record_from_bytes(data) == record
        assert record.to_bytes() == data and record.hash() == record_hash(data)


def _wire(record: ExpertCard) -> dict[str, object]:
    value = codec.decode(record.to_bytes())
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"t": "score"}, SchemaError),
        ({"v": 2}, VersionError),
        ({"n_params": 1.0}, SchemaError),
        ({"n_params": True}, SchemaError),
        ({"eval_scores": {"bpb": 1}}, SchemaError),
        ({"owner": "a" * 32}, SchemaError),
        ({"owner": b"a" * 31}, SchemaError),
        ({"domains": ["math", "code"]}, SchemaError),
        ({"domains": ["code", "code"]}, SchemaError),
        ({"name": "bad\nname"}, SchemaError),
        ({"extra": 1}, SchemaError),
        ({"lineage": b"x" * 33}, SchemaError),
    ],
)
def test_expert_card_rejects_bad_fields(change: dict[str, object], error: type[Exception]) -> None:
    wire = {**_wire(sample_card(ALICE)), **change}
    with pytest.raises(error):
        ExpertCard.from_bytes(codec.encode(wire))


def test_expert_card_rejects_missing_field() -> None:
    wire = _wire(sample_card(ALICE))
    del wire["license"]
    with pytest.raises(SchemaError, match="missing fields \\['license'\\]"):
        ExpertCard.from_bytes(codec.encode(wire))


def test_manifest_invariants() -> None:
    manifest = sample_manifest()
    assert manifest.tensor("lm_head.weight").nbytes == 6144
    assert manifest.total_bytes == 6144 + 6 + 2
    bad_size = dataclasses.replace(manifest.tensors[0], nbytes=6000)
    unsorted = dataclasses.replace(manifest, tensors=manifest.tensors[::-1])
    for bad in (dataclasses.replace(manifest, tensors=(bad_size,)), unsorted):
        with pytest.raises(SchemaError):
            bad.to_bytes()
    with pytest.raises(SchemaError):
        TensorManifest(1000, (), ()).to_bytes()
    with pytest.raises(SchemaError):
        TensorManifest(1024, (TensorEntry("x", "F33", (1,), 4, fake_hash("x")),), ()).to_bytes()


# --- keys ----------------------------------------------------------------------------------


def test_keys_round_trip_and_reject_other_versions() -> None:
    rid = fake_hash("r")
    name = dht_key("main", "claim", rid, 7)
    assert name == f"unode/main/v1/round/{rid.hex()}/claim/7"
    parsed = parse_dht_key(name)
    assert (parsed.network, parsed.kind, parsed.params) == ("main", "claim", (rid.hex(), "7"))
    assert parsed.name == name
    with pytest.raises(VersionError):
        parse_dht_key(name.replace("/v1/", "/v2/"))
    for bad in (
        "unode/main/v1/round/xyz/claim/7",
        "unode/Main/v1/peers",
        "other/main/v1/peers",
        "unode/main/v1/claim/07",
    ):
        with pytest.raises((SchemaError, VersionError)):
            parse_dht_key(bad)


def test_owner_marker_is_52_bytes_and_parses_back() -> None:
    marker = owner_marker(ALICE.public_key)
    assert len(marker) == 52 and len(codec.encode(marker)) == 54
    assert parse_subkey(dht_subkey(ALICE.public_key, "code")) == (ALICE.public_key, "code")
    assert parse_subkey(marker) == (ALICE.public_key, "")
    for bad in (
        b"[owner:abc]",
        marker[:-1],
        marker + b"x",
        marker + b"/",
        marker.replace(b"[", b"("),
    ):
        with pytest.raises(SchemaError):
            parse_subkey(bad)


# --- signed envelopes ------------------------------------------------------------------------


def _signed(identity: Identity = ALICE, **kw: object) -> SignedRecord:
    place = sample_placements(ALICE)[1]  # the expert card, owned by ALICE
    args: dict[str, object] = {"expiration": time.time() + 600, "item": place.item, **kw}
    return sign_record(identity, place.key, place.record, **args)  # type: ignore[arg-type]


def test_sign_and_open_every_kind() -> None:
    for place in sample_placements(ALICE):
        signed = sign_record(
            ALICE, place.key, place.record, expiration=time.time() + 60, item=place.item
        )
        reopened, record = open_record(signed.to_bytes())
        assert record == place.record and reopened == signed
        assert signed.subkey == dht_subkey(ALICE.public_key, place.item)


def _resigned(signed: SignedRecord, **changes: object) -> SignedRecord:
    """A validly signed envelope with changed fields (what a buggy or hostile signer could send)."""
    unsigned = dataclasses.replace(signed, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(unsigned, signature=ALICE.sign(unsigned.signed_message()))


def test_envelope_rejects_tampering() -> None:
    signed = _signed()
    cases = {
        SignatureError: [
            dataclasses.replace(signed, signature=os.urandom(64)),
            dataclasses.replace(signed, expiration=signed.expiration + 1),
            dataclasses.replace(signed, seq=signed.seq + 1),
            dataclasses.replace(signed, owner=MALLORY.public_key),
            dataclasses.replace(signed, key=dht_key("test", "expert", fake_hash("other"))),
        ],
        BindingError: [_resigned(signed, key=dht_key("test", "expert", fake_hash("other")))],
        ExpirationError: [
            _resigned(signed, expiration=signed.seq / 1e6 + 2 * 86400),
            _resigned(signed, expiration=signed.seq / 1e6 - 1),
            _resigned(signed, seq=int((time.time() + 3600) * 1e6), expiration=time.time() + 7200),
        ],
        VersionError: [_resigned(signed, key=signed.key.replace("/v1/", "/v2/"))],
        SchemaError: [_resigned(signed, key=dht_key("test", "claim", fake_hash("r"), 1))],
    }
    for error, bad_ones in cases.items():
        for bad in bad_ones:
            with pytest.raises(error):
                SignedRecord.from_bytes(bad.to_bytes()).open()


def test_signing_refuses_what_validators_would_reject() -> None:
    card = sample_card(ALICE)
    with pytest.raises(BindingError, match="cannot be stored"):
        sign_record(
            ALICE, dht_key("test", "claim", fake_hash("r"), 1), card, expiration=time.time() + 60
        )
    with pytest.raises(BindingError, match="item"):
        sign_record(
            ALICE,
            dht_key("test", "family", card.base_fingerprint),
            card,
            expiration=time.time() + 60,
        )
    with pytest.raises(BindingError, match="owner"):
        _signed(identity=MALLORY)  # a card owned by ALICE, signed by MALLORY
    with pytest.raises(ExpirationError):
        _signed(expiration=time.time() + 3 * 86400)
    with pytest.raises(ExpirationError):
        _signed(seq=int((time.time() + 3600) * 1e6))


def test_a_score_sits_at_its_domain_and_metric() -> None:
    from protocol.round_records import HELDBACK_METRIC, SCORE_METRIC, Score, score_item

    rid, cand = fake_hash("round"), fake_hash("cand")
    key = dht_key("test", "score", rid, cand)
    seen = Score(rid, cand, "prose", SCORE_METRIC, 1.5, 100, fake_hash("a"))
    held = dataclasses.replace(seen, metric=HELDBACK_METRIC, value=1.7)
    assert score_item("prose", SCORE_METRIC) == "prose"  # unguarded records keep their subkey
    assert score_item("prose", HELDBACK_METRIC) == "prose.heldback_bpb"
    for rec in (seen, held):
        signed = sign_record(
            ALICE, key, rec, expiration=time.time() + 60, item=score_item("prose", rec.metric)
        )
        assert open_record(signed.to_bytes())[1] == rec
    # One scorer cannot put a held-back score where the search score of the domain belongs,
    # nor the search score under another domain's item.
    for rec, item in ((held, "prose"), (seen, "prose.heldback_bpb"), (seen, "python")):
        with pytest.raises(BindingError, match="item"):
            sign_record(ALICE, key, rec, expiration=time.time() + 60, item=item)
