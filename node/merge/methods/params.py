"""Reading a method's resolved parameters out of `MergeInputs`: defaults, types, ranges.

The executor resolves values per tensor; methods read them here so that a direct call
(tests, benchmarks) gets mergekit's defaults and every bad value one `UserError`.
"""

from __future__ import annotations

import math
from typing import Any

from node.errors import UserError
from node.merge.methods.base import MergeInputs, ParamSpec


def coerce(spec: ParamSpec, value: Any, where: str) -> Any:
    """`value` converted to `spec.kind` (float/int/bool), or a UserError naming `where`."""
    if spec.kind is None or value is None:
        return value
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(where, value, "use true or false", problem="not a boolean")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(where, value, f"give a number for {spec.name}", problem="not a number")
    if spec.kind is int:
        if float(value) != int(value):
            raise UserError(where, value, f"give a whole number for {spec.name}")
        return int(value)
    if not math.isfinite(float(value)):
        raise UserError(where, value, f"give a finite number for {spec.name}")
    return float(value)


def read_params(specs: tuple[ParamSpec, ...], inputs: MergeInputs) -> dict[str, Any]:
    """Method-level values for this tensor: given ones coerced, the rest mergekit's defaults."""
    values: dict[str, Any] = {}
    for spec in specs:
        where = f"parameters.{spec.name}"
        if spec.name in inputs.params:
            values[spec.name] = coerce(spec, inputs.params[spec.name], where)
        elif spec.required:
            raise UserError(where, None, f"set {spec.name} in the recipe", problem="missing")
        else:
            values[spec.name] = spec.default
    return values


def read_model_params(
    specs: tuple[ParamSpec, ...], inputs: MergeInputs, keys: tuple[str, ...]
) -> dict[str, list[Any]]:
    """Per-model values for `keys` (in that order): name -> one value per key."""
    values: dict[str, list[Any]] = {spec.name: [] for spec in specs}
    for key in keys:
        given = inputs.model_params.get(key, {})
        for spec in specs:
            where = f"models[{key}].parameters.{spec.name}"
            if spec.name in given:
                values[spec.name].append(coerce(spec, given[spec.name], where))
            elif spec.required:
                raise UserError(
                    where, None, f"set {spec.name} for {key} (or for all models)", "missing"
                )
            else:
                values[spec.name].append(spec.default)
    return values


def check_density(densities: list[float], keys: tuple[str, ...]) -> None:
    """Density keeps a fraction of each task vector: it must lie in (0, 1]."""
    for key, density in zip(keys, densities, strict=True):
        if not 0 < density <= 1:
            raise UserError(
                f"models[{key}].parameters.density",
                density,
                "use a value in (0, 1]",
                problem="out of range",
            )
