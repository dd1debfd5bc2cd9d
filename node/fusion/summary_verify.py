"""Spot checks of a peer's summaries by recomputation: one seeded batch of sequences (at most
`batch_size`, 8 by default) is summarized again with the source model and compared.

Content checks (summary_check.py) catch impossible summaries; this catches plausible but wrong
ones (another model's distributions, shuffled or shifted rows). One machine recomputes bit for
bit; across CPUs and BLAS builds float reordering moves float32 log-probs slightly, so values
are compared within `LOGP_ATOL` plus one float16 step (the stored precision), and top-k ids by
token, not by rank: ids may differ only where the recomputed values are within `LOGP_ATOL` of
the (k+1)-th (a near-tie at the k-th place), and order within the top-k is not compared.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from node.errors import UserError
from node.fusion.corpus import load_corpus
from node.fusion.summaries import SummarySettings, batches_of, summarize_batch
from node.fusion.summary_check import SummaryMismatchError
from node.fusion.summary_store import SeqSummary, SummaryReader
from node.fusion.tokens import Encoded

LOGP_ATOL = 0.02  # nats (a probability within 2 %); 200x the float noise the tests add


def _tolerance(values: np.ndarray) -> np.ndarray:
    """LOGP_ATOL plus one float16 step at each value (the precision summaries are stored in)."""
    step = np.spacing(np.abs(values).astype(np.float16)).astype(np.float32)
    return np.asarray(LOGP_ATOL + step, dtype=np.float32)


def _row_problem(ids: np.ndarray, logp: np.ndarray, ref_ids: np.ndarray, ref: np.ndarray) -> str:
    """Why one row's top-k (ids, logp) disagrees with a recomputed top-(k+1); '' if it agrees."""
    k = len(ids)
    edge = float(ref[k]) if len(ref) > k else -np.inf  # the best value left out of the top-k
    pos = {int(t): j for j, t in enumerate(ref_ids.tolist())}
    for t, v in zip(ids.tolist(), logp.tolist(), strict=True):
        j = pos.get(int(t))
        want = ref[j] if j is not None else edge  # outside the top-(k+1): at most `edge`
        tol = float(_tolerance(np.array([want]))[0])
        if (j is not None and abs(v - want) > tol) or (j is None and v > want + tol):
            return f"token {t} has log-prob {v:.4f}, recomputed {float(want):.4f}"
    missing = [int(t) for t, v in zip(ref_ids[:k], ref[:k], strict=True) if v > edge + LOGP_ATOL]
    absent = sorted(set(missing) - set(int(t) for t in ids))
    if absent:
        return f"token {absent[0]} is missing from the top-k (recomputed {ref[pos[absent[0]]]:.4f})"
    return ""


def compare_sequence(got: SeqSummary, enc: Encoded, rows: dict[str, np.ndarray]) -> str:
    """What differs between a peer's summary of one sequence and a recomputation of it ('' if
    nothing): token ids and spans exactly, top-k and NLLs within the documented tolerance."""
    if not np.array_equal(got.ids, enc.ids.astype(np.int64)):
        return "its token ids differ"
    if not np.array_equal(got.spans, enc.spans.reshape(-1, 2).astype(np.int64)):
        return "its character spans differ"
    ref_ids, ref = rows["topk_ids"], rows["topk_logp"].astype(np.float32)
    if len(got.topk_ids) != len(ref_ids) or got.topk_ids.shape[1] + 1 != ref_ids.shape[1]:
        return "its number of rows or of top-k entries differs"
    for i in range(len(ref_ids)):
        problem = _row_problem(got.topk_ids[i], got.topk_logp[i], ref_ids[i], ref[i])
        if problem:
            return f"position {i}: {problem}"
    nll = rows["token_nll"].astype(np.float32)
    bad = np.flatnonzero(np.abs(got.token_nll - nll) > _tolerance(nll))
    if bad.size:
        i = int(bad[0])
        return f"position {i}: token NLL {got.token_nll[i]:.4f}, recomputed {nll[i]:.4f}"
    return ""


def sample_batch(n_seqs: int, settings: SummarySettings, seed: bytes) -> range:
    """The batch a verifier recomputes: one of `summarize`'s batches, chosen by `seed`."""
    return random.Random(seed).choice(batches_of(n_seqs, settings))


def verify_sample(
    summaries: Path, model_dir: Path, corpus: Path, settings: SummarySettings, seed: bytes
) -> range:
    """Recompute one seeded batch of content-checked `summaries` of `corpus` by `model_dir`;
    raise SummaryMismatchError naming the first sequence that differs. Returns the batch."""
    n = len(load_corpus(corpus))
    try:
        got = SummaryReader(summaries, verify=False)
    except UserError as err:  # e.g. fewer sequences than the manifest says
        raise SummaryMismatchError(err.problem) from None
    if got.n_seqs != n:
        raise SummaryMismatchError(f"{got.n_seqs} sequences summarized, the shard has {n}")
    batch = sample_batch(n, settings, seed)
    for i, (enc, rows) in summarize_batch(model_dir, corpus, batch, settings, extra=1).items():
        problem = compare_sequence(got.sequence(i), enc, rows)
        if problem:
            raise SummaryMismatchError(f"sequence {i} does not match a recomputation: {problem}")
    return batch
