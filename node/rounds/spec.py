"""A round's full description (the blob whose record hash is the proposal's `recipe_hash`).

It travels over P2P (too large for the DHT): the recipe with `unode://<expert id>` model
references, the work units (lists of output tensor names), and the round's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import codec
from protocol.content import record_hash
from protocol.errors import ProtocolError

SPEC_VERSION = 1
MAX_SPEC_BYTES = 4 << 20
URI = "unode://"
MODES = ("merge", "search", "fuse")


@dataclass(frozen=True)
class RoundSpec:
    """What every participant needs to compute, verify and assemble a round."""

    mode: str  # "merge": compute units; "search": score candidates (see search.py)
    recipe: dict[str, Any]  # mergekit-style mapping; models are unode://<64 hex>
    units: tuple[tuple[str, ...], ...]  # output tensor names per work unit
    claim_ttl: float = 30.0  # seconds a claim lives unless its worker renews it
    verify_rate: float = 0.25  # share of other workers' units each worker recomputes
    name: str = "merged"
    domain: str = "general"
    candidates: tuple[dict[str, Any], ...] = ()  # search mode: the recipes peers score
    guard: bool = False  # search mode: peers also score a held-back fold (search.py)

    def to_bytes(self) -> bytes:
        fields: dict[str, Any] = {
            "v": SPEC_VERSION,
            "mode": self.mode,
            "recipe": self.recipe,
            "units": [list(u) for u in self.units],
            "claim_ttl": float(self.claim_ttl),
            "verify_rate": float(self.verify_rate),
            "name": self.name,
            "domain": self.domain,
            "candidates": list(self.candidates),
        }
        if self.guard:  # only when set: unguarded specs keep the bytes (and hashes) they had
            fields["guard"] = True
        return codec.encode(fields, max_bytes=MAX_SPEC_BYTES)

    def hash(self) -> bytes:
        return record_hash(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundSpec:
        """Decode a spec from a peer (canonical msgpack only; every field type-checked)."""
        value = codec.decode(data, max_bytes=MAX_SPEC_BYTES)
        try:
            if not isinstance(value, dict) or value.get("v") != SPEC_VERSION:
                raise TypeError("not a round spec of this version")
            units = tuple(tuple(str(n) for n in u) for u in value["units"])
            spec = cls(
                mode=str(value["mode"]),
                recipe=dict(value["recipe"]),
                units=units,
                claim_ttl=float(value["claim_ttl"]),
                verify_rate=float(value["verify_rate"]),
                name=str(value["name"]),
                domain=str(value["domain"]),
                candidates=tuple(dict(c) for c in value["candidates"]),
                guard=value.get("guard", False),
            )
            if not isinstance(spec.guard, bool):
                raise TypeError("guard is not a bool")
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"malformed round spec: {err}") from None
        if spec.mode not in MODES or not units or not 0.0 <= spec.verify_rate <= 1.0:
            raise ProtocolError("round spec has an unknown mode, no units or a bad verify rate")
        if not 1.0 <= spec.claim_ttl <= 3600.0:
            raise ProtocolError("round spec claim_ttl out of range")
        return spec


def candidate_id(recipe: dict[str, Any]) -> bytes:
    """A candidate recipe's id (the `candidate` of its Score records)."""
    return record_hash(codec.encode(recipe, max_bytes=MAX_SPEC_BYTES))


def expert_refs(recipe: dict[str, Any]) -> list[str]:
    """Every `unode://` model reference of a recipe, in first-seen order."""
    found: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str) and x.startswith(URI) and x not in found:
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(recipe)
    return found


def expert_id_of(ref: str) -> bytes:
    """The 32-byte expert id of `unode://<64 hex>` (ProtocolError otherwise)."""
    text = ref[len(URI) :] if ref.startswith(URI) else ""
    try:
        eid = bytes.fromhex(text)
    except ValueError:
        eid = b""
    if len(eid) != 32:
        raise ProtocolError(f"not a unode://<64 hex> reference: {ref[:80]!r}")
    return eid


def split_units(names: list[str], sizes: list[int], n_units: int) -> tuple[tuple[str, ...], ...]:
    """Contiguous groups of plan-order tensors with about equal bytes (layers stay together)."""
    n_units = max(1, min(n_units, len(names)))
    total = sum(sizes) or 1
    units: list[list[str]] = [[]]
    done = 0
    for name, size in zip(names, sizes, strict=True):
        target = total * len(units) / n_units
        if units[-1] and done + size / 2 > target and len(units) < n_units:
            units.append([])
        units[-1].append(name)
        done += size
    return tuple(tuple(u) for u in units)
