"""The fusion corpus: instruction–response jsonl (or `{"text": ...}` records), plain text, its hash,
and a toy generator.

Every model that summarises the corpus and the target that trains on it see the same texts
in the same order; `response_start` marks where the response begins (for response-only loss).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from node.errors import UserError

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Example:
    """One corpus text; characters before `response_start` are the prompt."""

    text: str
    response_start: int


def corpus_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _from_record(rec: object, line_no: int, path: Path) -> Example:
    if not isinstance(rec, dict):
        raise UserError(f"corpus {path} line {line_no}", rec, "each line must be a JSON object")
    if isinstance(rec.get("text"), str) and "instruction" not in rec and "prompt" not in rec:
        return Example(rec["text"], 0)  # plain text (pretraining-style records): no template
    instruction = rec.get("instruction", rec.get("prompt"))
    response = rec.get("response", rec.get("output"))
    if not isinstance(instruction, str) or not isinstance(response, str):
        raise UserError(
            f"corpus {path} line {line_no}",
            sorted(rec),
            'give string fields "instruction" and "response"',
            problem="missing fields",
        )
    if isinstance(rec.get("input"), str) and rec["input"]:
        instruction = f"{instruction}\n\n{rec['input']}"
    prompt = PROMPT_TEMPLATE.format(instruction=instruction)
    return Example(prompt + response, len(prompt))


def load_corpus(path: Path) -> list[Example]:
    """Read a `.jsonl` instruction–response file, or any other file as blank-line-separated text."""
    path = Path(path)
    if not path.is_file():
        raise UserError("--corpus", str(path), "give an existing jsonl or text file", "not a file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        examples = []
        for no, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"corpus {path} line {no}", line[:80], "fix the JSON") from err
                examples.append(_from_record(rec, no, path))
    else:
        examples = [Example(p.strip(), 0) for p in raw.split("\n\n") if p.strip()]
    if not examples:
        raise UserError("--corpus", str(path), "give a file with at least one text", "empty corpus")
    return examples


def _arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    return {"instruction": f"What is {a} {op} {b}?", "response": f"{a} {op} {b} = {value}."}


def _passage_task(rng: random.Random, passage: str) -> dict[str, str]:
    words = passage.split()
    cut = max(1, len(words) // 3)
    if rng.random() < 0.5:
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        return {"instruction": f"Continue the text:\n{head}", "response": tail}
    first = passage.split(". ")[0].strip()
    return {"instruction": f"Summarise in one sentence:\n{passage}", "response": first}


def write_toy_corpus(out: Path, n: int = 200, seed: int = 0, max_chars: int = 400) -> Path:
    """Write an instruction–response jsonl made offline: pydoc passages and arithmetic Q/A."""
    from node.toymodels import shipped_text

    rng = random.Random(seed)
    passages = [
        " ".join(p.split())
        for p in shipped_text().split("\n\n")
        if 80 <= len(p) <= max_chars and p.isascii()
    ]
    rng.shuffle(passages)
    records = [
        _arithmetic(rng) if i % 3 == 2 else _passage_task(rng, passages[i % len(passages)])
        for i in range(n)
    ]
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(out)
    return out
