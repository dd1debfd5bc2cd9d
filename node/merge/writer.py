"""Sharded safetensors output whose layout is fixed before any tensor is merged.

Every output tensor's name, shape and dtype is known from the plan, so each shard's header is
written first and each tensor is written at its offset when ready: no shard is buffered in
memory, and the files are byte-identical whatever order the tensors are merged in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from node.merge.io import CHUNK_BYTES, DTYPE_NAMES, TensorMeta, bytes_view

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Slot:
    shard: int
    start: int  # absolute offset in the shard file
    nbytes: int
    dtype: torch.dtype


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Lays out shards of at most `max_shard_bytes` (one tensor may exceed it) in plan order."""

    def __init__(self, out_dir: Path, plan: list[tuple[str, TensorMeta]], max_shard_bytes: int):
        self.out_dir = out_dir
        groups: list[list[tuple[str, TensorMeta]]] = [[]]
        size = 0
        for name, meta in plan:
            nbytes = meta.numel * _itemsize(meta.dtype)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, meta))
            size += nbytes
        n = len(groups)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._hashes: dict[str, str] = {}
        self.total_bytes = 0
        for i, group in enumerate(groups):
            self._fds.append(self._open_shard(i, group))

    def _open_shard(self, i: int, group: list[tuple[str, TensorMeta]]) -> int:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, meta in group:
            nbytes = meta.numel * _itemsize(meta.dtype)
            header[name] = {
                "dtype": DTYPE_NAMES[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keeps every tensor 8-byte aligned
        base = 8 + len(raw)
        for name, meta in group:
            lo, hi = header[name]["data_offsets"]  # type: ignore[index]
            self.slots[name] = _Slot(i, base + lo, hi - lo, meta.dtype)
        fd = os.open(self.out_dir / self.files[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(fd, base + offset)
        self.total_bytes += offset
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one finished tensor at its slot, cast to the slot's dtype in small chunks."""
        slot = self.slots[name]
        flat = tensor.detach().contiguous().reshape(-1)
        assert flat.numel() * _itemsize(slot.dtype) == slot.nbytes, name
        h = hashlib.sha256()
        fd, offset = self._fds[slot.shard], slot.start
        if flat.dtype == slot.dtype:
            view = bytes_view(flat) if slot.nbytes else memoryview(b"")
            _pwrite_all(fd, view, offset)
            h.update(view)
        else:
            step = CHUNK_BYTES // flat.element_size()
            scratch = torch.empty(min(step, flat.numel()), dtype=slot.dtype)
            for lo in range(0, flat.numel(), step):
                part = scratch[: min(step, flat.numel() - lo)]
                part.copy_(flat[lo : lo + part.numel()])
                view = bytes_view(part)
                _pwrite_all(fd, view, offset)
                h.update(view)
                offset += len(view)
        self._hashes[name] = h.hexdigest()

    def finish(self) -> dict[str, str]:
        """Close the shards, write the index; return {tensor name: sha256 of its bytes}."""
        missing = sorted(set(self.slots) - set(self._hashes))
        assert not missing, f"tensors never written: {missing[:3]}"
        for fd in self._fds:  # no fsync: the directory only becomes visible by rename
            os.close(fd)
        self._fds = []
        weight_map = {name: self.files[s.shard] for name, s in sorted(self.slots.items())}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return dict(sorted(self._hashes.items()))

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
