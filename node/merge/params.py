"""Per-tensor parameter resolution, exactly as mergekit does it, plus unode's per-layer tables.

Scopes are searched from the most specific (a model's own parameters in a slice) to the recipe's
top level; the first scope whose setting yields a value wins. Gradients interpolate over the
layers of an output slice with t = i / (n - 1) (t = 0 for embeddings, final norm and lm_head);
filters are substring matches, first match wins; tables index the output layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import UserError
from node.merge.methods.base import REQUIRED, ParamSpec
from node.merge.settings import Conditional, Gradient, LayerTable, Params, Setting

_MISSING: Any = object()


@dataclass(frozen=True)
class Position:
    """Where a tensor sits: its (output) name, t in a slice, and output layer (None: not a layer)."""

    name: str
    t: float = 0.0
    layer: int | None = None


def _coerce(value: Any, kind: type | None) -> Any:
    """mergekit validates values by type: YAML's `1e-3` is a string, `1` may mean true."""
    if kind is str:
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if kind is bool and low in ("true", "false"):
            return low == "true"
        try:
            return float(value)
        except ValueError:
            return value
    if kind is bool and isinstance(value, int | float) and not isinstance(value, bool):
        return bool(value) if value in (0, 1) else value
    return value


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def interpolate(values: Sequence[Any], t: float) -> Any:
    """mergekit's gradient: linear between neighbours; non-numeric values select a step."""
    if not all(_numeric(v) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate(setting: Setting, pos: Position, kind: type | None = None) -> Any:
    """The value of one setting at one tensor position, or None when no filter matches."""
    if isinstance(setting, tuple):
        for cond in setting:
            assert isinstance(cond, Conditional)
            if cond.filter is None or cond.filter == "*" or cond.filter in pos.name:
                return evaluate(cond.value, pos, kind)
        return None
    if isinstance(setting, Gradient):
        return interpolate([_coerce(v, kind) for v in setting.values], pos.t)
    if isinstance(setting, LayerTable):
        if pos.layer is None:
            value = setting.default if setting.default is not None else setting.layers[0]
            return _coerce(value, kind)
        return _coerce(setting.layers[pos.layer], kind)
    return _coerce(setting, kind)


def resolve_one(spec: ParamSpec, scopes: Iterable[Params], pos: Position) -> Any:
    """The first scope with a value wins; else the spec's default (`_MISSING` when required)."""
    for scope in scopes:
        if spec.name in scope:
            value = evaluate(scope[spec.name], pos, spec.kind)
            if value is not None:
                return value
    return _MISSING if spec.default is REQUIRED else spec.default


def resolve(
    specs: Sequence[ParamSpec], scopes: Sequence[Params], pos: Position, where: str, strict: bool
) -> dict[str, Any]:
    """Resolve every spec; a missing required one is a UserError (strict) or left out."""
    out: dict[str, Any] = {}
    for spec in specs:
        value = resolve_one(spec, scopes, pos)
        if value is _MISSING:
            if strict:
                raise UserError(
                    f"{where}.parameters.{spec.name}", None,
                    f"give `{spec.name}` for every model or in top-level `parameters`",
                    problem=f"required by this method for tensor {pos.name}",
                )  # fmt: skip
            continue
        out[spec.name] = value
    return out


def check_table_lengths(scopes: Iterable[tuple[str, Params]], n_layers: int) -> None:
    """A per-layer table must give exactly one value per output layer."""
    for where, params in scopes:
        for name, setting in params.items():
            for table in _tables(setting):
                if len(table.layers) != n_layers:
                    raise UserError(
                        f"{where}.{name}.layers", list(table.layers),
                        f"give exactly {n_layers} values, one per output layer",
                        problem=f"{len(table.layers)} values for {n_layers} layers",
                    )  # fmt: skip


def _tables(setting: Setting) -> list[LayerTable]:
    if isinstance(setting, LayerTable):
        return [setting]
    if isinstance(setting, tuple):
        return [t for c in setting for t in _tables(c.value)]
    return []


def leaf_values(setting: Setting) -> list[Any]:
    """Every scalar a setting can produce (interpolation stays between them)."""
    if isinstance(setting, tuple):
        return [v for c in setting for v in leaf_values(c.value)]
    if isinstance(setting, Gradient):
        return list(setting.values)
    if isinstance(setting, LayerTable):
        return [*setting.layers, *([setting.default] if setting.default is not None else [])]
    return [setting]


def check_ranges(scopes: Iterable[tuple[str, Params]]) -> None:
    """Values mergekit would reject later, rejected up front: density must lie in (0, 1]."""
    for where, params in scopes:
        for name, setting in params.items():
            if name != "density":
                continue
            for v in leaf_values(setting):
                x = _coerce(v, float)
                if not _numeric(x) or not 0.0 < x <= 1.0:
                    raise UserError(
                        f"{where}.density", v, "give a fraction of weights to keep in (0, 1]",
                        problem="density outside (0, 1]",
                    )  # fmt: skip
