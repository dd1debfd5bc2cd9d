"""An expert directory as a TensorManifest (expert id = its hash), computed once and cached.

Each safetensors shard contributes its tensors plus a `<shard>.header` side entry (its exact
header bytes), so a fetcher can rebuild every file bit for bit; other files are side entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from node.errors import UserError
from protocol import codec
from protocol.content import DEFAULT_CHUNK_SIZE, chunk_hash, object_meta, object_root
from protocol.errors import ProtocolError
from protocol.records import FileEntry, TensorEntry, TensorManifest

log = logging.getLogger(__name__)
HEADER_SUFFIX = ".header"  # "model.safetensors.header": the first 8+n bytes of model.safetensors
MAX_HEADER = 100 << 20
CACHE_VERSION = 1


@dataclass(frozen=True)
class Located:
    """Where a content-addressed object of a hosted expert lives, and its chunk hashes."""

    path: Path
    offset: int
    nbytes: int
    meta: list[object]  # ["tensor", dtype, shape] or ["blob"]
    chunk_hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class LocalExpert:
    """A hosted expert: its manifest, its id, and every object's bytes on disk."""

    model_dir: Path
    manifest: TensorManifest
    objects: dict[bytes, Located]

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.to_bytes()

    @property
    def expert_id(self) -> bytes:
        return self.manifest.hash()


def hash_range(
    path: Path, offset: int, nbytes: int, chunk: int = DEFAULT_CHUNK_SIZE
) -> list[bytes]:
    """Chunk hashes of bytes [offset, offset+nbytes) of a file, read 1 chunk at a time."""
    out: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for pos in range(offset, offset + nbytes, chunk):
            data = os.pread(fd, min(chunk, offset + nbytes - pos), pos)
            out.append(chunk_hash(data))
    finally:
        os.close(fd)
    return out


def read_safetensors_header(path: Path) -> tuple[int, dict[str, dict[str, object]]]:
    """(header length n, header JSON) of a safetensors file; data starts at 8 + n."""
    fix = "re-save the model with safetensors; this file is truncated or not safetensors"
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= MAX_HEADER:
            raise UserError("--expert", str(path), fix, problem="bad safetensors header length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError("--expert", str(path), fix, problem="bad safetensors header") from None
    if not isinstance(header, dict):
        raise UserError("--expert", str(path), fix, problem="bad safetensors header")
    return n, header


def _scan(model_dir: Path) -> tuple[list[TensorEntry], list[FileEntry], dict[bytes, Located]]:
    tensors: list[TensorEntry] = []
    files: list[FileEntry] = []
    objects: dict[bytes, Located] = {}

    def add(path: Path, offset: int, nbytes: int, meta: list[object]) -> bytes:
        hashes = hash_range(path, offset, nbytes)
        digest = object_root(meta, nbytes, DEFAULT_CHUNK_SIZE, hashes)
        objects[digest] = Located(path, offset, nbytes, meta, tuple(hashes))
        return digest

    for path in sorted(
        p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")
    ):
        if path.suffix == ".safetensors":
            n, header = read_safetensors_header(path)
            name = path.name + HEADER_SUFFIX
            files.append(FileEntry(name, 8 + n, add(path, 0, 8 + n, object_meta())))
            for tname, info in header.items():
                if tname == "__metadata__":
                    continue
                try:
                    lo, hi = (int(x) for x in info["data_offsets"])  # type: ignore[attr-defined]
                    dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])  # type: ignore[attr-defined]
                    meta = object_meta(dtype, shape)
                except (KeyError, TypeError, ValueError, ProtocolError):
                    raise UserError(
                        "--expert",
                        str(path),
                        "re-save the model with safetensors",
                        problem=f"tensor {tname!r} has a malformed header entry",
                    ) from None
                digest = add(path, 8 + n + lo, hi - lo, meta)
                tensors.append(TensorEntry(tname, dtype, shape, hi - lo, digest))
        else:
            size = path.stat().st_size
            files.append(FileEntry(path.name, size, add(path, 0, size, object_meta())))
    tensors.sort(key=lambda t: t.name)
    files.sort(key=lambda f: f.name)
    return tensors, files, objects


def _fingerprint(model_dir: Path) -> str:
    """Changes whenever any file of the directory changes (name, size or mtime)."""
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_expert(model_dir: Path, cache_dir: Path) -> LocalExpert:
    """The manifest of `model_dir`, from the cache when no file changed since it was computed."""
    model_dir = model_dir.resolve()
    cache = cache_dir / (hashlib.sha256(str(model_dir).encode()).hexdigest()[:24] + ".manifest")
    fingerprint = _fingerprint(model_dir)
    cached = _read_cache(cache, model_dir, fingerprint)
    if cached is not None:
        return cached
    tensors, files, objects = _scan(model_dir)
    try:
        manifest = TensorManifest(DEFAULT_CHUNK_SIZE, tuple(tensors), tuple(files))
        manifest.to_bytes()  # validates every field
    except ProtocolError as err:
        raise UserError(
            "--expert",
            str(model_dir),
            "keep the directory to safetensors, config and tokenizer files",
            problem=f"cannot describe it as a manifest ({err})",
        ) from None
    expert = LocalExpert(model_dir, manifest, objects)
    _write_cache(cache, expert, fingerprint)
    return expert


def _write_cache(cache: Path, expert: LocalExpert, fingerprint: str) -> None:
    locs = [
        [d, loc.path.name, loc.offset, loc.nbytes, loc.meta, list(loc.chunk_hashes)]
        for d, loc in expert.objects.items()
    ]
    data = codec.encode(
        {"v": CACHE_VERSION, "fp": fingerprint, "manifest": expert.manifest_bytes, "objects": locs},
        max_bytes=1 << 30,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(cache)


def _read_cache(cache: Path, model_dir: Path, fingerprint: str) -> LocalExpert | None:
    try:
        value = codec.decode(cache.read_bytes(), max_bytes=1 << 30)
        if value["v"] != CACHE_VERSION or value["fp"] != fingerprint:
            return None
        manifest = TensorManifest.from_bytes(value["manifest"])
        objects = {
            bytes(d): Located(model_dir / name, off, n, meta, tuple(hashes))
            for d, name, off, n, meta, hashes in value["objects"]
        }
    except (OSError, ProtocolError, KeyError, TypeError, ValueError):
        return None  # missing, stale or damaged: recompute
    return LocalExpert(model_dir, manifest, objects)
