"""Every deterministic merge method against mergekit 0.1.5's own implementation, tensor by tensor.

mergekit's methods are called directly (`mergekit.merge_methods.merge_tensors`) on the same
random fp32 tensors; results must agree within 1e-5.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch

from node.merge.methods import get_method, method_names
from node.merge.methods.base import MergeInputs
from node.merge.methods.select import mergekit_tie_order

mergekit_methods = pytest.importorskip("mergekit.merge_methods")  # the `bench` extra

SHAPES = [(7,), (64,), (16, 24), (3, 5, 4)]


def make_models(
    shape: tuple[int, ...], count: int, seed: int, zero_fraction: float = 0.2
) -> dict[str, torch.Tensor]:
    """A base and `count` fine-tune-like variants; some elements left exactly unchanged."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tensors = {"base": base}
    for i in range(count):
        delta = torch.randn(shape, generator=g) * 0.1
        delta[torch.rand(shape, generator=g) < zero_fraction] = 0
        tensors[f"m{i}"] = base + delta
    return tensors


def ours(
    method: str,
    tensors: dict[str, torch.Tensor],
    models: tuple[str, ...],
    base: str | None,
    params: dict[str, Any],
    model_params: dict[str, dict[str, Any]],
) -> torch.Tensor:
    inputs = MergeInputs(
        name="model.layers.0.mlp.up_proj.weight",
        models=models,
        tensors=tensors,
        base=base,
        model_params=model_params,
        params=params,
    )
    return get_method(method).merge(inputs)


def reference(
    method: str,
    tensors: dict[str, torch.Tensor],
    models: tuple[str, ...],
    base: str | None,
    params: dict[str, Any],
    model_params: dict[str, dict[str, Any]],
) -> torch.Tensor:
    """mergekit's result, with the inputs its planner builds (a base not listed goes last)."""
    keys = list(models) + ([base] if base is not None and base not in models else [])
    spec = mergekit_methods.get(method).spec
    bound: dict[str, Any] = {}
    for parameter in spec.parameters:
        if parameter.scope.value == "shared":
            if parameter.name in params:
                bound[parameter.name] = params[parameter.name]
            continue
        takers = [k for k in keys if parameter.scope.value == "input" or k != base]
        given = {k: model_params.get(k, {}) for k in takers}
        if any(parameter.name in v for v in given.values()):
            bound[parameter.name] = {
                k: v.get(parameter.name, parameter.default) for k, v in given.items()
            }
    base_index = keys.index(base) if base is not None else None
    result: torch.Tensor = mergekit_methods.merge_tensors(
        [tensors[k] for k in keys], method, parameters=bound, ids=keys, base_index=base_index
    )
    return result


def weights(values: list[float], **extra: Any) -> dict[str, dict[str, Any]]:
    return {f"m{i}": {"weight": w, **extra} for i, w in enumerate(values)}


