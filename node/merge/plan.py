"""The merge plan: every output tensor with the inputs it reads and its resolved parameters.

Built from tensor metadata only (no tensor is read), so every user error about models, shapes,
missing tensors and parameters surfaces before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from node.errors import UserError
from node.merge import architecture as arch
from node.merge.io import TensorMeta, TensorSource
from node.merge.methods import check_inputs
from node.merge.methods.base import MergeMethod
from node.merge.params import Position, check_ranges, check_table_lengths, resolve
from node.merge.recipe import OutputSlice, Recipe, SliceSource
from node.merge.settings import Params


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: what to read from which model, and how to merge it."""

    name: str
    reads: dict[str, str]  # model key -> tensor name in that model
    models: tuple[str, ...]
    base: str | None
    params: dict[str, Any]
    model_params: dict[str, dict[str, Any]]
    out: TensorMeta
    vocab: bool = False  # rows indexed by token id: remapped to the output vocabulary
    floating: bool = True


@dataclass
class MergePlan:
    jobs: list[TensorJob] = field(default_factory=list)
    layer_sources: list[tuple[str, int]] = field(
        default_factory=list
    )  # out layer -> (model, layer)
    donor: str = ""  # model whose config.json and tokenizer the output starts from

    @property
    def n_layers(self) -> int:
        return len(self.layer_sources)


def _groups(recipe: Recipe, sources: dict[str, TensorSource]) -> list[OutputSlice]:
    """The `models:` syntax is one slice over every layer, the base appended if not listed."""
    if recipe.slices is not None:
        return list(recipe.slices)
    assert recipe.models is not None
    srcs = list(recipe.models)
    if recipe.base_model and recipe.base_model not in [s.model for s in srcs]:
        srcs.append(SliceSource(recipe.base_model))
    n = arch.layout(sources[recipe.base_model or srcs[0].model].names()).n_layers
    return [OutputSlice(tuple(SliceSource(s.model, (0, n), s.parameters) for s in srcs))]


def _slice_base(recipe: Recipe, sl: OutputSlice, method: MergeMethod, i: int) -> str | None:
    """In a slice the base must be one of its sources, unless the method ignores bases."""
    base = sl.base_model or recipe.base_model
    if recipe.slices is None or base is None or base in [s.model for s in sl.sources]:
        return base
    if method.inputs.base != "ignored":
        raise UserError(
            f"slices[{i}].base_model", base, "add the base model to the slice's sources",
            problem=f"method {method.name} needs its base among the slice's sources",
        )  # fmt: skip
    return None


def build_plan(
    recipe: Recipe,
    method: MergeMethod,
    sources: dict[str, TensorSource],
    vocab_rows: int | None = None,
) -> MergePlan:
    """`vocab_rows`: the output vocabulary size when a tokenizer setting remaps token rows."""
    groups = _groups(recipe, sources)
    for i, sl in enumerate(groups):
        base = _slice_base(recipe, sl, method, i)
        listed = [s.model for s in (recipe.models or sl.sources)]
        check_inputs(method, listed, base)
    scopes = _all_scopes(recipe)
    check_ranges(scopes)
    n_out = 0
    for sl in groups:
        lo, hi = sl.sources[0].layer_range or (0, 0)
        n_out += hi - lo
    check_table_lengths(scopes, n_out)
    plan = MergePlan(donor=recipe.base_model or groups[0].sources[0].model)
    builder = _Builder(recipe, method, sources, vocab_rows, plan)
    first, last = groups[0], groups[-1]
    pre_layout = arch.layout(sources[_lead(recipe, first).model].names())
    for name in pre_layout.pre:
        builder.add(name, first, 0, {s.model: name for s in first.sources}, Position(name))
    for i, sl in enumerate(groups):
        builder.add_slice(i, sl)
    post_layout = arch.layout(sources[_lead(recipe, last).model].names())
    for name in post_layout.post:
        builder.add(
            name, last, len(groups) - 1, {s.model: name for s in last.sources}, Position(name)
        )
    assert plan.n_layers == n_out
    return plan


def _lead(recipe: Recipe, sl: OutputSlice) -> SliceSource:
    """The source whose tensor names define the output: the base if it is one, else the first."""
    base = sl.base_model or recipe.base_model
    return next((s for s in sl.sources if s.model == base), sl.sources[0])


