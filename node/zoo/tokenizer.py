"""The zoo's tokenizers, trained offline on a mix of the domain corpora.

The shared (homogeneous) tokenizer is a byte-level BPE whose pre-tokenizer isolates every digit
and lets one space attach to the END of a piece: arithmetic sees one token per digit, and a
prompt ending in a space (`metrics.exact_match` gives `prompt + " "`) tokenizes as a prefix of
the training text (GPT-2's leading-space pieces would not).
"""

from __future__ import annotations

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
    from transformers import PreTrainedTokenizerFast

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
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
        )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
