"""`merge(recipe, out_dir)`: the public entry of the merge engine (the CLI and rounds call it).

Validates the whole recipe against tensor metadata first, merges into a temporary directory
next to `out_dir` and renames it into place: on any error nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node.errors import UserError
from node.merge import vocab as vocab_mod
from node.merge.executor import execute
from node.merge.io import LocalSafetensorsSource, TensorSource
from node.merge.methods import get_method, method_names
from node.merge.methods.base import MergeMethod
from node.merge.outputs import (
    LINEAGE_NAME,
    Lineage,
    lineage_hash,
    model_card,
    output_config,
    set_chat_template,
    write_json,
)
from node.merge.plan import MergePlan, build_plan
from node.merge.recipe import Recipe, load_recipe
from node.merge.writer import ShardedWriter

DEFAULT_SHARD_BYTES = 5 * 1000**3


@dataclass(frozen=True)
class MergeReport:
    """What a merge did (printed by `unode merge --json`)."""

    method: str
    out_dir: str
    tensors: int
    params: int
    seconds: float
    seed: int
    recipe_sha256: str
    lineage_sha256: str
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _method(name: str) -> MergeMethod:
    names = sorted(method_names())
    if name not in names:
        raise UserError("merge_method", name, f"use one of: {', '.join(names)}", "unknown method")
    return get_method(name)


def model_field(recipe: Recipe, ref: str) -> str:
    """The recipe field that names a model first (for error messages)."""
    if recipe.base_model == ref:
        return "base_model"
    for i, s in enumerate(recipe.models or ()):
        if s.model == ref:
            return f"models[{i}].model"
    for i, sl in enumerate(recipe.slices or ()):
        for j, src in enumerate(sl.sources):
            if src.model == ref:
                return f"slices[{i}].sources[{j}].model"
    return "model"


def open_sources(
    recipe: Recipe, given: Mapping[str, TensorSource] | None
) -> dict[str, TensorSource]:
    out: dict[str, TensorSource] = {}
    for ref in recipe.referenced_models():
        fld = model_field(recipe, ref)
        if given is not None and ref in given:
            out[ref] = given[ref]
        elif ref.startswith("unode://"):  # fetched tensor by tensor from peers (node.network)
            from node.network.source import open_network_source

            out[ref] = open_network_source(ref, fld)
        else:
            out[ref] = LocalSafetensorsSource(ref, Path(ref).expanduser(), fld)
    return out


def read_configs(recipe: Recipe, sources: dict[str, TensorSource]) -> dict[str, dict[str, Any]]:
    configs = {}
    for ref, src in sources.items():
        path = src.meta_dir / "config.json"
        try:
            configs[ref] = dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            raise UserError(
                model_field(recipe, ref), ref, "give a model directory with its config.json",
                problem="missing or malformed config.json",
            ) from None  # fmt: skip
    return configs


def merge(
    recipe: Mapping[str, Any] | Path | str,
    out_dir: Path | str,
    *,
    force: bool = False,
    progress: bool = True,
    sources: Mapping[str, TensorSource] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    order: Sequence[int] | None = None,
) -> MergeReport:
    """Merge the models a mergekit-style recipe names into `out_dir` (a Hugging Face model dir).

    `sources` supplies tensor sources by model reference (e.g. a peer's expert); references not
    in it are local directories. `order` permutes the tensor processing order (the output is
    byte-identical whatever it is).
    """
    start = time.perf_counter()
    rec = load_recipe(recipe)
    method = _method(rec.merge_method)
    out = Path(out_dir)
    if out.exists() and not force:
        raise UserError(
            "OUT_DIR",
            str(out),
            "pass --force to replace it, or choose a new path",
            "already exists",
        )
    srcs = open_sources(rec, sources)
    try:
        configs = read_configs(rec, srcs)
        dirs = {k: s.meta_dir for k, s in srcs.items()}
        base = rec.base_model or rec.referenced_models()[0]
        remap = None
        if rec.tokenizer is not None:
            remap = vocab_mod.build_remap(rec.tokenizer, base, dirs, configs)
        else:
            vocab_mod.check_same_vocab(dirs)
        plan = build_plan(rec, method, srcs, remap.rows if remap else None)
        files, lineage = _write(
            rec, method, plan, srcs, configs, remap, out, shard_bytes, progress, order
        )
    finally:
        for s in srcs.values():
            if isinstance(s, LocalSafetensorsSource) and not (sources and s.ref in sources):
                s.close()  # only the sources opened here
    return MergeReport(
        method=rec.merge_method,
        out_dir=str(out),
        tensors=len(plan.jobs),
        params=sum(j.out.numel for j in plan.jobs),
        seconds=round(time.perf_counter() - start, 3),
        seed=rec.seed,
        recipe_sha256=rec.sha256(),
        lineage_sha256=lineage,
        files=files,
    )


def _write(
    rec: Recipe,
    method: MergeMethod,
    plan: MergePlan,
    srcs: dict[str, TensorSource],
    configs: dict[str, dict[str, Any]],
    remap: vocab_mod.VocabRemap | None,
    out: Path,
    shard_bytes: int,
    progress: bool,
    order: Sequence[int] | None,
) -> tuple[list[str], str]:
    tmp = out.parent / f".{out.name}.unode-tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        writer = ShardedWriter(tmp, [(j.name, j.out) for j in plan.jobs], shard_bytes)
        try:
            execute(plan.jobs, method, srcs, writer, rec.seed, remap, progress, order)
        except BaseException:
            writer.abort()
            raise
        hashes = writer.finish()
        _extras(rec, plan, srcs, configs, remap, tmp)
        lineage = Lineage(
            rec.merge_method,
            rec.sha256(),
            rec.seed,
            {k: s.digest() for k, s in srcs.items()},
            hashes,
        )
        record = lineage.to_json()
        write_json(tmp / LINEAGE_NAME, record)
        (tmp / "README.md").write_text(model_card(rec, out.name, record))
        files = sorted(p.name for p in tmp.iterdir())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files, lineage_hash(out / LINEAGE_NAME)


def _extras(
    rec: Recipe,
    plan: MergePlan,
    srcs: dict[str, TensorSource],
    configs: dict[str, dict[str, Any]],
    remap: vocab_mod.VocabRemap | None,
    tmp: Path,
) -> None:
    donor_dir = srcs[plan.donor].meta_dir
    dtype = rec.out_dtype or rec.dtype
    cfg = output_config(
        configs[plan.donor], configs, dtype, plan.layer_sources, remap.rows if remap else None
    )
    write_json(tmp / "config.json", cfg)
    gen = donor_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, tmp / "generation_config.json")
    if remap is not None:
        vocab_mod.save_tokenizer(remap, tmp)
    else:
        vocab_mod.copy_tokenizer(donor_dir, tmp)
    if rec.chat_template is not None:
        set_chat_template(tmp, rec.chat_template, [s.meta_dir for s in srcs.values()])


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an old one (--force) is removed after."""
    if out.exists():
        trash = out.parent / f".{out.name}.unode-old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
