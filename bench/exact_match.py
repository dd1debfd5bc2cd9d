"""Greedy exact match, one prompt at a time vs prompts of one token length batched together.

Side by side in one process on the built-in zoo (`unode zoo build`): every model, the three
reasoning tasks of the held-out split. Prints both times, the ratio, and whether every
prompt's verdict is the same.

    .venv/bin/python bench/exact_match.py [--zoo DIR] [--n 200] [--batch-size 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from node.eval import corpora
from node.eval.metrics import greedy_hits
from node.zoo import default_dir

TASKS = ("arithmetic", "logic", "arithlogic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo directory (default: the built one)")
    ap.add_argument("--n", type=int, default=200, help="held-out prompts per task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the zoo's eval: 1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    zoo = args.zoo or default_dir()
    models = sorted(p.parent for p in zoo.glob("*/model.safetensors"))
    if not models:
        print(f"error: --zoo {zoo}: no models there; build them with `unode zoo build`", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows: list[dict[str, Any]] = []
    for path in models:
        tok = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for task in TASKS:
            examples = corpora.load(task, args.n, "heldout")
            t0 = time.perf_counter()
            one = greedy_hits(model, tok, examples, batch_size=1)
            t1 = time.perf_counter()
            many = greedy_hits(model, tok, examples, batch_size=args.batch_size)
            t2 = time.perf_counter()
            rows.append(
                {
                    "model": path.name,
                    "task": task,
                    "one_at_a_time_s": round(t1 - t0, 3),
                    "batched_s": round(t2 - t1, 3),
                    "same_verdicts": one == many,
                    "exact_match": sum(many) / len(many),
                }
            )
            if not args.json:
                r = rows[-1]
                print(
                    f"{r['model']:13s} {task:10s} one at a time {r['one_at_a_time_s']:7.2f} s"
                    f"  batched {r['batched_s']:6.2f} s  x{(t1 - t0) / (t2 - t1):5.1f}"
                    f"  same verdicts {r['same_verdicts']}  exact match {r['exact_match']:.3f}",
                    flush=True,
                )
    one_s = sum(r["one_at_a_time_s"] for r in rows)
    many_s = sum(r["batched_s"] for r in rows)
    summary = {
        "n": args.n,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "one_at_a_time_s": round(one_s, 2),
        "batched_s": round(many_s, 2),
        "speedup": round(one_s / many_s, 2),
        "all_verdicts_same": all(r["same_verdicts"] for r in rows),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"total: one at a time {one_s:.1f} s, batched {many_s:.1f} s: "
            f"{one_s / many_s:.1f}x; every verdict the same: {summary['all_verdicts_same']}"
        )


if __name__ == "__main__":
    main()
