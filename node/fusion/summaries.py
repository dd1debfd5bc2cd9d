"""Distribution summaries: a source model's per-token top-k log-probabilities over a corpus.

Layout (one safetensors file per shard, no padding, no pickle): `seq_index` (S,) int64,
`tok_ptr`/`pred_ptr` (S+1,) int64 row pointers, `input_ids` (N,) and `topk_ids` (P, k) in the
smallest unsigned type that fits the vocabulary, `offsets` (N, 2) character spans, `topk_logp`
(P, k) float16 = log_softmax(logits / T) over the full vocabulary, `token_nll` (P,) float16 and
`seq_ce` (S,) float32 = mean next-token cross-entropy at T = 1. Row i predicts token i + 1.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm import tqdm

from node.errors import UserError
from node.fusion.corpus import corpus_sha256, load_corpus
from node.fusion.summary_store import (
    FORMAT,
    ShardBuilder,
    file_sha256,
    model_sha256,
    write_json_atomic,
)
from node.fusion.tokens import Encoded, encode, tokenizer_sha256

MAX_UNK_SHARE = 0.01


@dataclass(frozen=True)
class SummarySettings:
    """What a summary depends on besides model and corpus; a rerun must use the same values."""

    top_k: int = 10  # FuseLLM's default
    temperature: float = 1.0
    max_len: int = 2048
    shard_size: int = 256  # sequences per shard: the unit of resume and of transfer
    batch_size: int = 8

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_size")  # batching does not change the values stored
        return d


def _check_settings(s: SummarySettings) -> None:
    if s.top_k < 1:
        raise UserError("--top-k", s.top_k, "use a value of at least 1")
    if not s.temperature > 0:
        raise UserError("--temperature", s.temperature, "use a value above 0")
    if s.max_len < 2:
        raise UserError("--max-len", s.max_len, "use a value of at least 2")
    if s.batch_size < 1 or s.shard_size < 1:
        raise UserError("--batch-size", s.batch_size, "use values of at least 1")


def check_coverage(tokenizer: Any, encs: list[Encoded], corpus: Path) -> None:
    """Refuse a corpus whose characters the tokenizer mostly cannot represent (<unk>)."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    total = sum(len(e.ids) for e in encs)
    n_unk = sum(int((e.ids == unk).sum()) for e in encs)
    if n_unk > MAX_UNK_SHARE * total:
        raise UserError(
            "--corpus",
            str(corpus),
            "use a tokenizer that covers the corpus characters, or clean the corpus",
            problem=f"{n_unk}/{total} tokens are unknown to the model's tokenizer",
        )


def _encode_corpus(tokenizer: Any, corpus: Path, max_len: int) -> list[Encoded]:
    encs = [encode(tokenizer, ex.text, max_len) for ex in load_corpus(corpus)]
    check_coverage(tokenizer, encs, corpus)
    return encs


@torch.inference_mode()
def _forward_batch(
    model: Any, encs: list[Encoded], s: SummarySettings, pad_id: int
) -> list[dict[str, np.ndarray]]:
    lengths = [len(e.ids) for e in encs]
    width = max(lengths)
    ids = torch.full((len(encs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), width), dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, : len(e.ids)] = torch.from_numpy(e.ids)
        mask[b, : len(e.ids)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits / s.temperature, dim=-1)
    top_logp, top_ids = logp.topk(min(s.top_k, logits.shape[-1]), dim=-1)  # (B, T, k)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )  # (B, T-1), temperature 1
    out = []
    for b, n in enumerate(lengths):
        p = max(n - 1, 0)
        out.append(
            {
                "topk_ids": top_ids[b, :p].numpy(),
                "topk_logp": top_logp[b, :p].numpy(),
                "token_nll": nll[b, :p].numpy(),
            }
        )
    return out


def _max_positions(model_dir: Path) -> int:
    """The longest input the model takes (sequences are cut to it)."""
    config = json.loads((model_dir / "config.json").read_text())
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(name), int):
            return int(config[name])
    return 1 << 30


def _shard_settings(model_dir: Path, corpus: Path, tok: Any, s: SummarySettings) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "corpus_sha256": corpus_sha256(corpus),
        "model_sha256": model_sha256(model_dir),
        "tokenizer_sha256": tokenizer_sha256(tok),
        "settings": s.key(),
    }


def _load_progress(out_dir: Path, head: dict[str, Any]) -> dict[str, str]:
    """Shards already written by an earlier run with the same inputs, verified by hash."""
    path = out_dir / "progress.json"
    if not path.exists():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise UserError("--out", str(out_dir), "give an empty or new directory", "not empty")
        return {}
    progress = json.loads(path.read_text())
    if progress["head"] != head:
        raise UserError(
            "--out",
            str(out_dir),
            "give a new directory (it holds summaries of another model, corpus or settings)",
            problem="inputs differ from the run that started it",
        )
    done = {}
    for name, digest in progress["shards"].items():
        f = out_dir / name
        if f.exists() and file_sha256(f) == digest:
            done[name] = digest
    return done


