"""Alignment of two tokenizations of one text, and vocabulary mapping between tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from node.fusion.align import (
    ONE_HOT,
    ONE_TO_ONE,
    UNCOVERED,
    align_dp,
    align_spans,
    dtw_matrix,
)
from node.fusion.tokens import canonical_text, encode, scheme_of, vocab_texts
from node.fusion.vocab import build_vocab_map, start_pairs, stats_vocab_map

TEXT = "Hello world, 12+34=46.\n\n  The cafe and the naive end"


def spans(*pairs: tuple[int, int]) -> np.ndarray:
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def test_one_to_one_everywhere_when_tokenizations_agree() -> None:
    s = spans((0, 0), (0, 5), (5, 11), (11, 11))
    a = align_spans(s, s)
    assert a.kind.tolist() == [ONE_TO_ONE] * 3
    assert a.src_row.tolist() == [0, 1, 2]


def test_many_source_tokens_to_one_target_token() -> None:
    # "hello world": target "hello"|" world", source "hel"|"lo"|" world"
    tgt = spans((0, 0), (0, 5), (5, 11), (11, 11))
    src = spans((0, 0), (0, 3), (3, 5), (5, 11), (11, 11))
    a = align_spans(src, tgt)
    # row 0 predicts "hello": the source predicts "hel" there -> one-hot on the label
    assert a.kind.tolist() == [ONE_HOT, ONE_TO_ONE, ONE_TO_ONE]
    # row 1 predicts " world": source row 2 predicts source token 3 = " world" (next token)
    assert a.src_row.tolist() == [-1, 2, 3]


def test_one_source_token_to_many_target_tokens() -> None:
    tgt = spans((0, 0), (0, 3), (3, 5), (5, 11), (11, 11))
    src = spans((0, 0), (0, 5), (5, 11), (11, 11))
    a = align_spans(src, tgt)
    # "hel" (row 0) starts where "hello" does but is a different token; "lo" (row 1) starts
    # inside a source token: both one-hot; " world" and EOS align
    assert a.kind.tolist() == [ONE_HOT, ONE_HOT, ONE_TO_ONE, ONE_TO_ONE]
    assert a.src_row.tolist() == [-1, -1, 1, 2]


def test_shared_spans_of_byte_pieces_are_never_one_to_one() -> None:
    # "é" as two byte pieces with the same span on the target side, one token on the source
    tgt = spans((0, 0), (0, 1), (0, 1), (1, 2), (2, 2))
    src = spans((0, 0), (0, 1), (1, 2), (2, 2))
    a = align_spans(src, tgt)
    assert a.kind.tolist() == [ONE_HOT, ONE_HOT, ONE_TO_ONE, ONE_TO_ONE]


def test_truncated_source_leaves_the_rest_uncovered() -> None:
    tgt = spans((0, 0), (0, 5), (5, 11), (11, 11))
    src = spans((0, 0), (0, 5))  # cut after "hello", no EOS
    a = align_spans(src, tgt)
    assert a.kind.tolist() == [ONE_TO_ONE, UNCOVERED, UNCOVERED]


def test_empty_text_aligns_its_eos() -> None:
    a = align_spans(spans((0, 0), (0, 0)), spans((0, 0), (0, 0)))
    assert a.kind.tolist() == [ONE_TO_ONE] and a.src_row.tolist() == [0]
    assert len(align_spans(spans((0, 0)), spans((0, 0))).kind) == 0


def test_dp_alignment_on_the_hand_made_cases() -> None:
    tgt = ["<b>", "hello", " world", "<e>"]
    assert align_dp(["<b>", "hel", "lo", " world", "<e>"], tgt).src_row.tolist() == [-1, 2, 3]
    a = align_dp(["<b>", "hello", " world", "<e>"], ["<b>", "hel", "lo", " world", "<e>"])
    assert a.kind.tolist() == [ONE_HOT, ONE_HOT, ONE_TO_ONE, ONE_TO_ONE]
    assert a.src_row.tolist() == [-1, -1, 1, 2]


def test_dp_leaves_text_beyond_a_cut_source_uncovered() -> None:
    a = align_dp(["\x00<bos>", "hel", "lo"], ["\x00<bos>", "hello", " world", "\x00<eos>"])
    assert a.kind.tolist() == [ONE_HOT, UNCOVERED, UNCOVERED]
    full = align_dp(
        ["\x00<bos>", "hello", " world", "\x00<eos>"], ["\x00<bos>", "hello", " world", "\x00<eos>"]
    )
    assert full.kind.tolist() == [ONE_TO_ONE] * 3


def test_dtw_matrix_equals_the_plain_recurrence() -> None:
    cost = np.random.default_rng(0).integers(0, 6, size=(23, 31))
    n, m = cost.shape
    ref = np.full((n + 1, m + 1), np.inf)
    ref[0, 0] = 0
    for i in range(n):
        for j in range(m):
            ref[i + 1, j + 1] = cost[i, j] + min(ref[i, j + 1], ref[i + 1, j], ref[i, j])
    assert np.array_equal(dtw_matrix(cost), ref[1:, 1:])


def _texts(tok: Any, ids: np.ndarray) -> list[str]:
    table = vocab_texts(tok)
    return [table[i] for i in ids]


def test_offset_alignment_matches_tokens_and_agrees_with_dp(
    bpe_tokenizer: Any, unigram_tokenizer: Any
) -> None:
    from node.toymodels import shipped_text

    text = shipped_text()[5000:7000]
    src, tgt = encode(unigram_tokenizer, text, 4096), encode(bpe_tokenizer, text, 4096)
    a = align_spans(src.spans, tgt.spans)
    rows = np.nonzero(a.kind == ONE_TO_ONE)[0]
    assert 0.3 < len(rows) / len(a.kind) < 1.0
    # next-token convention: the source row's *next* token is the target row's next token
    assert np.array_equal(src.spans[a.src_row[rows] + 1], tgt.spans[rows + 1])
    s_txt, t_txt = _texts(unigram_tokenizer, src.ids), _texts(bpe_tokenizer, tgt.ids)
    assert all(s_txt[a.src_row[r] + 1] == t_txt[r + 1] for r in rows)
    dp = align_dp(s_txt, t_txt)
    both = (dp.kind == ONE_TO_ONE) & (a.kind == ONE_TO_ONE)
    assert both.sum() >= 0.9 * len(rows)  # the DP misses a few; where both pair, they agree
    assert np.array_equal(dp.src_row[both], a.src_row[both])


def test_canonical_text_undoes_markers_and_bytes() -> None:
    assert canonical_text("Ġhello", "bytelevel") == " hello"
    assert canonical_text("Ċ", "bytelevel") == "\n"
    assert canonical_text("Ã©", "bytelevel").encode("latin-1").decode() == "é"
    assert canonical_text("▁hello", "metaspace") == " hello"
    assert canonical_text("<0x41>", "metaspace") == "A"


def test_scheme_detection(bpe_tokenizer: Any, unigram_tokenizer: Any) -> None:
    assert scheme_of(bpe_tokenizer) == "bytelevel"
    assert scheme_of(unigram_tokenizer) == "metaspace"


def test_vocab_map_exact_then_mined(
    tmp_path: Path, bpe_tokenizer: Any, unigram_tokenizer: Any
) -> None:
    vmap = build_vocab_map(unigram_tokenizer, bpe_tokenizer, "mined", cache_dir=tmp_path)
    src, tgt = vocab_texts(unigram_tokenizer), vocab_texts(bpe_tokenizer)
    exact = np.nonzero(vmap.exact)[0]
    assert 0.1 < len(exact) / len(src) < 1.0
    assert all(src[i] == tgt[vmap.target_id[i]] for i in exact)
    assert vmap.target_id[unigram_tokenizer.eos_token_id] == bpe_tokenizer.eos_token_id
    assert vmap.target_id[unigram_tokenizer.bos_token_id] == bpe_tokenizer.bos_token_id
    plain = [t for t in tgt if not t.startswith("\x00")]
    for i in np.nonzero(~vmap.exact)[0][:25]:
        best = min(Levenshtein.distance(src[i], t) for t in plain)
        assert Levenshtein.distance(src[i], tgt[vmap.target_id[i]]) == best > 0
    only_exact = build_vocab_map(unigram_tokenizer, bpe_tokenizer, "exact", cache_dir=tmp_path)
    assert (only_exact.target_id[~only_exact.exact] == -1).all()


def test_vocab_map_cache_hit(tmp_path: Path, bpe_tokenizer: Any, unigram_tokenizer: Any) -> None:
    first = build_vocab_map(bpe_tokenizer, unigram_tokenizer, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    second = build_vocab_map(bpe_tokenizer, unigram_tokenizer, cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache and len(files) == 1
    assert np.array_equal(first.target_id, second.target_id)
    reverse = build_vocab_map(unigram_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    assert not reverse.from_cache and len(list(tmp_path.iterdir())) == 2


def test_stats_mapping_takes_the_most_frequent_partner(
    tmp_path: Path, bpe_tokenizer: Any, unigram_tokenizer: Any
) -> None:
    base = build_vocab_map(unigram_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    inexact = int(np.nonzero(~base.exact)[0][0])
    exact = int(np.nonzero(base.exact)[0][5])
    pairs = np.array([[inexact, 7], [inexact, 7], [inexact, 9], [exact, 11], [exact, 11]])
    refined = stats_vocab_map(base, pairs, n_tgt=len(bpe_tokenizer))
    assert refined.target_id[inexact] == 7
    assert refined.target_id[exact] == base.target_id[exact]  # exact matches are kept
    once = stats_vocab_map(base, pairs[2:3], n_tgt=len(bpe_tokenizer))  # below min_count
    assert once.target_id[inexact] == base.target_id[inexact]


def test_start_pairs_pair_tokens_starting_together(
    bpe_tokenizer: Any, unigram_tokenizer: Any
) -> None:
    src, tgt = encode(unigram_tokenizer, TEXT, 512), encode(bpe_tokenizer, TEXT, 512)
    pairs = start_pairs(src.ids, src.spans, tgt.ids, tgt.spans)
    s_start = {int(i): int(s) for i, s in zip(src.ids[1:], src.spans[1:, 0], strict=True)}
    t_start = {int(i): int(s) for i, s in zip(tgt.ids[1:], tgt.spans[1:, 0], strict=True)}
    assert len(pairs) > 10
    # every pair's two tokens occur at a common start (checked through one witness each)
    assert all(a in s_start and b in t_start for a, b in pairs.tolist())


@pytest.mark.parametrize("text", ["", "x", "naïve café 日本"])
def test_real_tokenizers_on_edge_texts(text: str, bpe_tokenizer: Any) -> None:
    enc = encode(bpe_tokenizer, text, 64)
    a = align_spans(enc.spans, enc.spans)
    shared = np.r_[False, (enc.spans[2:] == enc.spans[1:-1]).all(1)]  # byte pieces
    assert (a.kind[~shared] == ONE_TO_ONE).all() or len(text) > 3
    assert len(a.kind) == len(enc.ids) - 1
