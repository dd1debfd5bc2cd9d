"""Steady skill scores for the zoo: teacher-forced answer accuracy (per answer token, e.g. per
digit), exact match of greedy answers, and bits per byte, on a held-out split cut in two
halves (`search` for choosing merge coefficients, `test` for reporting them).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from node.eval import corpora, metrics

Half = Literal["search", "test", "all", "search:a", "search:b"]
TASKS = ("arithmetic", "logic", "arithlogic")
TEXTS = ("python", "prose")


@dataclass(frozen=True)
class Score:
    domain: str
    bits_per_byte: float
    answer_accuracy: float | None  # share of answer tokens the model ranks first (teacher-forced)
    exact_match: float | None
    parts: tuple[float, float, float] | None = None  # arithlogic: arith / logic / both right

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def heldout(domain: str, n: int, half: Half) -> list[corpora.Example]:
    """`n` held-out examples of one half; halves are cut by a hash of the text, so a text
    repeated by a generator never sits in both. `search:a` / `search:b` cut the search half in
    two folds the same way (a search on one, a check on the other).
    """
    if half == "all":
        return corpora.load(domain, n, "heldout")
    side, _, fold = half.partition(":")
    pool = corpora.load(domain, (6 if fold else 3) * n, "heldout")
    want = 0 if side == "search" else 1

    def keep(e: corpora.Example) -> bool:
        digest = hashlib.sha256(e.text.encode()).digest()
        return digest[0] % 2 == want and (not fold or digest[1] % 2 == "ab".index(fold))

    return [e for e in pool if keep(e)][:n]


@torch.no_grad()
def answer_start(tokenizer: Any, ex: corpora.Example, full: list[int] | None = None) -> int:
    """Index of the first answer token in the example's tokens. Where the prompt's tokens are a
    prefix of the text's (the zoo's tokenizer), that is the prompt's length; byte-level BPEs
    (GPT-2, SmolLM2) and SentencePiece fold the space into the answer's first token (`" T"`), so
    the answer starts where the two encodings part."""
    full = full if full is not None else metrics.encode(tokenizer, ex.text.rstrip("\n"))
    prompt = metrics.encode(tokenizer, ex.prompt + " ")
    same = next(
        (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt)
    )
    return max(1, min(len(prompt), same, len(full) - 1))


def answer_hits(model: Any, tokenizer: Any, examples: list[corpora.Example]) -> list[list[bool]]:
    """Per example, whether each answer token is predicted exactly (argmax) given the true
    prefix (teacher-forced).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for ex in examples:
        full = metrics.encode(tokenizer, ex.text.rstrip("\n"))
        rows.append((full, answer_start(tokenizer, ex, full)))
    out: list[list[bool]] = []
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        width = max(len(f) for f, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for r, (f, _) in enumerate(chunk):
            ids[r, : len(f)], mask[r, : len(f)] = torch.tensor(f), 1
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (B, T)
        for r, (f, start) in enumerate(chunk):
            out.append((pred[r, start - 1 : len(f) - 1] == torch.tensor(f[start:])).tolist())
    return out


def answer_accuracy(model: Any, tokenizer: Any, examples: list[corpora.Example]) -> float:
    """Share of answer tokens predicted exactly given the true prefix: a per-digit accuracy
    for arithmetic, steadier than exact match on small models.
    """
    hits = answer_hits(model, tokenizer, examples)
    return sum(map(sum, hits)) / max(sum(map(len, hits)), 1)


def two_skill_parts(
    tokenizer: Any, examples: list[corpora.Example], hits: list[list[bool]]
) -> tuple[float, float, float]:
    """Shares of `arithlogic` examples whose arithmetic half, logic half, and both halves are
    right (teacher-forced; `both` equals greedy exact match up to tokenization).
    """
    arith = logic = both = 0
    for ex, ok in zip(examples, hits, strict=True):
        _, truth = corpora.two_skill_parts(ex.answer)
        start = answer_start(tokenizer, ex)
        n_truth = len(metrics.encode(tokenizer, f"{ex.prompt} {truth}")) - start
        n_head = len(metrics.encode(tokenizer, f"{ex.prompt} {truth} ; ")) - start
        a, lg = all(ok[n_head:]), all(ok[:n_truth])
        arith, logic, both = arith + a, logic + lg, both + (a and lg)
    n = max(len(examples), 1)
    return arith / n, logic / n, both / n


def score_model(
    model: Any, tokenizer: Any, domains: tuple[str, ...], n: int, half: Half, em: bool = True
) -> dict[str, Score]:
    """Per-domain scores of a loaded model on one half of the held-out split."""
    out = {}
    for domain in domains:
        n_dom = n if domain in TASKS else max(n // 4, 16)  # texts are ~20x longer than tasks
        examples = heldout(domain, n_dom, half)
        bpb = metrics.bits_per_byte(model, tokenizer, [e.text for e in examples], batch_size=32)
        acc = exact = parts = None
        if domain in TASKS:
            hits = answer_hits(model, tokenizer, examples)
            acc = sum(map(sum, hits)) / max(sum(map(len, hits)), 1)
            exact = metrics.exact_match(model, tokenizer, examples) if em else None
            if domain == "arithlogic":
                parts = two_skill_parts(tokenizer, examples, hits)
        out[domain] = Score(domain, bpb, acc, exact, parts)
    return out


def score_dir(
    model_dir: Path, domains: tuple[str, ...], n: int = 200, half: Half = "test", em: bool = True
) -> dict[str, Score]:
    model, tok = load(model_dir)
    return score_model(model, tok, domains, n, half, em)


def load(model_dir: Path) -> tuple[Any, Any]:
    """A model directory's model (float32, eval mode) and tokenizer, for scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    return model, AutoTokenizer.from_pretrained(model_dir)


def head(text: str, width: int) -> str:
    """The start of `text`, at most `width` characters, cut at its last space (a hard cut where
    there is none)."""
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] or text[:width]


def pieces(text: str, width: int) -> list[str]:
    """`text` cut into consecutive `head`s (a piece under a quarter of `width` is dropped, as
    `corpora` drops short chunks)."""
    out, rest = [], text.lstrip()
    while rest:
        piece = head(rest, width)
        if len(piece.strip()) >= width // 4:
            out.append(piece)
        rest = rest[len(piece) :].lstrip()
    return out


def two_skill_documents(n: int, half: Half = "test", width: int = 200) -> list[str]:
    """Documents that need both text skills: a piece of a held-out prose text and the start of
    a held-out python text of `half` in one document, joined by a blank line, in both orders
    (prose first, then python first). The pieces are every `width`-character piece of the
    first `n` prose texts (`pieces`), each with its own python text's `head`, so both fit
    together in the 256-token window."""
    prose = [p for e in heldout("prose", n, half) for p in pieces(e.text, width)]
    code = [head(e.text, width) for e in heldout("python", len(prose), half)]
    pairs = list(zip(prose, code, strict=False))  # a half may hold fewer python texts
    return [f"{p}\n\n{c}" for p, c in pairs] + [f"{c}\n\n{p}" for p, c in pairs]
