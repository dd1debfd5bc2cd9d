"""Property-based fuzz of every decoder of peer bytes: mutated records are never accepted where a
signature or hash protects them, and no decoder ever raises anything but a ProtocolError."""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter

import pytest
from hivemind.dht.validation import DHTRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import ProtocolError
from protocol.identity import Identity, public_key_from_peer_id
from protocol.keys import parse_dht_key, parse_subkey
from protocol.records import RECORD_TYPES, any_record_from_bytes
from protocol.samples import sample_manifest, sample_placements, sample_summary
from protocol.signing import open_record, sign_record
from protocol.stream import FrameSplitter, StreamDecoder, encode_stream, make_header
from protocol.validators import Ed25519SignatureValidator, UnodeRecordValidator, dht_key_id

ALICE = Identity.from_seed(b"a" * 32)
EXPIRATION = time.time() + 3000
SIGNED = [
    sign_record(ALICE, p.key, p.record, expiration=EXPIRATION, item=p.item)
    for p in sample_placements(ALICE)
]
ENVELOPES = [s.to_bytes() for s in SIGNED]
MANIFESTS = [sample_manifest(), sample_summary()]
STREAM_DATA = bytes(range(256)) * 13  # 3328 bytes: 4 chunks of 1 KiB, the last one short
STREAM_HEADER = make_header(STREAM_DATA, 1024)
FRAMES = list(encode_stream(STREAM_DATA, STREAM_HEADER))
EXAMPLES: Counter[str] = Counter()  # mutated inputs that a protected decoder had to reject


