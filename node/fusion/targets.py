"""Turning a source summary of one text into a sparse distribution over the target's vocabulary,
row by target row, with the diagnostics that say how much of the source survived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from node.fusion.align import ONE_TO_ONE, UNCOVERED, Alignment, align_dp, align_spans
from node.fusion.summary_store import SeqSummary
from node.fusion.tokens import Encoded
from node.fusion.vocab import VocabMap


@dataclass
class Candidate:
    """One source's aligned distributions over one target sequence (rows predict token i + 1)."""

    ids: np.ndarray  # (n_t - 1, k) int64 target ids, -1 = empty slot
    probs: np.ndarray  # (n_t - 1, k) float32, each row sums to 1
    tok_ce: np.ndarray  # (n_t - 1,) float32 source NLL of the aligned token (seq CE on fallback)
    ce: float  # the source's sequence-level cross-entropy


@dataclass
class Diagnostics:
    """Counts over target rows; `mass_kept` sums, over one-to-one rows, the share of the
    source's top-k probability that mapped to a target token."""

    rows: int = 0
    one_to_one: int = 0
    one_hot: int = 0
    uncovered: int = 0
    empty_after_mapping: int = 0
    mass_kept: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: Diagnostics) -> None:
        for name in ("rows", "one_to_one", "one_hot", "uncovered", "empty_after_mapping"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.mass_kept += other.mass_kept

    def summary(self) -> dict[str, float]:
        rows = max(self.rows, 1)
        return {
            "rows": self.rows,
            "share_one_to_one": self.one_to_one / rows,
            "share_one_hot": (self.one_hot + self.empty_after_mapping) / rows,
            "share_uncovered": self.uncovered / rows,
            "mass_kept": self.mass_kept / max(self.one_to_one, 1),
        }


def align(
    src: SeqSummary, tgt: Encoded, src_texts: list[str], tgt_texts: list[str], use_spans: bool
) -> Alignment:
    """Span alignment when both sides have spans; FuseLLM's DP over token texts otherwise."""
    if use_spans:
        return align_spans(src.spans, tgt.spans)
    return align_dp([src_texts[i] for i in src.ids], [tgt_texts[i] for i in tgt.ids])


def one_hot_rows(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(labels), k), -1, dtype=np.int64)
    probs = np.zeros((len(labels), k), dtype=np.float32)
    ids[:, 0], probs[:, 0] = labels, 1.0
    return ids, probs


def build_candidate(
    src: SeqSummary, tgt: Encoded, vmap: VocabMap, alignment: Alignment
) -> tuple[Candidate, Diagnostics]:
    """Map the source rows that align one to one; every other row is a one-hot on the label."""
    k = src.topk_ids.shape[1] if src.topk_ids.ndim == 2 else 1
    labels = tgt.ids[1:]
    ids, probs = one_hot_rows(labels, k)
    tok_ce = np.full(len(labels), src.ce, dtype=np.float32)
    rows = np.nonzero(alignment.kind == ONE_TO_ONE)[0]
    src_rows = alignment.src_row[rows]
    valid = src_rows < len(src.topk_ids)
    rows, src_rows = rows[valid], src_rows[valid]
    mapped = vmap.target_id[src.topk_ids[src_rows]]  # (r, k)
    p = np.exp(src.topk_logp[src_rows]) * (mapped >= 0)  # (r, k)
    total = np.exp(src.topk_logp[src_rows]).sum(axis=1)
    kept = p.sum(axis=1)
    ok = kept > 0
    ids[rows[ok]] = mapped[ok]
    probs[rows[ok]] = p[ok] / kept[ok, None]
    tok_ce[rows[ok]] = src.token_nll[src_rows[ok]]
    diag = Diagnostics(
        rows=len(labels),
        one_to_one=int(ok.sum()),
        one_hot=int((alignment.kind != ONE_TO_ONE).sum() - (alignment.kind == UNCOVERED).sum()),
        uncovered=int((alignment.kind == UNCOVERED).sum()),
        empty_after_mapping=int((~ok).sum()) + int((~valid).sum()),
        mass_kept=float((kept[ok] / total[ok]).sum()),
    )
    return Candidate(ids, probs, tok_ce, src.ce), diag