# (method, number of models, base given, params, per-model params)
CASES: list[tuple[str, int, bool, dict[str, Any], dict[str, dict[str, Any]]]] = [
    ("linear", 2, False, {}, weights([0.3, 0.7])),
    ("linear", 3, False, {"normalize": False}, weights([0.5, -0.2, 0.9])),
    ("linear", 2, True, {}, {**weights([0.6, 0.1]), "base": {"weight": 0.3}}),
    ("task_arithmetic", 2, True, {}, weights([0.5, 0.5])),
    ("task_arithmetic", 3, True, {"lambda": 0.7, "normalize": True}, weights([1.0, -0.4, 0.6])),
    ("ties", 2, True, {}, weights([0.5, 0.5], density=0.5)),
    ("ties", 3, True, {"normalize": False}, weights([1.0, -0.5, 0.7], density=0.3)),
    (
        "ties",
        3,
        True,
        {"rescale": True, "lambda": 1.5, "int8_mask": True},
        {
            "m0": {"weight": 0.4, "density": 0.9},
            "m1": {"weight": 0.3, "density": 0.2},
            "m2": {"weight": -0.6, "density": 1.0},
        },
    ),
    ("breadcrumbs", 2, True, {}, weights([0.5, 0.8], density=0.6, gamma=0.05)),
    (
        "breadcrumbs",
        3,
        True,
        {"rescale": True, "normalize": True},
        weights([0.5, -0.3, 0.8], density=0.3, gamma=0.2),
    ),
    ("breadcrumbs_ties", 2, True, {}, weights([0.5, 0.8], density=0.9, gamma=0.3)),
    (
        "breadcrumbs_ties",
        3,
        True,
        {"normalize": True, "lambda": 0.8},
        weights([0.7, 0.2, -0.1], density=0.4),
    ),
    ("slerp", 1, True, {"t": 0.3}, {}),
    ("slerp", 1, True, {"t": 0.9}, {}),
    ("slerp", 1, True, {"t": 0.0}, {}),
    ("nuslerp", 2, False, {}, weights([0.3, 0.7])),
    ("nuslerp", 2, True, {"nuslerp_flatten": False}, weights([1.0, 2.0])),
    ("nuslerp", 2, True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, weights([0.5, 0.5])),
    ("multislerp", 3, False, {}, weights([0.2, 0.5, 0.3])),
    ("multislerp", 2, True, {"normalize_weights": False}, weights([0.4, 0.4])),
    ("karcher", 3, False, {}, {}),
    ("karcher", 2, True, {"max_iter": 3, "tol": 1e-6}, {}),
    ("model_stock", 2, True, {}, {}),
    ("model_stock", 3, True, {"filter_wise": True}, {}),
    ("sce", 3, True, {}, {}),
    ("sce", 2, True, {"select_topk": 0.3}, {}),
    ("ram", 3, True, {}, {}),
    ("ram", 2, True, {"epsilon": 0.05}, {}),
    ("ramplus_tl", 3, True, {}, {}),
    ("ramplus_tl", 3, True, {"r": 0.5, "alpha": 0.9, "epsilon": 0.02}, {}),
    ("nearswap", 1, True, {"t": 0.05}, {}),
    ("nearswap", 1, True, {"t": 0.5}, {}),
    ("arcee_fusion", 1, True, {}, {}),
    ("passthrough", 1, False, {}, {}),
    ("passthrough", 1, False, {}, {"m0": {"scale": 0.5}}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parity_with_mergekit(case: tuple[Any, ...], shape: tuple[int, ...]) -> None:
    method, count, with_base, params, model_params = case
    tensors = make_models(shape, count, seed=zlib.crc32(f"{method}{shape}".encode()))
    models = tuple(f"m{i}" for i in range(count))
    if method == "slerp" or method == "nearswap" or method == "arcee_fusion":
        models = ("base", *models)  # mergekit recipes usually list the base too
    base = "base" if with_base else None
    if not with_base:
        tensors.pop("base")
    expected = reference(method, tensors, models, base, params, model_params)
    got = ours(method, tensors, models, base, params, model_params)
    assert got.shape == expected.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_every_deterministic_method_has_a_parity_case() -> None:
    randomized = {"dare_ties", "dare_linear", "della", "della_linear"}
    assert {c[0] for c in CASES} == set(method_names()) - randomized
    assert set(method_names()) == {m.spec.name for m in mergekit_methods.registered_methods()}


@pytest.mark.parametrize("name", method_names())
def test_parameters_and_input_rules_match_mergekit(name: str) -> None:
    """Names, defaults, scopes (shared / per model / per model with the base) and contracts."""
    ours_method = get_method(name)
    spec = mergekit_methods.get(name).spec
    theirs = {p.name: (None if p.required else p.default, p.scope.value) for p in spec.parameters}
    mine = {
        p.name: (None if p.required else p.default, "shared") for p in ours_method.global_params
    }
    for p in ours_method.model_params:
        mine[p.name] = (
            None if p.required else p.default,
            "input" if p.applies_to_base else "non_base",
        )
    assert mine == theirs
    rule, contract = ours_method.inputs, spec.contract
    assert rule.base == contract.base.value
    assert ours_method.requires_base == (contract.base.value == "required")
    assert (rule.min_inputs, rule.max_inputs) == (contract.min_inputs, contract.max_inputs)
    assert rule.min_non_base == (contract.min_non_base or 0)
    assert rule.max_non_base == contract.max_non_base


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "sce"])
def test_ties_at_the_cut_match_mergekit_under_mergekit_tie_order(method: str) -> None:
    """Fine-tune-like deltas are rounded to the base's ulp: many equal magnitudes at a cut.

    By default unode keeps the tied elements in index order, mergekit whichever its
    unstable sort puts first: the same count, possibly other elements. `mergekit_tie_order`
    reproduces mergekit's choice.
    """
    g = torch.Generator().manual_seed(22)  # a seed whose breadcrumbs cuts split ties
    base = torch.randn(320, 256, generator=g)
    tensors = {"base": base, **{m: base + 0.01 * torch.randn(320, 256, generator=g) for m in "ab"}}
    per_model = {m: {"weight": 0.5, "density": 0.5, "gamma": 0.01} for m in "ab"}
    if method != "breadcrumbs" and method != "breadcrumbs_ties":
        per_model = {m: {"weight": 0.5, "density": 0.5} for m in "ab"}
    params: dict[str, Any] = {"select_topk": 0.5} if method == "sce" else {}
    if method == "sce":
        per_model = {}
    expected = reference(method, tensors, ("a", "b"), "base", params, per_model)
    with mergekit_tie_order():
        got = ours(method, tensors, ("a", "b"), "base", params, per_model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    default = ours(method, tensors, ("a", "b"), "base", params, per_model)
    differing = int((default - expected).abs().gt(1e-5).sum())
    assert differing <= 20  # only tied elements may differ
    if method.startswith("breadcrumbs"):
        assert differing > 0  # this input does have ties straddling the cut
