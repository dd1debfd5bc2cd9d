"""Tensor reading and writing for merges: `TensorSource` (what the executor reads through),
a local safetensors directory source (sharded, with its index) and a pre-laid-out sharded writer.

Reads use `pread` on byte ranges from a validated safetensors header instead of a memory map:
mapped pages count toward the process's resident set, which the merge keeps small.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from node.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "unode never unpickles checkpoints; convert it once with transformers on a machine you "
    "trust: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)"
)
MAX_HEADER = 100 * 1024 * 1024
CHUNK_BYTES = 8 * 1024 * 1024  # conversion chunk: small enough to stay in cache-friendly sizes


@dataclass(frozen=True)
class TensorMeta:
    """What a source says about one tensor before it is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TensorSource(Protocol):
    """Where one input model's tensors come from (a local directory now, a peer later).

    `meta_dir` holds config.json and tokenizer files; `digest()` is the per-model manifest
    hash over every tensor read so far (name, dtype, shape, sha256 of the bytes).
    """

    ref: str
    meta_dir: Path

    def names(self) -> list[str]: ...

    def meta(self, name: str) -> TensorMeta: ...

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor; a source may read into `out` (same shape and dtype) to avoid allocating."""
        ...

    def digest(self) -> str: ...


@dataclass(frozen=True)
class _Entry:
    path: Path
    start: int  # absolute byte offset in the file
    end: int
    meta: TensorMeta


def read_header(path: Path, field: str) -> dict[str, _Entry]:
    """Parse and validate a safetensors header: every tensor's byte range must lie in the file."""
    size = path.stat().st_size
    bad = f"file {path.name} is not a valid safetensors file"
    fix = "re-download or re-save the checkpoint; the file is truncated or corrupt"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(field, str(path), fix, problem=bad + " (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise UserError(field, str(path), fix, problem=bad + " (header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(field, str(path), fix, problem=bad + " (header)") from None
    if not isinstance(header, dict):
        raise UserError(field, str(path), fix, problem=bad + " (header)")
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _parse_entry(path, 8 + n, size, name, info, field, fix)
    return entries


def _parse_entry(
    path: Path, base: int, size: int, name: str, info: object, field: str, fix: str
) -> _Entry:
    try:
        assert isinstance(info, dict)
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        lo, hi = (int(x) for x in info["data_offsets"])
    except (AssertionError, KeyError, TypeError, ValueError):
        raise UserError(
            field, str(path), fix, problem=f"tensor {name} has a malformed or unknown entry"
        ) from None
    meta = TensorMeta(shape, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if lo < 0 or hi < lo or hi - lo != meta.numel * itemsize:
        raise UserError(field, str(path), fix, problem=f"tensor {name} has inconsistent offsets")
    if base + hi > size:
        raise UserError(
            field, str(path), fix, problem=f"file {path.name} is truncated (tensor {name})"
        )
    return _Entry(path, base + lo, base + hi, meta)


def bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's storage (no copy)."""
    arr: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(arr)


def _pread_exact(fd: int, view: memoryview, start: int, field: str, path: Path) -> None:
    got = 0
    while got < len(view):  # one read returns at most ~2 GiB
        n = os.preadv(fd, [view[got:]], start + got)
        if n <= 0:
            raise UserError(field, str(path), "re-save the checkpoint", problem="short read")
        got += n


def refuse_pickles(model_dir: Path, field: str) -> None:
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            field, str(model_dir), CONVERT_HINT, problem=f"pickle checkpoint ({pickles[0]})"
        )
    raise UserError(
        field,
        str(model_dir),
        "give a model directory with *.safetensors files",
        problem="no safetensors weights",
    )


def _shard_files(model_dir: Path, field: str) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({str(v) for v in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(
                field, str(index), "fix or delete the index file", problem="malformed index"
            ) from None
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise UserError(
                field,
                str(model_dir / missing[0]),
                "restore the shard the index names",
                problem="missing shard",
            )
        return [model_dir / f for f in files]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        refuse_pickles(model_dir, field)
    return found


class LocalSafetensorsSource:
    """A model directory of (sharded) safetensors files, read one tensor at a time."""

    def __init__(self, ref: str, model_dir: Path, field: str = "model") -> None:
        self.ref, self.meta_dir, self.field = ref, Path(model_dir), field
        if not self.meta_dir.is_dir():
            raise UserError(
                field, ref, "give the path of a local model directory", problem="not a directory"
            )
        self._entries: dict[str, _Entry] = {}
        for f in _shard_files(self.meta_dir, field):
            self._entries.update(read_header(f, field))
        self._fds: dict[Path, int] = {}
        self._hashes: dict[str, str] = {}
        self._local = threading.local()  # per-thread conversion scratch

    def names(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        return self._entries[name].meta

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (one copy out of the page cache) and record the hash of its bytes.

        `out` may be float32 for a bf16/fp16 tensor: it is converted in small chunks, so no
        full-size copy in the stored dtype is ever made.
        """
        e = self._entries[name]
        fd = self._fds.get(e.path)
        if fd is None:
            fd = self._fds[e.path] = os.open(e.path, os.O_RDONLY)
        if out is None:
            out = torch.empty(e.meta.shape, dtype=e.meta.dtype)
        assert tuple(out.shape) == e.meta.shape and out.is_contiguous()
        h = hashlib.sha256()
        if out.dtype == e.meta.dtype:
            view = bytes_view(out) if out.numel() else memoryview(b"")
            _pread_exact(fd, view, e.start, self.field, e.path)
            h.update(view)
        else:
            assert out.dtype == torch.float32 and e.meta.dtype.is_floating_point, name
            flat, step = out.reshape(-1), CHUNK_BYTES // out.element_size()
            scratch = self._scratch(e.meta.dtype, step)
            itemsize = scratch.element_size()
            for lo in range(0, flat.numel(), step):
                n = min(step, flat.numel() - lo)
                view = bytes_view(scratch[:n])
                _pread_exact(fd, view, e.start + lo * itemsize, self.field, e.path)
                h.update(view)
                flat[lo : lo + n].copy_(scratch[:n])
        self._hashes[name] = h.hexdigest()
        return out

    def _scratch(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = f"scratch_{dtype}"
        buf = getattr(self._local, key, None)
        if buf is None:
            buf = torch.empty(numel, dtype=dtype)
            setattr(self._local, key, buf)
        return buf

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._hashes):
            m = self._entries[name].meta
            h.update(
                f"{name}\0{DTYPE_NAMES[m.dtype]}\0{list(m.shape)}\0{self._hashes[name]}\n".encode()
            )
        return h.hexdigest()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