def fuzz(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


_SPECIAL = bytes(
    [0x00, 0xC0, 0xC1, 0xC2, 0xC3, 0xCB, 0xD9, 0xDC, 0xDE, 0xFF, 0x7F, 0x80, 0x90, 0xA0]
)


def mutate(data: bytes, originals: list[bytes], rng: random.Random) -> bytes:
    """1-4 edits: bit flips, msgpack-significant bytes, inserts, deletes, cuts, appends, splices."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.randrange(7), rng.randint(0, max(len(out) - 1, 0))
        if op == 0 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[at] = rng.choice(_SPECIAL)
        elif op == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del out[at : at + rng.randint(1, 16)]
        elif op == 4:
            del out[at:]
        elif op == 5:
            out += rng.randbytes(rng.randint(1, 8))
        else:
            other = rng.choice(originals)
            begin = rng.randint(0, len(other))
            out[at:at] = other[begin : begin + rng.randint(1, 64)]
    return bytes(out)


BATCH = 4  # mutations per hypothesis example: hypothesis' own overhead is ~2 ms per example


def mutated(originals: list[bytes]) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    """BATCH (original index, mutated bytes) pairs from one drawn seed (replayable on failure)."""

    def build(seed: int) -> list[tuple[int, bytes]]:
        rng, out = random.Random(seed), list[tuple[int, bytes]]()
        while len(out) < BATCH:
            index = rng.randrange(len(originals))
            data = mutate(originals[index], originals, rng)
            if data not in originals:
                out.append((index, data))
        return out

    return st.integers(0, 2**64 - 1).map(build)


@fuzz(1000)
@given(mutated(ENVELOPES))
def test_fuzz_signed_envelopes_never_accepted(batch: list[tuple[int, bytes]]) -> None:
    for _, data in batch:
        with pytest.raises(ProtocolError):
            open_record(data)
        EXAMPLES["envelope"] += 1


VALIDATOR = UnodeRecordValidator("test")
DHT_RECORDS = [
    DHTRecord(dht_key_id(s.key), codec.encode(s.subkey), codec.encode(s.to_bytes()), EXPIRATION)
    for s in SIGNED
]
SUBKEYS = [record.subkey for record in DHT_RECORDS]


def test_fuzz_originals_are_accepted() -> None:
    assert all(VALIDATOR.validate(record) for record in DHT_RECORDS)
    assert all(open_record(data) for data in ENVELOPES)


@fuzz(400)
@given(mutated(ENVELOPES))
def test_fuzz_dht_validator_never_accepts_values(batch: list[tuple[int, bytes]]) -> None:
    for index, data in batch:
        record = DHT_RECORDS[index]
        assert (
            VALIDATOR.validate(DHTRecord(record.key, record.subkey, codec.encode(data), EXPIRATION))
            is False
        )
        EXAMPLES["validator value"] += 1


@fuzz(250)
@given(mutated(SUBKEYS))
def test_fuzz_dht_validator_never_accepts_subkeys(batch: list[tuple[int, bytes]]) -> None:
    for index, subkey in batch:
        record = DHT_RECORDS[index]
        assert VALIDATOR.validate(DHTRecord(record.key, subkey, record.value, EXPIRATION)) is False
        EXAMPLES["validator subkey"] += 1


MANIFEST_BYTES = [m.to_bytes() for m in MANIFESTS]


@fuzz(400)
@given(mutated(MANIFEST_BYTES))
def test_fuzz_content_addressed_manifests_never_accepted(batch: list[tuple[int, bytes]]) -> None:
    for index, data in batch:
        manifest = MANIFESTS[index]
        with pytest.raises(ProtocolError):
            type(manifest).from_verified_bytes(data, manifest.hash())
        EXAMPLES["manifest"] += 1


@fuzz(500)
@given(mutated(FRAMES))
def test_fuzz_stream_frames_never_accepted(batch: list[tuple[int, bytes]]) -> None:
    for index, frame in batch:
        frames = list(FRAMES)
        frames[index] = frame
        decoder = StreamDecoder(STREAM_HEADER.object_hash)
        with pytest.raises(ProtocolError):
            for each in frames:
                decoder.feed(each)
            decoder.finish()
        EXAMPLES["stream"] += 1


SIGNER = Ed25519SignatureValidator(ALICE)
PROTECTED = DHTRecord(
    b"k" * 20, codec.encode(SIGNER.local_marker), codec.encode(b"payload"), EXPIRATION
)
SIGNED_VALUE = SIGNER.sign_value(PROTECTED)


def test_fuzz_ed25519_original_is_accepted() -> None:
    assert SIGNER.validate(DHTRecord(PROTECTED.key, PROTECTED.subkey, SIGNED_VALUE, EXPIRATION))


@fuzz(200)
@given(mutated([SIGNED_VALUE]))
def test_fuzz_ed25519_signature_validator_never_accepts(batch: list[tuple[int, bytes]]) -> None:
    for _, value in batch:
        assert (
            SIGNER.validate(DHTRecord(PROTECTED.key, PROTECTED.subkey, value, EXPIRATION)) is False
        )
        EXAMPLES["ed25519"] += 1


RECORD_BYTES = [p.record.to_bytes() for p in sample_placements(ALICE)] + MANIFEST_BYTES
PLAIN_DECODERS = [any_record_from_bytes, *(cls.from_bytes for cls in RECORD_TYPES.values())]


@fuzz(300)
@given(mutated(RECORD_BYTES))
def test_fuzz_plain_decoders_raise_only_protocol_errors(batch: list[tuple[int, bytes]]) -> None:
    """Unsigned decoders may accept a mutated record, but only a canonical, valid one."""
    for _, data in batch:
        with contextlib.suppress(ProtocolError):
            assert codec.encode(codec.decode(data)) == data
        for decode in PLAIN_DECODERS:
            with contextlib.suppress(ProtocolError):
                assert decode(data).to_bytes() == data
        splitter = FrameSplitter(max_frame=1 << 16)
        with contextlib.suppress(ProtocolError):
            splitter.feed(data)
            splitter.close()


@fuzz(300)
@given(st.text(max_size=300), st.binary(max_size=120))
def test_fuzz_key_and_subkey_parsers(text: str, raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_dht_key(text)
    with contextlib.suppress(ProtocolError):
        parse_subkey(raw)
    with contextlib.suppress(ProtocolError):
        public_key_from_peer_id(text)


def test_fuzz_total_mutated_records_rejected() -> None:
    """Runs last in this module: the protected decoders above rejected >= 10,000 mutated inputs."""
    if not EXAMPLES:
        pytest.skip("run with the whole module")
    assert sum(EXAMPLES.values()) >= 10_000, EXAMPLES
