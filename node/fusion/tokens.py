"""Tokenizer facts fusion needs: a stable tokenizer hash, text encoding with character spans,
and each vocabulary entry's canonical text (word-boundary markers and byte-level symbols undone).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np

Scheme = Literal["bytelevel", "metaspace", "bytechars", "plain"]
BOS_TEXT, EOS_TEXT = "\x00<bos>", "\x00<eos>"  # canonical text of special tokens (never in a vocab)


@dataclass(frozen=True)
class Encoded:
    """One text in one tokenizer: ids (n,) int64 and character spans (n, 2) int64.

    BOS (when the tokenizer has one) is token 0 with span (0, 0); EOS, when the text was not
    truncated, is the last token with span (L, L). Row i of a summary predicts token i + 1.
    A tokenizer without offsets (a slow one) gives all-zero spans and `has_offsets` False.
    """

    ids: np.ndarray
    spans: np.ndarray
    has_offsets: bool = True


def tokenizer_sha256(tokenizer: Any) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id])
    return hashlib.sha256((blob + specials).encode()).hexdigest()


def encode(tokenizer: Any, text: str, max_len: int) -> Encoded:
    """Tokenize `text` without the tokenizer's own specials, then add BOS/EOS with explicit spans."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # some Python tokenizers refuse offsets
        enc = tokenizer(text, add_special_tokens=False)
    ids = list(enc["input_ids"])
    has_offsets = "offset_mapping" in enc  # others silently return none
    spans = [tuple(o) for o in enc["offset_mapping"]] if has_offsets else [(0, 0)] * len(ids)
    if tokenizer.bos_token_id is not None:
        ids, spans = [tokenizer.bos_token_id, *ids], [(0, 0), *spans]
    if tokenizer.eos_token_id is not None:
        ids, spans = [*ids, tokenizer.eos_token_id], [*spans, (len(text), len(text))]
    ids, spans = ids[:max_len], spans[:max_len]
    return Encoded(
        np.asarray(ids, dtype=np.int64),
        np.asarray(spans, dtype=np.int64).reshape(-1, 2) * has_offsets,
        has_offsets,
    )


def scheme_of(tokenizer: Any) -> Scheme:
    """Which word-boundary convention the vocabulary strings use."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        special = set(getattr(tokenizer, "all_special_tokens", []))
        plain = [t for t in tokenizer.get_vocab() if t not in special and not t.startswith("<")]
        if plain and all(len(t) == 1 and ord(t) < 256 for t in plain):
            return "bytechars"  # one token per byte, spelled chr(byte) (ByT5)
        return "metaspace" if "▁" in "".join(plain[:2000]) else "plain"
    spec = json.loads(backend.to_str())
    # ensure_ascii=False: "▁" must stay itself to be found (Gemma-3 spells its metaspace as a
    # Replace normalizer/decoder, which only shows up as the literal character)
    blob = json.dumps(
        [spec.get("normalizer"), spec.get("decoder"), spec.get("pre_tokenizer")],
        ensure_ascii=False,
    )
    if "ByteLevel" in blob:
        return "bytelevel"
    if "Metaspace" in blob or "▁" in blob:
        return "metaspace"
    return "plain"


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    codes = list(keep)
    for b in range(256):
        if b not in keep:
            chars.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(chars, codes, strict=True)}


def canonical_text(token: str, scheme: Scheme) -> str:
    """The bytes a vocabulary entry stands for, as a latin-1 string (so equal text ⇔ equal string)."""
    if scheme == "bytelevel":
        table = _unicode_to_byte()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token).decode("latin-1")
        return token.encode("utf-8").decode("latin-1")
    if scheme == "bytechars" and len(token) == 1 and ord(token) < 256:
        return token
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)]).decode("latin-1")  # SentencePiece byte fallback
    if scheme == "metaspace":
        token = token.replace("▁", " ")
    return token.encode("utf-8").decode("latin-1")


def vocab_texts(tokenizer: Any) -> list[str]:
    """Canonical text of every id (specials: a marker by role, or their literal name)."""
    scheme = scheme_of(tokenizer)
    vocab = tokenizer.get_vocab()
    out = [""] * max(len(tokenizer), max(vocab.values()) + 1)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for tok, idx in vocab.items():
        out[idx] = f"\x00{tok}" if tok in special else canonical_text(tok, scheme)
    if tokenizer.bos_token_id is not None:
        out[tokenizer.bos_token_id] = BOS_TEXT
    if tokenizer.eos_token_id is not None:
        out[tokenizer.eos_token_id] = EOS_TEXT
    return out
