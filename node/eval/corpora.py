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


def _in(key: str, split: str) -> bool:
    """Whether the item named `key` falls in `split`, cut by a hash of the key. Any other split
    is refused: no item would ever fall in it, and a generator would loop forever."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r}: use 'train' or 'heldout'")
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return split == ("heldout" if h / 2**32 < HELDOUT_SHARE else "train")


def _task(domain: str, prompt: str, answer: str) -> Example:
    return Example(domain=domain, text=f"{prompt} {answer}\n", prompt=prompt, answer=answer)


def _fact(rng: random.Random) -> tuple[str, int]:
    """One single-digit sum or product: a table of 200 facts a small model can memorise."""
    a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+*")
    return f"{a}{op}{b}", a + b if op == "+" else a * b


def arithmetic(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """Single-digit sums and products: `Q: 7*8= A: 56`. The held-out split is the ~10 % of
    the 200 facts never trained (generalisation); `arithlogic` asks trained facts in new prompts.
    """
    rng, out = random.Random(f"arith/{seed}"), list[Example]()
    while len(out) < n:
        expr, value = _fact(rng)
        prompt = f"Q: {expr}="
        if _in(prompt, split):
            out.append(_task("arithmetic", prompt, f"A: {value}"))
    return out


def _truth(x: bool, op1: str, y: bool, op2: str, z: bool) -> bool:
    """`x op1 y op2 z` under Python's precedence (`and` binds tighter than `or`)."""
    if op1 == op2:
        return (x and y and z) if op1 == "and" else (x or y or z)
    return ((x and y) or z) if op1 == "and" else (x or (y and z))


def _expression(rng: random.Random) -> tuple[str, str]:
    """Three T/F operands, each optionally negated, joined by and/or (256 expressions), and its
    value under Python's precedence (`not`, then `and`, then `or`).
    """
    negs = [rng.random() < 0.5 for _ in range(3)]
    names = [rng.choice("TF") for _ in range(3)]
    op1, op2 = rng.choice(["and", "or"]), rng.choice(["and", "or"])
    x, y, z = ((n == "T") != neg for n, neg in zip(names, negs, strict=True))
    value = _truth(x, op1, y, op2, z)
    t = [("not " if neg else "") + n for n, neg in zip(names, negs, strict=True)]
    return f"{t[0]} {op1} {t[1]} {op2} {t[2]}", "T" if value else "F"


def logic(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """Boolean expressions over T/F with and/or/not: `L: not T or F and not F = T`."""
    rng, out = random.Random(f"logic/{seed}"), list[Example]()
    while len(out) < n:
        expr, value = _expression(rng)
        prompt = f"L: {expr} ="
        if _in(prompt, split):
            out.append(_task("logic", prompt, value))
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
        if not _in(path.name, split):
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
        if not _in(f"topic/{key}", split):
            continue
        out.extend(Example("prose", c) for c in _chunks(topics.topics[key], chunk_chars))
        if len(out) >= n:
            break
    return out[:n]


def arithlogic(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """A task that needs two skills at once: a fact and a boolean expression in one prompt,
    both answers required, the truth value first (next to its expression, as in `logic`):
    `C: 7*8 ; not T or F and T = F ; 56`.
    """
    rng, out = random.Random(f"arithlogic/{seed}"), list[Example]()
    while len(out) < n:
        (calc, number), (expr, truth) = _fact(rng), _expression(rng)
        prompt = f"C: {calc} ; {expr} ="
        if _in(prompt, split):
            out.append(_task("arithlogic", prompt, f"{truth} ; {number}"))
    return out


def two_skill_parts(answer: str) -> tuple[str, str]:
    """The arithmetic and the logic half of an `arithlogic` answer (`"F ; 56"` -> 56, F)."""
    truth, _, number = answer.partition(" ; ")
    return number, truth


GENERATORS = {
    "arithmetic": arithmetic,
    "logic": logic,
    "python": python_source,
    "prose": prose,
    "arithlogic": arithlogic,
}
TWO_SKILL_DOMAINS = ("arithlogic",)

# Session 1's reasoning generators, kept under their own names: the real-model figures
# (bench/real_*.py, docs/real-models.md) were measured on them, and two-digit sums suit
# pretrained models better than the zoo's single-digit facts. Same seeds, same texts as then.


def arithmetic2(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """Two-operand additions and subtractions below 100: `Q: 47+38= A: 85`."""
    rng, out = random.Random(f"arith/{seed}"), list[Example]()
    while len(out) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        prompt = f"Q: {a}{op}{b}="
        if _in(prompt, split):
            out.append(_task("arithmetic2", prompt, f"A: {a + b if op == '+' else a - b}"))
    return out


def logic64(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """Boolean expressions with one optional `not` in front (64 of them): `L: not T or F = F`."""
    rng, out = random.Random(f"logic/{seed}"), list[Example]()
    while len(out) < n:
        x, y, z = (rng.choice("TF") for _ in range(3))
        op1, op2 = rng.choice(["and", "or"]), rng.choice(["and", "or"])
        neg = rng.choice(["", "not "])
        a, b, c = ((v == "T") != (i == 0 and neg != "") for i, v in enumerate((x, y, z)))
        value = _truth(a, op1, b, op2, c)
        prompt = f"L: {neg}{x} {op1} {y} {op2} {z} ="
        if _in(prompt, split):
            out.append(_task("logic64", prompt, "T" if value else "F"))
    return out


GENERATORS["arithmetic2"] = arithmetic2
GENERATORS["logic64"] = logic64  # not in DOMAINS: `unode eval`'s default stays the four


def load(domain: str, n: int, split: Split = "train") -> list[Example]:
    """`n` examples of one domain (fewer if the domain's split is smaller)."""
    from node.errors import UserError

    if domain not in GENERATORS:
        names = ", ".join(GENERATORS)
        raise UserError("domain", domain, f"use one of: {names}", "unknown domain")
    return GENERATORS[domain](n, split)
