"""Arcee Fusion (mergekit's `arcee_fusion`): take the other model's changes that matter most."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, non_base_keys
from node.merge.methods.reduce import stable_row_dot


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other - base| times KL(softmax(other) || softmax(base)) of its row (last dimension)."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = stable_row_dot(p, torch.log(p / q)).view(*other.shape[:-1], 1)  # keepdim
    return (other - base).abs() * kl


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * IQR, quantiles taken as sorted[floor(q * (n - 1))], exactly.

    mergekit sorts the whole tensor up to 1M elements and a random sample of 1M
    (global RNG) above; selection gives its exact value at any size, deterministically.
    """
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (torch.kthvalue(flat, last * i // 4 + 1).values for i in (1, 2, 3))
    return median + 1.5 * (q3 - q1)


class ArceeFusionMerge:
    """base + (other - base) where the change's importance reaches the outlier threshold."""

    name: str = "arcee_fusion"
    requires_base: bool = True
    inputs: InputRule = InputRule(base="required", min_inputs=2, max_inputs=2)
    global_params: tuple[ParamSpec, ...] = ()
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None  # check_inputs rejects a recipe without one
        base = inputs.tensors[inputs.base]
        (other_key,) = non_base_keys(inputs)
        other = inputs.tensors[other_key]
        scores = importance(other, base)
        keep = scores >= outlier_threshold(scores)
        return base + (other - base) * keep
