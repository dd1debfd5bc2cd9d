"""Content addressing: chunk hashes, the hash of a tensor (dtype, shape, bytes) or blob, record hashes.

All hashes are SHA-256 with a domain-separation tag, so a chunk hash can never be confused with a
tensor hash or a record hash. An object hash commits to the ordered list of its chunk hashes, so a
receiver can check every chunk against the signed manifest as soon as it arrives.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from protocol import codec
from protocol.errors import SchemaError

HASH_BYTES = 32
MIN_CHUNK_SIZE = 1 << 10  # 1 KiB
MAX_CHUNK_SIZE = 1 << 24  # 16 MiB
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: fastest size measured on hivemind P2P streams
MAX_OBJECT_BYTES = 1 << 40  # 1 TiB: no single tensor or shard is larger
MAX_CHUNKS = MAX_OBJECT_BYTES // MIN_CHUNK_SIZE

_CHUNK_TAG = b"unode/chunk/v1\x00"
_OBJECT_TAG = b"unode/object/v1\x00"
_RECORD_TAG = b"unode/record/v1\x00"

# safetensors dtype names -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_RANK = 8


def check_chunk_size(chunk_size: object) -> int:
    """A chunk size is a power of two in [1 KiB, 16 MiB]."""
    if type(chunk_size) is not int or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise SchemaError(f"chunk size {chunk_size!r} not in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    if chunk_size & (chunk_size - 1):
        raise SchemaError(f"chunk size {chunk_size} is not a power of two")
    return chunk_size


def check_tensor_meta(dtype: object, shape: object) -> int:
    """Validate a (dtype, shape) pair; return the tensor's size in bytes."""
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SchemaError(f"dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise SchemaError(f"shape {shape!r} must be a list of at most {MAX_RANK} ints")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim < (1 << 40):
            raise SchemaError(f"shape {shape!r} has a bad dimension {dim!r}")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if nbytes > MAX_OBJECT_BYTES:
        raise SchemaError(f"tensor of shape {shape!r} is larger than {MAX_OBJECT_BYTES} bytes")
    return nbytes


def num_chunks(nbytes: int, chunk_size: int) -> int:
    return -(-nbytes // chunk_size)


def chunk_hash(chunk: bytes | memoryview) -> bytes:
    h = hashlib.sha256(_CHUNK_TAG)
    h.update(chunk)
    return h.digest()


def chunk_hashes(data: bytes | bytearray | memoryview, chunk_size: int) -> list[bytes]:
    view = memoryview(data).cast("B")
    return [chunk_hash(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)]


def object_meta(dtype: str | None = None, shape: Sequence[int] | None = None) -> list[object]:
    """What an object hash commits to besides its bytes: ['tensor', dtype, shape] or ['blob']."""
    if dtype is None and shape is None:
        return ["blob"]
    check_tensor_meta(dtype, shape)
    return ["tensor", dtype, list(shape or ())]


def check_object_meta(meta: object) -> int | None:
    """Validate a meta list from a peer; return the tensor's size in bytes (None for a blob)."""
    if meta == ["blob"]:
        return None
    if isinstance(meta, list) and len(meta) == 3 and meta[0] == "tensor":
        return check_tensor_meta(meta[1], meta[2])
    raise SchemaError(f"object meta {meta!r} is neither ['blob'] nor ['tensor', dtype, shape]")


def object_root(meta: list[object], nbytes: int, chunk_size: int, hashes: Sequence[bytes]) -> bytes:
    """The object hash from its parts (what a stream decoder recomputes from the header)."""
    body = codec.encode([meta, nbytes, chunk_size, list(hashes)], max_bytes=1 << 30)
    return hashlib.sha256(_OBJECT_TAG + body).digest()


def tensor_hash(
    dtype: str, shape: Sequence[int], data: bytes | bytearray | memoryview, chunk_size: int
) -> bytes:
    """Content hash of a tensor: commits to dtype, shape and every chunk of its raw bytes."""
    meta = object_meta(dtype, shape)
    nbytes = memoryview(data).nbytes
    if nbytes != check_tensor_meta(dtype, shape):
        raise SchemaError(f"{nbytes} bytes do not fit dtype {dtype} shape {list(shape)}")
    check_chunk_size(chunk_size)
    return object_root(meta, nbytes, chunk_size, chunk_hashes(data, chunk_size))


def blob_hash(data: bytes | bytearray | memoryview, chunk_size: int) -> bytes:
    """Content hash of an untyped byte string (a config file, a summary shard)."""
    check_chunk_size(chunk_size)
    nbytes = memoryview(data).nbytes
    return object_root(["blob"], nbytes, chunk_size, chunk_hashes(data, chunk_size))


def record_hash(record_bytes: bytes) -> bytes:
    """Hash of a record's canonical bytes: a manifest's hash (= expert id), a round id."""
    return hashlib.sha256(_RECORD_TAG + record_bytes).digest()
