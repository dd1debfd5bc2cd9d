"""The deterministic work of a merge round: plan a recipe, compute one unit, assemble units.

Every unit is computed with the merge engine's own per-tensor path (`gather`, `merge_one`,
`ShardedWriter`), seeded by the round seed and the tensor name, so any peer gets the same bytes
as `unode merge` on local copies and can verify any other peer's unit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.merge import api
from node.merge import vocab as vocab_mod
from node.merge.executor import execute
from node.merge.io import LocalSafetensorsSource, TensorSource
from node.merge.methods.base import MergeMethod
from node.merge.outputs import LINEAGE_NAME, write_json
from node.merge.plan import MergePlan, TensorJob, build_plan
from node.merge.recipe import Recipe, load_recipe
from node.merge.writer import ShardedWriter

WRONG_UNITS_ENV = "UNODE_TEST_WRONG_UNITS"  # fault injector for tests: publish altered units
UNIT_SHARD_BYTES = 1 << 62  # a unit is one safetensors file


@dataclass
class Prepared:
    """A recipe resolved against its sources: the plan every unit is cut from."""

    recipe: Recipe
    method: MergeMethod
    plan: MergePlan
    sources: dict[str, TensorSource]
    configs: dict[str, dict[str, Any]]
    remap: vocab_mod.VocabRemap | None

    def jobs(self, names: tuple[str, ...]) -> list[TensorJob]:
        by_name = {j.name: j for j in self.plan.jobs}
        return [by_name[n] for n in names]


def prepare(recipe: Mapping[str, Any], sources: Mapping[str, TensorSource]) -> Prepared:
    """What `node.merge.api.merge` resolves before executing, for a round's recipe."""
    rec = load_recipe(recipe)
    method = api._method(rec.merge_method)
    srcs = api.open_sources(rec, sources)
    configs = api.read_configs(rec, srcs)
    dirs = {k: s.meta_dir for k, s in srcs.items()}
    base = rec.base_model or rec.referenced_models()[0]
    remap = None
    if rec.tokenizer is not None:
        remap = vocab_mod.build_remap(rec.tokenizer, base, dirs, configs)
    else:
        vocab_mod.check_same_vocab(dirs)
    plan = build_plan(rec, method, srcs, remap.rows if remap else None)
    return Prepared(rec, method, plan, srcs, configs, remap)


class _Altered:
    """Test-only fault injector: the recipe's method, but every result is slightly wrong."""

    def __init__(self, inner: MergeMethod) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def merge(self, inputs: Any) -> torch.Tensor:
        result = self._inner.merge(inputs).clone()
        if result.numel():
            result.view(-1)[0] += 1.0
        return result


def job_bytes(job: TensorJob) -> int:
    return job.out.numel * torch.empty((), dtype=job.out.dtype).element_size()


def compute_unit(prep: Prepared, names: tuple[str, ...], out_dir: Path) -> None:
    """Merge the unit's tensors into `out_dir` (one safetensors file; atomic rename)."""
    jobs = prep.jobs(names)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardedWriter(tmp, [(j.name, j.out) for j in jobs], UNIT_SHARD_BYTES)
    method: Any = prep.method
    if os.environ.get(WRONG_UNITS_ENV, "") == "1":
        method = _Altered(method)
    try:
        # the engine's own executor on the unit's jobs: same bytes as `unode merge`, same speed
        execute(jobs, method, prep.sources, writer, prep.recipe.seed, prep.remap, progress=False)
        writer.finish()
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def assemble(
    prep: Prepared,
    unit_dirs: list[Path],
    out_dir: Path,
    lineage: dict[str, Any],
    shard_bytes: int = api.DEFAULT_SHARD_BYTES,
) -> None:
    """Write the merged model from verified unit directories (same layout as `unode merge`)."""
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    units = [LocalSafetensorsSource(str(d), d, "unit") for d in unit_dirs]
    owner = {name: u for u in units for name in u.names()}
    writer = ShardedWriter(tmp, [(j.name, j.out) for j in prep.plan.jobs], shard_bytes)
    try:
        for job in prep.plan.jobs:
            writer.write(job.name, owner[job.name].get(job.name))
        writer.finish()
        api._extras(prep.recipe, prep.plan, prep.sources, prep.configs, prep.remap, tmp)
        write_json(tmp / LINEAGE_NAME, lineage)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for u in units:
            u.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
