"""Heterogeneous fusion on real models: Gemma-3-270M and SmolLM2-135M summaries over an offline
instruction–response corpus, fused into SmolLM2-135M with `unode fuse`, against SmolLM2 itself
and SmolLM2 after the same CLM-only continual training (λ = 1, FuseLLM's controlled comparison).

Every step is the real CLI (`unode summarize`, `unode fuse`) in a subprocess; steps whose output
exists are skipped (re-run to resume). Needs `make real` and both models imported.

    .venv/bin/python bench/real_fusion.py --work bench/_work/real/fusion
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.eval import corpora, metrics

DOMAINS = ("arithmetic2", "logic64", "python", "prose")  # session 1's generators (corpora.py)
UNODE = str(Path(sys.executable).with_name("unode"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _records(domain: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    """Instruction–response records from a domain's train split (never its held-out split)."""
    if domain in ("arithmetic2", "logic64"):
        tasks = corpora.load(domain, 6 * n, "train")
        what = "sums and differences" if domain == "arithmetic2" else "boolean expressions"
        return [
            {"instruction": f"Solve these {what}, one per line.",
             "response": "".join(t.text for t in tasks[6 * i : 6 * i + 6])}
            for i in range(n)
        ]  # fmt: skip
    texts = [e.text for e in corpora.load(domain, 4 * n, "train")]
    rng.shuffle(texts)
    what = "Python code" if domain == "python" else "text"
    out = []
    for text in texts[:n]:
        cut = len(text) // 3
        out.append({"instruction": f"Continue this {what}:\n{text[:cut]}", "response": text[cut:]})
    return out


