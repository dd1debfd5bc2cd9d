"""Token alignment and vocabulary mapping: unode against a re-implementation of FuseLLM's.

FuseLLM aligns two tokenizations with a pure-Python O(n·m) dynamic-time-warping loop over a
numpy matrix, computing each cell's edit distance inside the loop, and maps vocabularies with a
Python minimum over every target token per unmatched source token. The reference below is
written from that description (not copied); its per-cell distance uses rapidfuzz's Levenshtein
(FuseLLM uses the `editdistance` package, also a C extension). Runs everything side by side in
one process on the same ~2048-token pairs and prints ratios. One core; tokenizers trained here.

    .venv/bin/python bench/align.py [--pairs 2] [--ref-pairs 1] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

from node.fusion.align import ONE_TO_ONE, align_dp, align_spans
from node.fusion.tokens import Encoded, encode, vocab_texts
from node.fusion.vocab import _compute
from node.toymodels import shipped_text, train_tokenizer


def fusellm_dtw(
    series_1: list[str], series_2: list[str], dist: Callable[[str, str], int]
) -> list[list[int]]:
    """FuseLLM's DTW as its source describes it: returns, per series_2 item, its series_1 items."""
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, a in enumerate(series_1):
        for j, b in enumerate(series_2):
            matrix[i + 1, j + 1] = dist(a, b) + min(
                matrix[i, j + 1], matrix[i + 1, j], matrix[i, j]
            )
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    to_1: list[list[int]] = [[] for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        to_1[j].append(i)
        diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf
        left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([diag, up, left])
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    to_1[0].append(0)
    for m in to_1:
        m.reverse()
    return to_1


def fusellm_rows(src_txt: list[str], tgt_txt: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per target token: the source token it aligns to when FuseLLM keeps the distribution
    (one partner, same text; -1 otherwise, where FuseLLM puts a one-hot on the *current* token)."""
    to_src = fusellm_dtw(
        src_txt, tgt_txt, lambda a, b: Levenshtein.distance(a.replace(" ", ""), b.replace(" ", ""))
    )
    partner = np.array(
        [m[0] if len(m) == 1 and src_txt[m[0]] == tgt_txt[t] else -1 for t, m in enumerate(to_src)]
    )
    return partner, np.array([len(m) for m in to_src])


def fusellm_mined(query: str, choices: list[str]) -> str:
    return min([(y, Levenshtein.distance(query, y)) for y in choices], key=lambda d: d[1])[0]


def timed(reps: int, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def pairs_of_texts(
    src_tok: Any, tgt_tok: Any, n_pairs: int, n_tokens: int
) -> list[tuple[Encoded, Encoded]]:
    """Consecutive slices of shipped text whose target tokenization has about n_tokens tokens."""
    text, out, pos = shipped_text(), [], 0
    for _ in range(n_pairs):
        chunk = text[pos : pos + 6 * n_tokens]
        tgt = encode(tgt_tok, chunk, n_tokens)
        cut = int(tgt.spans[-1, 1])
        chunk = chunk[:cut]
        out.append((encode(src_tok, chunk, 10**6), encode(tgt_tok, chunk, 10**6)))
        pos += cut
    return out


def bench_alignment(src_tok: Any, tgt_tok: Any, args: argparse.Namespace) -> None:
    s_tab, t_tab = vocab_texts(src_tok), vocab_texts(tgt_tok)
    rows = []
    for k, (src, tgt) in enumerate(pairs_of_texts(src_tok, tgt_tok, args.pairs, args.tokens)):
        s_txt, t_txt = [s_tab[i] for i in src.ids], [t_tab[i] for i in tgt.ids]
        t_off, off = timed(50, align_spans, src.spans, tgt.spans)
        t_dp, dp = timed(3, align_dp, s_txt, t_txt)
        t_ref, ref = (float("nan"), None)
        if k < args.ref_pairs:
            t_ref, ref = timed(1, fusellm_rows, s_txt, t_txt)
        rows.append((len(src.ids), len(tgt.ids), t_off, t_dp, t_ref, off, dp, ref, tgt))
    print(
        f"{'src':>5} {'tgt':>5} {'offsets ms':>10} {'our DP ms':>9} {'FuseLLM s':>9} {'ref/offsets':>11} {'ref/ourDP':>9}"
    )
    for n_s, n_t, t_off, t_dp, t_ref, *_ in rows:
        print(
            f"{n_s:>5} {n_t:>5} {t_off * 1e3:>10.3f} {t_dp * 1e3:>9.1f} {t_ref:>9.2f} {t_ref / t_off:>11.0f} {t_ref / t_dp:>9.0f}"
        )
    for n_s, n_t, _, _, _, off, dp, ref, tgt in rows:
        o, d = off.kind == ONE_TO_ONE, dp.kind == ONE_TO_ONE
        both = o & d
        print(
            f"pair {n_s}x{n_t}: one-to-one rows: offsets {o.mean():.1%}, our DP {d.mean():.1%}; "
            f"agree where both pair: {np.mean(off.src_row[both] == dp.src_row[both]):.1%} "
            f"(DP finds {both.sum() / max(o.sum(), 1):.1%} of the offset pairs)"
        )
        if ref is not None:
            partner, _ = ref
            r = partner[1:] >= 0  # target rows 0.. predict tokens 1..
            same = (
                np.mean(partner[1:][r & d] - 1 == dp.src_row[r & d])
                if (r & d).any()
                else float("nan")
            )
            wrong = (
                tgt.ids[1:][~r] != tgt.ids[:-1][~r]
            )  # FuseLLM's one-hot (current) vs label (next)
            print(
                f"  FuseLLM DP: one-to-one {r.mean():.1%}; same source rows as our DP where both pair: {same:.1%}; "
                f"its one-hot fallback is on the wrong token at {wrong.mean():.1%} of its fallback rows"
            )


def bench_vocab(src_tok: Any, tgt_tok: Any, n_queries: int) -> None:
    s_tab, t_tab = vocab_texts(src_tok), vocab_texts(tgt_tok)
    tset = set(t_tab)
    misses = [t for t in s_tab if t not in tset and not t.startswith("\x00")][:n_queries]
    choices = [t for t in t_tab if not t.startswith("\x00")]
    from rapidfuzz import process

    t_ref, ref = timed(1, lambda: [fusellm_mined(q, choices) for q in misses])
    t_our, our = timed(
        3, lambda: [process.extractOne(q, choices, scorer=Levenshtein.distance)[0] for q in misses]
    )
    same_dist = np.mean(
        [
            Levenshtein.distance(q, a) == Levenshtein.distance(q, b)
            for q, a, b in zip(misses, ref, our, strict=True)
        ]
    )
    t_full, _ = timed(1, _compute, src_tok, tgt_tok, "mined")
    print(
        f"MinED over {len(choices)} target tokens, {len(misses)} unmatched source tokens: "
        f"FuseLLM-style {t_ref / len(misses) * 1e3:.2f} ms/token, rapidfuzz extractOne "
        f"{t_our / len(misses) * 1e3:.3f} ms/token, ratio {t_ref / t_our:.0f}x; same distance {same_dist:.0%}"
    )
    print(f"whole mapping {len(s_tab)} -> {len(t_tab)} tokens (exact + MinED): {t_full:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument(
        "--ref-pairs", type=int, default=1, help="pairs also run through the slow reference"
    )
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tgt_tok = train_tokenizer(args.vocab, "bpe")
    src_tok = train_tokenizer(args.vocab, "unigram")
    print(
        f"tokenizers: byte-level BPE {len(tgt_tok)} (target), unigram {len(src_tok)} (source), "
        f"trained in {time.perf_counter() - t0:.1f}s"
    )
    bench_alignment(src_tok, tgt_tok, args)
    bench_vocab(src_tok, tgt_tok, args.queries)


if __name__ == "__main__":
    main()
