"""Passthrough (mergekit's `passthrough`): one input copied, optionally scaled (frankenmerges)."""

from __future__ import annotations

import torch

from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, input_keys
from node.merge.methods.params import read_model_params


class PassthroughMerge:
    """The single input tensor, times its `scale` when one is given.

    Returns the input tensor itself when there is no scale (never modified in place).
    """

    name: str = "passthrough"
    requires_base: bool = False
    inputs: InputRule = InputRule(base="ignored", max_inputs=1)
    global_params: tuple[ParamSpec, ...] = ()
    model_params: tuple[ParamSpec, ...] = (
        ParamSpec("scale", None, "multiplies the tensor (none: copied as is)", float, True),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        (key,) = input_keys(inputs)
        (scale,) = read_model_params(self.model_params, inputs, (key,))["scale"]
        tensor = inputs.tensors[key]
        return tensor if scale is None else tensor * scale
