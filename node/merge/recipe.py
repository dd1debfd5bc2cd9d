"""A merge recipe: mergekit's YAML format parsed and validated into typed, frozen dataclasses.

Adds two unode fields: a top-level `seed` (randomness of DARE/DELLA-style methods) and per-layer
tables (`{layers: [...], default: x}`) wherever mergekit accepts a parameter value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from node.errors import UserError
from node.merge.settings import Params, parse_params

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "seed", "name",
)  # fmt: skip
DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int] | None = None  # None: every layer (the `models:` syntax)
    parameters: Params = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Params = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "union", "base" or a model reference
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class Recipe:
    merge_method: str
    base_model: str | None
    models: tuple[SliceSource, ...] | None
    slices: tuple[OutputSlice, ...] | None
    parameters: Params
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer: TokenizerSpec | None
    seed: int
    raw: Mapping[str, Any]
    chat_template: str | None = None  # "auto" or the template text

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in recipe order."""
        refs = [self.base_model] if self.base_model else []
        for s in self.models or ():
            refs.append(s.model)
        for sl in self.slices or ():
            refs.extend([sl.base_model] if sl.base_model else [])
            refs.extend(src.model for src in sl.sources)
        return list(dict.fromkeys(refs))

    def yaml_text(self) -> str:
        return yaml.safe_dump(dict(self.raw), sort_keys=False)

    def sha256(self) -> str:
        """Hash of the recipe's canonical JSON form (key order and YAML layout do not matter)."""
        canon = json.dumps(self.raw, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canon.encode()).hexdigest()


