"""Content checks of one summary shard before any of it is used: a peer's summaries are
untrusted, and a bad row would crash training (an id past the vocabulary) or poison it (NaN).

Checked (vectorised, about a millisecond per MB): the arrays and their dtypes, the row pointers
(start at 0, never decrease, end at the array lengths, one prediction per token after the first),
ids below the source's vocabulary size, finite log-probabilities that are at most 0, finite
non-negative token NLLs, character spans with start <= end, and sequence indexes that are
unique and below the corpus size.
"""

from __future__ import annotations

import numpy as np

# fp16 rounding of a log-probability or NLL that is exactly 0 can land just past it
_SLACK = 1e-2
_INTS = ("seq_index", "tok_ptr", "pred_ptr", "input_ids", "offsets", "topk_ids")
_FLOATS = ("topk_logp", "token_nll", "seq_ce")


class SummaryContentError(ValueError):
    """A summary shard whose content cannot be what `unode summarize` wrote."""


class SummaryMismatchError(SummaryContentError):
    """Summaries that pass the content checks but differ from a recomputation (summary_verify)."""


def _fail(problem: str) -> None:
    raise SummaryContentError(problem)


def _check_kinds(a: dict[str, np.ndarray]) -> None:
    for name in (*_INTS, *_FLOATS):
        if name not in a:
            _fail(f"array {name!r} missing")
    for name in _INTS:
        if a[name].dtype.kind not in "iu":
            _fail(f"{name} is {a[name].dtype}, not an integer type")
    for name in _FLOATS:
        if a[name].dtype.kind != "f":
            _fail(f"{name} is {a[name].dtype}, not a float type")
    ndims = {"offsets": 2, "topk_ids": 2, "topk_logp": 2}
    for name in (*_INTS, *_FLOATS):
        if a[name].ndim != ndims.get(name, 1):
            _fail(f"{name} has {a[name].ndim} dimensions")
    if a["offsets"].shape[1] != 2 or a["topk_ids"].shape != a["topk_logp"].shape:
        _fail("offsets is not (N, 2) or topk_ids and topk_logp differ in shape")


def _check_pointers(a: dict[str, np.ndarray]) -> None:
    n = len(a["seq_index"])
    tok, pred = a["tok_ptr"].astype(np.int64), a["pred_ptr"].astype(np.int64)
    if len(tok) != n + 1 or len(pred) != n + 1 or len(a["seq_ce"]) != n:
        _fail("row pointers or seq_ce do not match the number of sequences")
    if tok[0] != 0 or pred[0] != 0 or (np.diff(tok) < 0).any() or (np.diff(pred) < 0).any():
        _fail("row pointers do not start at 0 or decrease")
    if tok[-1] != len(a["input_ids"]) or tok[-1] != len(a["offsets"]):
        _fail("tok_ptr does not end at the number of tokens")
    if pred[-1] != len(a["topk_ids"]) or pred[-1] != len(a["token_nll"]):
        _fail("pred_ptr does not end at the number of predictions")
    if (np.diff(pred) != np.maximum(np.diff(tok) - 1, 0)).any():
        _fail("a sequence does not have one prediction per token after the first")


def check_shard(a: dict[str, np.ndarray], vocab_size: int, n_seqs: int) -> None:
    """Raise SummaryContentError naming the first problem found in shard arrays `a`."""
    _check_kinds(a)
    _check_pointers(a)
    if a["input_ids"].size and int(a["input_ids"].max()) >= vocab_size:
        _fail(f"a token id is >= the vocabulary size {vocab_size}")
    if a["topk_ids"].size and int(a["topk_ids"].max()) >= vocab_size:
        _fail(f"a top-k id is >= the vocabulary size {vocab_size}")
    logp = a["topk_logp"].astype(np.float32)
    if not np.isfinite(logp).all() or (logp > _SLACK).any():
        _fail("a top-k log-probability is not finite or is above 0")
    nll = a["token_nll"].astype(np.float32)
    if not np.isfinite(nll).all() or (nll < -_SLACK).any():
        _fail("a token NLL is not finite or is negative")
    if not np.isfinite(a["seq_ce"]).all():
        _fail("a sequence cross-entropy is not finite")
    spans = a["offsets"].astype(np.int64)
    if (spans[:, 0] > spans[:, 1]).any():
        _fail("a character span ends before it starts")
    seqs = a["seq_index"].astype(np.int64)
    if len(np.unique(seqs)) != len(seqs) or (seqs < 0).any() or (seqs >= n_seqs).any():
        _fail(f"sequence indexes are repeated or outside 0..{n_seqs - 1}")
