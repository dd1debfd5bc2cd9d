"""The fusion training set: the corpus in the target's tokenization, each source's summary
aligned onto it (checked against the corpus hash), and padded batches of sparse candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from node.errors import UserError
from node.fusion.align import ONE_TO_ONE, Alignment
from node.fusion.corpus import Example, corpus_sha256, load_corpus
from node.fusion.summaries import check_coverage
from node.fusion.summary_store import SummaryReader
from node.fusion.targets import Candidate, Diagnostics, align, build_candidate
from node.fusion.tokens import Encoded, encode, tokenizer_sha256, vocab_texts
from node.fusion.vocab import VocabMap, build_vocab_map, start_pairs, stats_vocab_map


@dataclass
class FusionExample:
    """One target sequence: ids (n,), loss mask over its n - 1 rows, one candidate per source."""

    ids: np.ndarray
    mask: np.ndarray
    cands: list[Candidate]


@dataclass
class SourceReport:
    path: str
    model_sha256: str
    tokenizer_sha256: str
    manifest_sha256: str
    vocab_exact_share: float
    diagnostics: dict[str, float]


def open_summaries(paths: list[Path], corpus: Path, n_seqs: int) -> list[SummaryReader]:
    digest = corpus_sha256(corpus)
    readers = []
    for p in paths:
        r = SummaryReader(p)
        if r.manifest["corpus_sha256"] != digest or r.n_seqs != n_seqs:
            raise UserError(
                "--summaries",
                str(p),
                f"summarise {corpus} with `unode summarize` and pass those summaries",
                problem="summaries of another corpus (corpus hash differs)",
            )
        readers.append(r)
    return readers


def _vocab_map(
    reader: SummaryReader, tgt_tok: Any, encs: list[Encoded], method: str, cache: Path | None
) -> VocabMap:
    src_tok = reader.tokenizer()
    n_src = int(reader.manifest["vocab_size"])
    if reader.manifest["tokenizer_sha256"] == tokenizer_sha256(tgt_tok):
        ident = np.arange(n_src, dtype=np.int64)
        return VocabMap(np.where(ident < len(tgt_tok), ident, -1), ident < len(tgt_tok))
    base = build_vocab_map(src_tok, tgt_tok, "exact" if method == "exact" else "mined", cache)
    base = _widen(base, n_src)
    if method != "stats":
        return base
    if not (reader.has_offsets and all(e.has_offsets for e in encs)):
        raise UserError("--vocab-map", "stats", "use mined: stats needs tokenizers with offsets")
    pairs = [
        start_pairs(s.ids, s.spans, e.ids, e.spans)
        for s, e in ((reader.sequence(i), encs[i]) for i in range(len(encs)))
    ]
    return stats_vocab_map(base, np.concatenate(pairs), n_tgt=len(tgt_tok))


def _widen(vmap: VocabMap, n_src: int) -> VocabMap:
    """Model vocabularies can be larger than the tokenizer's (padding rows): map those to -1."""
    extra = n_src - len(vmap.target_id)
    if extra <= 0:
        return vmap
    return VocabMap(
        np.r_[vmap.target_id, np.full(extra, -1, np.int64)],
        np.r_[vmap.exact, np.zeros(extra, bool)],
        vmap.from_cache,
    )


def _identity_alignment(n_rows: int) -> Alignment:
    return Alignment(np.arange(n_rows, dtype=np.int64), np.full(n_rows, ONE_TO_ONE, np.int8))


def response_mask(tok: Any, enc: Encoded, ex: Example, response_only: bool) -> np.ndarray:
    """(n - 1,) bool: rows whose predicted token belongs to the response (all rows if not
    `response_only`). Without offsets the prompt's length is counted by tokenizing it alone."""
    if not response_only:
        return np.ones(len(enc.ids) - 1, bool)
    if enc.has_offsets:
        return np.asarray(enc.spans[1:, 0] >= ex.response_start)
    n_prompt = len(encode(tok, ex.text[: ex.response_start], len(enc.ids)).ids) - 1  # minus EOS
    return np.arange(1, len(enc.ids)) >= n_prompt


