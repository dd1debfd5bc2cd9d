"""Per-domain evaluation: bits per byte (comparable across tokenizers) and exact-match accuracy.

BOS is given exactly as in training (prepended when the tokenizer has one): a mismatch
between training and evaluation costs tiny models most of their measured skill.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from node.eval import corpora


@dataclass(frozen=True)
class DomainScore:
    domain: str
    bits_per_byte: float
    exact_match: float | None
    n: int


def encode(tokenizer: Any, text: str, max_len: int = 256) -> list[int]:
    """Token ids of `text` with BOS prepended when the tokenizer defines one."""
    return encode_scored(tokenizer, text, max_len)[0]


def encode_scored(tokenizer: Any, text: str, max_len: int = 256) -> tuple[list[int], int]:
    """`encode`'s ids and the UTF-8 bytes of the part of `text` they cover: all of it, or up
    to the end of the last kept token when the text is cut at `max_len` (a tokenizer that packs
    fewer bytes per token is cut earlier, so counting the whole text would flatter it)."""
    keep = max_len - 1
    ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if len(ids) <= keep:
        return bos + ids, len(text.encode("utf-8"))
    try:  # a cut text: where its last kept token ends
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        covered = text[: max(stop for _, stop in offsets["offset_mapping"][:keep])]
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets: decode what is kept
        covered = tokenizer.decode(ids[:keep])
    return bos + ids[:keep], len(covered.encode("utf-8"))


LOGITS_BUDGET = 1 << 29  # bytes of fp32 logits one forward pass may hold (large vocabularies)


@torch.no_grad()
def nll_and_bytes(
    model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Per text, the summed next-token NLL (nats) and the UTF-8 bytes it covers
    (`encode_scored`). A batch whose logits would pass LOGITS_BUDGET (a 262k vocabulary: 268 MB
    a row at 256 tokens) is run a few rows at a time; small vocabularies keep the batch whole."""
    nll: list[float] = []
    n_bytes: list[int] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = int(model.get_output_embeddings().weight.shape[0])
    for i in range(0, len(texts), batch_size):
        encoded = [encode_scored(tokenizer, t) for t in texts[i : i + batch_size]]
        batch = [ids for ids, _ in encoded]
        n_bytes += [n for _, n in encoded]
        width = max(len(b) for b in batch)
        rows = max(1, min(len(batch), LOGITS_BUDGET // (width * vocab * 4)))
        for j in range(0, len(batch), rows):
            nll += _batch_nll(model, batch[j : j + rows], pad)
    return nll, n_bytes


def bits_per_byte(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> float:
    """Total negative log-likelihood in bits over the UTF-8 bytes it covers (a text longer than
    the 256-token window counts up to its last scored token: `encode_scored`)."""
    nll, n_bytes = nll_and_bytes(model, tokenizer, texts, batch_size)
    return sum(nll) / math.log(2) / max(sum(n_bytes), 1)


def _batch_nll(model: Any, batch: list[list[int]], pad: int) -> list[float]:
    """Summed next-token NLL (nats) of each right-padded sequence."""
    width = max(len(b) for b in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        ids[row, : len(b)] = torch.tensor(b)
        mask[row, : len(b)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    token_nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return [float(x) for x in (token_nll * mask[:, 1:]).sum(-1)]


@torch.no_grad()
def greedy_hits(
    model: Any, tokenizer: Any, examples: list[corpora.Example], batch_size: int = 32
) -> list[bool]:
    """Per example, whether its greedy continuation starts with the expected answer.

    Prompts of the same token length are generated together (up to `batch_size` at a time),
    so no row is padded and each continuation is the one a prompt alone would get; the batch
    generates as many tokens as its longest answer needs (greedy text only grows, so a shorter
    answer is judged on the same first tokens)."""
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    rows = [encode(tokenizer, ex.prompt + " ") for ex in examples]
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r), []).append(i)
    hits, step = [False] * len(examples), max(1, batch_size)
    for idx in by_len.values():
        for k in range(0, len(idx), step):
            chunk = idx[k : k + step]
            ids = torch.tensor([rows[i] for i in chunk])  # (B, T), no padding
            n_new = max(
                len(tokenizer(examples[i].answer, add_special_tokens=False)["input_ids"])
                for i in chunk
            )
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new + 2,
                do_sample=False,
                pad_token_id=pad,
            )
            for row, i in enumerate(chunk):
                text = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True)
                hits[i] = text.strip().startswith(examples[i].answer)
    return hits


def exact_match(
    model: Any, tokenizer: Any, examples: list[corpora.Example], batch_size: int = 32
) -> float:
    """Share of prompts whose greedy continuation starts with the expected answer."""
    hits = greedy_hits(model, tokenizer, examples, batch_size)
    return sum(hits) / max(len(examples), 1)


def evaluate(
    model_dir: Path, domains: list[str] | None = None, n: int = 64, n_generate: int = 32
) -> list[DomainScore]:
    """Score a model directory on the held-out split of each domain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    scores = []
    for domain in domains or list(corpora.DOMAINS):
        examples = corpora.load(domain, n, "heldout")
        bpb = bits_per_byte(model, tokenizer, [e.text for e in examples])
        tasks = [e for e in examples if e.answer][:n_generate]
        em = exact_match(model, tokenizer, tasks) if tasks else None
        scores.append(DomainScore(domain, bpb, em, len(examples)))
    return scores


def as_json(scores: list[DomainScore]) -> list[dict[str, Any]]:
    return [asdict(s) for s in scores]
