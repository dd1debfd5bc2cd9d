"""Aligning a source tokenization onto the target tokenization of the same text.

Convention: target row i predicts target token i + 1 from the text before that token starts.
A source row j can stand in for it only when the source's predicted token j + 1 covers exactly
the same characters (then the contexts are equal and the tokens are the same text):
ONE_TO_ONE. Where the tokens do not correspond one to one (a target token split into several
source tokens or the reverse, or a span shared by several byte pieces) the row falls back to a
one-hot on the *next* target token (the label): ONE_HOT. FuseLLM's fallback put the one-hot on
the current token, which teaches the model to repeat its input. Target tokens beyond the text
the source saw (truncation) are UNCOVERED and also get the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

ONE_TO_ONE, ONE_HOT, UNCOVERED = 0, 1, 2


@dataclass(frozen=True)
class Alignment:
    """Per target row: the source row predicting the same token (-1 if none) and the kind."""

    src_row: np.ndarray  # (n_t - 1,) int64
    kind: np.ndarray  # (n_t - 1,) int8

    def counts(self) -> dict[str, int]:
        return {
            "one_to_one": int((self.kind == ONE_TO_ONE).sum()),
            "one_hot": int((self.kind == ONE_HOT).sum()),
            "uncovered": int((self.kind == UNCOVERED).sum()),
        }


def _unique_lookup(keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query: the position in `keys` where it occurs once, and whether it does."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    left = np.searchsorted(sorted_keys, queries, side="left")
    right = np.searchsorted(sorted_keys, queries, side="right")
    unique = (right - left) == 1
    pos = order[np.minimum(left, max(len(keys) - 1, 0))] if len(keys) else np.zeros_like(left)
    return pos, unique


def align_spans(src_spans: np.ndarray, tgt_spans: np.ndarray) -> Alignment:
    """Exact alignment from character spans: O((n + m) log m), vectorised.

    Both arrays are (n, 2) spans of *all* tokens (BOS (0, 0) first, EOS (L, L) last if present).
    """
    tgt_pred, src_pred = tgt_spans[1:], src_spans[1:]  # the tokens rows predict
    n = len(tgt_pred)
    if n == 0:
        return Alignment(np.zeros(0, np.int64), np.zeros(0, np.int8))
    width = int(max(tgt_spans.max(initial=0), src_spans.max(initial=0))) + 1
    tkeys = tgt_pred[:, 0] * width + tgt_pred[:, 1]
    skeys = src_pred[:, 0] * width + src_pred[:, 1]
    pos, src_unique = _unique_lookup(skeys, tkeys)
    _, tgt_unique = _unique_lookup(tkeys, tkeys)
    found = src_unique & tgt_unique
    if len(skeys):
        found &= skeys[pos] == tkeys
    covered_to = int(src_spans[:, 1].max(initial=0)) if len(src_spans) else 0
    kind = np.where(found, ONE_TO_ONE, ONE_HOT).astype(np.int8)
    kind[(tgt_pred[:, 1] > covered_to) & ~found] = UNCOVERED
    src_row = np.where(found, pos, -1).astype(np.int64)
    return Alignment(src_row, kind)


def dtw_cost(src_texts: list[str], tgt_texts: list[str]) -> np.ndarray:
    """FuseLLM's cost: edit distance between token texts with word-boundary spaces removed."""
    a = [t.replace(" ", "") for t in src_texts]
    b = [t.replace(" ", "") for t in tgt_texts]
    return process.cdist(a, b, scorer=Levenshtein.distance, dtype=np.int32, workers=1)


def dtw_matrix(cost: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost D[i, j] = c[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1]).

    Each row is one vectorised scan: the left-neighbour chain unrolls to
    D[i, j] = C[j] + cummin_k(m[k] - C[k-1]), with C the row's cumulative cost and
    m[k] = min(D[i-1, k], D[i-1, k-1]).
    """
    n, m = cost.shape
    acc = np.empty((n, m), dtype=np.float64)
    csum = np.cumsum(cost, axis=1, dtype=np.float64)  # (n, m) C[i, j]
    shifted = np.zeros((n, m))
    shifted[:, 1:] = csum[:, :-1]  # C[i, k-1]
    prev = np.full(m + 1, np.inf)
    prev[0] = 0.0  # the virtual D[-1, -1]
    scratch = np.empty(m)
    for i in range(n):
        np.minimum(prev[1:], prev[:-1], out=scratch)  # min(D[i-1, j], D[i-1, j-1])
        scratch -= shifted[i]
        np.minimum.accumulate(scratch, out=scratch)
        np.add(scratch, csum[i], out=acc[i])
        prev[1:] = acc[i]
        prev[0] = np.inf
    return acc


def dtw_path(acc: np.ndarray) -> list[tuple[int, int]]:
    """Backtrack from the end, preferring diagonal, then up, then left on ties (as FuseLLM)."""
    i, j = acc.shape[0] - 1, acc.shape[1] - 1
    at = acc.item  # scalar reads without building a Python copy of the matrix
    inf = float("inf")
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = at(i - 1, j - 1) if i > 0 and j > 0 else inf
        up = at(i - 1, j) if i > 0 else inf
        left = at(i, j - 1) if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    return path


def covered_tokens(src_texts: list[str], tgt_texts: list[str]) -> int:
    """How many leading target tokens lie within the text the source tokens spell (canonical
    texts are one character per byte; specials, marked by a leading NUL, count zero)."""

    def size(t: str) -> int:
        return 0 if t.startswith("\x00") else len(t)

    src_len = sum(size(t) for t in src_texts)
    ends = np.cumsum([size(t) for t in tgt_texts])
    return int(np.searchsorted(ends, src_len, side="right"))


def align_dp(src_texts: list[str], tgt_texts: list[str]) -> Alignment:
    """Fallback when a tokenizer gives no offsets: FuseLLM's DTW over token texts.

    Target tokens beyond the source's text (a source cut at max_len) are UNCOVERED and left out
    of the DP, so they cannot pile onto the source's last token.

    A target token is ONE_TO_ONE when the path pairs it with exactly one source token and both
    are the same text (FuseLLM's rule), each source token serving one target token at most.
    """
    n = len(tgt_texts) - 1
    if n <= 0 or not src_texts:
        return Alignment(np.full(max(n, 0), -1, np.int64), np.full(max(n, 0), ONE_HOT, np.int8))
    cut = max(covered_tokens(src_texts, tgt_texts), 1)
    if src_texts[-1].startswith("\x00<eos>") or cut >= len(tgt_texts):
        cut = len(tgt_texts)  # the source saw the whole text
    path = dtw_path(dtw_matrix(dtw_cost(src_texts, tgt_texts[:cut])))
    tgt_count = np.bincount([p[1] for p in path], minlength=len(tgt_texts))
    src_row = np.full(n, -1, np.int64)
    kind = np.full(n, ONE_HOT, np.int8)
    kind[max(cut - 1, 0) :] = UNCOVERED
    used: set[int] = set()
    for s, t in path:
        single = t >= 1 and s >= 1 and tgt_count[t] == 1 and s not in used
        if single and src_texts[s] == tgt_texts[t]:
            src_row[t - 1], kind[t - 1] = s - 1, ONE_TO_ONE
            used.add(s)
    return Alignment(src_row, kind)
