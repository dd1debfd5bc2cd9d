"""Ed25519 identity: key generation, the key file (0600), signing, and the matching libp2p peer id.

The key file is a libp2p-protobuf Ed25519 private key (68 bytes), so the same file is hivemind's
`identity_path`: the node's libp2p peer id and its record-owner key are provably the same key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import IdentityError, SchemaError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
KEY_FILE_NAME = "identity.key"
# libp2p crypto.pb: PrivateKey{key_type=Ed25519(1), data=seed||public} and PublicKey{1, public}
_PRIVATE_PREFIX = b"\x08\x01\x12\x40"
_PUBLIC_PREFIX = b"\x08\x01\x12\x20"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _b58encode(data: bytes) -> str:
    number, out = int.from_bytes(data, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        out = _B58[digit] + out
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + out


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        index = _B58.find(char)
        if index < 0:
            raise SchemaError(f"peer id {text[:60]!r} is not base58")
        number = number * 58 + index
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id ('12D3KooW...') of an Ed25519 key: identity multihash of its protobuf."""
    check_public_key(public_key)
    encoded = _PUBLIC_PREFIX + public_key
    return _b58encode(bytes([0x00, len(encoded)]) + encoded)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of peer_id_from_public_key; raises SchemaError for non-Ed25519 or malformed ids."""
    if not isinstance(peer_id, str) or len(peer_id) > 64:
        raise SchemaError("peer id must be a str of at most 64 characters")
    raw = _b58decode(peer_id)
    if len(raw) != 38 or raw[:2] != b"\x00\x24" or raw[2:6] != _PUBLIC_PREFIX:
        raise SchemaError(f"peer id {peer_id!r} is not an Ed25519 libp2p peer id")
    return raw[6:]


def check_public_key(public_key: object) -> bytes:
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise SchemaError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    return public_key


def short_id(public_key: bytes) -> str:
    """A 16-character, human-friendly id of a key (for logs and UIs; not for security)."""
    digest = hashlib.sha256(b"unode/short-id/v1\x00" + public_key).digest()[:10]
    return base64.b32encode(digest).decode().lower()


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `message` by `public_key`. Never raises."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A node's Ed25519 private key. Holds no file handle; see save_identity / load_identity."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests, reproducible demos)."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @property
    def short_id(self) -> str:
        return short_id(self.public_key)

    @property
    def peer_id(self) -> str:
        """The libp2p peer id p2pd will have when started with this key file as identity."""
        return peer_id_from_public_key(self.public_key)

    def libp2p_private_key(self) -> bytes:
        """The key in libp2p's protobuf form: the exact content of the key file."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return _PRIVATE_PREFIX + seed + self.public_key

    @classmethod
    def from_libp2p_private_key(cls, data: bytes) -> Identity:
        if len(data) != 68 or data[:4] != _PRIVATE_PREFIX:
            raise ValueError("not a libp2p Ed25519 private key (68 bytes, prefix 08011240)")
        identity = cls.from_seed(data[4:36])
        if identity.public_key != data[36:]:
            raise ValueError("the public half does not match the private seed")
        return identity

    def __repr__(self) -> str:
        return f"Identity({self.short_id})"


def default_state_dir() -> Path:
    """`$UNODE_STATE_DIR`, else ~/.local/share/unode."""
    env = os.environ.get("UNODE_STATE_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "unode"


def save_identity(identity: Identity, path: Path) -> None:
    """Write the key file with mode 0600 (atomically; never overwrites an existing file)."""
    path = Path(path)
    if path.exists():
        raise IdentityError(
            str(path), "a key file already exists", "keep it, or move it away first"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(identity.libp2p_private_key())
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if `path` appeared meanwhile: no silent overwrite
    finally:
        tmp.unlink(missing_ok=True)


def load_identity(path: Path) -> Identity:
    """Read a key file; refuse one that group or others can read (the fix is `chmod 600`)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise IdentityError(str(path), "no key file", "create one with `unode keys init`") from None
    if not stat.S_ISREG(mode):
        raise IdentityError(str(path), "not a regular file", "point to the identity.key file")
    if mode & 0o077:
        raise IdentityError(
            str(path), f"key file mode is {stat.S_IMODE(mode):o}", f"run `chmod 600 {path}`"
        )
    with path.open("rb") as f:
        data = f.read(1024)  # a key file is 68 bytes; never slurp whatever was put there
    try:
        return Identity.from_libp2p_private_key(data)
    except ValueError as err:
        raise IdentityError(
            str(path), f"malformed key file ({err})", "restore it from a backup"
        ) from None


def load_or_create_identity(path: Path) -> tuple[Identity, bool]:
    """Load the key file at `path`, creating it first if absent. Returns (identity, created)."""
    if Path(path).exists():
        return load_identity(path), False
    identity = Identity.generate()
    save_identity(identity, path)
    return identity, True
