"""The zoo's tokenizers, trained offline on a mix of the domain corpora.

The shared (homogeneous) tokenizer is a byte-level BPE whose pre-tokenizer isolates every digit
and lets one space attach to the END of a piece: arithmetic sees one token per digit, and a
prompt ending in a space (`metrics.exact_match` gives `prompt + " "`) tokenizes as a prefix of
the training text (GPT-2's leading-space pieces would not).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

from node.eval import corpora

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
# a word | one digit | a run of other symbols, each with at most one trailing space | whitespace
PIECES = r"[A-Za-z_]+ ?|\d ?|[^\sA-Za-z_\d]+ ?|\s+"


def tokenizer_corpus(per_domain: int = 600) -> list[str]:
    """Training texts for the tokenizers: the train split of every domain, in a fixed order."""
    texts: list[str] = []
    for domain in (*corpora.DOMAINS, *corpora.TWO_SKILL_DOMAINS):
        texts.extend(e.text for e in corpora.load(domain, per_domain, "train"))
    return texts


def train_zoo_tokenizer(
    texts: list[str], vocab_size: int, kind: Literal["bpe", "unigram"] = "bpe"
) -> Any:
    """A `PreTrainedTokenizerFast` with `<s>` BOS, `</s>` EOS, `<unk>`, `<pad>` (ids 1, 2, 0, 3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PIECES), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer: Any = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:  # SentencePiece-style unigram: a different segmentation for fusion's alignment
        tok = Tokenizer(deterministic_unigram(texts, vocab_size))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.add_special_tokens(SPECIALS)
        return _wrap(tok)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def _wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def deterministic_unigram(texts: list[str], vocab_size: int) -> Any:
    """A unigram (Viterbi) model whose pieces come from a BPE trained on Metaspace pieces and
    whose scores are the pieces' log frequencies in that segmentation.

    `tokenizers`' UnigramTrainer returns a different vocabulary on every run (measured: 4 runs,
    4 vocabularies); the BPE trainer and these counts are reproducible.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.NFKC()
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    counts = Counter(t for enc in bpe.encode_batch(texts) for t in enc.tokens)
    ranked = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [p for p, _ in ranked if p not in SPECIALS]
    total = sum(counts[p] + 1 for p in pieces)
    vocab = [(s, 0.0) for s in SPECIALS] + [(p, math.log((counts[p] + 1) / total)) for p in pieces]
    return models.Unigram(vocab, unk_id=0, byte_fallback=False)
