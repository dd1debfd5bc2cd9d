"""The streaming executor: one output tensor at a time, reading the next tensor's inputs and
writing the previous result on two helper threads while the current one is merged.

Memory stays at about the largest tensor's inputs plus its method temporaries: the next job is
prefetched only when both jobs' inputs together fit in the largest job's, inputs are handed to
the method as owned (it may merge into them), and buffers, results included, are recycled
through a plan-aware pool. Largest tensors run first (the file layout is fixed by the
plan, so execution order never changes the output bytes).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from node.errors import UserError
from node.merge.buffers import BufferPool, Key
from node.merge.io import LocalSafetensorsSource, TensorSource
from node.merge.methods.base import MergeInputs, MergeMethod, tensor_generator
from node.merge.plan import TensorJob
from node.merge.vocab import VocabRemap
from node.merge.writer import ShardedWriter

F32 = torch.float32


def _finite(name: str, model: str, x: torch.Tensor) -> None:
    # A sum is one fast pass; only a non-finite sum (NaN/inf, or overflow) needs the exact check.
    if x.numel() and not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
        raise UserError(
            "model", model, "fix or re-export that checkpoint; merges of NaN/inf are meaningless",
            problem=f"tensor {name} contains NaN or inf",
        )  # fmt: skip


def _input_bytes(job: TensorJob, sources: dict[str, TensorSource]) -> int:
    return sum(sources[m].meta(n).numel * 4 for m, n in job.reads.items())


def buffer_needs(jobs: Sequence[TensorJob], sources: dict[str, TensorSource]) -> Counter[Key]:
    """How many pooled float32 input buffers of each size the jobs will take."""
    needs: Counter[Key] = Counter()
    for job in jobs:
        if job.floating:
            for m, n in job.reads.items():
                needs[(sources[m].meta(n).numel, F32)] += 1
    return needs


_MODEL_READS = ThreadPoolExecutor(2, "unode-read-model")  # reads of one job's models at once


def gather(
    job: TensorJob, sources: dict[str, TensorSource], pool: BufferPool
) -> dict[str, torch.Tensor]:
    """Every input of one job, as float32 (non-float buffers keep their dtype).

    Local files are read (pread, hash, bf16 -> fp32) two models at a time: each model is
    its own source, and those steps release the GIL.
    """
    if not job.floating:
        return {model: sources[model].get(name) for model, name in job.reads.items()}
    local = all(isinstance(sources[m], LocalSafetensorsSource) for m in job.reads)
    if len(job.reads) < 2 or not local:
        return {m: _read(m, n, sources[m], pool) for m, n in job.reads.items()}
    reads = {m: _MODEL_READS.submit(_read, m, n, sources[m], pool) for m, n in job.reads.items()}
    return {model: future.result() for model, future in reads.items()}


def _read(model: str, name: str, src: TensorSource, pool: BufferPool) -> torch.Tensor:
    buf = pool.take(src.meta(name).shape, F32)
    x = src.get(name, buf)
    if x.dtype != F32:  # a source that ignored `out`
        buf.copy_(x)
        x = buf
    _finite(name, model, x)
    return x


def merge_one(
    job: TensorJob,
    tensors: dict[str, torch.Tensor],
    method: MergeMethod,
    seed: int,
    remap: VocabRemap | None,
) -> torch.Tensor:
    """Merge one tensor (float32 result; non-float buffers come from the base or first model)."""
    if not job.floating:
        return tensors[job.base if job.base in tensors else next(iter(tensors))]
    if job.vocab and remap is not None:
        tensors = remap.remap(tensors, job.base)
    inputs = MergeInputs(
        owned=_distinct(tensors),  # ours (pooled or remapped): the method may overwrite them
        name=job.name,
        models=job.models,
        tensors=tensors,
        base=job.base,
        model_params=job.model_params,
        params=job.params,
        generator=tensor_generator(seed, job.name),
    )
    try:
        result = method.merge(inputs)
    except ValueError as err:
        raise UserError(
            "parameters", job.name, "check the method's parameters in the recipe",
            problem=f"{method.name} failed: {str(err).splitlines()[0][:160]}",
        ) from None  # fmt: skip
    if tuple(result.shape) != job.out.shape:
        raise AssertionError(f"{method.name} returned {tuple(result.shape)} for {job.name}")
    return result


def _distinct(tensors: dict[str, torch.Tensor]) -> bool:
    """No two tensors share storage (so overwriting one never changes another)."""
    ptrs = [t.untyped_storage().data_ptr() for t in tensors.values()]
    return len(set(ptrs)) == len(ptrs)


def _recycle(pool: BufferPool, tensors: dict[str, torch.Tensor], keep: torch.Tensor) -> bool:
    """Give inputs back to the pool, except one the result is (True then: give it after use)."""
    kept, shared = keep.untyped_storage().data_ptr(), False
    for t in tensors.values():
        if t.dtype != F32:
            continue
        if t.untyped_storage().data_ptr() != kept:
            pool.give(t)
        elif keep.shape == t.shape and keep.is_contiguous() and keep.data_ptr() == t.data_ptr():
            shared = True
    return shared


def execution_order(jobs: Sequence[TensorJob]) -> list[int]:
    """Largest output first (vocabulary tensors back to back), plan order among equals."""
    return sorted(range(len(jobs)), key=lambda i: -jobs[i].out.numel)


class _Run:
    def __init__(self, jobs: list[TensorJob], method: MergeMethod, sources: dict[str, TensorSource],
                 writer: ShardedWriter, seed: int, remap: VocabRemap | None) -> None:  # fmt: skip
        self.jobs, self.method, self.sources, self.writer = jobs, method, sources, writer
        self.seed, self.remap = seed, remap
        self.pool = BufferPool(buffer_needs(jobs, sources))
        self.sizes = [_input_bytes(j, sources) for j in jobs]
        self.largest = max(self.sizes, default=0)

    def write(self, job: TensorJob, result: torch.Tensor, pooled: bool) -> None:
        self.writer.write(job.name, result)  # the writer casts to the output dtype in chunks
        if pooled:  # the method merged into one of its (owned) inputs: a pool buffer
            self.pool.give(result)

    def loop(self, reader: ThreadPoolExecutor, out: ThreadPoolExecutor, bar: object) -> None:
        pending: Future[None] | None = None
        nxt: Future[dict[str, torch.Tensor]] | None = None
        for i, job in enumerate(self.jobs):
            if pending is not None and 2 * self.sizes[i] > self.largest:
                pending.result()  # a big job: let the previous result go first
            tensors = nxt.result() if nxt is not None else gather(job, self.sources, self.pool)
            nxt = None
            if i + 1 < len(self.jobs) and self.sizes[i] + self.sizes[i + 1] <= self.largest:
                nxt = reader.submit(gather, self.jobs[i + 1], self.sources, self.pool)
            result = merge_one(job, tensors, self.method, self.seed, self.remap)
            pooled = job.floating and _recycle(self.pool, tensors, result)
            del tensors
            if pending is not None:
                pending.result()
            pending = out.submit(self.write, job, result, pooled)
            del result
            bar.update(1)  # type: ignore[attr-defined]
        if pending is not None:
            pending.result()


def execute(
    jobs: Sequence[TensorJob],
    method: MergeMethod,
    sources: dict[str, TensorSource],
    writer: ShardedWriter,
    seed: int,
    remap: VocabRemap | None = None,
    progress: bool = True,
    order: Sequence[int] | None = None,
) -> None:
    """Run every job (in `order`, default `execution_order`) and write each result to its slot."""
    from tqdm import tqdm

    seq = [jobs[i] for i in (order if order is not None else execution_order(jobs))]
    run = _Run(seq, method, sources, writer, seed, remap)
    bar = tqdm(
        total=len(seq), unit="tensor", desc="merge", file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()), leave=False,
    )  # fmt: skip
    with ThreadPoolExecutor(1, "unode-read") as reader, ThreadPoolExecutor(1, "unode-write") as out:
        try:
            run.loop(reader, out, bar)
        finally:
            bar.close()
