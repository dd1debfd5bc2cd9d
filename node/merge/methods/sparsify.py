"""Task-vector sparsifiers (mergekit's sparsify.py semantics) without a full sort.

Each works in place on one float32 task vector and returns it. Magnitude and outlier cuts
find their thresholds by selection (O(n)) instead of mergekit's argsort (O(n log n));
elements tied at a cut are taken in flat-index order (mergekit's unstable argsort takes
an arbitrary subset of them). Random ones draw only from the given generator.
"""

from __future__ import annotations

import torch

from node.merge.methods.rank_range import (
    keep_magnitude_range,
    keep_top_magnitudes,
    rank_range_mask,
)
from node.merge.methods.reduce import BLOCK, PieceSums, stable_dot, stable_sum
from node.merge.methods.select import row_argsort, top_count_mask

RESCALE_EPS = 1e-7  # mergekit: no rescale when either l1 norm is below this


def apply_mask(
    delta: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, rescale: bool
) -> torch.Tensor:
    """delta *= keep in place (`w` = |delta| flat, `keep` a float 0/1 mask of as many elements),
    scaled back to delta's l1 norm when `rescale` (mergekit: not when a norm is < 1e-7)."""
    keep = keep.reshape(-1)
    if rescale:
        l1_before = stable_sum(w)
        l1_after = stable_dot(w, keep)  # |kept| summed without a masked copy
        if l1_before >= RESCALE_EPS and l1_after >= RESCALE_EPS:
            keep.mul_(l1_before / l1_after)
    return delta.mul_(keep.view(delta.shape))


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the `density` fraction (at least one) of largest-|x| elements (TIES)."""
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return delta.zero_()
    if not rescale:  # |x| taken block by block, the mask applied in place
        return keep_top_magnitudes(delta, max(1, int(density * n)))
    w = delta.view(-1).abs()
    return apply_mask(delta, w, top_count_mask(w, max(1, int(density * n))), rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    """Drop the `gamma` largest-|x| fraction, then the smallest, keeping `density` (breadcrumbs)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)  # fewer outliers dropped if density needs them
    if not rescale:  # |x| taken block by block, the mask applied in place
        return keep_magnitude_range(delta, n_bottom, n_bottom + keep)
    w = delta.view(-1).abs()
    return apply_mask(delta, w, rank_range_mask(w, n_bottom, n_bottom + keep), rescale)


def bernoulli_mask(shape: torch.Size, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Float 0/1 Bernoulli(p) draws from 16 random bits each (p rounded to 1/65536).

    Four draws per 64-bit word: 4-6x faster than torch.bernoulli, same distribution.
    """
    threshold = round(p * 65536) - 32768  # int16 draws are uniform on [-32768, 32767]
    return torch.lt(random_int16(shape, generator), threshold, out=torch.empty(shape))


def random_int16(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform int16 values, four per 64-bit draw of the generator."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    words.random_(-(2**63), 2**63 - 1, generator=generator)  # uniform over (almost) all 64 bits
    return words.view(torch.int16)[:n].view(shape)


def random_drop(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep each element with probability `density` (DARE).

    A block at a time (draws, mask, |x| and the l1 sums of the rescale), so no full-size
    temporary is made; blocks hold a multiple of 4 elements and are drawn in order, so they
    consume the generator exactly as one whole draw would, and the sums are `apply_mask`'s.
    """
    if density >= 1:
        return delta
    flat = delta.view(-1)
    threshold = round(density * 65536) - 32768  # as bernoulli_mask
    sums = PieceSums()
    size = min(BLOCK, flat.numel())
    keep, magnitude = torch.empty(size), torch.empty(size if rescale else 0)
    for a in range(0, flat.numel(), BLOCK):
        x = flat[a : a + BLOCK]
        kept = torch.lt(random_int16(x.shape, generator), threshold, out=keep[: x.numel()])
        if rescale:
            sums.add(torch.abs(x, out=magnitude[: x.numel()]), kept)
        x.mul_(kept)
    if rescale:
        l1_before, l1_after = sums.totals(delta.dtype)
        if l1_before >= RESCALE_EPS and l1_after >= RESCALE_EPS:
            delta.mul_(l1_before / l1_after)  # x * 1 * s == x * s: apply_mask's values
    return delta


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Keep each element with a probability rising linearly with its |x| rank in its row.

    Probabilities run from density - epsilon (smallest) to density + epsilon (largest);
    ranks run along dimension 1 (a row of a 2-D matrix), over the whole of a 1-D tensor.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if delta.dim() < 2:
        rows = delta.view(1, -1)
    else:  # mergekit ranks along dim 1: make it the last one, (R, C)
        rows = delta.movedim(1, -1).reshape(-1, delta.shape[1])
    width = rows.shape[1]
    # Keep probability of each rank in a row, as mergekit computes it from normalized
    # ranks; as an int16 threshold for 16-bit uniform draws (p rounded to 1/65536).
    by_rank = torch.arange(width, dtype=torch.float32).div_(max(width - 1, 1)).clamp_(0, 1)
    by_rank = (density - epsilon) + by_rank * 2 * epsilon
    thresholds = by_rank.mul_(65536).round_().sub_(32768).to(torch.int32)
    magnitudes = rows.abs()  # (R, C), contiguous
    keep = _della_keep(magnitudes, thresholds, generator)
    if delta.dim() > 2:
        keep = keep.view(delta.movedim(1, -1).shape).movedim(-1, 1)
    w = magnitudes.view(-1) if delta.dim() <= 2 else delta.view(-1).abs()
    return apply_mask(delta, w, keep.reshape(delta.shape), rescale)


DELLA_BLOCK = 1 << 21  # elements ranked at once: bounds the sort's and the draws' temporaries


def _della_keep(
    magnitudes: torch.Tensor, thresholds: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Float 0/1 keep decisions of (R, C) magnitudes, a block of rows at a time.

    One argsort per row, of the magnitudes' bit patterns (non-negative floats order as
    their int32 bits, which sort faster; mergekit argsorts every row twice). Draws are
    made in sorted order, decisions scattered back to their elements. Blocks hold a
    multiple of 4 elements, so they consume the generator exactly as one whole draw would.
    """
    n_rows, width = magnitudes.shape
    step = max(4, DELLA_BLOCK // max(width, 1) // 4 * 4)
    keep = torch.empty(magnitudes.shape)
    for a in range(0, n_rows, step):
        block = magnitudes[a : a + step]
        order = row_argsort(block.view(torch.int32))
        draws = random_int16(block.shape, generator)
        kept = torch.lt(draws, thresholds, out=torch.empty(block.shape))
        keep[a : a + step].scatter_(1, order, kept)
        del order, draws, kept
    return keep
