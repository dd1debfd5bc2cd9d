"""The training loss: λ·CLM + (1−λ)·fusion, the fusion term computed sparsely at the k target ids.

One logsumexp per position serves both terms; the student's log-probability of target id j is
logits[j] − lse, gathered only at the ids. No (B, T, V) target tensor is ever built.
"""

from __future__ import annotations

import torch


def clm_and_fusion(
    logits: torch.Tensor,  # (B, T, V): row t predicts token t + 1
    labels: torch.Tensor,  # (B, T) int64
    ids: torch.Tensor,  # (B, T, K) int64 target ids, -1 = empty slot
    probs: torch.Tensor,  # (B, T, K) target probabilities (0 on empty slots)
    mask: torch.Tensor,  # (B, T) bool: positions that count
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy and mean sparse fusion cross-entropy over masked positions."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    label_logit = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
    target_logit = logits.gather(-1, ids.clamp(min=0))  # (B, T, K)
    weights = probs.float() * (ids >= 0)
    fusion_tok = (weights * (lse[..., None] - target_logit)).sum(-1)  # (B, T)
    m = mask.float()
    denom = m.sum().clamp(min=1.0)
    return ((lse - label_logit) * m).sum() / denom, (fusion_tok * m).sum() / denom


def dense_fusion_loss(
    logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Reference (tests and benchmarks only): the same loss with a dense (B, T, V) target."""
    target = torch.zeros_like(logits, dtype=torch.float32)
    target.scatter_add_(-1, ids.clamp(min=0), probs.float() * (ids >= 0))
    per_tok = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    m = mask.float()
    return (per_tok * m).sum() / m.sum().clamp(min=1.0)
