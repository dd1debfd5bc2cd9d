"""Task-vector sparsifiers (mergekit's sparsify.py semantics) without a full sort.

Each works in place on one float32 task vector and returns it. Magnitude and outlier cuts
find their thresholds by selection (O(n)) instead of mergekit's argsort (O(n log n));
elements tied at a cut are taken in flat-index order (mergekit's unstable argsort takes
an arbitrary subset of them). Random ones draw only from the given generator.
"""

from __future__ import annotations

import torch

from node.merge.methods.select import rank_range_mask, row_order, top_count_mask

RESCALE_EPS = 1e-7  # mergekit: no rescale when either l1 norm is below this


def rescale_l1(masked: torch.Tensor, l1_before: torch.Tensor) -> torch.Tensor:
    """Scale `masked` in place back to the l1 norm its unmasked version had."""
    l1_after = masked.abs().sum()
    if l1_before < RESCALE_EPS or l1_after < RESCALE_EPS:
        return masked
    return masked.mul_(l1_before / l1_after)


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
    flat.mul_(rank_range_mask(w, n_bottom, n_bottom + keep))
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
    if delta.dim() < 2:
        rows = delta.view(1, -1)
    else:  # mergekit ranks along dim 1: make it the last one, (R, C)
        rows = delta.movedim(1, -1).reshape(-1, delta.shape[1])
    height, width = rows.shape
    # Probability of each rank in a row, as mergekit computes it from normalized ranks.
    by_rank = torch.arange(width, dtype=torch.float32).div_(max(width - 1, 1)).clamp_(0, 1)
    by_rank = (density - epsilon) + by_rank * 2 * epsilon
    # One sort of all rows; probabilities go straight to each sorted position
    # (mergekit argsorts every row twice to get ranks).
    probs = torch.empty(height * width, dtype=torch.float32)
    probs[row_order(rows.abs())] = by_rank.repeat(height)
    if delta.dim() > 2:
        probs = probs.view(delta.movedim(1, -1).shape).movedim(-1, 1)
    probs = probs.reshape(delta.shape)
    l1_before = delta.abs().sum() if rescale else None
    delta.mul_(torch.rand(delta.shape, generator=generator) < probs)
    return rescale_l1(delta, l1_before) if l1_before is not None else delta
