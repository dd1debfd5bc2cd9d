"""Tiny real models and tokenizers built offline from transformers configs.

Used by the tests, the benchmarks and the built-in default: no download ever happens here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

Arch = Literal["llama", "qwen2", "gpt2"]


def shipped_text() -> str:
    """English prose that ships with every CPython (pydoc's topic help, ~460 KB)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def train_tokenizer(
    vocab_size: int = 512,
    kind: Literal["bpe", "unigram"] = "bpe",
    text: str | None = None,
) -> Any:
    """Train a small tokenizer (byte-level BPE or a SentencePiece-style unigram) on shipped text.

    Returns a `PreTrainedTokenizerFast` with `<s>`, `</s>`, `<unk>`, `<pad>` special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (text or shipped_text()).split("\n\n")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer: Any = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast: Any = PreTrainedTokenizerFast  # transformers' constructor is untyped
    return fast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def tiny_config(arch: Arch, vocab_size: int, hidden: int = 64, layers: int = 4) -> Any:
    """A transformers config for a small causal LM of the given architecture."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(
        hidden_size=hidden,
        intermediate_size=hidden * 2 + hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=3,
        **common,
    )


def build_model(
    out_dir: Path,
    arch: Arch = "llama",
    tokenizer: Any = None,
    vocab_size: int | None = None,
    hidden: int = 64,
    layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "50GB",
) -> Path:
    """Build a randomly initialised causal LM and save it (safetensors, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 512
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, hidden, layers)
    auto: Any = AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def make_variant(
    base_dir: Path, out_dir: Path, seed: int, scale: float = 0.02, rank: int = 4
) -> Path:
    """Copy a model with a fine-tune-like delta: low-rank plus sparse updates to every matrix.

    Real fine-tunes move weights by a small, low-rank-dominated delta with a few larger
    entries; merges behave on such deltas as they do on real ones.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(seed)
    for f in base_dir.iterdir():
        if f.suffix == ".safetensors":
            continue
        if f.is_file():
            (out_dir / f.name).write_bytes(f.read_bytes())
    for f in safetensors_files(base_dir):
        tensors = load_file(f)
        out = {}
        for name, t in tensors.items():
            w = t.float()
            if w.ndim == 2:
                u = torch.randn(w.shape[0], rank, generator=gen)
                v = torch.randn(rank, w.shape[1], generator=gen)
                delta = (u @ v) / rank**0.5
                sparse = torch.randn(w.shape, generator=gen) * (
                    torch.rand(w.shape, generator=gen) < 0.01
                )
                w = w + scale * (delta + 5 * sparse) * w.std()
            else:
                w = w + scale * torch.randn(w.shape, generator=gen) * (w.std() + 1e-3)
            out[name] = w.to(t.dtype).contiguous()
        save_file(out, str(out_dir / f.name), metadata={"format": "pt"})
    return out_dir


def read_config(model_dir: Path) -> dict[str, Any]:
    return dict(json.loads((Path(model_dir) / "config.json").read_text()))
