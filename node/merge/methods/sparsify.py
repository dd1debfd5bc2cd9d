"""Task-vector sparsifiers (mergekit's sparsify.py semantics) without a full sort.

Each works in place on one float32 task vector and returns it. Magnitude and outlier cuts
find their thresholds by selection (O(n)) instead of mergekit's argsort (O(n log n));
elements tied at a cut are taken in flat-index order (mergekit's unstable argsort takes
an arbitrary subset of them). Random ones draw only from the given generator.
"""

from __future__ import annotations

import torch

RESCALE_EPS = 1e-7  # mergekit: no rescale when either l1 norm is below this


def rescale_l1(masked: torch.Tensor, l1_before: torch.Tensor) -> torch.Tensor:
    """Scale `masked` in place back to the l1 norm its unmasked version had."""
    l1_after = masked.abs().sum()
    if l1_before < RESCALE_EPS or l1_after < RESCALE_EPS:
        return masked
    return masked.mul_(l1_before / l1_after)


def _rank_range_mask(w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the flat elements whose rank in ascending `w` lies in [start, stop).

    Ranks follow a stable ascending sort: equal values rank in flat-index order.
    """
    n = w.numel()
    if stop <= start:
        return torch.zeros(n, dtype=torch.bool)
    lo = torch.kthvalue(w, start + 1).values if start > 0 else w.min()
    hi = torch.kthvalue(w, stop).values if stop < n else w.max()
    mask = (w > lo) & (w < hi)
    for value in {float(lo), float(hi)}:
        tied = w == value
        below = int((w < value).sum())  # rank of the first tied element
        if int(tied.sum()) == 1:
            if start <= below < stop:
                mask |= tied
            continue
        rank = tied.cumsum(0, dtype=torch.int64).add_(below - 1)  # rank of each tied element
        mask |= tied & (rank >= start) & (rank < stop)
    return mask


def top_count_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest flat elements of `w` (ties at the cut in flat-index order)."""
    n = w.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = torch.kthvalue(w, n - k).values  # largest value that is dropped
    mask = w > threshold
    missing = k - int(mask.sum())
    if missing > 0:  # some elements equal to the threshold are kept too
        tied = (w == threshold).nonzero().squeeze(1)[:missing]
        mask[tied] = True
    return mask


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the `density` fraction (at least one) of largest-|x| elements (TIES)."""
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return delta.zero_()
    k = max(1, int(density * n))
    flat = delta.view(-1)
    w = flat.abs()
    l1_before = w.sum() if rescale else None
    flat.mul_(top_count_mask(w, k))
    return rescale_l1(delta, l1_before) if l1_before is not None else delta


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
    flat = delta.view(-1)
    w = flat.abs()
    l1_before = w.sum() if rescale else None
    flat.mul_(_rank_range_mask(w, n_bottom, n_bottom + keep))
    return rescale_l1(delta, l1_before) if l1_before is not None else delta


def random_drop(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep each element with probability `density` (DARE)."""
    if density >= 1:
        return delta
    l1_before = delta.abs().sum() if rescale else None
    # Uniform draws compared with p are Bernoulli(p) draws, and 3x faster than bernoulli_.
    delta.mul_(torch.rand(delta.shape, generator=generator) < density)
    return rescale_l1(delta, l1_before) if l1_before is not None else delta


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
    rows = delta.view(1, -1) if delta.dim() < 2 else delta
    width = rows.shape[1]
    # One argsort; probabilities are written straight to each sorted position
    # (mergekit argsorts twice to get ranks, then maps ranks to probabilities).
    order = torch.argsort(rows.abs(), dim=1)
    by_rank = torch.arange(width, dtype=torch.float32).div_(max(width - 1, 1)).clamp_(0, 1)
    by_rank = (density - epsilon) + by_rank * 2 * epsilon
    by_rank = by_rank.view(1, width, *([1] * (rows.dim() - 2)))
    probs = torch.empty(rows.shape, dtype=torch.float32)
    probs.scatter_(1, order, by_rank.expand_as(probs))
    l1_before = delta.abs().sum() if rescale else None
    keep = torch.rand(rows.shape, generator=generator) < probs
    delta.mul_(keep.view_as(delta))
    return rescale_l1(delta, l1_before) if l1_before is not None else delta
