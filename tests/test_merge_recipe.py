"""Recipe parsing and per-tensor parameter resolution, checked against hand-computed values."""

from __future__ import annotations

from typing import Any

import pytest

from node.errors import UserError
from node.merge import architecture as arch
from node.merge.methods.base import ParamSpec
from node.merge.params import Position, evaluate, interpolate, resolve
from node.merge.recipe import parse_recipe
from node.merge.settings import Conditional, Gradient, LayerTable, parse_setting

ATTN = "model.layers.2.self_attn.q_proj.weight"
MLP = "model.layers.2.mlp.up_proj.weight"


def recipe(**over: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 1}}],
        **over,
    }


def test_gradient_interpolates_like_mergekit() -> None:
    # 5 values over 4 layers: t = i / 3, scaled = t * 4
    values = [0.0, 0.2, 0.6, 0.8, 1.0]
    assert interpolate(values, 0.0) == 0.0
    assert interpolate(values, 1 / 3) == pytest.approx(0.2 + (4 / 3 - 1) * 0.4)
    assert interpolate(values, 2 / 3) == pytest.approx(0.6 + (8 / 3 - 2) * 0.2)
    assert interpolate(values, 1.0) == 1.0
    assert interpolate([True, False], 0.4) is True  # non-numeric: a step, not a blend
    assert interpolate([True, False], 1.0) is False


def test_filters_first_match_wins_and_fall_through() -> None:
    setting = parse_setting(
        "w",
        [
            {"filter": "self_attn", "value": 0.1},
            {"filter": "attn", "value": 0.2},
            {"value": [0, 1]},
        ],
    )
    assert evaluate(setting, Position(ATTN, 0.5, 2)) == 0.1
    assert evaluate(setting, Position(MLP, 0.5, 2)) == 0.5  # gradient inside a filter
    only = parse_setting("w", [{"filter": "mlp", "value": 0.3}])
    assert evaluate(only, Position(ATTN)) is None  # no match: the next scope decides


def test_layer_table_and_default() -> None:
    table = parse_setting("w", {"layers": [0.1, 0.2, 0.3, 0.4], "default": 0.9})
    assert isinstance(table, LayerTable)
    assert evaluate(table, Position(MLP, 0.0, 2)) == 0.3
    assert evaluate(table, Position("model.embed_tokens.weight")) == 0.9
    no_default = parse_setting("w", {"layers": [0.1, 0.2]})
    assert evaluate(no_default, Position("lm_head.weight")) == 0.1  # like a gradient's first value


def test_scalar_strings_are_numbers_as_in_mergekit() -> None:
    assert evaluate(parse_setting("w", "1e-3"), Position(MLP), float) == 0.001
    assert evaluate(parse_setting("w", 1), Position(MLP), bool) is True
    assert evaluate(parse_setting("w", ["0", "1e0"]), Position(MLP, 0.5, 1), float) == 0.5


def test_resolution_precedence_model_then_slice_then_top_level() -> None:
    specs = (ParamSpec("weight", kind=float), ParamSpec("density", 1.0, kind=float))
    model = {"weight": parse_setting("w", [{"filter": "mlp", "value": 0.7}])}
    top = {"weight": 0.2, "density": 0.5}
    assert resolve(specs, [model, {}, top], Position(MLP), "models[0]", strict=True) == {
        "weight": 0.7,
        "density": 0.5,
    }
    assert resolve(specs, [model, {}, top], Position(ATTN), "models[0]", strict=True) == {
        "weight": 0.2,
        "density": 0.5,
    }
    assert resolve(specs, [{}, {}, {}], Position(ATTN), "models[0]", strict=False) == {
        "density": 1.0
    }
    with pytest.raises(UserError, match="weight"):
        resolve(specs, [{}, {}], Position(ATTN), "models[0]", strict=True)


def test_recipe_fields_and_seed() -> None:
    r = parse_recipe(
        recipe(
            seed=7, dtype="torch.bfloat16", tokenizer={"source": "base", "pad_to_multiple_of": 64}
        )
    )
    assert r.seed == 7 and str(r.dtype) == "torch.bfloat16"
    assert r.tokenizer is not None and (r.tokenizer.source, r.tokenizer.pad_to_multiple_of) == (
        "base",
        64,
    )
    assert parse_recipe(recipe()).seed == 0
    assert r.models is not None and r.models[0].parameters == {"weight": 1}
    assert parse_setting("w", {"filter": "mlp", "value": [1, 2]}) == (
        Conditional(Gradient((1, 2)), "mlp"),
    )


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"merge_methd": "linear"}, "merge_methd"),
        ({"seed": -1}, "seed"),
        ({"dtype": "int8"}, "dtype"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "models"),
        ({"tokenizer_source": "base", "tokenizer": {"source": "union"}}, "tokenizer"),
        ({"parameters": {"weight": {"layers": []}}}, "parameters.weight"),
        ({"parameters": {"weight": [{"filter": 3, "value": 1}]}}, "filter"),
    ],
)
def test_bad_recipes_name_the_field(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(UserError) as err:
        parse_recipe(recipe(**over))
    assert needle in str(err.value)


def test_slices_must_have_equal_lengths() -> None:
    bad = {"merge_method": "linear", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}]}  # fmt: skip
    with pytest.raises(UserError, match="same number of layers"):
        parse_recipe(bad)


def test_tensor_places_come_from_names() -> None:
    assert arch.place("model.layers.11.mlp.up_proj.weight").layer == 11
    assert (
        arch.place("transformer.h.3.attn.c_attn.bias").renamed(7)
        == "transformer.h.7.attn.c_attn.bias"
    )
    assert arch.place("model.norm.weight").post and arch.place("lm_head.weight").post
    assert arch.place("transformer.ln_f.weight").post
    assert not arch.place("model.embed_tokens.weight").post
    assert arch.is_vocab_tensor("transformer.wte.weight", (512, 64))
    assert not arch.is_vocab_tensor("transformer.wpe.weight", (256, 64))
