"""SCE (select, calculate, erase; mergekit's `sce`): FuseChat's merge of task vectors."""

from __future__ import annotations

import torch

from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, non_base_keys
from node.merge.methods.params import read_params
from node.merge.methods.select import top_count_mask


def select_by_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask (*shape) of the elements whose variance across models is among the top `fraction`.

    The count is `fraction` of the elements with nonzero variance.
    """
    if fraction <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool)
    if fraction >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    if k == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    return top_count_mask(variance.view(-1), k).view_as(variance)


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """(N,) weights: each task vector's mean square over their sum (equal when all ~0)."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


class SceMerge:
    """Select high-variance elements, weight task vectors by energy, erase minority signs."""

    name: str = "sce"
    requires_base: bool = True
    inputs: InputRule = InputRule(base="required")
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("int8_mask", False, "store masks as int8 (no effect on values)", bool),
        ParamSpec("select_topk", 1.0, "fraction of highest-variance elements kept", float),
    )
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None  # check_inputs rejects a recipe without one
        base = inputs.tensors[inputs.base]
        keys = non_base_keys(inputs)
        if not keys:
            return base
        select_topk = read_params(self.global_params, inputs)["select_topk"]
        deltas = torch.stack([inputs.tensors[key] - base for key in keys])  # (N, *shape)
        if select_topk < 1:
            deltas.mul_(select_by_variance(deltas, select_topk))
        elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
        agree = deltas.sign() == elected  # (N, *shape)
        weights = sce_weights(deltas).view(-1, *([1] * base.dim()))
        kept = weights * agree
        merged = (deltas * kept).sum(dim=0)
        return merged.div_(kept.sum(dim=0).clamp(min=1e-6)).add_(base)