def load_recipe(source: Mapping[str, Any] | Path | str) -> Recipe:
    """Parse a recipe from a YAML file path, YAML text, or an already-loaded dict."""
    if isinstance(source, Mapping):
        return parse_recipe(source)
    path = Path(source)
    if not path.is_file():
        raise UserError("recipe", str(path), "give the path of a YAML recipe file", "not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f"line {where.line + 1}" if where is not None else "parse error"
        raise UserError(
            "recipe", str(path), "fix the YAML syntax", problem=f"malformed YAML at {line}"
        ) from None
    if not isinstance(data, Mapping):
        raise UserError(
            "recipe", str(path), "write a YAML mapping with merge_method", "not a mapping"
        )
    return parse_recipe(data)


def parse_recipe(data: Mapping[str, Any]) -> Recipe:
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise UserError(
            unknown[0], data[unknown[0]], f"use only {', '.join(TOP_LEVEL_KEYS)}", "unknown field"
        )
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise UserError("merge_method", method, "name a merge method, e.g. linear", "missing")
    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        raise UserError(
            "models",
            data.get("models"),
            "give exactly one of `models:` or `slices:`",
            problem="both or neither of models/slices",
        )
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError("seed", seed, "give a non-negative integer")
    return Recipe(
        merge_method=method.strip().lower(),
        base_model=_model_ref("base_model", data.get("base_model")),
        models=_models(data["models"]) if has_models else None,
        slices=_slices(data["slices"]) if has_slices else None,
        parameters=parse_params("parameters", data.get("parameters")),
        dtype=_dtype("dtype", data.get("dtype")),
        out_dtype=_dtype("out_dtype", data.get("out_dtype")),
        tokenizer=_tokenizer(data),
        seed=seed,
        raw=dict(data),
        chat_template=_chat_template(data.get("chat_template")),
    )


def _chat_template(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or (value != "auto" and "{" not in value):
        raise UserError(
            "chat_template", value, "give `auto` or the Jinja template text itself",
            problem="named templates are not shipped with unode",
        )  # fmt: skip
    return value


def _model_ref(fld: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping) and isinstance(value.get("model"), Mapping):
        if value.get("lora"):
            raise UserError(fld, value, "merge the LoRA into its model first", "LoRA adapter")
        value = value["model"].get("path")
    if not isinstance(value, str) or not value.strip():
        raise UserError(fld, value, "give a model directory path as a string")
    return value.strip()


def _models(value: Any) -> tuple[SliceSource, ...]:
    if not isinstance(value, list):
        raise UserError("models", value, "give a list of {model: PATH, parameters: {...}}")
    out = []
    for i, item in enumerate(value):
        fld = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or "model" not in item:
            raise UserError(fld, item, "give {model: PATH, parameters: {...}}")
        ref = _model_ref(f"{fld}.model", item["model"])
        assert ref is not None
        out.append(
            SliceSource(ref, None, parse_params(f"{fld}.parameters", item.get("parameters")))
        )
    refs = [s.model for s in out]
    dup = next((r for r in refs if refs.count(r) > 1), None)
    if dup:
        raise UserError("models", dup, "list each model once", "duplicate model")
    return tuple(out)


def _slices(value: Any) -> tuple[OutputSlice, ...]:
    if not isinstance(value, list):
        raise UserError("slices", value, "give a list of {sources: [...]}")
    out = []
    for i, item in enumerate(value):
        fld = f"slices[{i}]"
        if (
            not isinstance(item, Mapping)
            or not isinstance(item.get("sources"), list)
            or not item["sources"]
        ):
            raise UserError(f"{fld}.sources", item, "give a non-empty list of {model, layer_range}")
        sources = tuple(
            _slice_source(f"{fld}.sources[{j}]", s) for j, s in enumerate(item["sources"])
        )
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range}
        if len(lengths) != 1:
            raise UserError(
                f"{fld}.sources",
                sorted(lengths),
                "give every source the same number of layers",
                "unequal layer ranges",
            )
        out.append(
            OutputSlice(
                sources=sources,
                base_model=_model_ref(f"{fld}.base_model", item.get("base_model")),
                parameters=parse_params(f"{fld}.parameters", item.get("parameters")),
            )
        )
    return tuple(out)


def _slice_source(fld: str, item: Any) -> SliceSource:
    if not isinstance(item, Mapping) or "model" not in item:
        raise UserError(fld, item, "give {model: PATH, layer_range: [START, END]}")
    lr = item.get("layer_range")
    ok = isinstance(lr, list | tuple) and len(lr) == 2 and all(type(x) is int for x in lr)
    if not ok or lr is None or lr[0] < 0 or lr[1] <= lr[0]:
        raise UserError(f"{fld}.layer_range", lr, "give [START, END] with 0 <= START < END")
    ref = _model_ref(f"{fld}.model", item["model"])
    assert ref is not None
    return SliceSource(
        ref, (lr[0], lr[1]), parse_params(f"{fld}.parameters", item.get("parameters"))
    )


def _dtype(fld: str, value: Any) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise UserError(fld, value, f"use one of {', '.join(DTYPE_NAMES)}", "unknown dtype")
    return DTYPE_NAMES[name]


def _tokenizer(data: Mapping[str, Any]) -> TokenizerSpec | None:
    src, tok = data.get("tokenizer_source"), data.get("tokenizer")
    if src is not None and tok is not None:
        raise UserError("tokenizer", tok, "give tokenizer_source or tokenizer, not both")
    if tok is not None:
        if not isinstance(tok, Mapping):
            raise UserError("tokenizer", tok, "give {source: union|base|MODEL}")
        if tok.get("tokens"):
            raise UserError(
                "tokenizer.tokens",
                tok["tokens"],
                "remove it: per-token embedding sources are not supported yet",
                "unsupported",
            )
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (type(pad) is not int or pad <= 0):
            raise UserError("tokenizer.pad_to_multiple_of", pad, "give a positive integer")
        ref = _model_ref("tokenizer.source", tok.get("source", "union"))
        return TokenizerSpec(ref or "union", pad)
    if src is None:
        return None
    ref = _model_ref("tokenizer_source", src)
    return TokenizerSpec(ref or "union")
