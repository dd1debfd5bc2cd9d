"""The registry of merge methods: mergekit's names, built explicitly (no import-time registration).

`get_method(name)` for the executor; `check_inputs(method, models, base)` to reject a
recipe whose models do not fit the method before any tensor is merged;
`with mergekit_tie_order():` to choose elements tied at a sparsification cut as mergekit does.
"""

from __future__ import annotations

from node.errors import UserError
from node.merge.methods.arcee_fusion import ArceeFusionMerge
from node.merge.methods.base import MergeMethod
from node.merge.methods.linear import LinearMerge
from node.merge.methods.model_stock import ModelStockMerge
from node.merge.methods.nearswap import NearSwapMerge
from node.merge.methods.passthrough import PassthroughMerge
from node.merge.methods.ram import RamMerge, RamPlusMerge
from node.merge.methods.sce import SceMerge
from node.merge.methods.select import mergekit_tie_order
from node.merge.methods.slerp import NuSlerpMerge, SlerpMerge
from node.merge.methods.spherical_mean import KarcherMerge, MultiSlerpMerge
from node.merge.methods.task_vector import TASK_VECTOR_METHODS


def _build() -> dict[str, MergeMethod]:
    methods: list[MergeMethod] = [
        LinearMerge(),
        *TASK_VECTOR_METHODS,
        SlerpMerge(),
        NuSlerpMerge(),
        MultiSlerpMerge(),
        KarcherMerge(),
        ModelStockMerge(),
        SceMerge(),
        RamMerge(),
        RamPlusMerge(),
        NearSwapMerge(),
        ArceeFusionMerge(),
        PassthroughMerge(),
    ]
    return {method.name: method for method in methods}


METHODS: dict[str, MergeMethod] = _build()
__all__ = ["METHODS", "check_inputs", "get_method", "mergekit_tie_order", "method_names"]


def method_names() -> list[str]:
    """Every method name, sorted."""
    return sorted(METHODS)


def get_method(name: str) -> MergeMethod:
    """The method called `name`, or a UserError listing the valid names."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UserError(
            "merge_method", name, "use one of: " + ", ".join(method_names()), "unknown method"
        ) from None


def check_inputs(
    method: MergeMethod, models: list[str] | tuple[str, ...], base: str | None
) -> None:
    """Reject models/base that `method` cannot take (mergekit's input contract), naming the fix.

    `models` is the recipe's model list; a base not listed there counts as one more input,
    as in mergekit's planner.
    """
    rule = method.inputs
    has_base = base is not None and rule.base != "ignored"
    if rule.base == "required" and not has_base:
        raise UserError(
            "base_model",
            None,
            f"{method.name} needs a base_model: add one to the recipe",
            "missing",
        )
    keys = list(models) + ([base] if base is not None and base not in models else [])
    count = len(keys)
    non_base = count - int(has_base)
    for what, value, low, high in (
        ("input models", count, rule.min_inputs, rule.max_inputs),
        ("non-base models", non_base, rule.min_non_base, rule.max_non_base),
    ):
        if value < low or (high is not None and value > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            if high is not None and low != high:
                wanted = f"{low} to {high}"
            raise UserError(
                "models", keys, f"{method.name} takes {wanted} {what}", f"{value} {what}"
            )
