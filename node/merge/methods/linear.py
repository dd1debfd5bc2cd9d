"""Linear (weighted average) merging, mergekit's `linear`."""

from __future__ import annotations

import torch

from node.errors import UserError
from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, input_keys
from node.merge.methods.params import read_model_params, read_params


class LinearMerge:
    """sum_i w_i * x_i, divided by sum_i w_i when `normalize` (every input, the base too)."""

    name: str = "linear"
    requires_base: bool = False
    inputs: InputRule = InputRule(base="ignored")
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("normalize", True, "divide by the sum of the weights", kind=bool),
    )
    model_params: tuple[ParamSpec, ...] = (
        ParamSpec("weight", doc="coefficient of this model", kind=float, applies_to_base=True),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        keys = input_keys(inputs)
        params = read_params(self.global_params, inputs)
        weights = read_model_params(self.model_params, inputs, keys)["weight"]
        coefficients = torch.tensor(weights, dtype=torch.float32)
        total = coefficients.sum()
        if params["normalize"] and total == 0:
            raise UserError(
                "models[].parameters.weight",
                weights,
                "weights sum to 0: change them or set normalize: false",
            )
        first, c0 = inputs.tensors[keys[0]], float(coefficients[0])
        # into the first input when it is ours to overwrite; a new tensor (no zero fill) if not
        result = first.mul_(c0) if inputs.owned else torch.mul(first, c0)
        for key, coefficient in zip(keys[1:], coefficients[1:], strict=True):
            result.add_(inputs.tensors[key], alpha=float(coefficient))
        if params["normalize"]:
            result.div_(total)
        return result
