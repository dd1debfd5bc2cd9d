"""Model Stock (mergekit's `model_stock`): interpolate toward the average by the models' angle."""

from __future__ import annotations

import torch

from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, non_base_keys
from node.merge.methods.params import read_params
from node.merge.methods.reduce import stable_row_dot, stable_row_norm


class ModelStockMerge:
    """t * mean(models) + (1 - t) * base, t = N cos / (1 + (N - 1) cos).

    cos is the mean pairwise cosine between the task vectors, over the whole tensor or
    per row (`filter_wise`); where 1 + (N - 1) cos is ~0 the base is kept.
    """

    name: str = "model_stock"
    requires_base: bool = True
    inputs: InputRule = InputRule(base="required", min_inputs=3)
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("filter_wise", False, "one angle per row instead of per tensor", bool),
    )
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None  # check_inputs rejects a recipe without one
        filter_wise = read_params(self.global_params, inputs)["filter_wise"]
        base = inputs.tensors[inputs.base]
        models = [inputs.tensors[key] for key in non_base_keys(inputs)]
        shape = base.shape
        if not filter_wise:
            base, models = base.reshape(-1), [m.reshape(-1) for m in models]
        elif base.dim() == 1:
            base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
        offsets = [m - base for m in models]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norms = stable_row_norm(a) * stable_row_norm(b)
                cosines.append((stable_row_dot(a, b) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        count = len(models)
        denominator = 1 + (count - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
        average = sum(models) / count
        return (t * average + (1 - t) * base).reshape(shape)
