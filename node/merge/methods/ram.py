"""Reinforced Agent Merging: mergekit's `ram` and `ramplus_tl` (tensor-local RAM+)."""

from __future__ import annotations

import torch

from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, non_base_keys
from node.merge.methods.params import read_params

EPSILON = ParamSpec("epsilon", 1e-5, "|task vector| above this counts as a contribution", float)


def _contributions(
    inputs: MergeInputs, keys: tuple[str, ...], base: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat task vectors zeroed where insignificant (N, P), contributor counts (1, P), and
    the significance mask (N, P)."""
    deltas = torch.stack([inputs.tensors[key] - base for key in keys]).view(len(keys), -1)
    significant = deltas.abs() > epsilon
    counts = significant.sum(dim=0, keepdim=True)
    return deltas.mul_(significant), counts, significant


class RamMerge:
    """Elements changed by one model take its change; shared ones the mean of the changes."""

    name: str = "ram"
    requires_base: bool = True
    inputs: InputRule = InputRule(base="required")
    global_params: tuple[ParamSpec, ...] = (EPSILON,)
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None  # check_inputs rejects a recipe without one
        base = inputs.tensors[inputs.base]
        keys = non_base_keys(inputs)
        if not keys:
            return base
        epsilon = read_params(self.global_params, inputs)["epsilon"]
        deltas, counts, _ = _contributions(inputs, keys, base, epsilon)
        merged = (deltas * (counts == 1) + deltas * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
        return base + merged.view_as(base)


class RamPlusMerge:
    """RAM with each model's unique changes scaled by 1 + r * min(shared/unique, alpha)."""

    name: str = "ramplus_tl"
    requires_base: bool = True
    inputs: InputRule = InputRule(base="required")
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("r", 0.1, "strength of the boost of unique changes", float),
        ParamSpec("alpha", 0.2, "cap on the shared/unique ratio", float),
        EPSILON,
    )
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None  # check_inputs rejects a recipe without one
        base = inputs.tensors[inputs.base]
        keys = non_base_keys(inputs)
        if not keys:
            return base
        params = read_params(self.global_params, inputs)
        epsilon = params["epsilon"]
        deltas, counts, significant = _contributions(inputs, keys, base, epsilon)
        shared, unique = counts > 1, counts == 1
        ratio = (significant & shared).sum(dim=1) / (significant & unique).sum(dim=1).clamp(
            min=epsilon
        )
        boost = 1 + params["r"] * ratio.clamp(min=0, max=params["alpha"])  # (N,)
        merged = deltas * unique * boost.unsqueeze(-1) + deltas * shared / counts.clamp(min=1)
        return torch.add(base, merged.sum(dim=0).view_as(base))
