"""The demo's result table: every model scored per domain with `node.eval.metrics`
(bits per byte; exact match on task domains), as rows for JSON and as aligned text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.demo.experts import DemoModels


@dataclass(frozen=True)
class Row:
    model: str
    kind: str  # base, expert, merge, searched merge, target, fused
    path: Path
    scores: dict[str, dict[str, float | None]]  # domain -> {bits_per_byte, exact_match}


def score(model: str, kind: str, path: Path, models: DemoModels) -> Row:
    from transformers.utils import logging as hf_logging

    from node.eval.metrics import evaluate

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    got = evaluate(path, list(models.domains), n=models.eval_n, n_generate=models.em_n)
    return Row(model, kind, path, {
        s.domain: {"bits_per_byte": s.bits_per_byte, "exact_match": s.exact_match} for s in got
    })  # fmt: skip


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        {"model": r.model, "kind": r.kind, "path": str(r.path), "scores": r.scores} for r in rows
    ]


def _cell(s: dict[str, float | None]) -> str:
    bpb, em = s["bits_per_byte"], s["exact_match"]
    text = "nan" if bpb is None or not math.isfinite(bpb) else f"{bpb:.3f}"
    return text if em is None else f"{text} / {em:.2f}"


def render(rows: list[Row], domains: tuple[str, ...]) -> str:
    """An aligned text table: bits per byte (lower is better) / exact match on task domains."""
    head = ["model", "kind", *domains]
    body = [[r.model, r.kind, *(_cell(r.scores[d]) for d in domains)] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*line) for line in body]
    lines.append("cells: bits per byte (lower is better) / exact match of generated answers")
    return "\n".join(lines)
