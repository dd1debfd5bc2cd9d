"""Means on the hypersphere of many models: mergekit's `multislerp` and `karcher`."""

from __future__ import annotations

import torch

from node.errors import UserError
from node.merge.methods.base import (
    InputRule,
    MergeInputs,
    ParamSpec,
    input_keys,
    non_base_keys,
)
from node.merge.methods.params import read_model_params, read_params
from node.merge.methods.reduce import stable_dot, stable_norm, stable_row_dot, stable_row_norm


class MultiSlerpMerge:
    """Weighted mean of unit directions through the tangent space at their Euclidean mean.

    The result's norm is the weighted mean of the input norms; with a base, everything is
    done on task vectors. One non-base model is returned unchanged.
    """

    name: str = "multislerp"
    requires_base: bool = False
    inputs: InputRule = InputRule(base="optional", min_non_base=1)
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("normalize_weights", True, "divide weights by their sum", bool),
        ParamSpec("eps", 1e-8, "numerical floor for norms", float),
    )
    model_params: tuple[ParamSpec, ...] = (
        ParamSpec("weight", doc="weight of this model in the spherical mean", kind=float),
    )

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        keys = non_base_keys(inputs)
        if len(keys) == 1:
            return inputs.tensors[keys[0]]
        params = read_params(self.global_params, inputs)
        eps = params["eps"]
        weights = torch.tensor(read_model_params(self.model_params, inputs, keys)["weight"])
        if params["normalize_weights"]:
            weights = weights / weights.sum()
        stacked = torch.stack([inputs.tensors[key] for key in keys])  # (N, *shape)
        if inputs.base is not None:
            stacked -= inputs.tensors[inputs.base]
        flat = stacked.view(len(keys), -1)
        norms = stable_row_norm(flat).unsqueeze(-1)  # (N, 1)
        units = flat / (norms + eps)
        mean = (units * weights.view(-1, 1)).sum(0)
        mean_norm = stable_norm(mean)
        if mean_norm < eps:
            if len(keys) != 2:
                raise UserError(
                    "models[].parameters.weight",
                    weights.tolist(),
                    "the weighted directions cancel out: change the weights",
                )
            result = stacked[0] * weights[0] + stacked[1] * weights[1]
        else:
            result = self._tangent_mean(units, weights, mean / mean_norm, eps)
            result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
        if inputs.base is not None:
            result = result + inputs.tensors[inputs.base]
        return result

    @staticmethod
    def _tangent_mean(
        units: torch.Tensor, weights: torch.Tensor, mean: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """Project units to the tangent space at `mean`, average, map back (exp map)."""
        tangents = units - stable_row_dot(units, mean.expand_as(units)).unsqueeze(-1) * mean
        tangent = (tangents * weights.view(-1, 1)).sum(0)
        length = stable_norm(tangent) + eps
        result: torch.Tensor = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
        return result


class KarcherMerge:
    """Equal-weight Karcher (Riemannian) mean of the unit directions, scaled by the mean norm.

    Every input takes part, the base too when the recipe names one.
    """

    name: str = "karcher"
    requires_base: bool = False
    inputs: InputRule = InputRule(base="ignored")
    global_params: tuple[ParamSpec, ...] = (
        ParamSpec("max_iter", 10, "iterations of the fixed-point update", int),
        ParamSpec("tol", 1e-5, "convergence tolerance (and zero-norm threshold)", float),
    )
    model_params: tuple[ParamSpec, ...] = ()

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        tensors = [inputs.tensors[key] for key in input_keys(inputs)]
        if len(tensors) == 1:
            return tensors[0]
        params = read_params(self.global_params, inputs)
        alphas = [1.0 / len(tensors)] * len(tensors)
        return karcher_mean(tensors, alphas, params["max_iter"], params["tol"])


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float
) -> torch.Tensor:
    """Weighted Karcher mean direction of `tensors`, times sum(alpha_i * |x_i|)."""
    norms = [stable_norm(x) for x in tensors]
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [tensors[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for weight, unit in zip(weights, units, strict=True):
        mean += weight * unit
    mean_norm = stable_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, units, strict=True):
            dot = torch.clamp(stable_dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        length = stable_norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        mean_norm = stable_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    result: torch.Tensor = scale * mean
    return result
