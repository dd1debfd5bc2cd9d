"""A plan-aware pool of tensor buffers for the executor's reads and casts.

Fresh large CPU allocations are paid for in page faults on first touch (a bf16->fp32 cast into
a new 128 MB tensor is ~5x slower than into a reused one). The pool hands a freed buffer to the
next job of the same size and drops it once no job left in the plan needs that size, so it
never holds more than the jobs in flight do.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch

Key = tuple[int, torch.dtype]


class BufferPool:
    def __init__(self, needs: Counter[Key]) -> None:
        """`needs[(numel, dtype)]`: how many buffers of that kind the remaining jobs will take."""
        self._needs = needs
        self._free: dict[Key, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        key = (numel, dtype)
        with self._lock:
            self._needs[key] -= 1
            free = self._free.get(key)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(numel, dtype=dtype)
        return buf.view(shape)

    def give(self, t: torch.Tensor) -> None:
        """Return a buffer taken from this pool (callers must hold no other reference)."""
        key = (t.numel(), t.dtype)
        with self._lock:
            if self._needs[key] > len(self._free.get(key, ())):
                self._free.setdefault(key, []).append(t.reshape(-1))