def write_corpus(path: Path, per_domain: int) -> Path:
    if path.exists():
        return path
    rng = random.Random(0)
    records = [r for d in DOMAINS for r in _records(d, per_domain, rng)]
    rng.shuffle(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_parallel(steps: list[tuple[list[str], Path]]) -> list[float]:
    """CLI steps side by side, each with its output in its log file; seconds of each."""
    t0, procs = time.perf_counter(), []
    done: dict[int, float] = {}
    for cmd, logfile in steps:
        log(" ".join(cmd[1:]))
        procs.append(
            (subprocess.Popen(cmd, stdout=logfile.open("w"), stderr=subprocess.STDOUT), logfile)
        )
    while len(done) < len(procs):
        for i, (p, logfile) in enumerate(procs):
            if i not in done and p.poll() is not None:
                if p.returncode != 0:
                    raise SystemExit(f"step failed ({p.returncode}); see {logfile}")
                done[i] = time.perf_counter() - t0
        time.sleep(2)
    return [done[i] for i in range(len(procs))]


def summarize_cmd(model: Path, corpus: Path, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [UNODE, "summarize", "--model", str(model), "--corpus", str(corpus), "--out", str(out),
           "--max-len", str(args.max_len), "--batch-size", "4", "--shard-size", "64"]  # fmt: skip
    return cmd


def fuse_cmd(lam: float, out: Path, summaries: list[Path], args: argparse.Namespace) -> list[str]:
    cmd = [UNODE, "fuse", "--target", str(args.smollm2), "--corpus", str(args.corpus),
           "--out", str(out), "--lam", str(lam), "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", "5",
           "--max-len", str(args.max_len), "--vocab-map", args.vocab_map, "--save-every", "1000"]  # fmt: skip
    for s in summaries:
        cmd += ["--summaries", str(s)]
    return cmd


def evaluate_small_batches(model_dir: Path, n: int, batch_size: int = 2) -> str:
    """What `unode eval --json` computes (same examples, same metrics), in small batches:
    its batch of 16 rows × 256 positions × a 262k vocabulary is 4.3 GB of logits per copy,
    which is how session 1's Gemma-3 eval died."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    scores = []
    for domain in DOMAINS:
        examples = corpora.load(domain, n, "heldout")
        bpb = metrics.bits_per_byte(model, tok, [e.text for e in examples], batch_size)
        tasks = [e for e in examples if e.answer][:32]  # metrics.evaluate's n_generate
        em = metrics.exact_match(model, tok, tasks) if tasks else None
        scores.append(metrics.DomainScore(domain, bpb, em, len(examples)))
    return json.dumps({"model": str(model_dir), "scores": metrics.as_json(scores)}, indent=2)


def evaluate(model: Path, n: int, cache: Path) -> dict[str, Any]:
    """Per-domain held-out scores with `unode eval --json` (its own process: memory); models
    with a vocabulary over 100k in small batches in this process."""
    if not cache.exists() or cache.stat().st_size == 0:  # an interrupted run leaves it empty
        if json.loads((model / "config.json").read_text()).get("vocab_size", 0) > 100_000:
            cache.write_text(evaluate_small_batches(model, n))
        else:
            res = subprocess.run([UNODE, "eval", str(model), "--n", str(n), "--json"],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            cache.write_text(res.stdout)
    return {s["domain"]: s for s in json.loads(cache.read_text())["scores"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("bench/_work/real/fusion"))
    ap.add_argument("--smollm2", type=Path, default=Path("bench/_work/real/smollm2"))
    ap.add_argument("--gemma", type=Path, default=Path("bench/_work/real/gemma3"))
    ap.add_argument("--per-domain", type=int, default=25)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--lam", type=float, default=0.9)
    ap.add_argument("--vocab-map", default="exact")
    ap.add_argument("--n", type=int, default=16, help="held-out examples per domain")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.corpus = write_corpus(args.work / "corpus.jsonl", args.per_domain)
    t: dict[str, float] = {}
    sums = {"gemma": args.work / "sum_gemma3", "smollm2": args.work / "sum_smollm2"}
    todo = {
        f"summarize {name}": (model, sums[name])
        for name, model in (("gemma", args.gemma), ("smollm2", args.smollm2))
        if not (sums[name] / "manifest.json").exists()
    }
    steps = [
        (summarize_cmd(m, args.corpus, o, args), o.with_suffix(".log")) for m, o in todo.values()
    ]
    t.update(zip(todo, run_parallel(steps), strict=True))
    both = [sums["smollm2"], sums["gemma"]]
    runs = {f"fuse (lam={args.lam:g})": (args.lam, args.work / "fused"),
            "clm only (lam=1)": (1.0, args.work / "clm_only")}  # fmt: skip
    todo = {k: v for k, v in runs.items() if not v[1].exists()}
    steps = [
        (fuse_cmd(lam, out, both, args), out.with_suffix(".log")) for lam, out in todo.values()
    ]
    t.update(zip(todo, run_parallel(steps), strict=True))
    models = {"SmolLM2-135M": args.smollm2, "SmolLM2 + CLM only": args.work / "clm_only",
              "SmolLM2 fused (Gemma+SmolLM2)": args.work / "fused", "Gemma-3-270M": args.gemma}  # fmt: skip
    rows = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        rows[name] = evaluate(path, args.n, args.work / f"eval_{path.name}.json")
        t[f"eval {name}"] = time.perf_counter() - t0
        log(f"evaluated {name}")
    lineage = json.loads((args.work / "fused" / "lineage.json").read_text())
    out = {"settings": {k: str(v) for k, v in vars(args).items()}, "scores": rows,
           "timings": t, "lineage": lineage}  # fmt: skip
    (args.work / "results.json").write_text(json.dumps(out, indent=2))
    print(f"{'model':<30} " + " ".join(f"{d:>11}" for d in DOMAINS) + f" {'mean':>7}  EM a/l")
    for name, r in rows.items():
        b = [r[d]["bits_per_byte"] for d in DOMAINS]
        em = "/".join(f"{r[d]['exact_match']:.2f}" for d in ("arithmetic2", "logic64"))
        print(f"{name:<30} " + " ".join(f"{x:>11.4f}" for x in b) + f" {np.mean(b):>7.4f}  {em}")
    print("timings (s, under load):", json.dumps({k: round(v, 1) for k, v in t.items()}))


if __name__ == "__main__":
    main()
