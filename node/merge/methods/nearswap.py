"""NearSwap (mergekit's `nearswap`): take the other model's value where it is close to the base."""

from __future__ import annotations

import torch

from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, non_base_keys
from node.merge.methods.params import read_params


class NearSwapMerge:
    """lerp(base, other, w) per element, w = clamp(t / |base - other|, 0, 1)."""

    name: str = "nearswap"
    requires_base: bool = True
    inputs: InputRule = InputRule(base="required", min_inputs=2, max_inputs=2)
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("t", doc="distance below which the other model's value is taken", kind=float),
    )
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None  # check_inputs rejects a recipe without one
        t = read_params(self.global_params, inputs)["t"]
        base = inputs.tensors[inputs.base]
        (other_key,) = non_base_keys(inputs)
        other = inputs.tensors[other_key]
        weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
        result: torch.Tensor = weight * other + (1 - weight) * base
        return result
