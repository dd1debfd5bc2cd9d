"""Alignment figures for a pair of real tokenizers on one set of texts: the share of target
rows a source covers one to one (exact character spans), whether the exact vocabulary map agrees
with those alignments, and the corpus-weighted share of source tokens whose text the target has.
Shared by the real-tokenizer tests and `bench/real_align.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.fusion.align import ONE_TO_ONE, align_spans
from node.fusion.tokens import Encoded, encode
from node.fusion.vocab import VocabMap


@dataclass(frozen=True)
class PairFigures:
    """Over all texts: target rows, one-to-one rows, rows whose exact vocab map agrees with the
    aligned target token, and source tokens (without specials) whose text maps exactly."""

    rows: int
    one_to_one: int
    map_agrees: int
    src_tokens: int
    src_tokens_mapped: int

    @property
    def share_one_to_one(self) -> float:
        return self.one_to_one / max(self.rows, 1)

    @property
    def map_agreement(self) -> float:
        return self.map_agrees / max(self.one_to_one, 1)

    @property
    def mass_kept(self) -> float:
        """Corpus-weighted share of source tokens whose exact text is a target token: the mass
        a source keeps when it puts all its probability on the token it would emit."""
        return self.src_tokens_mapped / max(self.src_tokens, 1)


def encode_all(tok: Any, texts: list[str]) -> list[Encoded]:
    return [encode(tok, t, 10**7) for t in texts]


def pair_figures(src: list[Encoded], tgt: list[Encoded], vmap: VocabMap) -> PairFigures:
    """Align every text's source tokenization onto its target tokenization and count."""
    rows = one = agree = n_src = n_mapped = 0
    for s, t in zip(src, tgt, strict=True):
        a = align_spans(s.spans, t.spans)
        hit = a.kind == ONE_TO_ONE
        rows += len(a.kind)
        one += int(hit.sum())
        src_next = s.ids[1:][a.src_row[hit]]  # the source token each one-to-one row predicts
        agree += int((vmap.target_id[src_next] == t.ids[1:][hit]).sum())
        body = s.ids[s.spans[:, 1] > s.spans[:, 0]]  # text tokens (no BOS/EOS)
        n_src += len(body)
        n_mapped += int(vmap.exact[body].sum())
    return PairFigures(rows, one, agree, n_src, n_mapped)
