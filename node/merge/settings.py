"""Parameter values in a recipe: scalars, mergekit gradients and filter lists, unode layer tables.

Parsed and validated here; `params.py` evaluates them for one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node.errors import UserError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Conditional:
    """mergekit's `{filter: substring, value: ...}`; no filter (or `*`) matches every tensor."""

    value: Any
    filter: str | None = None


@dataclass(frozen=True)
class LayerTable:
    """unode's per-layer table: `layers[i]` for output layer i, `default` for the rest."""

    layers: tuple[Scalar, ...]
    default: Scalar | None = None


@dataclass(frozen=True)
class Gradient:
    """A mergekit gradient: values interpolated over the layers of a slice."""

    values: tuple[Scalar, ...]


Setting = Scalar | Gradient | LayerTable | tuple[Conditional, ...]
Params = Mapping[str, Setting]


def parse_params(fld: str, value: Any) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(fld, value, "give a mapping of parameter name to value")
    return {str(k): parse_setting(f"{fld}.{k}", v) for k, v in value.items()}


def parse_setting(fld: str, value: Any) -> Setting:
    """A scalar, a gradient list, a filter list / single filter, or a unode layer table."""
    if isinstance(value, bool | int | float | str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, bool | int | float | str) for v in value)
    ):
        return Gradient(tuple(value))
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return tuple(_conditional(f"{fld}[{i}]", v) for i, v in enumerate(value))
    if isinstance(value, Mapping) and "layers" in value:
        return _layer_table(fld, value)
    if isinstance(value, Mapping) and "value" in value:
        return (_conditional(fld, value),)
    raise UserError(
        fld, value,
        "give a number, a list of numbers (gradient), a list of {filter, value}, or {layers: [...], default: x}",
    )  # fmt: skip


def _conditional(fld: str, value: Mapping[str, Any]) -> Conditional:
    extra = set(value) - {"filter", "value"}
    if extra or "value" not in value:
        raise UserError(fld, dict(value), "give {filter: SUBSTRING, value: VALUE}")
    flt = value.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise UserError(f"{fld}.filter", flt, "give a substring of tensor names")
    inner = parse_setting(f"{fld}.value", value["value"])
    if isinstance(inner, tuple):
        raise UserError(f"{fld}.value", value["value"], "do not nest filter lists")
    return Conditional(inner, flt)


def _layer_table(fld: str, value: Mapping[str, Any]) -> LayerTable:
    extra = set(value) - {"layers", "default"}
    layers = value["layers"]
    if extra or not isinstance(layers, list) or not layers:
        raise UserError(fld, dict(value), "give {layers: [v0, v1, ...], default: v}")
    if not all(isinstance(v, bool | int | float | str) for v in layers):
        raise UserError(f"{fld}.layers", layers, "give one scalar per output layer")
    default = value.get("default")
    if default is not None and not isinstance(default, bool | int | float | str):
        raise UserError(f"{fld}.default", default, "give a scalar")
    return LayerTable(tuple(layers), default)
