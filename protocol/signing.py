"""The signed envelope every DHT record travels in: who signed what, for which key, until when.

The signature covers a domain-separated canonical encoding of the envelope (key name, item, owner,
sequence, expiration, record bytes), so a record cannot be moved to another key, subkey, network,
protocol version or expiration. `seq` is the signing time in microseconds, strictly increasing per
owner: a newer record always wins and an older one is a replay.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from protocol import codec
from protocol.errors import (
    BindingError,
    ExpirationError,
    ProtocolError,
    SchemaError,
    SignatureError,
)
from protocol.identity import SIGNATURE_BYTES, Identity, check_public_key, verify
from protocol.keys import DhtKey, check_binding, dht_subkey, parse_dht_key
from protocol.schema import Record
from protocol.version import PROTOCOL_VERSION, check_version

ENVELOPE_TAG = b"unode/envelope/v1\x00"
MAX_ENVELOPE_BYTES = 8192  # a DHT value over ~16 KiB can kill hivemind's DHT process
MAX_CLOCK_SKEW = 60.0  # seconds a signer's clock may run ahead of ours
_FIELDS = ("v", "key", "item", "owner", "seq", "exp", "body", "sig")

_seq_lock = threading.Lock()
_last_seq = 0


def next_seq() -> int:
    """Microseconds since the Unix epoch, strictly increasing within this process."""
    global _last_seq
    with _seq_lock:
        _last_seq = max(time.time_ns() // 1000, _last_seq + 1)
        return _last_seq


@dataclasses.dataclass(frozen=True)
class SignedRecord:
    key: str  # the raw DHT key name (its hash is hivemind's key id)
    item: str  # subkey item ("" for kinds without items)
    owner: bytes  # 32-byte Ed25519 public key of the signer
    seq: int  # signing time in microseconds; strictly increasing per owner
    expiration: float  # the DHT expiration time (Unix seconds), bound by the signature
    body: bytes  # the record's canonical bytes (Record.to_bytes())
    signature: bytes  # 64 bytes
    version: int = PROTOCOL_VERSION

    def _unsigned(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "key": self.key,
            "item": self.item,
            "owner": self.owner,
            "seq": self.seq,
            "exp": self.expiration,
            "body": self.body,
        }

    def signed_message(self) -> bytes:
        return ENVELOPE_TAG + codec.encode(self._unsigned(), max_bytes=MAX_ENVELOPE_BYTES)

    def to_bytes(self) -> bytes:
        """The DHT value to store (pass it as `value=` to hivemind's DHT.store)."""
        return codec.encode(
            {**self._unsigned(), "sig": self.signature}, max_bytes=MAX_ENVELOPE_BYTES
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRecord:
        """Parse an envelope from a peer (schema only: call `open()` to verify and decode)."""
        value = codec.decode(data, max_bytes=MAX_ENVELOPE_BYTES)
        if not isinstance(value, dict) or set(value) != set(_FIELDS):
            raise SchemaError(f"envelope must have exactly the fields {list(_FIELDS)}")
        check_version(value["v"])
        key, item, owner, seq = value["key"], value["item"], value["owner"], value["seq"]
        exp, body, sig = value["exp"], value["body"], value["sig"]
        if not isinstance(key, str) or not isinstance(item, str) or not isinstance(body, bytes):
            raise SchemaError("envelope key/item must be str and body bytes")
        if type(seq) is not int or seq <= 0 or type(exp) is not float or not math.isfinite(exp):
            raise SchemaError("envelope seq must be a positive int and exp a finite float")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
            raise SchemaError(f"envelope signature must be {SIGNATURE_BYTES} bytes")
        return cls(key, item, check_public_key(owner), seq, exp, body, sig, value["v"])

    @property
    def dht_key(self) -> DhtKey:
        return parse_dht_key(self.key)

    @property
    def subkey(self) -> bytes:
        """The subkey this record must be stored under (pass it as `subkey=`)."""
        return dht_subkey(self.owner, self.item)

    def store_kwargs(self) -> dict[str, Any]:
        """Arguments for hivemind: `dht.store(**signed.store_kwargs())`."""
        return {
            "key": self.key,
            "subkey": self.subkey,
            "value": self.to_bytes(),
            "expiration_time": self.expiration,
        }

    def verify_signature(self) -> None:
        if not verify(self.owner, self.signed_message(), self.signature):
            raise SignatureError(f"bad signature on {self.key[:80]!r}")

    def check_times(self, now: float | None = None) -> None:
        """Signed no later than now + skew; expiration after signing and within the key's TTL cap."""
        now = time.time() if now is None else now
        signed_at, ttl = self.seq / 1e6, self.dht_key.spec.max_ttl
        if signed_at > now + MAX_CLOCK_SKEW:
            raise ExpirationError(f"signed {signed_at - now:.0f} s in the future")
        if not signed_at < self.expiration <= signed_at + ttl:
            raise ExpirationError(f"expiration not within {ttl:.0f} s after signing")

    def open(self, now: float | None = None) -> Record:
        """Verify signature, times and binding; return the decoded record. Raises ProtocolError."""
        key = self.dht_key
        self.check_times(now)
        self.verify_signature()
        record = key.spec.record.from_bytes(self.body)
        check_binding(key, self.item, self.owner, record)
        return record


def sign_record(
    identity: Identity,
    key: str,
    record: Record,
    *,
    expiration: float,
    item: str = "",
    seq: int | None = None,
) -> SignedRecord:
    """Sign `record` for DHT key name `key` (see protocol.keys.dht_key). Checks what validators will."""
    parsed = parse_dht_key(key)
    body = record.to_bytes()
    check_binding(parsed, item, identity.public_key, record)
    unsigned = SignedRecord(
        key, item, identity.public_key, seq or next_seq(), float(expiration), body, b""
    )
    unsigned.check_times()
    signed = dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_message()))
    if len(signed.to_bytes()) > MAX_ENVELOPE_BYTES:
        raise SchemaError("signed record is larger than a DHT value may be")
    return signed


def open_dht_dictionary(
    key: str, entries: Mapping[Any, Any], now: float | None = None
) -> tuple[list[tuple[SignedRecord, Record]], list[ProtocolError]]:
    """Verify every entry of a dictionary value fetched with `dht.get(key)`.

    `entries` maps subkey -> an object with `.value` (the envelope bytes) and `.expiration_time`
    (hivemind's ValueWithExpiration). Returns (accepted, rejected); accepted entries are checked
    for key, subkey and expiration binding, signature, times and schema.
    """
    accepted: list[tuple[SignedRecord, Record]] = []
    rejected: list[ProtocolError] = []
    for subkey, entry in entries.items():
        try:
            signed = SignedRecord.from_bytes(getattr(entry, "value", None))  # type: ignore[arg-type]
            if signed.key != key or signed.subkey != subkey:
                raise BindingError("entry was signed for another key or subkey")
            if signed.expiration != getattr(entry, "expiration_time", None):
                raise BindingError("entry expiration differs from the signed one")
            accepted.append((signed, signed.open(now)))
        except ProtocolError as err:
            rejected.append(err)
    return accepted, rejected


def open_record(data: bytes, now: float | None = None) -> tuple[SignedRecord, Record]:
    """Parse, verify and decode an envelope fetched from anywhere (DHT value, P2P, disk)."""
    signed = SignedRecord.from_bytes(data)
    return signed, signed.open(now)
