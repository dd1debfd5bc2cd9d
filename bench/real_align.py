"""Alignment and vocabulary mapping on real tokenizers: GPT-2 BPE, Mistral SentencePiece 32k,
SmolLM2 byte-level BPE 49k and Gemma-3 SentencePiece 262k, every ordered pair, on held-out
code + prose. Prints, per pair: one-to-one share of target rows (exact spans), exact vocab-map
agreement on those rows, corpus-weighted mass kept by the exact map, the source vocabulary's
exact share, and timings (alignment per 1k target tokens, exact map, MinED per unmatched token,
measured side by side in this one process; machine under load from other jobs).

    .venv/bin/python bench/real_align.py [--texts 24] [--mined-queries 200]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from node.eval import corpora
from node.fusion.align import align_spans
from node.fusion.tokens import vocab_texts
from node.fusion.vocab import _compute
from node.importer import real_tokenizers as rt
from node.importer.packaged import packaged_gguf
from node.importer.tokenizer_pairs import encode_all, pair_figures


def load_all() -> dict[str, Any]:
    out, t = {}, {}
    for name, fn in (
        ("gpt2", rt.gpt2_tokenizer),
        ("mistral", rt.mistral_tokenizer),
        ("smollm2", lambda: rt.gguf_tokenizer(packaged_gguf("smollm2"))),
        ("gemma3", lambda: rt.gguf_tokenizer(packaged_gguf("gemma3-270m"))),
    ):
        t0 = time.perf_counter()
        out[name] = fn()
        t[name] = time.perf_counter() - t0
    print("load seconds:", json.dumps({k: round(v, 1) for k, v in t.items()}))
    return out


def mined_ms(src: Any, tgt: Any, n: int) -> tuple[float, int]:
    """MinED (rapidfuzz extractOne) per unmatched source token, and how many there are."""
    s_tab, t_tab = vocab_texts(src), vocab_texts(tgt)
    tset = set(t_tab)
    misses = [t for t in s_tab if t not in tset and not t.startswith("\x00")]
    choices = [t for t in t_tab if not t.startswith("\x00")]
    rng = np.random.default_rng(0)
    sample = [misses[i] for i in rng.choice(len(misses), min(n, len(misses)), replace=False)]
    t0 = time.perf_counter()
    for q in sample:
        process.extractOne(q, choices, scorer=Levenshtein.distance)
    return (time.perf_counter() - t0) / max(len(sample), 1) * 1e3, len(misses)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=24, help="held-out texts per domain")
    ap.add_argument("--mined-queries", type=int, default=200)
    args = ap.parse_args()
    texts = [e.text for d in ("python", "prose") for e in corpora.load(d, args.texts, "heldout")]
    toks = load_all()
    encs = {k: encode_all(t, texts) for k, t in toks.items()}
    chars = sum(len(t) for t in texts)
    print(f"{len(texts)} texts, {chars} characters; tokens per 1k characters: "
          + ", ".join(f"{k} {sum(len(e.ids) for e in v) / chars * 1e3:.0f}" for k, v in encs.items()))  # fmt: skip
    head = f"{'source -> target':<20} {'1-to-1':>7} {'map ok':>7} {'mass kept':>9} {'vocab exact':>11} {'align ms/1k':>11} {'exact map s':>11} {'MinED ms/tok':>12} {'unmatched':>9}"
    print(head)
    results = {}
    for src in toks:
        for tgt in toks:
            if src == tgt:
                continue
            t0 = time.perf_counter()
            vmap = _compute(toks[src], toks[tgt], "exact")
            t_map = time.perf_counter() - t0
            fig = pair_figures(encs[src], encs[tgt], vmap)
            t0 = time.perf_counter()
            for _ in range(5):
                for s, t in zip(encs[src], encs[tgt], strict=True):
                    align_spans(s.spans, t.spans)
            t_align = (time.perf_counter() - t0) / 5 / max(fig.rows, 1) * 1e6
            ms, n_miss = mined_ms(toks[src], toks[tgt], args.mined_queries)
            row = dict(one_to_one=fig.share_one_to_one, map_ok=fig.map_agreement,
                       mass_kept=fig.mass_kept, vocab_exact=float(vmap.exact.mean()),
                       align_ms_per_1k=t_align, exact_map_s=t_map, mined_ms=ms, unmatched=n_miss)  # fmt: skip
            results[f"{src}->{tgt}"] = row
            print(f"{src + ' -> ' + tgt:<20} {row['one_to_one']:>7.1%} {row['map_ok']:>7.1%} "
                  f"{row['mass_kept']:>9.1%} {row['vocab_exact']:>11.1%} {t_align:>11.2f} "
                  f"{t_map:>11.1f} {ms:>12.2f} {n_miss:>9}", flush=True)  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
