"""The streaming executor: one output tensor at a time, reading the next tensor's inputs and
writing the previous result on two helper threads while the current one is merged.

At most two tensors' inputs and two results are alive at once, whatever the model size.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from node.errors import UserError
from node.merge.io import TensorSource
from node.merge.methods.base import MergeInputs, MergeMethod, tensor_generator
from node.merge.plan import TensorJob
from node.merge.vocab import VocabRemap
from node.merge.writer import ShardedWriter


def _finite(name: str, model: str, x: torch.Tensor) -> None:
    # A sum is one fast pass; only a non-finite sum (NaN/inf, or overflow) needs the exact check.
    if x.numel() and not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
        raise UserError(
            "model", model, "fix or re-export that checkpoint; merges of NaN/inf are meaningless",
            problem=f"tensor {name} contains NaN or inf",
        )  # fmt: skip


def gather(job: TensorJob, sources: dict[str, TensorSource]) -> dict[str, torch.Tensor]:
    """Every input of one job, as float32 (non-float buffers keep their dtype)."""
    out = {}
    for model, name in job.reads.items():
        raw = sources[model].get(name)
        if job.floating:
            raw = raw.float()
            _finite(name, model, raw)
        out[model] = raw
    return out


def merge_one(
    job: TensorJob,
    tensors: dict[str, torch.Tensor],
    method: MergeMethod,
    seed: int,
    remap: VocabRemap | None,
) -> torch.Tensor:
    """Merge one tensor and cast it to its output dtype."""
    if not job.floating:  # integer/bool buffers are copied from the base (or first) model
        return tensors[job.base if job.base in tensors else next(iter(tensors))]
    if job.vocab and remap is not None:
        tensors = remap.remap(tensors, job.base)
    inputs = MergeInputs(
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
    return result.to(job.out.dtype)


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
    """Run every job (in `order`, default plan order) and write each result to its slot."""
    from tqdm import tqdm

    seq = [jobs[i] for i in (order if order is not None else range(len(jobs)))]
    bar = tqdm(
        total=len(seq), unit="tensor", desc="merge", file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()), leave=False,
    )  # fmt: skip
    with ThreadPoolExecutor(1, "unode-read") as reader, ThreadPoolExecutor(1, "unode-write") as out:
        pending: Future[None] | None = None
        nxt = reader.submit(gather, seq[0], sources) if seq else None
        try:
            for i, job in enumerate(seq):
                assert nxt is not None
                tensors = nxt.result()
                nxt = reader.submit(gather, seq[i + 1], sources) if i + 1 < len(seq) else None
                result = merge_one(job, tensors, method, seed, remap)
                del tensors
                if pending is not None:
                    pending.result()
                pending = out.submit(writer.write, job.name, result)
                del result
                bar.update(1)
            if pending is not None:
                pending.result()
        finally:
            if nxt is not None:
                nxt.cancel()
            bar.close()
