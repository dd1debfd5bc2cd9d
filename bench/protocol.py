"""Protocol benchmark: sign+verify per DHT record, unode Ed25519 vs hivemind's RSASignatureValidator,
measured side by side (interleaved rounds, one process), and record sizes.

Run: .venv/bin/python bench/protocol.py [--n 300] [--rounds 5]
"""

# ruff: noqa: E402  (bench/ must leave sys.path before `protocol` is imported)
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# This file is named like the package it measures: keep bench/ off sys.path so that
# `import protocol` finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey

from protocol import codec
from protocol.identity import Identity
from protocol.samples import sample_placements
from protocol.signing import sign_record
from protocol.validators import Ed25519SignatureValidator, UnodeRecordValidator, dht_key_id


def per_op_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def hivemind_style_round_trip(
    validator: Any, key: bytes, marker: bytes, body: bytes
) -> Callable[[], bool]:
    """sign_value then validate, exactly as hivemind does for an owner-marked subkey."""
    record = DHTRecord(key, codec.encode(marker), codec.encode(body), time.time() + 600)

    def run() -> bool:
        value = validator.sign_value(record)
        ok = bool(
            validator.validate(DHTRecord(record.key, record.subkey, value, record.expiration_time))
        )
        assert ok
        return ok

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="operations per timing round")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds (median reported)"
    )
    args = parser.parse_args()

    identity = Identity.generate()
    rsa = RSASignatureValidator(RSAPrivateKey())
    ed = Ed25519SignatureValidator(identity)
    unode = UnodeRecordValidator("bench")
    card_place = sample_placements(identity, "bench")[1]
    body = card_place.record.to_bytes()
    key = bytes(DHTID.generate(source=card_place.key).to_bytes())

    def unode_envelope() -> bool:
        signed = sign_record(
            identity, card_place.key, card_place.record, expiration=time.time() + 600
        )
        record = DHTRecord(
            dht_key_id(signed.key),
            codec.encode(signed.subkey),
            codec.encode(signed.to_bytes()),
            signed.expiration,
        )
        ok = bool(unode.validate(record))
        assert ok
        return ok

    cases = {
        "hivemind RSASignatureValidator (RSA-2048)": hivemind_style_round_trip(
            rsa, key, rsa.local_public_key, body
        ),
        "unode Ed25519SignatureValidator": hivemind_style_round_trip(
            ed, key, ed.local_marker, body
        ),
        "unode envelope (sign_record + UnodeRecordValidator)": unode_envelope,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():  # interleaved: machine load hits every case alike
            times[name].append(per_op_us(fn, args.n))
    rsa_us = statistics.median(times[next(iter(cases))])
    print(f"sign+verify per record (median of {args.rounds} interleaved rounds x {args.n} ops)")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<52} {med:9.1f} us   RSA/this = {rsa_us / med:5.2f}x")

    rsa_marker = codec.encode(rsa.local_public_key)
    ed_marker = codec.encode(ed.local_marker)
    rsa_sig = len(rsa.sign_value(DHTRecord(key, rsa_marker, codec.encode(body), 0.0))) - len(
        codec.encode(body)
    )
    ed_sig = len(ed.sign_value(DHTRecord(key, ed_marker, codec.encode(body), 0.0))) - len(
        codec.encode(body)
    )
    print("\nsizes (bytes)")
    print(
        f"  owner marker subkey (msgpack)       RSA {len(rsa_marker):5d}   Ed25519 {len(ed_marker):5d}   ratio {len(rsa_marker) / len(ed_marker):.1f}x"
    )
    print(
        f"  signature appended to the value     RSA {rsa_sig:5d}   Ed25519 {ed_sig:5d}   ratio {rsa_sig / ed_sig:.1f}x"
    )
    rsa_total = len(rsa_marker) + len(codec.encode(body)) + rsa_sig
    ed_total = len(ed_marker) + len(codec.encode(body)) + ed_sig
    print(
        f"  expert card record (subkey + value) RSA {rsa_total:5d}   Ed25519 {ed_total:5d}   ratio {rsa_total / ed_total:.2f}x"
    )
    print("\nunode envelopes per key kind (record body -> envelope bytes; subkey bytes)")
    for place in sample_placements(identity, "bench"):
        signed = sign_record(
            identity, place.key, place.record, expiration=time.time() + 600, item=place.item
        )
        kind = place.key.split("/")[3]
        print(
            f"  {kind:<10} {type(place.record).__name__:<15} {len(place.record.to_bytes()):5d} -> {len(signed.to_bytes()):5d}; subkey {len(codec.encode(signed.subkey)):4d}"
        )


if __name__ == "__main__":
    main()
