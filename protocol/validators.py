"""hivemind RecordValidatorBase plug-ins that keep a unode DHT clean.

hivemind calls `validate()` when a peer asks us to store a record and when a peer returns a record
we asked for; `sign_value()` when our application stores; `strip_value()` before returning a value
to our application. Validators must never raise into hivemind's network loop: each rejection
returns False and logs one line. `unode_validators(network)` is the set a unode DHT runs with.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from protocol import codec
from protocol.errors import BindingError, ProtocolError, ReplayError
from protocol.identity import Identity, verify
from protocol.keys import MAX_TTL, owner_marker, parse_subkey
from protocol.signing import MAX_CLOCK_SKEW, MAX_ENVELOPE_BYTES, SignedRecord
from protocol.version import check_network_name

logger = logging.getLogger(__name__)
_REGULAR_VALUE = codec.encode(None)  # hivemind's subkey tag for a plain (non-dictionary) value


class _LogBudget:
    """At most `burst` warnings per `period` seconds: a peer flooding bad records must not
    flood the operator's log. What is held back is counted and said with the next warning."""

    def __init__(
        self, burst: int = 20, period: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst, self.period, self.clock = burst, period, clock
        self.window_start, self.used, self.held = -float("inf"), 0, 0

    def take(self) -> int | None:
        """None: stay quiet; otherwise the number of warnings held back since the last one."""
        now = self.clock()
        if now - self.window_start >= self.period:
            self.window_start, self.used = now, 0
        if self.used >= self.burst:
            self.held += 1
            return None
        self.used += 1
        held, self.held = self.held, 0
        return held


_REJECT_LOG = _LogBudget()


def log_rejection(log: logging.Logger, msg: str, *args: object) -> None:
    """A warning about a rejected peer record, within the shared rate limit."""
    held = _REJECT_LOG.take()
    if held is None:
        return
    if held:
        msg, args = msg + " (%d more rejections not logged)", (*args, held)
    log.warning(msg, *args)


def _reject(record: DHTRecord, reason: object) -> bool:
    log_rejection(logger, "rejected DHT record key=%s: %s", record.key.hex()[:16], reason)
    return False


def dht_key_id(key_name: str) -> bytes:
    """The key id hivemind stores `key_name` under (sha1 of its msgpack encoding)."""
    return bytes(DHTID.generate(source=key_name).to_bytes())


class Ed25519SignatureValidator(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped
    """hivemind's RSASignatureValidator, with Ed25519: a record whose key or subkey contains
    `[owner:<base64 key>]` must end with `[signature:<64 bytes>]` made by that key."""

    _MARKER_RE = re.compile(rb"\[owner:([A-Za-z0-9+/]{43}=)\]")
    _SIG_PREFIX, _SIG_LEN = b"[signature:", 11 + 64 + 1
    _TAG = b"unode/dht-record/v1\x00"

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self.local_marker = owner_marker(identity.public_key)

    def _message(self, record: DHTRecord, value: bytes) -> bytes:
        fields = [record.key, record.subkey, value, float(record.expiration_time)]
        return self._TAG + codec.encode(fields, max_bytes=1 << 24)

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.local_marker not in record.key and self.local_marker not in record.subkey:
            return bytes(record.value)
        signature = self._identity.sign(self._message(record, record.value))
        return bytes(record.value) + self._SIG_PREFIX + signature + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        tail = record.value[-self._SIG_LEN :]
        if tail.startswith(self._SIG_PREFIX) and tail.endswith(b"]"):
            return bytes(record.value[: -self._SIG_LEN])
        return bytes(record.value)

    def validate(self, record: DHTRecord) -> bool:
        markers = set(self._MARKER_RE.findall(record.key) + self._MARKER_RE.findall(record.subkey))
        if not markers:
            return True  # not a protected record
        if len(markers) > 1:
            return _reject(record, "key and subkey name different owners")
        try:
            public_key = base64.b64decode(markers.pop(), validate=True)
        except (binascii.Error, ValueError):
            return _reject(record, "owner marker is not base64")
        stripped = self.strip_value(record)
        if len(stripped) == len(record.value):
            return _reject(record, "owner-marked record without a signature")
        signature = record.value[len(stripped) + len(self._SIG_PREFIX) : -1]
        if not verify(public_key, self._message(record, stripped), signature):
            return _reject(record, "bad owner signature")
        return True

    @property
    def priority(self) -> int:
        return 10  # validated before (and stripped for) validators that deserialize values

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, Ed25519SignatureValidator)


class SizeCapValidator(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped
    """Rejects values and subkeys larger than unode ever sends (big values kill hivemind's DHT)."""

    def __init__(self, max_value: int = MAX_ENVELOPE_BYTES + 16, max_subkey: int = 256) -> None:
        self.max_value, self.max_subkey = max_value, max_subkey

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > self.max_value or len(record.subkey) > self.max_subkey:
            return _reject(
                record, f"value {len(record.value)} B / subkey {len(record.subkey)} B too large"
            )
        return True

    @property
    def priority(self) -> int:
        return 30  # cheapest check first


class ExpirationCapValidator(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped
    """Rejects expirations further in the future than `max_ttl` seconds (pinned records)."""

    def __init__(self, max_ttl: float = MAX_TTL + MAX_CLOCK_SKEW) -> None:
        self.max_ttl = max_ttl

    def validate(self, record: DHTRecord) -> bool:
        if not record.expiration_time <= time.time() + self.max_ttl:
            return _reject(record, f"expiration more than {self.max_ttl:.0f} s ahead")
        return True

    @property
    def priority(self) -> int:
        return 20


class UnodeRecordValidator(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped
    """Accepts only signed unode envelopes of `network`, each bound to the exact key id, subkey
    and expiration it is stored under, schema-checked, and not older than one already seen."""

    def __init__(self, network: str, replay_cache_size: int = 100_000) -> None:
        self.network = check_network_name(network)
        self.replay_cache_size = replay_cache_size
        self._latest: OrderedDict[tuple[bytes, bytes], int] = OrderedDict()

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except ReplayError as err:
            # Usually a stale replica: a peer that missed the owner's latest refresh returns
            # the previous version to a lookup. Dropped, but no sign of a bad peer: not a warning.
            logger.debug("dropped older DHT record key=%s: %s", record.key.hex()[:16], err)
            return False
        except ProtocolError as err:
            return _reject(record, f"{type(err).__name__}: {err}")
        return True

    def check(self, record: DHTRecord) -> SignedRecord:
        """validate() with the reason: raises a ProtocolError subclass."""
        if record.subkey == _REGULAR_VALUE:
            raise BindingError("plain values are not allowed (they would replace a dictionary)")
        subkey = codec.decode(record.subkey, max_bytes=512)
        owner, item = parse_subkey(subkey)
        envelope = codec.decode(record.value, max_bytes=MAX_ENVELOPE_BYTES + 16)
        if not isinstance(envelope, bytes):
            raise BindingError("value is not a signed envelope")
        signed = SignedRecord.from_bytes(envelope)
        if signed.dht_key.network != self.network:
            raise BindingError(f"record of network {signed.dht_key.network!r}")
        if dht_key_id(signed.key) != record.key:
            raise BindingError("envelope names another DHT key")
        if signed.owner != owner or signed.item != item:
            raise BindingError("envelope owner or item differs from the subkey")
        if signed.expiration != record.expiration_time:
            raise BindingError("stored expiration differs from the signed one")
        signed.open()
        self._check_replay(record.key, record.subkey, signed.seq)
        return signed

    def _check_replay(self, key_id: bytes, subkey: bytes, seq: int) -> None:
        slot = (key_id, subkey)
        latest = self._latest.get(slot, 0)
        if seq < latest:
            raise ReplayError(f"sequence {seq} is older than {latest} already seen")
        self._latest[slot] = seq
        self._latest.move_to_end(slot)
        while len(self._latest) > self.replay_cache_size:
            self._latest.popitem(last=False)

    @property
    def priority(self) -> int:
        return 5


def unode_validators(network: str) -> list[RecordValidatorBase]:
    """The validators every unode DHT runs with: `hivemind.DHT(record_validators=...)`."""
    return [SizeCapValidator(), ExpirationCapValidator(), UnodeRecordValidator(network)]


__all__ = [
    "Ed25519SignatureValidator",
    "ExpirationCapValidator",
    "SizeCapValidator",
    "UnodeRecordValidator",
    "dht_key_id",
    "unode_validators",
]
