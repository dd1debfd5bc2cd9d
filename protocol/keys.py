"""Every unode DHT key: its name pattern, record type, subkey item rule, TTL cap and binding rule.

A key name is `unode/<network>/v<version>/<kind path>`; hivemind stores it under
sha1(msgpack(name)). Every unode key is a dictionary whose subkeys are owner markers
`[owner:<base64 Ed25519 key>]`, optionally followed by `/<item>`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import re

from protocol.errors import BindingError, SchemaError, VersionError
from protocol.identity import PUBLIC_KEY_BYTES, check_public_key, peer_id_from_public_key
from protocol.records import ExpertCard, PeerRecord, ProviderRecord
from protocol.round_records import RoundProposal, Score, UnitResult, WorkClaim, score_item
from protocol.schema import Record
from protocol.version import KEY_ROOT, PROTOCOL_VERSION, check_network_name, namespace

HOUR, DAY = 3600.0, 86400.0
MAX_TTL = 7 * DAY  # no unode record may be stored for longer
MAX_KEY_NAME = 256
_HEX = re.compile(r"[0-9a-f]{64}")
_UNIT = re.compile(r"0|[1-9][0-9]{0,6}")
_TAG = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_MARKER_PREFIX, _MARKER_SUFFIX = b"[owner:", b"]"
MARKER_BYTES = len(_MARKER_PREFIX) + 44 + len(_MARKER_SUFFIX)  # 52 (54 once msgpack-wrapped)


@dataclasses.dataclass(frozen=True)
class KeySpec:
    kind: str
    path: tuple[str, ...]  # literal segments, or "{hash}" (64 hex) / "{unit}" (decimal)
    record: type[Record]
    item: str  # "" (no item), "hash" (64 hex) or "tag" (a short lowercase tag)
    max_ttl: float


KEY_SPECS: dict[str, KeySpec] = {
    s.kind: s
    for s in (
        KeySpec("peers", ("peers",), PeerRecord, "", HOUR),
        KeySpec("expert", ("expert", "{hash}"), ExpertCard, "", DAY),
        KeySpec("family", ("family", "{hash}"), ExpertCard, "hash", DAY),
        KeySpec("provider", ("provider", "{hash}"), ProviderRecord, "", 6 * HOUR),
        KeySpec("rounds", ("rounds",), RoundProposal, "hash", MAX_TTL),
        KeySpec("claim", ("round", "{hash}", "claim", "{unit}"), WorkClaim, "", HOUR),
        KeySpec("result", ("round", "{hash}", "result", "{unit}"), UnitResult, "", MAX_TTL),
        KeySpec("score", ("round", "{hash}", "score", "{hash}"), Score, "tag", MAX_TTL),
    )
}


@dataclasses.dataclass(frozen=True)
class DhtKey:
    """A parsed key name; `params` are the hex hashes / unit numbers of the path, in order."""

    network: str
    kind: str
    params: tuple[str, ...]

    @property
    def spec(self) -> KeySpec:
        return KEY_SPECS[self.kind]

    @property
    def name(self) -> str:
        params = iter(self.params)
        segments = [next(params) if s.startswith("{") else s for s in self.spec.path]
        return "/".join([namespace(self.network), *segments])


def _param(template: str, value: bytes | int | str) -> str:
    if isinstance(value, bytes):
        value = value.hex()
    text = str(value)
    if (template == "{hash}" and not _HEX.fullmatch(text)) or (
        template == "{unit}" and not _UNIT.fullmatch(text)
    ):
        raise SchemaError(f"key parameter {text[:80]!r} does not fit {template}")
    return text


def dht_key(network: str, kind: str, *params: bytes | int | str) -> str:
    """The key name to pass to hivemind, e.g. dht_key('main', 'expert', expert_id)."""
    if kind not in KEY_SPECS:
        raise SchemaError(f"unknown key kind {kind!r}")
    templates = [s for s in KEY_SPECS[kind].path if s.startswith("{")]
    if len(params) != len(templates):
        raise SchemaError(f"key kind {kind} takes {len(templates)} parameters")
    key = DhtKey(check_network_name(network), kind, tuple(map(_param, templates, params)))
    return key.name


def parse_dht_key(name: object) -> DhtKey:
    """Parse a key name from a peer; raises VersionError / SchemaError if it is not a unode key."""
    if not isinstance(name, str) or len(name) > MAX_KEY_NAME:
        raise SchemaError("a key name is a str of at most 256 characters")
    return _parse_dht_key(name)


@functools.lru_cache(maxsize=4096)  # the same few keys are validated over and over
def _parse_dht_key(name: str) -> DhtKey:
    parts = name.split("/")
    if len(parts) < 4 or parts[0] != KEY_ROOT:
        raise SchemaError(f"{name[:80]!r} is not a unode key")
    check_network_name(parts[1])
    if parts[2] != f"v{PROTOCOL_VERSION}":
        raise VersionError(f"key {name[:80]!r} is not protocol v{PROTOCOL_VERSION}")
    for spec in KEY_SPECS.values():
        if len(spec.path) == len(parts) - 3 and all(
            s.startswith("{") or s == p for s, p in zip(spec.path, parts[3:], strict=True)
        ):
            params = [
                _param(s, p) for s, p in zip(spec.path, parts[3:], strict=True) if s[0] == "{"
            ]
            return DhtKey(parts[1], spec.kind, tuple(params))
    raise SchemaError(f"{name[:80]!r} matches no unode key pattern")


def owner_marker(public_key: bytes) -> bytes:
    """`[owner:<base64 of the 32-byte Ed25519 key>]`: 52 bytes."""
    return _MARKER_PREFIX + base64.b64encode(check_public_key(public_key)) + _MARKER_SUFFIX


def dht_subkey(public_key: bytes, item: str = "") -> bytes:
    """The subkey an owner stores under: its marker, plus `/<item>` for itemised kinds."""
    return owner_marker(public_key) + (b"/" + item.encode() if item else b"")


def parse_subkey(subkey: object) -> tuple[bytes, str]:
    """(owner public key, item) from a subkey; SchemaError if it is not an owner marker."""
    if not isinstance(subkey, bytes) or not subkey.startswith(_MARKER_PREFIX):
        raise SchemaError("subkey is not an owner marker")
    end = MARKER_BYTES - 1
    if len(subkey) < MARKER_BYTES or subkey[end : end + 1] != _MARKER_SUFFIX:
        raise SchemaError("subkey owner marker is malformed")
    try:
        public_key = base64.b64decode(subkey[len(_MARKER_PREFIX) : end], validate=True)
    except (binascii.Error, ValueError):
        raise SchemaError("subkey owner marker is not base64") from None
    if len(public_key) != PUBLIC_KEY_BYTES or owner_marker(public_key) != subkey[:MARKER_BYTES]:
        raise SchemaError("subkey owner marker is not a canonical Ed25519 key")
    rest = subkey[MARKER_BYTES:]
    if rest and (rest[:1] != b"/" or len(rest) < 2):
        raise SchemaError("subkey item must follow the marker as `/<item>`")
    try:
        return public_key, rest[1:].decode("ascii")
    except UnicodeDecodeError:
        raise SchemaError("subkey item is not ASCII") from None


def check_item(spec: KeySpec, item: str) -> None:
    pattern = {"": None, "hash": _HEX, "tag": _TAG}[spec.item]
    if (pattern is None and item) or (pattern is not None and not pattern.fullmatch(item)):
        raise BindingError(f"subkey item {item[:80]!r} does not fit key kind {spec.kind}")


def check_binding(key: DhtKey, item: str, owner: bytes, record: Record) -> None:
    """Raise BindingError unless `record` (signed by `owner`) belongs at (key, item)."""
    check_item(key.spec, item)
    if not isinstance(record, key.spec.record):
        raise BindingError(f"a {type(record).__name__} cannot be stored at a {key.kind} key")
    p = key.params
    rules: list[tuple[bool, str]] = []
    if isinstance(record, ExpertCard):
        rules.append((record.owner == owner, "card owner is not the signer"))
        if key.kind == "expert":
            rules.append((record.expert_id.hex() == p[0], "expert id differs from the key"))
        else:
            rules.append((record.base_fingerprint.hex() == p[0], "base fingerprint differs"))
            rules.append((record.expert_id.hex() == item, "expert id differs from the item"))
    elif isinstance(record, (PeerRecord, ProviderRecord)):
        rules.append(
            (record.peer_id == peer_id_from_public_key(owner), "peer id is not the signer's")
        )
        if isinstance(record, ProviderRecord):
            rules.append((record.object_hash.hex() == p[0], "object hash differs from the key"))
    elif isinstance(record, RoundProposal):
        rules.append((record.round_id.hex() == item, "round id differs from the item"))
    elif isinstance(record, (WorkClaim, UnitResult)):
        rules.append(
            (record.round_id.hex() == p[0] and str(record.unit) == p[1], "round/unit differ")
        )
    elif isinstance(record, Score):
        rules.append((record.round_id.hex() == p[0], "round id differs from the key"))
        rules.append((record.candidate.hex() == p[1], "candidate differs from the key"))
        want = score_item(record.domain, record.metric)
        rules.append((want == item, "domain and metric differ from the item"))
    for ok, problem in rules:
        if not ok:
            raise BindingError(f"{key.kind} key: {problem}")