def build_dataset(
    tgt_tok: Any,
    corpus: Path,
    summaries: list[Path],
    max_len: int,
    response_only: bool = False,
    vocab_method: str = "mined",
    cache_dir: Path | None = None,
    progress: bool = True,
    alignment: str = "auto",
) -> tuple[list[FusionExample], list[SourceReport]]:
    """Everything the training loop needs, aligned once up front.

    `alignment`: "auto" aligns by character offsets where both tokenizers give them and by
    FuseLLM's DP otherwise; "dp" forces the DP.
    """
    examples = load_corpus(corpus)
    encs = [encode(tgt_tok, ex.text, max_len) for ex in examples]
    check_coverage(tgt_tok, encs, corpus)
    readers = open_summaries(summaries, corpus, len(examples))
    data = [
        FusionExample(e.ids, response_mask(tgt_tok, e, ex, response_only), [])
        for e, ex in zip(encs, examples, strict=True)
    ]
    reports = [
        _add_source(r, tgt_tok, encs, data, vocab_method, cache_dir, progress, alignment)
        for r in readers
    ]
    return data, reports


def _add_source(
    reader: SummaryReader,
    tgt_tok: Any,
    encs: list[Encoded],
    data: list[FusionExample],
    vocab_method: str,
    cache_dir: Path | None,
    progress: bool,
    alignment: str,
) -> SourceReport:
    """Align one source's summary onto every target sequence; append its candidates."""
    vmap = _vocab_map(reader, tgt_tok, encs, vocab_method, cache_dir)
    tgt_texts = vocab_texts(tgt_tok)
    same_tok = reader.manifest["tokenizer_sha256"] == tokenizer_sha256(tgt_tok)
    src_texts = tgt_texts if same_tok else vocab_texts(reader.tokenizer())
    use_spans = alignment != "dp" and reader.has_offsets and all(e.has_offsets for e in encs)
    diag = Diagnostics()
    for i in tqdm(range(len(encs)), desc=f"align {reader.path.name}", disable=not progress):
        src = reader.sequence(i)
        if same_tok and np.array_equal(src.ids, encs[i].ids):
            rows = _identity_alignment(len(encs[i].ids) - 1)
        else:
            rows = align(src, encs[i], src_texts, tgt_texts, use_spans)
        cand, d = build_candidate(src, encs[i], vmap, rows)
        data[i].cands.append(cand)
        diag.add(d)
    return _report(reader, vmap, diag)


def _report(reader: SummaryReader, vmap: VocabMap, diag: Diagnostics) -> SourceReport:
    import hashlib

    return SourceReport(
        path=str(reader.path),
        model_sha256=reader.manifest["model_sha256"],
        tokenizer_sha256=reader.manifest["tokenizer_sha256"],
        manifest_sha256=hashlib.sha256((reader.path / "manifest.json").read_bytes()).hexdigest(),
        vocab_exact_share=float(vmap.exact.mean()),
        diagnostics=diag.summary(),
    )


def collate(batch: list[FusionExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; candidate tensors are (C, B, T-1, k_max)."""
    width = max(len(ex.ids) for ex in batch)
    n_c = len(batch[0].cands)
    k = max((c.ids.shape[1] for ex in batch for c in ex.cands), default=1)
    b = len(batch)
    out = {
        "input_ids": torch.full((b, width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, width), dtype=torch.long),
        "mask": torch.zeros((b, width - 1), dtype=torch.bool),
        "ids": torch.full((n_c, b, width - 1, k), -1, dtype=torch.long),
        "probs": torch.zeros((n_c, b, width - 1, k)),
        "seq_ce": torch.zeros((n_c, b)),
        "tok_ce": torch.zeros((n_c, b, width - 1)),
    }
    for j, ex in enumerate(batch):
        n = len(ex.ids)
        out["input_ids"][j, :n] = torch.from_numpy(ex.ids)
        out["attention_mask"][j, :n] = 1
        out["mask"][j, : n - 1] = torch.from_numpy(ex.mask)
        for c, cand in enumerate(ex.cands):
            kk = cand.ids.shape[1]
            out["ids"][c, j, : n - 1, :kk] = torch.from_numpy(cand.ids)
            out["probs"][c, j, : n - 1, :kk] = torch.from_numpy(cand.probs)
            out["seq_ce"][c, j] = cand.ce
            out["tok_ce"][c, j, : n - 1] = torch.from_numpy(cand.tok_ce)
    out["labels"] = out["input_ids"][:, 1:].clone()
    return out
