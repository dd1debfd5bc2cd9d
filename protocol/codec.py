"""Canonical msgpack: the one byte encoding of every record, hash and signature input.

Allowed values: None, bool, int (-2**63 .. 2**64-1), finite float (always float64), str, bytes,
list (tuples encode as lists), dict with str keys (sorted by their UTF-8 bytes). Decoding is
strict: it rejects trailing bytes, other types, and any encoding that is not the canonical one.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgpack

from protocol.errors import DecodeError, SizeError

MAX_DEPTH = 16
DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: records are small; tensors never travel as msgpack


def _canonical(value: Any, depth: int) -> Any:
    """Check `value` and return it with dicts rebuilt in sorted key order, tuples as lists."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"nesting deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise DecodeError(f"integer {value} out of 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError(f"float {value} is not finite")
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(item, depth + 1) for item in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise DecodeError(f"map key {key!r} is not a str")
        # code-point order is UTF-8 byte order, so sorting the str keys sorts their encodings
        return {key: _canonical(value[key], depth + 1) for key in sorted(value)}
    raise DecodeError(f"type {type(value).__name__} is not allowed in a record")


def _check_decoded(value: Any, depth: int) -> None:
    """Like _canonical, for a freshly decoded value: checks in place, demands sorted map keys."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"nesting deeper than {MAX_DEPTH}")
    if isinstance(value, list):
        for item in value:
            _check_decoded(item, depth + 1)
    elif isinstance(value, dict):
        keys = list(value)
        for key in keys:
            if not isinstance(key, str):
                raise DecodeError(f"map key {key!r} is not a str")
        if any(a >= b for a, b in itertools.pairwise(keys)):
            raise DecodeError("map keys are not in canonical (sorted) order")
        for item in value.values():
            _check_decoded(item, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError(f"float {value} is not finite")
    elif not (value is None or isinstance(value, (bool, int, str, bytes))):
        raise DecodeError(f"type {type(value).__name__} is not allowed in a record")


def encode(value: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The canonical encoding of `value`; raises DecodeError / SizeError like `decode` would."""
    data: bytes = msgpack.packb(_canonical(value, 0), use_bin_type=True, use_single_float=False)
    if len(data) > max_bytes:
        raise SizeError(f"encoding is {len(data)} bytes, more than {max_bytes}")
    return data


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode canonical msgpack from a peer; anything else raises a ProtocolError subclass."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise SizeError(f"{len(data)} bytes is more than {max_bytes}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
            ext_hook=_reject_ext,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as err:
        raise DecodeError(f"not valid msgpack: {type(err).__name__}: {err}") from None
    _check_decoded(value, 0)
    # decoded maps keep their wire order, so re-encoding as is reproduces canonical input exactly
    again = msgpack.packb(value, use_bin_type=True, use_single_float=False)
    if again != bytes(data):
        raise DecodeError("not the canonical encoding (int/str/bin width or float32)")
    return value
