"""Spherical interpolation of two models: mergekit's `slerp` and `nuslerp`."""

from __future__ import annotations

import torch

from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, non_base_keys
from node.merge.methods.params import read_model_params, read_params
from node.merge.methods.reduce import stable_dot, stable_norm, stable_row_dot, stable_row_norm

DOT_THRESHOLD = 0.9995  # slerp: |cos| above this interpolates linearly
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Great-circle interpolation of the whole flattened tensors, applied to the raw tensors.

    Nearly parallel or antiparallel pairs (|cos| > 0.9995) and zero vectors fall back to
    linear interpolation. `in_place`: the result is written into `v0`.
    """
    norm0 = stable_norm(v0)
    norm1 = stable_norm(v1)
    norm0 = torch.where(norm0 > NORM_EPS, norm0, 1)
    norm1 = torch.where(norm1 > NORM_EPS, norm1, 1)
    # cos from the raw dot product: no normalized copies (mergekit normalizes first, to
    # avoid overflow in fp16; fp32 inputs cannot overflow a dot of weights).
    dot = (stable_dot(v0, v1) / (norm0 * norm1)).clamp(-1, 1)
    t_ = torch.tensor(t, dtype=torch.float32)
    if dot.abs() > DOT_THRESHOLD:
        coef0, coef1 = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef0 = torch.sin((1 - t_) * theta) / sin_theta
        coef1 = torch.sin(t_ * theta) / sin_theta
    result = v0.mul_(float(coef0)) if in_place else torch.mul(v0, float(coef0))
    return result.add_(v1, alpha=float(coef1))


class SlerpMerge:
    """slerp(t, base, other): t = 0 gives the base, t = 1 the other model."""

    name: str = "slerp"
    requires_base: bool = True
    inputs: InputRule = InputRule(base="required", min_inputs=2, max_inputs=2)
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec(
            "t", doc="interpolation factor from the base (0) to the other model (1)", kind=float
        ),
    )
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None  # check_inputs rejects a recipe without one
        (other,) = non_base_keys(inputs)
        t = read_params(self.global_params, inputs)["t"]
        v0, v1 = inputs.tensors[inputs.base], inputs.tensors[other]
        return slerp(t, v0, v1, in_place=inputs.owned)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.div(x, stable_row_norm(x).unsqueeze(-1).clamp(min=1e-7))


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """Slerp over whole tensors (`flatten`), rows (last dim) or columns (`row_wise`: dim 0)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = stable_row_dot(_unit(v0), _unit(v1)).unsqueeze(-1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


class NuSlerpMerge:
    """Slerp of two models with t = w2 / (w1 + w2); of their task vectors when a base is given."""

    name: str = "nuslerp"
    requires_base: bool = False
    inputs: InputRule = InputRule(base="optional", min_non_base=2, max_non_base=2)
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("nuslerp_row_wise", False, "interpolate column vectors (dim 0) separately", bool),
        ParamSpec("nuslerp_flatten", True, "interpolate the whole flattened tensor", bool),
    )
    model_params: tuple[ParamSpec, ...] = (
        ParamSpec("weight", doc="relative weight of this model (t = w2 / (w1 + w2))", kind=float),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        keys = non_base_keys(inputs)
        params = read_params(self.global_params, inputs)
        w0, w1 = read_model_params(self.model_params, inputs, keys)["weight"]
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        v0, v1 = (inputs.tensors[key] for key in keys)
        how = {"row_wise": params["nuslerp_row_wise"], "flatten": params["nuslerp_flatten"]}
        if inputs.base is None:
            return nuslerp(t, v0, v1, **how)
        base = inputs.tensors[inputs.base]
        return nuslerp(t, v0 - base, v1 - base, **how).add_(base)
