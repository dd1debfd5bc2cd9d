"""Vocabulary mapping from a source tokenizer to a target tokenizer, cached per pair on disk.

`exact`: same canonical text (markers Ġ/▁ and byte-level symbols undone, byte-fallback pieces
decoded); `mined`: exact, else the target token at minimum edit distance (FuseLLM's MinED);
`stats`: FuseChat-2-style statistics — each source token goes to the target token that most often
starts at the same character in the corpus (the token the target would predict in the same
context), falling back to MinED for tokens seen fewer than `min_count` times.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from safetensors.numpy import load_file, save_file

from node.fusion.tokens import tokenizer_sha256, vocab_texts

Method = Literal["exact", "mined", "stats"]
MAP_VERSION = 2


@dataclass(frozen=True)
class VocabMap:
    """target_id[src_id] (-1: no target token) and whether that match is exact."""

    target_id: np.ndarray  # (V_src,) int64
    exact: np.ndarray  # (V_src,) bool
    from_cache: bool = False


def default_cache_dir() -> Path:
    root = os.environ.get("UNODE_CACHE") or Path.home() / ".cache" / "unode"
    return Path(root) / "vocab_maps"


def _special_roles(src: Any, tgt: Any) -> dict[int, int]:
    roles = {}
    for role in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        s, t = getattr(src, role, None), getattr(tgt, role, None)
        if s is not None and t is not None:
            roles[int(s)] = int(t)
    return roles


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _text_to_target_id(tgt: Any, tgt_texts: list[str]) -> dict[str, int]:
    """Canonical text -> the target id the tokenizer itself would emit for it.

    With SentencePiece byte fallback, `<0x41>` and `A` both spell "A"; the tokenizer emits the
    ordinary piece, so byte-fallback pieces only fill texts no ordinary piece has.
    """
    pieces = tgt.convert_ids_to_tokens(list(range(len(tgt_texts))))
    lookup: dict[str, int] = {}
    for fallback_pass in (False, True):
        for idx, text in enumerate(tgt_texts):
            is_byte_piece = bool(pieces[idx]) and bool(_BYTE_PIECE.fullmatch(str(pieces[idx])))
            if text and not text.startswith("\x00") and is_byte_piece == fallback_pass:
                lookup.setdefault(text, idx)
    return lookup


def _compute(src: Any, tgt: Any, method: Method) -> VocabMap:
    src_texts, tgt_texts = vocab_texts(src), vocab_texts(tgt)
    lookup = _text_to_target_id(tgt, tgt_texts)
    target = np.full(len(src_texts), -1, dtype=np.int64)
    exact = np.zeros(len(src_texts), dtype=bool)
    choices = list(lookup)
    for idx, text in enumerate(src_texts):
        if text in lookup:
            target[idx], exact[idx] = lookup[text], True
        elif method != "exact" and text and not text.startswith("\x00") and choices:
            best = process.extractOne(text, choices, scorer=Levenshtein.distance)
            target[idx] = lookup[best[0]]
    for s, t in _special_roles(src, tgt).items():
        if s < len(target):
            target[s], exact[s] = t, True
    return VocabMap(target, exact)


def build_vocab_map(
    src: Any, tgt: Any, method: Literal["exact", "mined"] = "mined", cache_dir: Path | None = None
) -> VocabMap:
    """The mapping for a tokenizer pair, from the on-disk cache when it is there."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # MAP_VERSION in the name: a map cached by an older algorithm is never reused
    name = f"{tokenizer_sha256(src)[:20]}-{tokenizer_sha256(tgt)[:20]}-{method}-v{MAP_VERSION}.safetensors"
    path = cache_dir / name
    if path.is_file():
        arrays = load_file(str(path))
        return VocabMap(arrays["target_id"], arrays["exact"].astype(bool), from_cache=True)
    vmap = _compute(src, tgt, method)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file({"target_id": vmap.target_id, "exact": vmap.exact.astype(np.uint8)}, str(tmp))
    tmp.replace(path)
    return vmap


def start_pairs(
    src_ids: np.ndarray, src_spans: np.ndarray, tgt_ids: np.ndarray, tgt_spans: np.ndarray
) -> np.ndarray:
    """(src_id, tgt_id) of tokens starting at the same character, one pair per start: (P, 2)."""
    s_start, t_start = src_spans[1:, 0], tgt_spans[1:, 0]
    # the first token starting at each character (byte pieces share a start)
    s_first = np.r_[True, s_start[1:] != s_start[:-1]]
    t_first = np.r_[True, t_start[1:] != t_start[:-1]]
    s_start, s_id = s_start[s_first], src_ids[1:][s_first]
    t_start, t_id = t_start[t_first], tgt_ids[1:][t_first]
    common, si, ti = np.intersect1d(s_start, t_start, return_indices=True)
    return np.stack([s_id[si], t_id[ti]], axis=1) if len(common) else np.zeros((0, 2), np.int64)


def stats_vocab_map(base: VocabMap, pairs: np.ndarray, n_tgt: int, min_count: int = 2) -> VocabMap:
    """Refine `base` with co-occurrence counts of (src_id, tgt_id) pairs over the corpus."""
    if len(pairs) == 0:
        return base
    keys, counts = np.unique(pairs[:, 0] * n_tgt + pairs[:, 1], return_counts=True)
    src_of, tgt_of = keys // n_tgt, keys % n_tgt
    order = np.lexsort((-counts, src_of))  # per source id, most frequent first
    src_sorted = src_of[order]
    first = np.r_[True, src_sorted[1:] != src_sorted[:-1]]
    best_src, best_tgt = src_sorted[first], tgt_of[order][first]
    best_count = counts[order][first]
    target = base.target_id.copy()
    keep = (
        (best_count >= min_count)
        & (best_src < len(target))
        & ~base.exact[np.minimum(best_src, len(target) - 1)]
    )
    target[best_src[keep]] = best_tgt[keep]
    return VocabMap(target, base.exact, base.from_cache)
