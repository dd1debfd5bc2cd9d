"""Offline domain corpora with deterministic train / held-out splits.

Four domains, all produced on this machine with no download: `arithmetic` and `logic`
(generated reasoning tasks with checkable answers), `python` (CPython's standard library
source) and `prose` (pydoc's English topic help). A held-out item is chosen by a hash of
its content, so the split never depends on the order in which items were produced.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout"]
DOMAINS = ("arithmetic", "logic", "python", "prose")
HELDOUT_SHARE = 0.1


@dataclass(frozen=True)
class Example:
    """One text of a domain; `prompt`/`answer` are set for tasks scored by exact match."""

    domain: str
    text: str
    prompt: str = ""
    answer: str = ""


def _split_of(key: str) -> Split:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return "heldout" if h / 2**32 < HELDOUT_SHARE else "train"


def _task(domain: str, prompt: str, answer: str) -> Example:
    return Example(domain=domain, text=f"{prompt} {answer}\n", prompt=prompt, answer=answer)


def arithmetic(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """Two-operand additions and subtractions: `Q: 47+38= A: 85`."""
    rng, out = random.Random(f"arith/{seed}"), list[Example]()
    while len(out) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        prompt = f"Q: {a}{op}{b}="
        if _split_of(prompt) == split:
            out.append(_task("arithmetic", prompt, f"A: {a + b if op == '+' else a - b}"))
    return out


def _truth(neg: bool, x: bool, op1: str, y: bool, op2: str, z: bool) -> bool:
    """Python's precedence: `not` binds tightest, then `and`, then `or`."""
    x = not x if neg else x
    if op1 == "and" and op2 == "and":
        return x and y and z
    if op1 == "or" and op2 == "or":
        return x or y or z
    if op1 == "and":  # (x and y) or z
        return (x and y) or z
    return x or (y and z)


def logic(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """Boolean expressions over T/F with and/or/not: `L: not T or F = F`."""
    rng, out = random.Random(f"logic/{seed}"), list[Example]()
    while len(out) < n:
        x, y, z = (rng.choice("TF") for _ in range(3))
        op1, op2 = rng.choice(["and", "or"]), rng.choice(["and", "or"])
        neg = rng.choice(["", "not "])
        expr = f"{neg}{x} {op1} {y} {op2} {z}"
        value = _truth(neg == "not ", x == "T", op1, y == "T", op2, z == "T")
        prompt = f"L: {expr} ="
        if _split_of(prompt) == split:
            out.append(_task("logic", prompt, "T" if value else "F"))
    return out


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size < 200_000)


def _chunks(text: str, size: int) -> Iterator[str]:
    for i in range(0, len(text), size):
        piece = text[i : i + size].strip()
        if len(piece) > size // 4:
            yield piece


def python_source(n: int, split: Split = "train", chunk_chars: int = 400) -> list[Example]:
    """Chunks of CPython standard-library modules (code, comments, docstrings)."""
    out: list[Example] = []
    for path in _stdlib_files():
        if _split_of(path.name) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        out.extend(Example("python", c) for c in _chunks(text, chunk_chars))
        if len(out) >= n:
            break
    return out[:n]


def prose(n: int, split: Split = "train", chunk_chars: int = 400) -> list[Example]:
    """Chunks of pydoc's English topic help, split by topic."""
    import pydoc_data.topics as topics

    out: list[Example] = []
    for key in sorted(topics.topics):
        if _split_of(f"topic/{key}") != split:
            continue
        out.extend(Example("prose", c) for c in _chunks(topics.topics[key], chunk_chars))
        if len(out) >= n:
            break
    return out[:n]


def arithlogic(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """A task that needs two skills at once: a sum and a boolean expression in one prompt,
    both answers required: `C: 47+38 ; not T or F = 85 ; F`.
    """
    rng, out = random.Random(f"arithlogic/{seed}"), list[Example]()
    while len(out) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        x, y, z = (rng.choice("TF") for _ in range(3))
        op1, op2 = rng.choice(["and", "or"]), rng.choice(["and", "or"])
        neg = rng.choice(["", "not "])
        value = _truth(neg == "not ", x == "T", op1, y == "T", op2, z == "T")
        prompt = f"C: {a}{op}{b} ; {neg}{x} {op1} {y} {op2} {z} ="
        number = a + b if op == "+" else a - b
        if _split_of(prompt) == split:
            out.append(_task("arithlogic", prompt, f"{number} ; {'T' if value else 'F'}"))
    return out


GENERATORS = {
    "arithmetic": arithmetic,
    "logic": logic,
    "python": python_source,
    "prose": prose,
    "arithlogic": arithlogic,
}
TWO_SKILL_DOMAINS = ("arithlogic",)  # not in DOMAINS: `unode eval`'s default stays the four


def load(domain: str, n: int, split: Split = "train") -> list[Example]:
    """`n` examples of one domain (fewer if the domain's split is smaller)."""
    from node.errors import UserError

    if domain not in GENERATORS:
        names = ", ".join(GENERATORS)
        raise UserError("domain", domain, f"use one of: {names}", "unknown domain")
    return GENERATORS[domain](n, split)
