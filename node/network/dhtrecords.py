"""Signed records in and out of hivemind's DHT: store envelopes, read and verify every one.

Whatever a DHT lookup returns is peer input: each envelope is opened (signature, times, key
binding, schema) and dropped with a log line if anything is wrong; nothing unverified escapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hivemind.utils import get_dht_time

from node.metrics import registry as metrics
from protocol.errors import ProtocolError
from protocol.schema import Record
from protocol.signing import SignedRecord, open_record

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Verified(Generic[R]):
    """A record that passed every check, with the envelope it came in."""

    envelope: SignedRecord
    record: R


async def put(dht: Any, signed: SignedRecord) -> bool:
    """Store one envelope under its key and owner subkey; False if no peer accepted it."""
    future = dht.store(
        signed.key, signed.to_bytes(), signed.expiration, subkey=signed.subkey, return_future=True
    )
    stored = bool(await future)
    if stored:
        metrics.RECORDS_PUBLISHED.inc()
    return stored


async def get_verified(dht: Any, key: str, kind: type[R], latest: bool = True) -> list[Verified[R]]:
    """Every valid record of type `kind` under `key` (one per owner subkey)."""
    found = await dht.get(key, latest=latest, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    out: list[Verified[R]] = []
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        try:
            if not isinstance(value, bytes):
                raise ProtocolError(f"value of type {type(value).__name__} is not an envelope")
            envelope, record = open_record(value, now)
            if envelope.key != key or envelope.subkey != subkey:
                raise ProtocolError("envelope was stored under another key or subkey")
            if not isinstance(record, kind):
                raise ProtocolError(f"{type(record).__name__} where a {kind.__name__} belongs")
        except ProtocolError as err:
            log.warning("dropped a record under %s (subkey %r): %s", key, subkey, err)
            metrics.RECORDS_REJECTED.inc()
            continue
        out.append(Verified(envelope, record))
    return out
