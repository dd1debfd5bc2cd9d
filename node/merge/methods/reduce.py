"""Whole-tensor reductions whose result does not depend on the torch thread count.

torch splits a full reduction (`x.sum()`, `torch.dot`, `vector_norm`) into per-thread partial
sums, so its last bits change with `set_num_threads`: two honest peers with different core
counts would then disagree on a merged tensor's hash. Here fixed-size rows are reduced (torch
gives each row to one thread, whatever the count), and the row results are added serially
in float64.
"""

from __future__ import annotations

import torch

ROW = 1 << 14  # elements per row: below torch's parallel grain, so a row is one thread's work
BLOCK = 64 * ROW  # elements multiplied at once by stable_dot (bounds its temporary)


def _serial_total(parts: torch.Tensor) -> torch.Tensor:
    """float64 sum of a 1-D tensor, split into rows until one serial add is left."""
    parts = parts.to(torch.float64)
    while parts.numel() > ROW:
        parts = _row_sums(parts)
    return parts.sum()


def _row_sums(flat: torch.Tensor) -> torch.Tensor:
    full = flat.numel() - flat.numel() % ROW
    rows = flat[:full].view(-1, ROW).sum(dim=1)
    return torch.cat([rows.to(torch.float64), flat[full:].to(torch.float64).sum().reshape(1)])


def stable_sum(x: torch.Tensor) -> torch.Tensor:
    """sum(x) as a 0-dim tensor of x's dtype, identical for every thread count."""
    return _serial_total(_row_sums(x.reshape(-1))).to(x.dtype)


def stable_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over all elements, identical for every thread count."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    parts = [_row_sums(fa[i : i + BLOCK] * fb[i : i + BLOCK]) for i in range(0, fa.numel(), BLOCK)]
    if not parts:
        return torch.zeros((), dtype=a.dtype)
    return _serial_total(torch.cat(parts)).to(a.dtype)


def stable_norm(x: torch.Tensor) -> torch.Tensor:
    """The l2 norm of all elements, identical for every thread count."""
    return stable_dot(x, x).sqrt()


def stable_row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, dim=-1) for 1-D (one value) or 2-D (one per row) inputs, thread-count free."""
    if a.dim() == 1:
        return stable_dot(a, b).reshape(1)
    if a.shape[-1] <= ROW:  # short rows: each row is one thread's work already
        return (a * b).sum(dim=-1)
    return torch.stack([stable_dot(x, y) for x, y in zip(a, b, strict=True)])


def stable_row_norm(x: torch.Tensor) -> torch.Tensor:
    """The l2 norm along the last dim (1-D: one value), thread-count free."""
    return stable_row_dot(x, x).sqrt()


class PieceSums:
    """`stable_sum(x)` and `stable_dot(x, m)` of a flat `x` fed in consecutive BLOCK-sized
    pieces (the last may be shorter), bit for bit the whole-tensor results: a piece holds
    whole rows, so its row sums are the whole tensor's, grouped the same way."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []  # stable_sum: full rows of every piece
        self.tail = torch.zeros(1, dtype=torch.float64)  # ... and the last piece's remainder
        self.dot_parts: list[torch.Tensor] = []  # stable_dot: _row_sums of each piece's product

    def add(self, x: torch.Tensor, m: torch.Tensor) -> None:
        """Adds piece `x` (and `m` for the dot); `x * m` is computed in a temporary."""
        full = x.numel() - x.numel() % ROW
        self.rows.append(x[:full].view(-1, ROW).sum(dim=1).to(torch.float64))
        self.tail = x[full:].to(torch.float64).sum().reshape(1)
        self.dot_parts.append(_row_sums(x * m))

    def totals(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(stable_sum(x), stable_dot(x, m)) over every piece added, as 0-dim `dtype` tensors."""
        if not self.dot_parts:
            return torch.zeros((), dtype=dtype), torch.zeros((), dtype=dtype)
        total = _serial_total(torch.cat([*self.rows, self.tail])).to(dtype)
        return total, _serial_total(torch.cat(self.dot_parts)).to(dtype)