def _all_scopes(recipe: Recipe) -> list[tuple[str, Params]]:
    out: list[tuple[str, Params]] = [("parameters", recipe.parameters)]
    for i, s in enumerate(recipe.models or ()):
        out.append((f"models[{i}].parameters", s.parameters))
    for i, sl in enumerate(recipe.slices or ()):
        out.append((f"slices[{i}].parameters", sl.parameters))
        out += [
            (f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(sl.sources)
        ]
    return out


class _Builder:
    def __init__(
        self,
        recipe: Recipe,
        method: MergeMethod,
        sources: dict[str, TensorSource],
        vocab_rows: int | None,
        plan: MergePlan,
    ) -> None:
        self.recipe, self.method, self.sources = recipe, method, sources
        self.vocab_rows, self.plan = vocab_rows, plan

    def add_slice(self, i: int, sl: OutputSlice) -> None:
        first = _lead(self.recipe, sl)
        assert first.layer_range is not None
        lo, hi = first.layer_range
        lay = arch.layout(self.sources[first.model].names())
        for k in range(hi - lo):
            if lo + k not in lay.layers:
                raise UserError(
                    f"slices[{i}].sources[0].layer_range", [lo, hi],
                    f"stay within the model's {lay.n_layers} layers", problem="layer out of range",
                )  # fmt: skip
            out_layer = self.plan.n_layers
            self.plan.layer_sources.append((first.model, lo + k))
            t = k / (hi - lo - 1) if hi - lo > 1 else 1.0
            for name in lay.layers[lo + k]:
                p = arch.place(name)
                reads = {
                    s.model: p.renamed(s.layer_range[0] + k) for s in sl.sources if s.layer_range
                }
                self.add(
                    p.renamed(out_layer), sl, i, reads, Position(p.renamed(out_layer), t, out_layer)
                )

    def add(
        self, out_name: str, sl: OutputSlice, i: int, reads: dict[str, str], pos: Position
    ) -> None:
        base = _slice_base(self.recipe, sl, self.method, i)
        models = tuple(s.model for s in sl.sources if s.model != base or self._listed(base))
        reads = {m: self._resolve_name(m, n) for m, n in reads.items()}
        metas = {m: self.sources[m].meta(n) for m, n in reads.items()}
        floating = all(m.dtype.is_floating_point for m in metas.values())
        vocab = floating and arch.is_vocab_tensor(out_name, next(iter(metas.values())).shape)
        self._check_shapes(out_name, metas, vocab)
        donor_meta = metas[base] if base in metas else next(iter(metas.values()))
        shape = donor_meta.shape
        if vocab and self.vocab_rows is not None:
            shape = (self.vocab_rows, *shape[1:])
        dtype = (
            (self.recipe.out_dtype or self.recipe.dtype or donor_meta.dtype)
            if floating
            else donor_meta.dtype
        )
        shared = [sl.parameters, self.recipe.parameters]
        params = resolve(self.method.global_params, shared, pos, "parameters", strict=True)
        model_params = {}
        for m, n in reads.items():
            own = [s.parameters for s in sl.sources if s.model == m]
            mpos = Position(n, pos.t, pos.layer)
            where = self._where(m)
            specs = [p for p in self.method.model_params if m != base or p.applies_to_base]
            model_params[m] = resolve(specs, [*own, *shared], mpos, where, strict=True)
        job = TensorJob(
            out_name,
            reads,
            models,
            base,
            params,
            model_params,
            TensorMeta(shape, dtype),
            vocab and self.vocab_rows is not None,
            floating,
        )
        self.plan.jobs.append(job)

    def _listed(self, base: str | None) -> bool:
        if self.recipe.models is not None:
            return base in [s.model for s in self.recipe.models]
        return True

    def _where(self, model: str) -> str:
        for i, s in enumerate(self.recipe.models or ()):
            if s.model == model:
                return f"models[{i}]"
        return model

    def _resolve_name(self, model: str, name: str) -> str:
        names = self.sources[model].names()
        if name in names:
            return name
        for alt in arch.TIED_HEADS.get(name, ()):
            if alt in names:
                return alt
        raise UserError(
            "model", model, "merge only models of one architecture whose checkpoints share tensor names",
            problem=f"tensor {name} missing",
        )  # fmt: skip

    def _check_shapes(self, name: str, metas: dict[str, TensorMeta], vocab: bool) -> None:
        shapes = {m: meta.shape for m, meta in metas.items()}
        if len(set(shapes.values())) == 1:
            return
        if vocab and len({s[1:] for s in shapes.values()}) == 1:
            if self.vocab_rows is not None:
                return
            raise UserError(
                "tokenizer_source", None,
                "the models have different vocabularies: add `tokenizer_source: base` (or union, or a model path)",
                problem=f"vocabulary sizes differ for {name}: {sorted(set(s[0] for s in shapes.values()))}",
            )  # fmt: skip
        raise UserError(
            "models", name, "merge only models of the same architecture and size",
            problem=f"shape mismatch for tensor {name}: {', '.join(f'{m}={list(s)}' for m, s in shapes.items())}",
        )  # fmt: skip
