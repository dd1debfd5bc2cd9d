"""The training loss: λ·CLM + (1−λ)·fusion, the fusion term computed sparsely at the k target ids.

One logsumexp per position serves both terms; the student's log-probability of target id j is
logits[j] − lse, gathered only at the ids. No (B, T, V) target tensor is ever built.
"""

from __future__ import annotations

from typing import Any

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


class _TargetNLL(torch.autograd.Function):
    """terms[..., j] = lse − logits[..., ids[..., j]] with a hand-written backward:
    softmax·Σ_j grad_j − scatter(grad), built in one (…, V) buffer, instead of autograd's
    separate buffers for logsumexp and for each gather."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)  # (B, T)
        ctx.save_for_backward(logits, ids, lse)
        return lse[..., None] - logits.gather(-1, ids)  # (B, T, K)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, ids, lse = ctx.saved_tensors
        g = torch.sub(logits, lse[..., None]).exp_()  # (B, T, V) softmax, the one big buffer
        g.mul_(grad.sum(-1, keepdim=True))
        return g.scatter_add_(-1, ids, -grad), None


def combined_loss(
    logits: torch.Tensor,  # (B, T, V) the model's full output: row t predicts token t + 1
    labels: torch.Tensor,  # (B, T-1)
    ids: torch.Tensor,  # (B, T-1, K)
    probs: torch.Tensor,  # (B, T-1, K)
    mask: torch.Tensor,  # (B, T-1)
    lam: float,
) -> tuple[torch.Tensor, float, float]:
    """(λ·CLM + (1−λ)·fusion, CLM, fusion) from one pass: the training path. Takes the full
    logits and gives the last position zero weight, so no (B, T-1, V) slice is copied."""
    m = mask.float() / mask.float().sum().clamp(min=1.0)  # (B, T-1)
    all_ids = torch.cat([labels[..., None], ids], dim=-1).clamp(min=0)  # (B, T-1, K+1)
    w_fusion = probs.float() * (ids >= 0) * m[..., None]
    all_ids = torch.nn.functional.pad(all_ids, (0, 0, 0, 1))  # one empty position at the end
    terms = _TargetNLL.apply(logits.float(), all_ids)[:, :-1]  # type: ignore[no-untyped-call]
    clm = (terms[..., 0] * m).sum()
    fusion = (terms[..., 1:] * w_fusion).sum()
    return lam * clm + (1.0 - lam) * fusion, float(clm.detach()), float(fusion.detach())
