"""Fusion functions: from C candidate distributions per sequence to one sparse target.

Shapes: ids (C, B, T, k) int64 target ids (-1 = empty), probs (C, B, T, k), seq_ce (C, B),
tok_ce (C, B, T). Sequence level as in FuseLLM: MinCE takes, per sequence, the candidate with
the lowest cross-entropy; AvgCE weights candidates by softmax_c(exp(-CE_c)) (FuseLLM's weights
on its "reward" 1 / exp(CE)). Token level: the same decisions per position with token NLLs.
The target's own distribution is a candidate like any other (summarise the target too).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sparse = tuple[torch.Tensor, torch.Tensor]  # ids (B, T, K), probs (B, T, K)


def _pick(ids: torch.Tensor, probs: torch.Tensor, choice: torch.Tensor) -> Sparse:
    """choice (B, T) candidate index per position → the chosen rows."""
    index = choice[None, :, :, None].expand(1, *ids.shape[1:])  # (1, B, T, k)
    return ids.gather(0, index)[0], probs.gather(0, index)[0]


def _weighted(ids: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor) -> Sparse:
    """weights (C, B, T) → all candidates side by side, (B, T, C·k), probs scaled."""
    c, b, t, k = ids.shape
    scaled = probs * weights[..., None]
    return (
        ids.permute(1, 2, 0, 3).reshape(b, t, c * k),
        scaled.permute(1, 2, 0, 3).reshape(b, t, c * k),
    )


def min_ce(
    ids: torch.Tensor, probs: torch.Tensor, seq_ce: torch.Tensor, tok_ce: torch.Tensor
) -> Sparse:
    choice = seq_ce.argmin(dim=0)[:, None].expand(ids.shape[1], ids.shape[2])  # (B, T)
    return _pick(ids, probs, choice)


def avg_ce(
    ids: torch.Tensor, probs: torch.Tensor, seq_ce: torch.Tensor, tok_ce: torch.Tensor
) -> Sparse:
    weights = torch.softmax(torch.exp(-seq_ce), dim=0)  # (C, B)
    return _weighted(ids, probs, weights[:, :, None].expand(-1, -1, ids.shape[2]))


def min_ce_token(
    ids: torch.Tensor, probs: torch.Tensor, seq_ce: torch.Tensor, tok_ce: torch.Tensor
) -> Sparse:
    return _pick(ids, probs, tok_ce.argmin(dim=0))


def avg_ce_token(
    ids: torch.Tensor, probs: torch.Tensor, seq_ce: torch.Tensor, tok_ce: torch.Tensor
) -> Sparse:
    return _weighted(ids, probs, torch.softmax(torch.exp(-tok_ce), dim=0))


FUSION_FNS: dict[
    str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Sparse]
] = {
    "min_ce": min_ce,
    "avg_ce": avg_ce,
    "min_ce_token": min_ce_token,
    "avg_ce_token": avg_ce_token,
}
