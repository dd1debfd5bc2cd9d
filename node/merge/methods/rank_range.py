"""Rank-range masks (breadcrumbs' two-sided cut) from one counting pass and one mask pass.

Both cut values are bracketed by quantiles of one strided sample; one blocked pass counts
the elements below each bracket and gathers those inside it (in flat order); exact
selection inside the brackets gives the cuts; a second blocked pass writes the mask, or
applies it in place. Blocks keep every temporary in cache and `keep_magnitude_range` takes
magnitudes block by block: it makes no full-size temporary at all.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from node.merge.methods import select

BLOCK = 1 << 18  # elements per block (1 MB of float32): a block's temporaries stay in cache


@dataclass(frozen=True)
class Cut:
    """A boundary between stable ascending ranks `< r` and `>= r` of a flat tensor.

    Elements below `value` are below it, above `value` above it; elements equal to
    `value` are below it when their flat index is `< split` (a stable sort's tie order).
    """

    value: float
    split: int


@dataclass(frozen=True)
class Keys:
    """The values ranked: flat `w` itself, or its magnitudes when `absolute`, negated when
    `negate` (largest first); taken a block at a time."""

    w: torch.Tensor
    absolute: bool = False
    negate: bool = False

    def block(self, a: int, b: int) -> torch.Tensor:
        return self._of(self.w[a:b])

    def whole(self) -> torch.Tensor:
        return self._of(self.w)

    def sample(self, step: int) -> torch.Tensor:
        """Every `step`-th key, contiguous (sorting a strided view is ~5x slower)."""
        return self._of(self.w[::step]).contiguous()

    def _of(self, x: torch.Tensor) -> torch.Tensor:
        if self.absolute:
            return x.abs().neg_() if self.negate else x.abs()
        return x.neg() if self.negate else x


@dataclass
class _Bracket:
    """Per block, for one rank: elements below `low`, and those in [low, high] (flat order)."""

    rank: int  # 0-based rank whose value is sought
    low: float
    high: float
    below: list[int]
    inside: list[torch.Tensor]  # values in [low, high]; empty tensors when low == high
    counts: list[int]  # how many are in [low, high]


def rank_range_mask(w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Float 0/1 mask of flat `w`'s elements whose stable ascending rank is in [start, stop)."""
    n = w.numel()
    if stop <= start:
        return torch.zeros(n)
    if start <= 0 and stop >= n:
        return torch.ones(n)
    out = torch.empty(n)
    order = lambda: torch.sort(w, descending=False).indices[start:stop]  # noqa: E731
    _apply_range(Keys(w), start, stop, out, into_mask=True, mergekit_order=order)
    return out


def keep_magnitude_range(delta: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Zeroes, in place, the elements of `delta` whose |x| stable ascending rank (over the
    flattened tensor) is outside [start, stop); returns `delta`."""
    flat = delta.view(-1)
    n = flat.numel()
    if stop <= start:
        return delta.zero_()
    if start > 0 or stop < n:
        order = lambda: torch.sort(flat.abs(), descending=False).indices[start:stop]  # noqa: E731
        keys = Keys(flat, absolute=True)
        _apply_range(keys, start, stop, flat, into_mask=False, mergekit_order=order)
    return delta


def keep_top_magnitudes(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Zeroes, in place, all but the `k` largest-|x| elements of `delta` (ties: lowest flat
    indices kept first, a stable descending sort's order); returns `delta`."""
    flat = delta.view(-1)
    n = flat.numel()
    if k <= 0:
        return delta.zero_()
    if k < n:
        order = lambda: torch.argsort(flat.abs(), descending=True)[:k]  # noqa: E731
        keys = Keys(flat, absolute=True, negate=True)
        _apply_range(keys, 0, k, flat, into_mask=False, mergekit_order=order)
    return delta


def _apply_range(
    keys: Keys,
    start: int,
    stop: int,
    out: torch.Tensor,
    into_mask: bool,
    mergekit_order: Callable[[], torch.Tensor],
) -> None:
    """Writes the [start, stop) rank mask of `keys` into `out`, or multiplies `out` by it.

    `mergekit_order` gives the indices mergekit keeps (its own sort call), used when ties
    straddle a cut under `select.mergekit_tie_order`.
    """
    n = keys.w.numel()
    ranks = [r for r in (start, stop) if 0 < r < n]
    cuts = dict(zip(ranks, find_cuts(keys, ranks), strict=True))
    if select.mergekit_ties_enabled() and any(c.split > 0 for c in cuts.values()):
        mask = select.indices_mask(n, mergekit_order())
        out.copy_(mask) if into_mask else out.mul_(mask)
        return
    lo, hi = cuts.get(start), cuts.get(stop)
    _for_blocks(n, lambda a, b: _mask_block(keys, lo, hi, a, b, out, into_mask))


def find_cuts(keys: Keys, ranks: list[int]) -> list[Cut]:
    """The cut below each 0-based rank in `ranks` (0 < rank < n) of `keys`, exactly."""
    n = keys.w.numel()
    if n <= select.SMALL:
        return [_cut_exact(keys.whole(), r) for r in ranks]
    step = n // select.SAMPLE
    sample = torch.sort(keys.sample(step)).values
    brackets = [_bracket(sample, r, n) for r in ranks]
    _for_blocks(n, lambda a, b: _count_block(keys.block(a, b), brackets, a // BLOCK))
    found = [_cut_in(keys, br) for br in brackets]
    return [
        cut or _cut_exact(keys.whole(), br.rank) for cut, br in zip(found, brackets, strict=True)
    ]


def _bracket(sample: torch.Tensor, rank: int, n: int) -> _Bracket:
    """Values around `rank` of the sorted strided `sample`, ~6 sigma of a binomial each side."""
    m = sample.numel()
    centre = (rank + 1) / n * m
    margin = 6 * math.sqrt(max(centre * (1 - (rank + 1) / n), 1.0)) + 8
    lo_index, hi_index = int(centre - margin), math.ceil(centre + margin)
    low = float(sample[lo_index]) if lo_index > 0 else -math.inf
    high = float(sample[hi_index]) if hi_index < m else math.inf
    blocks = (n + BLOCK - 1) // BLOCK
    return _Bracket(rank, low, high, [0] * blocks, [torch.empty(0)] * blocks, [0] * blocks)


def _count_block(x: torch.Tensor, brackets: list[_Bracket], index: int) -> None:
    """Fills block `index` of each bracket from the block's values `x`."""
    for br in brackets:
        at_least = torch.ge(x, br.low)
        below = x.numel() - int(torch.count_nonzero(at_least))
        if br.low == br.high:  # one value (a tie at the cut): counts say everything
            br.counts[index] = int(torch.count_nonzero(x == br.low))
        else:
            inside = at_least.logical_and_(torch.le(x, br.high))
            br.inside[index] = x[inside]
            br.counts[index] = br.inside[index].numel()
        br.below[index] = below


def _cut_in(keys: Keys, br: _Bracket) -> Cut | None:
    """The cut at `br.rank` from the gathered bracket; None if the sample's bracket missed."""
    below, inside_count = sum(br.below), sum(br.counts)
    if not below <= br.rank < below + inside_count:
        return None
    if br.low == br.high:
        value, less, ties = br.low, below, None
    else:
        inside = torch.cat(br.inside)
        value = float(torch.kthvalue(inside, br.rank - below + 1).values)
        less = below + int(torch.count_nonzero(inside < value))
        ties = (inside == value).nonzero().squeeze(1)
    tied_below = br.rank - less  # ties of `value` with stable rank < rank
    if tied_below == 0:
        return Cut(value, 0)
    position = tied_below if ties is None else int(ties[tied_below])  # among the inside ones
    block, offset = _locate(br.counts, position)
    x = keys.block(block * BLOCK, (block + 1) * BLOCK)
    inside_flags = (x == value) if ties is None else (x >= br.low) & (x <= br.high)
    return Cut(value, block * BLOCK + int(inside_flags.nonzero()[offset]))


def _locate(counts: list[int], position: int) -> tuple[int, int]:
    """(block, offset in it) of the `position`-th gathered element."""
    for block, count in enumerate(counts):
        if position < count:
            return block, position
        position -= count
    raise AssertionError("position beyond the gathered elements")


def _cut_exact(w: torch.Tensor, rank: int) -> Cut:
    """The cut at `rank` by whole-tensor selection (small tensors, or a missed bracket)."""
    found = select.kth_smallest(w, rank + 1)
    tied_below = rank - found.less
    if tied_below == 0:
        return Cut(found.value, 0)
    return Cut(found.value, int((w == found.value).nonzero()[tied_below]))


def _mask_block(
    keys: Keys,
    lo: Cut | None,
    hi: Cut | None,
    a: int,
    b: int,
    out: torch.Tensor,
    into_mask: bool,
) -> None:
    """Block [a, b) of the mask (1.0: at or above `lo` and below `hi`), into or times `out`."""
    x = keys.block(a, b)
    keep, other = torch.empty(b - a), torch.empty(b - a)
    splits = sorted({a, b, *(c.split for c in (lo, hi) if c is not None and a < c.split < b)})
    for s, e in itertools.pairwise(splits):
        xs, dest = x[s - a : e - a], keep[s - a : e - a]
        if lo is None:
            dest.fill_(1.0)
        else:  # ties before the split are below the cut
            (torch.gt if s < lo.split else torch.ge)(xs, lo.value, out=dest)
        if hi is not None:
            upper = (torch.le if s < hi.split else torch.lt)(xs, hi.value, out=other[: e - s])
            dest.mul_(upper)
    out[a:b].copy_(keep) if into_mask else out[a:b].mul_(keep)


def _for_blocks(n: int, work: Callable[[int, int], None]) -> None:
    """work(a, b) over [0, n) in BLOCK-aligned pieces, blocks spread over torch's thread count."""
    blocks = [(a, min(a + BLOCK, n)) for a in range(0, n, BLOCK)]
    threads = min(torch.get_num_threads(), len(blocks))
    if threads <= 1:
        for a, b in blocks:
            work(a, b)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda ab: work(*ab), blocks))
