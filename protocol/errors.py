"""Typed errors for everything a peer can send wrong (ProtocolError) and for the local key file.

A node catches ProtocolError at its network boundary, logs it with the peer id and goes on.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes or a record from a peer that this protocol version does not accept."""


class DecodeError(ProtocolError):
    """Not canonical msgpack of the allowed types (or trailing bytes, or too large)."""


class SchemaError(ProtocolError):
    """Decoded fine, but a field is missing, unexpected, of the wrong type or out of range."""


class VersionError(ProtocolError):
    """A record or key of another protocol version or another network."""


class SignatureError(ProtocolError):
    """A signature that does not verify, or a record signed by a key other than its owner's."""


class BindingError(ProtocolError):
    """A signed record that does not belong where it was found (DHT key, subkey, expiration)."""


class ExpirationError(ProtocolError):
    """An expiration (or signing time) outside the bounds the protocol allows."""


class ReplayError(ProtocolError):
    """A record older (lower sequence) than one already seen for the same key and owner."""


class SizeError(ProtocolError):
    """Bytes larger than the protocol allows in that place."""


class StreamError(ProtocolError):
    """A chunked object stream that is malformed: bad frame, reorder, truncation, extra data."""


class HashMismatchError(StreamError):
    """Data whose hash is not the one the signed manifest (or the stream header) promised."""


class IdentityError(Exception):
    """A local key file problem (not peer input): missing, unreadable, malformed or exposed.

    `path`, `problem` and `fix` let the CLI turn it into a one-line user error.
    """

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path}: {problem}; {fix}")
