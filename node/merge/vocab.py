"""The output tokenizer (`tokenizer_source: base | union | MODEL`) and token-row remapping of
embeddings and output heads, with mergekit's rules for tokens some models lack.

Only this step loads tokenizers (through transformers); the rest of a merge never imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.errors import UserError
from node.merge.architecture import VOCAB_SIZE_KEYS, config_value
from node.merge.recipe import TokenizerSpec

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass
class VocabRemap:
    """perm[model][new_id] = that model's row for the token, or -1 when it lacks it."""

    perm: dict[str, torch.Tensor]
    n_tokens: int
    rows: int  # n_tokens padded up to `pad_to_multiple_of`
    tokenizer: Any  # the output tokenizer (saved with the model)

    def remap(self, tensors: dict[str, torch.Tensor], base: str | None) -> dict[str, torch.Tensor]:
        """Rows in output-vocabulary order. A token missing from some models gets, in every
        model, the row of the only model that has it, else the base's, else their mean."""
        keys = list(tensors)
        present = {k: self.perm[k] >= 0 for k in keys}  # (V,)
        rows = {k: tensors[k][self.perm[k].clamp(min=0)] for k in keys}  # (V, H)
        count = torch.stack([present[k] for k in keys]).sum(0)
        acc = torch.zeros_like(rows[keys[0]])
        for k in keys:
            acc += rows[k] * present[k].unsqueeze(1)
        default = acc / count.clamp(min=1).unsqueeze(1).to(acc.dtype)
        if base in keys:
            default = torch.where(present[base].unsqueeze(1), rows[base], default)
        out = {}
        for k in keys:
            new = torch.where(present[k].unsqueeze(1), rows[k], default)
            if self.rows > self.n_tokens:
                pad = new.mean(0, keepdim=True).expand(self.rows - self.n_tokens, -1)
                new = torch.cat([new, pad])
            out[k] = new.contiguous()
        return out


def tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    """A model's token -> id map read from tokenizer.json with the `tokenizers` library."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return dict(Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True))


def check_same_vocab(dirs: dict[str, Path]) -> None:
    """Without a tokenizer setting every model must share one vocabulary."""
    files = {
        (d / "tokenizer.json").read_bytes()
        for d in dirs.values()
        if (d / "tokenizer.json").is_file()
    }
    if len(files) < 2:  # identical files (the usual case for fine-tunes): nothing to parse
        return
    vocabs = {k: v for k, d in dirs.items() if (v := tokenizer_vocab(d)) is not None}
    if len(vocabs) < 2:
        return
    first_key, first = next(iter(vocabs.items()))
    for key, vocab in vocabs.items():
        if vocab != first:
            raise UserError(
                "tokenizer_source", None,
                "the models have different vocabularies: add `tokenizer_source: base` (or union, or a model path)",
                problem=f"tokenizers of {first_key} and {key} differ",
            )  # fmt: skip


def _load(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise UserError(
            "tokenizer_source", str(model_dir), "give every model its tokenizer files",
            problem=f"cannot load tokenizer ({str(err).splitlines()[0][:80]})",
        ) from None  # fmt: skip


def _union(base: Any, others: list[Any]) -> Any:
    """The base tokenizer plus every other model's tokens it lacks, in model then id order."""
    import copy

    out = copy.deepcopy(base)
    have = set(out.get_vocab())
    for tok in others:
        specials = {t.content for t in tok.added_tokens_decoder.values()}
        new = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t not in have]
        plain = [t for t in new if t not in specials]
        if plain:
            out.add_tokens(plain)
        added = [
            info
            for _i, info in sorted(tok.added_tokens_decoder.items())
            if info.content not in have
        ]
        if added:
            out.add_tokens(added)
        have = set(out.get_vocab())
    return out


def build_remap(
    spec: TokenizerSpec, base: str, dirs: dict[str, Path], configs: dict[str, dict[str, Any]]
) -> VocabRemap:
    """Build the output tokenizer and every model's row permutation into it."""
    toks = {k: _load(d) for k, d in dirs.items()}
    if spec.source == "base":
        out = toks[base]
    elif spec.source == "union":
        out = _union(toks[base], [t for k, t in toks.items() if k != base])
    else:
        src = Path(spec.source)
        out = toks[spec.source] if spec.source in toks else _load(src)
    vocab = out.get_vocab()
    n = len(vocab)
    rows = (
        n
        if not spec.pad_to_multiple_of
        else -(-n // spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    )
    perm = {}
    for key, tok in toks.items():
        limit = config_value(configs[key], VOCAB_SIZE_KEYS) or len(tok.get_vocab())
        own = tok.get_vocab()
        p = torch.full((n,), -1, dtype=torch.long)
        for t, new_id in vocab.items():
            old = own.get(t)
            if old is not None and old < limit:
                p[new_id] = old
        perm[key] = p
    return VocabRemap(perm, n, rows, out)


def save_tokenizer(remap: VocabRemap, out_dir: Path) -> None:
    remap.tokenizer.save_pretrained(str(out_dir))


def copy_tokenizer(model_dir: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.is_file():
            (out_dir / name).write_bytes(src.read_bytes())


def read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))
