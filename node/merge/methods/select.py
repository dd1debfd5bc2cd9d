"""Exact order statistics of large flat tensors without a full sort.

`kth_smallest` brackets the answer with quantiles of a strided sample, then selects inside
the (small) bracket; it falls back to `torch.kthvalue` when the bracket misses, so the
result is always exact. Masks take elements tied at a cut in flat-index order (the order
a stable sort gives); `row_order` sorts every row at once on one int64 key.
"""

from __future__ import annotations

import math

import torch

SMALL = 1 << 16  # below this many elements, plain kthvalue is fastest
SAMPLE = 1 << 16  # strided sample size used to bracket a rank


def kth_smallest(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The value at 1-based `rank` of flat `w` sorted ascending (as torch.kthvalue)."""
    n = w.numel()
    if n <= SMALL:
        return torch.kthvalue(w, rank).values
    sample = w[:: n // SAMPLE]
    m = sample.numel()
    centre = rank / n * m
    margin = 6 * math.sqrt(max(centre * (1 - rank / n), 1.0)) + 8  # ~6 sigma of a binomial
    lo_index, hi_index = int(centre - margin), math.ceil(centre + margin)
    lo = torch.kthvalue(sample, lo_index + 1).values if lo_index > 0 else None
    hi = torch.kthvalue(sample, hi_index + 1).values if hi_index < m else None
    inside = w
    below = 0
    if lo is not None:
        below = int(torch.count_nonzero(w < lo))
        inside = w[w >= lo] if hi is None else w[(w >= lo) & (w <= hi)]
    elif hi is not None:
        inside = w[w <= hi]
    if not below < rank <= below + inside.numel():  # the bracket missed (a skewed sample)
        return torch.kthvalue(w, rank).values
    return torch.kthvalue(inside, rank - below).values


def _add_ties(mask: torch.Tensor, w: torch.Tensor, value: float, start: int, stop: int) -> None:
    """Set in `mask` the elements equal to `value` whose stable ascending rank is in [start, stop)."""
    tied = w == value
    count = int(torch.count_nonzero(tied))
    first = int(torch.count_nonzero(w < value))  # rank of the first tied element
    if start <= first and first + count <= stop:  # every tied element is in range
        mask |= tied
    elif count:
        rank = tied.cumsum(0, dtype=torch.int64).add_(first - 1)
        mask |= tied & (rank >= start) & (rank < stop)


def rank_range_mask(w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of flat `w`'s elements whose stable ascending rank lies in [start, stop)."""
    n = w.numel()
    if stop <= start:
        return torch.zeros(n, dtype=torch.bool)
    if start == 0 and stop >= n:
        return torch.ones(n, dtype=torch.bool)
    lo = float(kth_smallest(w, start + 1)) if start > 0 else -math.inf
    hi = float(kth_smallest(w, stop)) if stop < n else math.inf
    mask = (w > lo) & (w < hi)
    for value in {lo, hi} - {-math.inf, math.inf}:
        _add_ties(mask, w, value, start, stop)
    return mask


def top_count_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest elements of flat `w` (ties at the cut: lowest indices first)."""
    n = w.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = kth_smallest(w, n - k)  # the largest value that is dropped
    mask = w > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:  # some elements equal to the threshold are kept too
        tied = (w == threshold).nonzero().squeeze(1)[:missing]
        mask[tied] = True
    return mask


def row_order(rows: torch.Tensor) -> torch.Tensor:
    """Flat indices of (R, C) non-negative `rows` sorted by (row, value), ties by index.

    One stable sort of an int64 key (row << 32 | float bits) instead of R row argsorts:
    non-negative float32 values order exactly as their bit patterns do.
    """
    height = rows.shape[0]
    key = rows.contiguous().view(torch.int32).to(torch.int64)  # (R, C)
    key += torch.arange(height, dtype=torch.int64).mul_(1 << 32).view(height, 1)
    return torch.sort(key.view(-1), stable=True).indices
