"""Field specs and the strict struct/record base every record schema is built from.

A record is a frozen dataclass whose fields carry a Spec; to_bytes() checks then encodes the
canonical msgpack map {"t": TYPE, "v": PROTOCOL_VERSION, <fields>}; from_bytes() accepts exactly
that (every field present, nothing extra, exact types, ranges) or raises a ProtocolError.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, ClassVar, Self

from protocol import codec
from protocol.content import HASH_BYTES, record_hash
from protocol.errors import HashMismatchError, SchemaError
from protocol.version import PROTOCOL_VERSION, check_version


class Spec:
    """Checks one wire value (returns its Python form) and converts a Python value to wire form."""

    def check(self, value: object, path: str) -> Any:
        raise NotImplementedError

    def wire(self, value: Any) -> Any:
        return value


class Int(Spec):
    def __init__(self, lo: int = 0, hi: int = (1 << 63) - 1) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: object, path: str) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise SchemaError(f"{path}: {value!r} is not an int in [{self.lo}, {self.hi}]")
        return value


class Float(Spec):
    def __init__(self, lo: float = -1e12, hi: float = 1e12) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: object, path: str) -> float:
        if type(value) is not float or not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise SchemaError(f"{path}: {value!r} is not a float in [{self.lo}, {self.hi}]")
        return value

    def wire(self, value: Any) -> Any:
        return float(value) if type(value) is int else value


class Str(Spec):
    def __init__(
        self, max_len: int, pattern: str = r"[^\x00-\x1f\x7f]*", choices: tuple[str, ...] = ()
    ) -> None:
        self.max_len, self.re, self.choices = max_len, re.compile(pattern), choices

    def check(self, value: object, path: str) -> str:
        if not isinstance(value, str) or len(value) > self.max_len or not self.re.fullmatch(value):
            raise SchemaError(
                f"{path}: {str(value)[:80]!r} is not a str matching {self.re.pattern}"
            )
        if self.choices and value not in self.choices:
            raise SchemaError(f"{path}: {value!r} is not one of {list(self.choices)}")
        return value


class Bytes(Spec):
    def __init__(self, size: int | None = None, max_len: int = 1 << 16) -> None:
        self.size, self.max_len = size, max_len

    def check(self, value: object, path: str) -> bytes:
        if not isinstance(value, bytes) or len(value) > self.max_len:
            raise SchemaError(f"{path}: expected bytes of at most {self.max_len}")
        if self.size is not None and len(value) != self.size:
            raise SchemaError(f"{path}: expected exactly {self.size} bytes, got {len(value)}")
        return value


HASH = Bytes(HASH_BYTES)
TAG = Str(32, r"[a-z0-9][a-z0-9_.-]*")


class Opt(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def check(self, value: object, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def wire(self, value: Any) -> Any:
        return None if value is None else self.inner.wire(value)


class ListOf(Spec):
    """A list (a tuple in Python); `sorted_unique` demands strictly increasing items."""

    def __init__(self, inner: Spec, max_items: int, sorted_unique: bool = False) -> None:
        self.inner, self.max_items, self.sorted_unique = inner, max_items, sorted_unique

    def check(self, value: object, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list) or len(value) > self.max_items:
            raise SchemaError(f"{path}: expected a list of at most {self.max_items} items")
        items = tuple(self.inner.check(item, f"{path}[{i}]") for i, item in enumerate(value))
        if self.sorted_unique and any(a >= b for a, b in itertools.pairwise(items)):
            raise SchemaError(f"{path}: items must be sorted and unique")
        return items

    def wire(self, value: Any) -> Any:
        return [self.inner.wire(item) for item in value]


class MapOf(Spec):
    def __init__(self, key: Str, inner: Spec, max_items: int) -> None:
        self.key, self.inner, self.max_items = key, inner, max_items

    def check(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) > self.max_items:
            raise SchemaError(f"{path}: expected a map of at most {self.max_items} items")
        return {
            self.key.check(k, f"{path} key"): self.inner.check(v, f"{path}[{k!r}]")
            for k, v in value.items()
        }

    def wire(self, value: Any) -> Any:
        return {k: self.inner.wire(v) for k, v in value.items()}


class Nested(Spec):
    def __init__(self, struct: type[Struct]) -> None:
        self.struct = struct

    def check(self, value: object, path: str) -> Any:
        return self.struct.from_wire(value, path)

    def wire(self, value: Any) -> Any:
        return value.to_wire()


def spec(s: Spec) -> Any:
    """Declare a dataclass field with its wire spec: `name: int = spec(Int(0, 10))`."""
    return dataclasses.field(metadata={"spec": s})


@dataclasses.dataclass(frozen=True)
class Struct:
    """A frozen dataclass encoded as a map of its fields (used inside records)."""

    def to_wire(self) -> dict[str, Any]:
        return {
            f.name: f.metadata["spec"].wire(getattr(self, f.name)) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_wire(cls, value: object, path: str = "") -> Self:
        path = path or cls.__name__
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a map")
        fields = {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}
        if set(value) != set(fields):
            missing, extra = sorted(set(fields) - set(value)), sorted(set(value) - set(fields))
            raise SchemaError(f"{path}: missing fields {missing}, unexpected fields {extra}")
        obj = cls(**{name: s.check(value[name], f"{path}.{name}") for name, s in fields.items()})
        obj.check_invariants()
        return obj

    def check_invariants(self) -> None:
        """Cross-field rules (override); raise SchemaError."""


@dataclasses.dataclass(frozen=True)
class Record(Struct):
    """A top-level record: typed, versioned, canonical bytes."""

    TYPE: ClassVar[str] = ""
    MAX_BYTES: ClassVar[int] = 4096

    def to_bytes(self) -> bytes:
        wire = {"t": self.TYPE, "v": PROTOCOL_VERSION, **self.to_wire()}
        data = codec.encode(wire, max_bytes=self.MAX_BYTES)
        type(self).from_bytes(data)  # the bytes we send must pass our own strict decoder
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        value = codec.decode(data, max_bytes=cls.MAX_BYTES)
        if not isinstance(value, dict):
            raise SchemaError(f"{cls.__name__}: expected a map")
        if value.get("t") != cls.TYPE:
            raise SchemaError(f"{cls.__name__}: type tag {value.get('t')!r} is not {cls.TYPE!r}")
        check_version(value.get("v"))
        fields = {k: v for k, v in value.items() if k not in ("t", "v")}
        return cls.from_wire(fields, cls.__name__)

    @classmethod
    def from_verified_bytes(cls, data: bytes, expected_hash: bytes) -> Self:
        """Decode a content-addressed record (a manifest fetched from a peer) after checking that
        its bytes hash to `expected_hash` (from a signed card or proposal)."""
        if not isinstance(data, bytes) or record_hash(data) != expected_hash:
            raise HashMismatchError(f"{cls.__name__} bytes do not match the expected hash")
        return cls.from_bytes(data)

    def hash(self) -> bytes:
        """record_hash of the canonical bytes (a manifest's hash, a round id)."""
        return record_hash(self.to_bytes())