def summarize(
    model_dir: Path,
    corpus: Path,
    out_dir: Path,
    settings: SummarySettings | None = None,
    progress: bool = True,
) -> Path:
    """Summarise `model_dir` over `corpus` into `out_dir`; returns the manifest path.

    Resumable: a rerun with the same inputs skips every shard whose hash checks out.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = settings or SummarySettings()
    _check_settings(s)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").exists():
        raise UserError("--model", str(model_dir), "give a model directory with config.json")
    s = replace(s, max_len=min(s.max_len, _max_positions(model_dir)))
    tok = AutoTokenizer.from_pretrained(model_dir)
    encs = _encode_corpus(tok, corpus, s.max_len)
    head = _shard_settings(model_dir, corpus, tok, s)
    done = _load_progress(out_dir, head)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    vocab = int(model.config.vocab_size)
    shards: dict[str, str] = dict(done)
    bar = tqdm(total=len(encs), desc="summarize", unit="seq", disable=not progress)
    for k, batches in enumerate(shard_batches(len(encs), s)):
        name = f"shard-{k:05d}.safetensors"
        if name not in done:
            builder = ShardBuilder(vocab)
            for ix in batches:
                batch = [encs[i] for i in ix]
                for i, e, r in zip(ix, batch, _forward_batch(model, batch, s, pad_id), strict=True):
                    builder.add(i, e, r)
                bar.update(len(ix))
            shards[name] = _write_shard(out_dir, name, builder)
            write_json_atomic(out_dir / "progress.json", {"head": head, "shards": shards})
        else:
            bar.update(sum(map(len, batches)))
    bar.close()
    has_offsets = all(e.has_offsets for e in encs)
    return _finish(out_dir, model_dir, tok, head, shards, len(encs), vocab, has_offsets)


def shard_batches(n_seqs: int, s: SummarySettings) -> list[list[range]]:
    """Per shard, the sequence batches `summarize` runs one forward pass on, in order."""
    shards = [range(a, min(a + s.shard_size, n_seqs)) for a in range(0, n_seqs, s.shard_size)]
    return [
        [range(b, min(b + s.batch_size, sh.stop)) for b in sh[:: s.batch_size]] for sh in shards
    ]


def batches_of(n_seqs: int, s: SummarySettings) -> list[range]:
    """Every batch of `shard_batches`, in order (a verifier picks one to recompute)."""
    return [b for batches in shard_batches(n_seqs, s) for b in batches]


def summarize_batch(
    model_dir: Path, corpus: Path, batch: range, settings: SummarySettings, extra: int = 0
) -> dict[int, tuple[Encoded, dict[str, np.ndarray]]]:
    """Recompute one batch of `batches_of` as `summarize` does (same encoding, same padded
    forward pass: bit-identical on one machine), keeping `top_k + extra` candidates per row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = replace(settings, max_len=min(settings.max_len, _max_positions(Path(model_dir))))
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = load_corpus(corpus)
    chosen = [encode(tok, texts[i].text, s.max_len) for i in batch]  # the batch's texts only
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = _forward_batch(model, chosen, replace(s, top_k=s.top_k + extra), pad_id)
    return {i: (e, r) for i, e, r in zip(batch, chosen, rows, strict=True)}


def _write_shard(out_dir: Path, name: str, builder: ShardBuilder) -> str:
    """Write under a temporary name, rename, return the file's SHA-256."""
    tmp = out_dir / (name + ".tmp")
    save_file(builder.arrays(), str(tmp), metadata={"format": FORMAT})
    tmp.replace(out_dir / name)
    return file_sha256(out_dir / name)


def _finish(
    out_dir: Path,
    model_dir: Path,
    tok: Any,
    head: dict[str, Any],
    shards: dict[str, str],
    n_seqs: int,
    vocab: int,
    has_offsets: bool,
) -> Path:
    tok_dir = out_dir / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok.save_pretrained(tok_dir)
    manifest = {
        **head,
        "model": model_dir.name,
        "vocab_size": vocab,
        "n_seqs": n_seqs,
        "values": "log_softmax(logits / temperature), full-vocabulary normalisation",
        "has_offsets": has_offsets,
        "shards": [{"file": k, "sha256": v} for k, v in sorted(shards.items())],
    }
    path = out_dir / "manifest.json"
    write_json_atomic(path, manifest)
    return path
