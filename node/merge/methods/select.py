"""Exact order statistics of large flat tensors without a full sort.

`kth_smallest` brackets the answer with quantiles of a strided sample, then selects inside
the (small) bracket; it falls back to `torch.kthvalue` when the bracket misses, so the
result is always exact. Masks take elements tied at a cut in flat-index order (the order
a stable sort gives); `row_argsort` sorts blocks of rows in threads. Rank ranges (two cuts)
are in `rank_range.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

_MERGEKIT_TIES: ContextVar[bool] = ContextVar("mergekit_tie_order", default=False)


@contextmanager
def mergekit_tie_order(enabled: bool = True) -> Iterator[None]:
    """Inside this block, elements tied at a cut are chosen as mergekit 0.1.5 chooses them.

    mergekit keeps whichever tied elements torch's unstable CPU sort (or topk) happens to
    put first: deterministic, but defined only by running that sort. With this on, a
    tensor whose ties straddle a cut is re-selected with mergekit's own sort call, for
    bit-identical results at mergekit's speed on those tensors. Off (the default), ties
    are taken in flat-index order, the order a stable sort gives.
    """
    token = _MERGEKIT_TIES.set(enabled)
    try:
        yield
    finally:
        _MERGEKIT_TIES.reset(token)


def mergekit_ties_enabled() -> bool:
    """Whether elements tied at a cut are being chosen as mergekit chooses them."""
    return _MERGEKIT_TIES.get()


def indices_mask(n: int, indices: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n)
    mask[indices] = 1.0
    return mask


SMALL = 1 << 16  # below this many elements, plain kthvalue is fastest
SAMPLE = 1 << 16  # strided sample size used to bracket a rank


@dataclass(frozen=True)
class OrderStat:
    """The value at some rank of a flat tensor, and how many elements are below / equal to it."""

    value: float
    less: int
    equal: int


def kth_smallest(w: torch.Tensor, rank: int) -> OrderStat:
    """The value at 1-based `rank` of flat `w` sorted ascending (as torch.kthvalue), with counts."""
    n = w.numel()
    if n > SMALL:
        found = _bracketed(w, rank)
        if found is not None:
            return found
    value = torch.kthvalue(w, rank).values
    less, equal = torch.count_nonzero(w < value), torch.count_nonzero(w == value)
    return OrderStat(float(value), int(less), int(equal))


def _bracketed(w: torch.Tensor, rank: int) -> OrderStat | None:
    """kth_smallest by selecting inside quantiles of a strided sample; None if they miss."""
    n = w.numel()
    sample = w[:: n // SAMPLE]
    m = sample.numel()
    centre = rank / n * m
    margin = 6 * math.sqrt(max(centre * (1 - rank / n), 1.0)) + 8  # ~6 sigma of a binomial
    lo_index, hi_index = int(centre - margin), math.ceil(centre + margin)
    lo = torch.kthvalue(sample, lo_index + 1).values if lo_index > 0 else None
    hi = torch.kthvalue(sample, hi_index + 1).values if hi_index < m else None
    below = 0 if lo is None else int(torch.count_nonzero(w < lo))
    if lo is None:
        inside = w if hi is None else _select(w, w <= hi)
    else:
        inside = _select(w, w >= lo) if hi is None else _select(w, (w >= lo) & (w <= hi))
    if not below < rank <= below + inside.numel():  # a skewed sample: the bracket missed
        return None
    value = torch.kthvalue(inside, rank - below).values  # every element equal to it is inside
    less = below + int(torch.count_nonzero(inside < value))
    return OrderStat(float(value), less, int(torch.count_nonzero(inside == value)))


def _select(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w[mask], about twice as fast as boolean indexing for a sparse mask."""
    return w.index_select(0, mask.nonzero().squeeze(1))


def top_count_mask(w: torch.Tensor, k: int, reference: str = "argsort") -> torch.Tensor:
    """Float 0/1 mask of the k largest elements of flat `w` (ties: lowest indices first).

    `reference` is the call mergekit selects with ("argsort" or "topk"), used for ties
    under `mergekit_tie_order`.
    """
    n = w.numel()
    if k >= n:
        return torch.ones(n)
    if k <= 0:
        return torch.zeros(n)
    cut = kth_smallest(w, n - k)  # the largest value that is dropped
    mask = torch.gt(w, cut.value, out=torch.empty(n))
    kept_ties = k - (n - cut.less - cut.equal)  # elements equal to the cut that are kept
    if kept_ties > 0 and mergekit_ties_enabled():
        if reference == "topk":
            return indices_mask(n, torch.topk(w, k, largest=True).indices)
        return indices_mask(n, torch.argsort(w, descending=True)[:k])
    if kept_ties > 0:  # the first ones: their stable ascending ranks are the highest
        mask[(w == cut.value).nonzero().squeeze(1)[:kept_ties]] = 1.0
    return mask


def row_argsort(keys: torch.Tensor) -> torch.Tensor:
    """argsort of each row of (R, C) `keys`, rows split over torch's intra-op threads.

    torch sorts the rows of one tensor on one core; sorting blocks of rows in threads
    (torch releases the GIL) uses all of them.
    """
    threads = min(torch.get_num_threads(), keys.shape[0])
    if threads <= 1 or keys.numel() < (1 << 18):
        return torch.argsort(keys, dim=1)
    values = torch.empty_like(keys)
    order = torch.empty(keys.shape, dtype=torch.int64)
    bounds = [keys.shape[0] * i // threads for i in range(threads + 1)]

    def sort_block(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        torch.sort(keys[a:b], dim=1, out=(values[a:b], order[a:b]))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(sort_block, range(threads)))
    return order
